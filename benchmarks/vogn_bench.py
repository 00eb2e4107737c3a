"""VOGN examples/s: per-example gradient tensors (vmap, the path before issue 13) against the
analytic squared-gradient sums (certbnn.inference.squared_grads), in one run.

    .venv/bin/python benchmarks/vogn_bench.py [--quick] [--steps 20] [--old-steps 3] [--threads N]

Setting (issue 13 item 2): MNIST MLP 784-512-10, batch 128, one weight sample, VOGN with the
standard likelihood and with IBP (eps 0.11, lam 0.25, prob mix); inputs uniform in [0, 1] with
random labels (the speed does not depend on the pixel values). For each likelihood it prints
the examples/s of the old and the new path, their ratio, the FLOP floor (matmul FLOPs of one
analytic step, counted by torch's FlopCounterMode, at the matmul ceiling: a 2048x2048 float32
matmul timed in the same run) and measured / floor. The authors' TensorFlow code (robust VOGN
at ~1,900 examples/s on a comparable 2-core machine, as cited in issue 13) cannot run here; its
figure is printed as a cited constant, not measured. Also checks that both paths give the same
state after one step (max abs difference of s).
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from torch import nn

from certbnn.inference.vogn import VOGN
from certbnn.likelihoods import BatchNLL, make_likelihood
from certbnn.priors import prior_from_model

AUTHORS_ROBUST_VOGN = 1900.0  # examples/s, cited in issue 13 (TensorFlow code, not run here)


def matmul_ceiling(repeats: int = 5) -> float:
    """Best GFLOP/s of a 2048x2048 float32 matmul."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * 2048**3 / best / 1e9


def setup(likelihood: str, mode: str):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 10))
    g = torch.Generator().manual_seed(1)
    batch = (torch.rand(128, 1, 28, 28, generator=g), torch.randint(0, 10, (128,), generator=g))
    nll = BatchNLL(make_likelihood(likelihood), model, 0.11)
    method = VOGN(prior=prior_from_model(model, 1.0), num_data=60000, per_example=mode)
    state = method.init({n: p.detach().clone() for n, p in model.named_parameters()})
    return method, state, batch, nll


def rate(likelihood: str, mode: str, steps: int) -> tuple[float, object]:
    """Examples/s (median step time over ``steps`` after one warm-up step) and the state after the warm-up."""
    method, state, batch, nll = setup(likelihood, mode)
    state, _ = method.step(state, batch, nll, torch.Generator().manual_seed(2))
    first = state
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, _ = method.step(state, batch, nll)
        times.append(time.perf_counter() - t)
    times.sort()
    return batch[0].shape[0] / times[len(times) // 2], first


def step_flops(likelihood: str, batch: int = 128, layers=((784, 512), (512, 10))) -> int:
    """Matmul FLOPs of one analytic step: per layer, P forward GEMMs (P = 1 path, or 3 for IBP:
    clean, centre, radius), P backward GEMMs to the activations (not for the first layer), and
    P + P (P + 1) / 2 GEMMs for the gradient and the squared sums; each 2 B in out FLOPs."""
    paths = 3 if likelihood == "ibp" else 1
    total = 0
    for k, (fan_in, fan_out) in enumerate(layers):
        gemms = paths + (paths if k else 0) + paths + paths * (paths + 1) // 2
        total += gemms * 2 * batch * fan_in * fan_out
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few steps (about half a minute)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps of the analytic path")
    parser.add_argument("--old-steps", type=int, default=5, help="timed steps of the vmap path")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    steps, old_steps = (5, 2) if args.quick else (args.steps, args.old_steps)
    ceiling = matmul_ceiling()
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"matmul ceiling (2048^2 float32, this run): {ceiling:.1f} GFLOP/s")
    print(
        f"{'likelihood':<10} {'old vmap ex/s':>14} {'analytic ex/s':>14} {'new/old':>8} "
        f"{'floor ex/s':>11} {'new/floor':>10} {'new/authors':>12} {'max|ds|':>9}"
    )
    for likelihood in ("standard", "ibp"):
        old, old_state = rate(likelihood, "vmap", old_steps)
        new, new_state = rate(likelihood, "analytic", steps)
        diff = max(float((old_state.precision[n] - new_state.precision[n]).abs().max()) for n in old_state.precision)
        floor = 128 / (step_flops(likelihood) / (ceiling * 1e9))
        authors = f"{new / AUTHORS_ROBUST_VOGN:12.2f}" if likelihood == "ibp" else f"{'-':>12}"
        print(
            f"{likelihood:<10} {old:14.0f} {new:14.0f} {new / old:8.1f} {floor:11.0f} {new / floor:10.2f} "
            f"{authors} {diff:9.1e}"
        )
    print(f"authors' robust VOGN (TensorFlow, cited in issue 13, not run here): {AUTHORS_ROBUST_VOGN:.0f} examples/s")


if __name__ == "__main__":
    main()
