"""Step time of one inference method at two code versions, in ONE process (interleaved rounds).

    .venv/bin/python benchmarks/step_ab.py --before 7acd8a4 [--methods noisy-adam,bbb] [--rounds 30]

Separate runs of ``train_bench.py`` on a shared 2-core machine differ by 20-30 % from one minute to the
next, more than a pass-level change; this script loads the ``--before`` commit's copy of each method's
module (and of ``certbnn/inference/flat.py``, the fused helpers) from git under private names and times
both versions' steps with robust SGD's, round by round (best of ``--rounds``), on the benchmark's problem
(MNIST MLP 784-512-10, batch 128, IBP eps 0.11, lam 0.25). Prints ms per step and the ratio to SGD's step.
"""

from __future__ import annotations

import argparse
import importlib
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from certbnn.inference import make_method
from certbnn.models import build_model
from certbnn.priors import prior_from_model

sys.path.insert(0, str(Path(__file__).parent))
from train_bench import BATCH, best_times, method_stepper, training_batches  # noqa: E402

MODULES = {"noisy-adam": "noisy_adam", "bbb": "bbb", "sgd": "sgd", "adam": "sgd", "swag": "swag", "sghmc": "sghmc"}


def load_old(rev: str, module: str, folder: Path):
    """The ``rev`` version of ``certbnn.inference.<module>``, its ``flat``/``bbb`` imports redirected to
    the same revision's copies (imported as ``old_<name>``)."""
    for name in {"flat", "bbb", module}:
        source = subprocess.run(
            ["git", "show", f"{rev}:src/certbnn/inference/{name}.py"], capture_output=True, text=True, check=True
        ).stdout
        source = re.sub(r"from certbnn\.inference\.(flat|bbb) import", r"from old_\1 import", source)
        (folder / f"old_{name}.py").write_text(source.replace("@register_method\n", ""))
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    return importlib.import_module(f"old_{module}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", required=True, help="git revision of the 'before' code")
    parser.add_argument("--methods", default="noisy-adam,bbb", help="comma-separated method names")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_model("mnist-mlp", (1, 28, 28), 10)
    batches, source = training_batches("mnist", (1, 28, 28), BATCH)
    prior = prior_from_model(model)
    cases = {"sgd": method_stepper(make_method("sgd", prior=prior, num_data=60000), model, "ibp", batches)}
    with tempfile.TemporaryDirectory() as folder:
        for name in args.methods.split(","):
            new = make_method(name, prior=prior, num_data=60000)
            old_module = load_old(args.before, MODULES[name], Path(folder))
            old = getattr(old_module, type(new).__name__)(prior=prior, num_data=60000)
            cases[f"{name} now"] = method_stepper(new, model, "ibp", batches)
            cases[f"{name} {args.before}"] = method_stepper(old, model, "ibp", batches)
        print(f"# data: {source}; threads {torch.get_num_threads()}; best of {args.rounds} rounds of 20 steps")
        times = best_times(cases, args.rounds, 20)
    for name, seconds in times.items():
        print(f"{name:24s} {seconds * 1e3:7.2f} ms  {seconds / times['sgd']:.3f} x sgd")


if __name__ == "__main__":
    main()
