"""Speed of the graph engine on the registry's residual CNN (``resnet``) for CIFAR-10 shapes.

Per item: the figure, the reference measured in the same run (a plain-PyTorch forward
pass, or a plain-PyTorch training step, of the same model and batch) and the ratio.
Times are the best of interleaved rounds (other jobs may share the cores).

    PYTHONPATH=src python benchmarks/graph_bench.py [--quick] [--model resnet:16] [--batch 32]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch
import torch.nn.functional as F

from certbnn.bounds import compute_bounds, margin_spec, worst_case_logits
from certbnn.models import build_model


def best_of(fns: dict, rounds: int) -> dict[str, float]:
    best = {k: float("inf") for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="batch 8, 2 rounds")
    ap.add_argument("--model", default="resnet:16")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--eps", type=float, default=2 / 255)
    args = ap.parse_args()
    batch, rounds = (8, 2) if args.quick else (args.batch, args.rounds)
    torch.manual_seed(0)
    model = build_model(args.model, (3, 32, 32), 10).eval()
    x = torch.rand(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    lo, up = (x - args.eps).clamp(0, 1), (x + args.eps).clamp(0, 1)
    spec = margin_spec(y, 10)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def forward():
        with torch.no_grad():
            model(x)

    def bounds(method):
        def run():
            with torch.no_grad():
                compute_bounds(model, lo, up, method, spec=spec)

        return run

    def plain_step():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    def robust_step():  # the IBP robust likelihood's loss: clean + worst-case cross-entropy
        opt.zero_grad()
        z_lo, z_up = compute_bounds(model, lo, up, "ibp")
        loss = 0.5 * F.cross_entropy(model(x), y) + 0.5 * F.cross_entropy(worst_case_logits(z_lo, z_up, y), y)
        loss.backward()
        opt.step()

    fns = {
        "forward": forward,
        "ibp": bounds("ibp"),
        "crown-ibp": bounds("crown-ibp"),
        "plain step": plain_step,
        "robust IBP step": robust_step,
    }
    for fn in fns.values():  # warm-up (traces the graph once; later calls reuse the plan)
        fn()
    best = best_of(fns, rounds)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"model {args.model}, {sum(p.numel() for p in model.parameters()):,} parameters, batch {batch}, "
        f"eps {args.eps:.4f}; torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"{platform.machine()}, nproc {os.cpu_count()}, load average {load:.2f}"
    )
    print("| item | time per batch (ms) | reference | reference (ms) | ratio |")
    print("|---|---|---|---|---|")
    for item, ref in (("ibp", "forward"), ("crown-ibp", "forward"), ("robust IBP step", "plain step")):
        print(f"| {item} (margin spec)" if item != "robust IBP step" else f"| {item}", end="")
        print(f" | {best[item] * 1e3:.1f} | {ref} | {best[ref] * 1e3:.1f} | {best[item] / best[ref]:.2f} |")
    print(
        f"robust IBP training: {batch / best['robust IBP step']:.1f} examples/s "
        f"(plain: {batch / best['plain step']:.1f} examples/s)"
    )


if __name__ == "__main__":
    main()
