"""Full-batch HMC potential and gradient over the MNIST training set (issue 13, item 3): each
figure, its FLOP floor at the matmul ceiling measured in the same run, and the ratio.

    CERTBNN_DATA=../shared/data .venv/bin/python benchmarks/hmc_bench.py [RUN_DIR] [--quick]

One evaluation of ``HMC.potential_and_grad`` (U and grad U over all 60,000 images, the prior
included) for the MLP 784-512-10 with the standard likelihood and the IBP likelihood (eps 0.1,
lam 0.25: the clean and interval passes share each layer's GEMM). Weights: the posterior mean
of RUN_DIR (an MNIST MLP run), else 300 Adam steps of batch 128 from the default initialisation
(a trained net: confident softmaxes give the subnormal gradients that slow matmuls down).
``--quick``: 10,000 images, figures scaled to 60,000. Printed per likelihood: the figure
(best of 3) for several ``chunk_size`` values (the default first), the FLOP floor (the GEMMs
of the forward and backward passes at the ceiling) and the ratio; and the default chunk with
subnormals not flushed (``flush_denormals=False``: the cost they would add).

FLOPs per image (layer l: ``2 in_l out_l`` per GEMM): standard forward 1 GEMM per layer,
backward 1 (weight gradient) for the first layer and 2 (weight and input gradients) for the
others; IBP: 3 forward GEMMs per layer (point and centre stacked, radius with ``|W|``) and as
many in the backward pass per gradient kind.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch

from certbnn import data
from certbnn.functional import detached_params
from certbnn.inference.hmc import HMC
from certbnn.likelihoods import BatchNLL, make_likelihood
from certbnn.models import build_model
from certbnn.priors import GaussianPrior

SHAPES = ((784, 512), (512, 10))


def ceiling() -> float:
    """GFLOP/s of a (2500 x 784) @ (784 x 8192) float32 GEMM, best of 3 (as certify_bench.py)."""
    a, b = torch.rand(2500, 784), torch.rand(784, 8192)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * a.shape[0] * 784 * b.shape[1] / best / 1e9


def flops(images: int, gemms: int) -> float:
    """FLOPs of one potential and gradient: ``gemms`` forward GEMMs per layer, as many per gradient."""
    first, *rest = SHAPES
    return 2 * images * gemms * (2 * first[0] * first[1] + sum(3 * i * o for i, o in rest))


def trained(run_dir: str | None, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.nn.Module, dict]:
    model = build_model("mlp:512", (1, 28, 28), 10)
    if run_dir:
        from certbnn.evaluation.runner import load_run

        _, model, posterior = load_run(Path(run_dir))
        return model, {n: t.detach().clone() for n, t in posterior.mean().items()}
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for _ in range(300):
        idx = torch.randint(x.shape[0], (128,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, detached_params(model)


def best_of(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", nargs="?")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    x, y = data.load("mnist", "train").tensors()
    model, params = trained(args.run_dir, x, y)
    n = 10_000 if args.quick else x.shape[0]
    x, y = x[:n], y[:n]
    scale = 60_000 / n
    prior = GaussianPrior(
        {k: torch.zeros_like(v) for k, v in params.items()}, {k: torch.ones_like(v) for k, v in params.items()}
    )
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {n} images (figures x{scale:g} = 60,000)")
    ceil = ceiling()
    print(f"matmul ceiling: float32 {ceil:.1f} GFLOP/s")
    hmc = HMC(prior=prior, num_data=60_000)
    for label, lik, eps, gemms in (
        ("standard", make_likelihood("standard"), 0.0, 1),
        ("IBP eps 0.1, lam 0.25", make_likelihood("ibp"), 0.1, 3),
    ):
        nll = BatchNLL(lik, model, eps)
        floor = flops(n, gemms) / ceil / 1e9
        for chunk in (hmc.chunk_size, 2048, 8192, 16384):
            sampler = dataclasses.replace(hmc, chunk_size=chunk)
            sampler.potential_and_grad(params, (x, y), nll)  # warm-up
            s = best_of(lambda sampler=sampler, nll=nll: sampler.potential_and_grad(params, (x, y), nll))
            print(
                f"{label:<24} chunk {chunk:>6}: {s * scale:6.2f} s   floor {floor * scale:5.2f} s   "
                f"ratio {s / floor:5.2f}",
                flush=True,
            )
        unflushed = dataclasses.replace(hmc, flush_denormals=False)
        s = best_of(lambda unflushed=unflushed, nll=nll: unflushed.potential_and_grad(params, (x, y), nll))
        print(f"{label:<24} subnormals not flushed: {s * scale:6.2f} s   ratio {s / floor:5.2f}", flush=True)


if __name__ == "__main__":
    main()
