"""``certbnn train``: fit a (robust) posterior; flags mirror the TOML config keys."""

from __future__ import annotations

import argparse
from pathlib import Path

from certbnn.config import FIELDS, TrainConfig, load_saved_config, load_toml, make_config, parse_option

_TYPES = {"int": int, "float": float, "str": str, "bool": bool}

HELP = {
    "dataset": "data set: a name (mnist, fashion-mnist, cifar10, or a folder NAME/data.npz under a data root), "
    "or PATH.npz with arrays x_train, y_train, x_test, y_test (docs/data.md); an npz file's path and "
    "sha256 are recorded in config.json and checked again by resume and evaluate",
    "dataset_sha256": "refuse to train unless the npz data set has this sha256 (recorded automatically)",
    "data_dir": "directory holding the data set (default: $CERTBNN_DATA, user cache, /usr/share/datasets)",
    "model": "architecture: mlp:512 (the paper's MNIST MLP), mlp:1024,512, cifar-small, cnn:16c4,32c4,p2,100[@tanh], "
    "or your own nn.Module as package.module:factory. A plug-in IMPORTS AND RUNS YOUR PYTHON CODE (from "
    "PYTHONPATH and the current folder): factory() or factory(input_shape, num_classes) returns the module "
    "(docs/training.md, Plug-in models); nothing else on the command line imports code",
    "method": "inference method: sgd, adam, bbb, noisy-adam, vogn, swag, hmc, sghmc",
    "likelihood": "standard (plain softmax; alias categorical), ibp / crown-ibp / crown (certifiably robust), "
    "fgsm / pgd (adversarial); gaussian (regression) is for the Python API: every CLI data set is a classification",
    "lam": "weight of the clean term in the robust/adversarial mixture, in [0, 1] (paper: 0.25)",
    "mix": "prob: -log(lam p + (1-lam) p_worst) (the paper's); loss: lam CE + (1-lam) CE_worst",
    "margins": "build worst-case logits from margin bounds z_y - z_j (tighter than separate logit bounds)",
    "eps": "training radius in pixel units, reached by the linear ramp (paper MNIST: 0.11)",
    "warmup_epochs": "epochs at eps = 0 before the ramp starts",
    "ramp_fraction": "fraction of the post-warm-up steps over which eps ramps linearly, then holds",
    "lam_start": "clean weight lambda during warm-up and at the ramp's start, ramped linearly to --lam with eps "
    "(the kappa schedule of Gowal et al. 2018: 1 -> 0.5); unset: --lam throughout",
    "beta": "crown-ibp only: train on beta * CROWN-IBP + (1 - beta) * IBP bounds (0 = plain IBP) once eps is reached",
    "beta_start": "crown-ibp only: beta at the ramp's start, ramped linearly to --beta with eps (Zhang et al. 2020: "
    "--beta-start 1 --beta 0); unset: --beta throughout",
    "lr_schedule": "auto (default: cosine for the optimisers, constant for hmc / sghmc / swag), constant, or cosine: "
    "the learning rate holds while eps ramps, then decays to 0 along a half cosine over the remaining steps (over all "
    "steps for standard training); cosine is for optimisers only, not hmc / sghmc / swag",
    "epochs": "training epochs (full-batch HMC: proposals)",
    "batch_size": "minibatch size",
    "lr": "learning rate (HMC's step size is a method option: --opt step_size=...)",
    "kl_weight": "posterior temperature T: train towards p(D|w)^(1/T) p(w); the KL weight of bbb / noisy-adam / "
    "vogn (weight of KL/N in the ELBO), the prior_weight of sgd / adam / swag, the temperature of hmc / "
    "sghmc (potential (N/T) mean nll - log p(w)). The default 0.01 is a "
    "tempered posterior, common practice for BNNs: it trains and certifies far better than T = 1 "
    "(docs/training.md, Defaults). --kl-weight 1 gives the proper ELBO / Bayesian posterior. "
    "metrics.json and the posterior file record the value used",
    "prior_scale": "prior variance = prior_scale / fan_in, per layer",
    "seed": "random seed: held-out split, initialisation, shuffling and weight noise",
    "limit_train": "train on only the first N (shuffled) training examples",
    "augment": "append N randomly rotated / zoomed / shifted / flipped copies of training images "
    "(paper CIFAR-10: 40000)",
    "augment_each_epoch": "draw the --augment copies afresh every epoch (on-the-fly augmentation, against "
    "overfitting the fixed copies); the first epoch uses the fixed copies; not for hmc",
    "val_size": "training examples held out for per-epoch validation (0 disables)",
    "val_samples": "posterior samples used by the per-epoch validation",
    "test_size": "score only the first N test points into metrics.json at the end (default: all)",
    "parallel": "under torchrun: data = every process takes a shard of each batch (one posterior); chains = "
    "every process runs its own HMC / SG-HMC chain on all the data, samples pooled, R-hat and ESS reported",
    "device": "cpu, cuda[:N] or auto (GPU when available)",
    "init_from": "warm start: a posterior file or run directory (same architecture) whose mean gives the "
    "initial weights, e.g. an SGD run before HMC",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a (certifiably robust) Bayesian neural network",
        description="Train a posterior with the chosen inference method and likelihood. Settings come "
        "from the defaults, then --config FILE.toml, then flags. Writes RUN_DIR/config.json, "
        "checkpoint.safetensors (every epoch), posterior.safetensors and metrics.json.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--out", "-o", required=True, metavar="RUN_DIR", help="run directory to write")
    parser.add_argument("--config", metavar="FILE", help="TOML file with any of the settings below")
    parser.add_argument(
        "--resume",
        action="store_true",
        default=False,
        help="continue the run in RUN_DIR from its last checkpoint (same settings)",
    )
    parser.add_argument("--no-progress", action="store_true", default=False, help="hide progress bars")
    parser.add_argument(
        "--opt",
        action="append",
        metavar="KEY=VALUE",
        dest="method_opt",
        help="method option, e.g. --opt num_leapfrog=25 (repeatable)",
    )
    parser.add_argument(
        "--lik-opt",
        action="append",
        metavar="KEY=VALUE",
        dest="likelihood_opt",
        help="likelihood option, e.g. --lik-opt steps=20 (repeatable)",
    )
    for name, f in FIELDS.items():
        if name in ("method_options", "likelihood_options", "dataset_file"):  # tables; recorded, not set
            continue
        flag = "--" + name.replace("_", "-")
        kind = _TYPES[str(f.type).removesuffix(" | None")]
        help_text = f"{HELP[name]} (default {per_method_defaults(name) or f.default})"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(flag, type=kind, help=help_text)
    parser.set_defaults(handler=run_train)


