"""Evaluation throughput (issue 5 targets) on a trained MNIST MLP run.

    CERTBNN_DATA=../shared/data .venv/bin/python benchmarks/eval_bench.py RUN_DIR

1. the `paper` certificate (24 samples, IBP) on the full 10,000-image MNIST test set;
2. PGD-20 against the posterior predictive with K = 10 samples on 1,000 test images.
Prints the seconds of each and the certified / adversarial accuracy.
"""

from __future__ import annotations

import sys
import time

import torch

from certbnn import data
from certbnn.evaluation import certify, robustness
from certbnn.evaluation.runner import load_run


def main(run_dir: str) -> None:
    _, model, posterior = load_run(__import__("pathlib").Path(run_dir))
    test = data.load("mnist", "test")
    x, y = test.tensors()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")

    start = time.perf_counter()
    certified = torch.cat(
        [
            certify.certify_paper(
                model, posterior, x[i : i + 2500], y[i : i + 2500], 0.1, generator=torch.Generator().manual_seed(0)
            )["certified"]
            for i in range(0, len(y), 2500)
        ]
    )
    paper_s = time.perf_counter() - start
    print(
        f"paper certificate, 10,000 points, 24 samples, eps 0.1: {paper_s:.1f} s "
        f"(certified fraction {certified.float().mean():.4f})"
    )

    params = posterior.sample(10, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    accuracy, _ = robustness.adversarial_accuracy(
        model, params, x[:1000], y[:1000], 0.1, kind="pgd", steps=20, generator=torch.Generator().manual_seed(0)
    )
    pgd_s = time.perf_counter() - start
    print(f"PGD-20, K = 10 samples, 1,000 points, eps 0.1: {pgd_s:.1f} s (accuracy {accuracy:.4f})")


if __name__ == "__main__":
    main(sys.argv[1])
