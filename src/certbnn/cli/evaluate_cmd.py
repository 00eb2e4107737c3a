"""``certbnn evaluate RUN_DIR``: attacks, certificates, calibration and OOD of a trained run."""

from __future__ import annotations

import argparse

from certbnn import strict_json
from certbnn.cli.options import add_device_option
from certbnn.evaluation import ATTACKS, CERTIFICATES


def _list(kind):
    """Comma-separated values of ``kind``; '' is the empty list, an empty item ('0.1,,0.2') an error."""

    def parse(text: str):
        items = [t.strip() for t in text.split(",")] if text.strip() else []
        if any(not t for t in items):
            raise argparse.ArgumentTypeError(f"empty item in {text!r}")
        return [kind(t) for t in items]

    return parse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="attack, certify and calibrate a trained run",
        description="Evaluate the posterior in RUN_DIR on the first --limit test points: accuracy, NLL, Brier, "
        "ECE and uncertainty; FGSM/PGD accuracy of the posterior predictive (EOT); certificates; "
        "OOD AUROC. Writes evaluation.json, report.md and plots to --out (default RUN_DIR).",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a directory written by `certbnn train`")
    p.add_argument("--eps", type=_list(float), default=[0.1], help="radii, comma-separated (default 0.1)")
    p.add_argument(
        "--attacks",
        type=_list(str),
        default=list(ATTACKS),
        help=f"attacks on the predictive, comma-separated from {','.join(ATTACKS)} (default both; '' for none)",
    )
    p.add_argument(
        "--certificates",
        type=_list(str),
        default=["per-sample", "paper", "statistical"],
        help=f"comma-separated from {','.join(CERTIFICATES)}: per-sample = fraction of sampled nets "
        "certified; paper = the authors' protocol (24 samples); statistical = exact one-sided "
        "binomial test of P_rob >= --threshold at --confidence; weight-box = sound lower bound on "
        "P_rob (Gaussian mass of a verified weight box) >= --threshold (Gaussian posteriors); "
        "decision = the predictive's argmax cannot change "
        "(default per-sample,paper,statistical)",
    )
    p.add_argument("--bound", choices=["ibp", "crown-ibp", "crown"], default="ibp", help="bound method (default ibp)")
    p.add_argument("--float64", action="store_true", help="predictions and attacks in float64 (default float32)")
    p.add_argument(
        "--certify-float32",
        action="store_true",
        help="certificates in float32: faster, still rigorous (outward rounding) but looser (default float64)",
    )
    p.add_argument("--limit", type=int, default=1000, help="evaluate N test points (default 1000)")
    p.add_argument(
        "--points",
        choices=["first", "spread"],
        default="first",
        help="which N: the first (the paper's protocol; default) or evenly spaced over the test set "
        "(use for class-sorted test sets such as the CIFAR-10 JPEG copy)",
    )
    p.add_argument(
        "--samples", type=int, default=24, help="posterior samples K for predictions and attacks (default 24)"
    )
    p.add_argument("--pgd-steps", type=int, default=20, help="PGD steps (default 20)")
    p.add_argument("--pgd-restarts", type=int, default=1, help="PGD random restarts (default 1)")
    p.add_argument(
        "--confidence",
        type=float,
        default=0.99,
        help="statistical certificate: 1 - level of the one-sided test of P_rob >= --threshold (default 0.99)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=0.5,
        help="statistical and weight-box certificates: lower bound on P_rob needed (default 0.5)",
    )
    p.add_argument(
        "--weight-box-refine",
        type=int,
        default=0,
        help="weight-box certificate: rounds of per-point, per-tensor pattern search on the box radii "
        "after the shared grid of common k, each 2 x (parameter tensors) x 6 bound passes per "
        "point (slow: default 0, the common k only)",
    )
    p.add_argument(
        "--paper-arithmetic",
        choices=["sound", "authors"],
        default="sound",
        help="paper certificate's logit bounds: sound = rigorous in floating point (outward rounding, "
        "in --certify-float32's dtype; default), authors = the authors' plain round-to-nearest "
        "float32 IBP (reproduces their numbers; not a sound bound)",
    )
    p.add_argument("--ood", metavar="DATASET", help="out-of-distribution test set, e.g. fashion-mnist")
    p.add_argument("--ood-fgsm-eps", type=float, help="also score FGSM examples at this eps as OOD (paper: 0.3)")
    p.add_argument(
        "--radius",
        action="store_true",
        help="certified radius per point by bisection (decision certificate, the same --samples draws); "
        "stored per point in evaluation.json and drawn as the full certified-accuracy curve in "
        "certified_vs_eps.png (about 12 certificate calls per point)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for posterior samples and attack starts")
    p.add_argument(
        "--chunk-size",
        type=int,
        default=250,
        help="test points per attack / certificate call; smaller uses less memory (default 250)",
    )
    add_device_option(p)
    p.add_argument("--data-dir", help="data directory (default: the run's, then the usual search)")
    p.add_argument("--out", help="output directory (default RUN_DIR)")
    p.add_argument("--json", action="store_true", help="also print evaluation.json")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(handler=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    from certbnn import distributed
    from certbnn.evaluation.runner import EvalOptions, evaluate_run, render_report

    options = EvalOptions(
        eps=args.eps,
        attacks=args.attacks,
        certificates=args.certificates,
        bound=args.bound,
        float64=args.float64,
        certify_float32=args.certify_float32,
        limit=args.limit,
        points=args.points,
        samples=args.samples,
        pgd_steps=args.pgd_steps,
        pgd_restarts=args.pgd_restarts,
        confidence=args.confidence,
        threshold=args.threshold,
        weight_box_refine=args.weight_box_refine,
        paper_arithmetic=args.paper_arithmetic,
        ood=args.ood,
        ood_fgsm_eps=args.ood_fgsm_eps,
        radius=args.radius,
        seed=args.seed,
        data_dir=args.data_dir,
        device=args.device,
        chunk_size=args.chunk_size,
    )
    results = evaluate_run(args.run_dir, options, args.out, progress=not args.no_progress)
    comm = distributed.current()
    if comm is not None and not comm.is_main:  # rank 0 reports
        return 0
    print(strict_json.dumps(results, indent=2) if args.json else render_report(results))
    return 0
