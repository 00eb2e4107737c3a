"""``certbnn demo``: a robust and a standard BNN trained, certified and attacked in a few minutes."""

from __future__ import annotations

import argparse
import time

from certbnn.cli.options import add_device_option


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="train, certify and attack a robust and a standard BNN (a few minutes on a laptop)",
        description="Train Bayes-by-Backprop BNNs on MNIST (else Fashion-MNIST; downloaded when missing and "
        "there is internet) with the standard and the IBP-robust likelihood, certify and attack "
        "them, and write OUT/RESULTS.md, OUT/results.json and plots. Rerunning resumes.",
    )
    p.add_argument("--out", "-o", default="certbnn-demo", metavar="DIR", help="output directory (default certbnn-demo)")
    add_device_option(p)
    p.add_argument("--data-dir", help="data directory (default: $CERTBNN_DATA, the usual search)")
    p.add_argument("--epochs", type=int, help="training epochs (default 5)")
    p.add_argument("--no-download", action="store_true", help="never download; fail if no data set is found")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(handler=run_demo_command)


def run_demo_command(args: argparse.Namespace) -> int:
    from certbnn.reproduce.demo import run_demo, summary

    start = time.perf_counter()
    overrides = {"epochs": args.epochs} if args.epochs is not None else {}
    results = run_demo(
        args.out,
        device=args.device,
        data_dir=args.data_dir,
        progress=not args.no_progress,
        fetch=not args.no_download,
        overrides=overrides,
        log=lambda line: print(line, flush=True),
    )
    print()
    print(summary(results))
    print(f"\nreport: {args.out}/RESULTS.md (plots beside it); {time.perf_counter() - start:.0f} s")
    return 0