def per_method_defaults(name: str) -> str | None:
    """'per method: sgd 0.1, adam 0.003, ...' for the config keys whose default is the method's own
    (``lr``, ``kl_weight``), read off the method classes so the help cannot drift from the code."""
    import dataclasses

    from certbnn.inference.base import method_class, method_names
    from certbnn.training import TEMPERATURE_OPTIONS

    if name not in ("lr", "kl_weight"):
        return None
    parts = []
    for method in method_names():
        option = "lr" if name == "lr" else TEMPERATURE_OPTIONS.get(method)
        cls = method_class(method)
        field = next((f for f in dataclasses.fields(cls) if f.name == option), None)
        if field is not None and field.default is not dataclasses.MISSING:
            default = field.default  # None: a default that depends on N (the class's default_text)
            text = getattr(cls, "default_text", {}).get(option, "auto") if default is None else f"{default:g}"
            parts.append(f"{method} {text}")
    return "per method: " + ", ".join(parts)


def run_train(args: argparse.Namespace) -> int:
    from certbnn.training import CONFIG, train

    given = {k: v for k, v in vars(args).items() if k in FIELDS}
    if args.__dict__.get("method_opt"):
        given["method_options"] = dict(parse_option(o) for o in args.method_opt)
    if args.__dict__.get("likelihood_opt"):
        given["likelihood_options"] = dict(parse_option(o) for o in args.likelihood_opt)
    file_values = load_toml(args.config) if getattr(args, "config", None) else {}
    if args.resume:
        saved_path = Path(args.out) / CONFIG
        if not saved_path.exists():
            from certbnn.errors import CertbnnError

            raise CertbnnError(f"{args.out}: nothing to resume (no {CONFIG})")
        saved = load_saved_config(saved_path)
        config = make_config(saved)
        if given or file_values:
            _refuse_changed_settings(config, make_config(saved, file_values, given))
    else:
        config = make_config(file_values, given)
    metrics = train(config, args.out, resume=args.resume, progress=not args.no_progress)
    if not metrics:  # a non-zero rank of a distributed run: rank 0 reports
        return 0
    final = metrics["final"]
    summary = ", ".join(f"{k} {final[k]:.4f}" for k in ("test_accuracy", "certified_accuracy_ibp") if k in final)
    print(f"wrote {args.out} ({summary}; {metrics['seconds_per_epoch']:.1f} s per epoch)")
    return 0


def _refuse_changed_settings(saved: TrainConfig, requested: TrainConfig) -> None:
    """A resume may repeat the launch command: settings equal to the saved ones are accepted,
    any other value is refused in one line that names it (saved and given)."""
    old, new = saved.to_json(), requested.to_json()
    changed = [f"{key} (saved {old[key]!r}, given {new[key]!r})" for key in old if old[key] != new.get(key)]
    if changed:
        from certbnn.errors import ConfigError

        raise ConfigError("--resume continues a run with its saved settings; these differ: " + "; ".join(changed))
