"""Evaluate trained MNIST runs at a test radius: clean accuracy, per-sample IBP
certification rate, and the paper's protocol (first 100 test images, 24 samples).

    CERTBNN_DATA=../shared/data .venv/bin/python benchmarks/mnist_certify_runs.py RUN_DIR [RUN_DIR ...] [--eps 0.1]

Prints a Markdown table (one row per run) with the training time from metrics.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from certbnn import data
from certbnn.models import build_model
from certbnn.posterior import load_posterior
from certbnn.validation import validate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--eps", type=float, default=0.1)
    args = parser.parse_args()
    test = data.load("mnist", "test")
    print(
        f"| run | clean acc (10k, 24 samples) | IBP certified rate at {args.eps} (10k) | "
        f"paper protocol certified acc at {args.eps} (first 100, 24 samples) | s / epoch | examples / s |"
    )
    print("|---|---|---|---|---|---|")
    for run in args.runs:
        metrics = json.loads((run / "metrics.json").read_text())
        model = build_model(metrics["config"]["model"], (1, 28, 28), 10)
        posterior, _ = load_posterior(run / "posterior.safetensors", expected_fingerprint=model)
        with torch.no_grad():
            full = validate(model, posterior, test, args.eps, num_samples=24, seed=0, prefix="")
            first = validate(model, posterior, test.subset(slice(0, 100)), args.eps, num_samples=24, seed=0, prefix="")
        print(
            f"| {run.name} | {full['accuracy']:.4f} | {full['certified']:.4f} | "
            f"{first['certified_accuracy_ibp']:.2f} | {metrics['seconds_per_epoch']:.2f} | "
            f"{metrics['examples_per_second']:.0f} |"
        )


if __name__ == "__main__":
    main()
