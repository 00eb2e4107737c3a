"""Soundness and cost of ``tol="sound"`` on one device (a GPU when available).

    python benchmarks/sound_device_check.py                 # cuda when available, else cpu
    python benchmarks/sound_device_check.py --device cpu --points 4

For the paper's MNIST MLP (mlp:512) and CIFAR-10 CNN (cifar-small) with random
weights, it computes float32 and float64 ``tol="sound"`` bounds on the device --
with TF32 switched ON globally beforehand, as a user might, which the sound mode
must override -- and checks them at sampled points of the input box against a
float64 CPU reference whose own rounding error is bounded a priori (every
product of float32 numbers is exact in float64; the error of the float64 sums is
at most ``L * gamma_n(float64)`` times a magnitude pass with ``|W|``, which is
about 1e-13 relative: far below the float32 margins under test). Point boxes
(width 0) leave only the rounding margin, so a missing margin shows up there.
The plain float32 bounds (``tol=None``) are checked the same way, to show that
the check can fail. Then it times plain float32, sound float32 and sound float64
(IBP and CROWN-IBP, 1,000 points). Exit status 1 on any violation of a sound bound.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch
from torch import Tensor, nn

from certbnn.bounds import compute_bounds
from certbnn.models import build_model

U64 = 2.0**-53


def magnitude_and_reference(model: nn.Sequential, x: Tensor) -> tuple[Tensor, Tensor, float]:
    """``model(x)`` in float64 on the CPU, the magnitude pass ``|W|...|x|``, and the largest fan-in."""
    ref, mag, fan_in = x.double().cpu(), x.double().cpu().abs(), 1
    for layer in model:
        layer = layer.double().cpu()
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            absl = copy.deepcopy(layer)
            for p in absl.parameters():
                p.data.abs_()
            mag = absl(mag)
            fan_in = max(fan_in, layer.weight[0].numel())
        else:
            mag = layer(mag) if not isinstance(layer, (nn.ReLU, nn.Tanh, nn.Sigmoid)) else mag
        ref = layer(ref)
    return ref, mag, fan_in


def violations(
    model: nn.Sequential, lo_x: Tensor, hi_x: Tensor, lo: Tensor, hi: Tensor, points: int, gen: torch.Generator
) -> tuple[int, float]:
    """Exact-output points (with the reference's a-priori slack) outside ``[lo, hi]``; and the worst excess."""
    n_bad, worst = 0, float("-inf")
    layers = sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in model)
    for _ in range(points):
        t = torch.rand(lo_x.shape, generator=gen, dtype=torch.float64)
        x = torch.where(
            t < 0.25,
            lo_x.double().cpu(),
            torch.where(t > 0.75, hi_x.double().cpu(), (lo_x.double().cpu() + t * (hi_x - lo_x).double().cpu())),
        ).float()
        x = torch.minimum(torch.maximum(x, lo_x.float().cpu()), hi_x.float().cpu())
        with torch.no_grad():
            ref, mag, n = magnitude_and_reference(model, x)
        slack = 4 * layers * (n * U64 / (1 - n * U64)) * mag + 1e-300
        excess = torch.maximum(lo.double().cpu() - slack - ref, ref - hi.double().cpu() - slack)
        n_bad += int((excess > 0).sum())
        worst = max(worst, float(excess.max()))
    return n_bad, worst


def timed(fn, device: torch.device, repeats: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--points", type=int, default=16, help="sampled input points per box")
    ap.add_argument("--batch", type=int, default=1000, help="points per timed bound call")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":  # what a speed-minded user may have switched on; sound mode must override it
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, TF32 enabled globally")
    else:
        print(f"device: cpu, torch {torch.__version__}")
    gen = torch.Generator().manual_seed(0)
    failed = False
    for spec, shape in (("mlp:512", (1, 28, 28)), ("cifar-small", (3, 32, 32))):
        torch.manual_seed(0)
        model = build_model(spec, shape, 10).eval()
        x = torch.rand(4, *shape, generator=gen)
        for eps in (0.0, 0.01):
            lo_x, hi_x = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
            for method in ("ibp", "crown-ibp"):
                for label, kw in (
                    ("plain f32", dict(dtype=torch.float32)),
                    ("sound f32", dict(dtype=torch.float32, tol="sound")),
                    ("sound f64", dict(dtype=torch.float64, tol="sound")),
                ):
                    dev_model = build_model(spec, shape, 10).eval()
                    dev_model.load_state_dict(model.state_dict())
                    with torch.no_grad():
                        lo, hi = compute_bounds(dev_model.to(device), lo_x.to(device), hi_x.to(device), method, **kw)
                    bad, worst = violations(model, lo_x, hi_x, lo, hi, args.points, gen)
                    width = float((hi.double() - lo.double()).mean())
                    sound = label.startswith("sound")
                    verdict = ("FAIL" if bad else "ok") if sound else ("(misses, as expected)" if bad else "(contains)")
                    print(
                        f"{spec:12s} eps={eps:<5} {method:9s} {label}: {bad} violations, worst excess "
                        f"{worst:.3g}, mean width {width:.3g} {verdict}",
                        flush=True,
                    )
                    failed |= sound and bad > 0
    print("\ntimings (best of 3, seconds per call of", args.batch, "points):")
    for spec, shape in (("mlp:512", (1, 28, 28)), ("cifar-small", (3, 32, 32))):
        model = build_model(spec, shape, 10).eval().to(device)
        xb = torch.rand(args.batch, *shape, device=device)
        for method in ("ibp", "crown-ibp"):
            row = []
            for label, kw in (
                ("plain f32", dict(dtype=torch.float32)),
                ("sound f32", dict(dtype=torch.float32, tol="sound")),
                ("sound f64", dict(dtype=torch.float64, tol="sound")),
            ):

                def call() -> None:
                    with torch.no_grad():
                        compute_bounds(model, (xb - 0.01).clamp(0, 1), (xb + 0.01).clamp(0, 1), method, **kw)

                row.append(f"{label} {timed(call, device):.4f}")
            print(f"  {spec:12s} {method:9s} " + " | ".join(row), flush=True)
    print("FAILED: a sound bound was violated" if failed else "all sound bounds held")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
