"""Certification of the MNIST test set (issue 13, item 4): each figure, its reference measured in
the same run, and the ratio.

    CERTBNN_DATA=../shared/data .venv/bin/python benchmarks/certify_bench.py [RUN_DIR] [--quick] [--points N]

RUN_DIR: a trained MNIST MLP run (robust BBB); without it the script trains one itself (1 epoch
of robust BBB, IBP at eps 0.11, lam 0.25, KL weight 0.01; a few minutes on 2 cores). ``--quick``
uses 1,000 points (default all 10,000) and states the figures scaled to 10,000. Printed:

* the matmul ceiling (float32 / float64 GEMM of the first layer's shape, GFLOP/s);
* paper protocol (24 samples, 2,500 points per call as ``evaluate`` does for an MLP): authors'
  arithmetic (plain float32 IBP), sound float32, sound float64, each with its FLOP floor at the
  ceiling (2 GEMMs per layer: centre and radius; the MLP fast path needs no third one);
* statistical certificate (sequential, the runner's setting) in sound float32 and float64, with
  the samples used and the FLOP floor of those samples, the non-sequential 1,060-sample floor,
  and the certified counts of both dtypes (does float32 lose points?);
* weight-box certificate by the shared grid, with its FLOP floor (4 GEMMs per box and point).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from certbnn import data
from certbnn.evaluation import certify
from certbnn.evaluation.runner import load_run

FIRST, HIDDEN, OUT = 784, 512, 10


def ceiling(dtype: torch.dtype) -> float:
    """GFLOP/s of a (2500 x 784) @ (784 x 8192) GEMM, best of 3."""
    a, b = torch.rand(2500, FIRST, dtype=dtype), torch.rand(FIRST, 16 * HIDDEN, dtype=dtype)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * a.shape[0] * FIRST * b.shape[1] / best / 1e9


def flops(points: float, samples: float, gemms: int, spec_rows: int = OUT) -> float:
    """FLOPs of ``gemms`` matmuls per layer of the MLP for every (point, sample)."""
    return 2 * gemms * points * samples * (FIRST * HIDDEN + HIDDEN * spec_rows)


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def train_run(out: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "certbnn",
            "train",
            "--method",
            "bbb",
            "--likelihood",
            "ibp",
            "--eps",
            "0.11",
            "--lam",
            "0.25",
            "--epochs",
            "1",
            "--kl-weight",
            "0.01",
            "--out",
            str(out),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", nargs="?")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--points", type=int)
    ap.add_argument("--skip", default="", help="comma list of parts to skip: paper,statistical,weight-box")
    ap.add_argument("--threads", type=int, help="torch threads (default torch's; 1 is steadier on a shared machine)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.run_dir is None:
        args.run_dir = str(Path(tempfile.mkdtemp()) / "bbb")
        print(f"training a 1-epoch robust BBB MLP into {args.run_dir} ...", flush=True)
        train_run(Path(args.run_dir))
    _, model, posterior = load_run(Path(args.run_dir))
    x, y = data.load("mnist", "test").tensors()
    n = args.points or (1000 if args.quick else len(y))
    x, y = x[:n], y[:n]
    scale = 10_000 / n
    skip = set(args.skip.split(","))
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, {n} points (figures x{scale:g} "
        f"= 10,000 points), eps 0.1"
    )
    ceil32, ceil64 = ceiling(torch.float32), ceiling(torch.float64)
    print(f"matmul ceiling: float32 {ceil32:.1f} GFLOP/s, float64 {ceil64:.1f} GFLOP/s")

    def row(name: str, seconds: float, floor: float, extra: str = "") -> None:
        print(
            f"{name:<46} {seconds * scale:8.1f} s   floor {floor * scale:7.1f} s   ratio "
            f"{seconds / floor:5.2f}  {extra}",
            flush=True,
        )

    if "paper" not in skip:
        for label, kw, ceil, gemms in (
            ("paper, authors' arithmetic (--paper-arithmetic authors)", {"sound": False}, ceil32, 2),
            ("paper, sound float32 (--certify-float32)", {"dtype": torch.float32}, ceil32, 2),
            ("paper, sound float64 (evaluate default)", {"dtype": torch.float64}, ceil64, 2),
        ):
            res, s = timed(
                lambda kw=kw: torch.cat(
                    [
                        certify.certify_paper(
                            model,
                            posterior,
                            x[i : i + 2500],
                            y[i : i + 2500],
                            0.1,
                            generator=torch.Generator().manual_seed(i),
                            **kw,
                        )["certified"]
                        for i in range(0, n, 2500)
                    ]
                )
            )
            row(label, s, flops(n, 24, gemms) / ceil / 1e9, f"certified {int(res.sum())}/{n}")

    if "statistical" not in skip:
        decided = {}
        for dt, ceil in ((torch.float32, ceil32), (torch.float64, ceil64)):
            parts, s = timed(
                lambda dt=dt: [
                    certify.certify_statistical(
                        model,
                        posterior,
                        x[i : i + 2500],
                        y[i : i + 2500],
                        0.1,
                        sequential=True,
                        dtype=dt,
                        generator=torch.Generator().manual_seed(i),
                    )
                    for i in range(0, n, 2500)
                ]
            )
            used = torch.cat([p["num_samples"] for p in parts]).double()
            decided[dt] = torch.cat([p["certified"] for p in parts])
            floor = flops(n, float(used.mean()), 3, OUT * (OUT - 1)) / ceil / 1e9
            row(
                f"statistical, sequential, sound {str(dt)[6:]}",
                s,
                floor,
                f"certified {int(decided[dt].sum())}/{n}, mean samples {float(used.mean()):.1f}, "
                f"non-sequential 1060-sample floor {flops(n, 1060, 3, 90) / ceil / 1e9 * scale:.0f} s",
            )
        lost = int((decided[torch.float64] & ~decided[torch.float32]).sum())
        gained = int((decided[torch.float32] & ~decided[torch.float64]).sum())
        print(
            f"  float32 vs float64: {lost} points certified only in float64, {gained} only in float32 "
            "(different draws per dtype are not used: same seeds, same samples)"
        )

    if "weight-box" not in skip:
        grid = certify.weight_box_grid(
            torch.tensor([float(t.numel()) for t in posterior.mean().values()], dtype=torch.float64), 0.5
        )
        for dt, ceil in ((torch.float32, ceil32), (torch.float64, ceil64)):
            res, s = timed(
                lambda dt=dt: [
                    certify.certify_weight_box(
                        model, posterior, x[i : i + 2500], y[i : i + 2500], 0.1, search="grid", refine=0, dtype=dt
                    )
                    for i in range(0, n, 2500)
                ]
            )
            cert = torch.cat([r["certified"] for r in res])
            ver = torch.cat([r["verified"] for r in res])
            row(
                f"weight-box, grid of {grid.numel()} k, sound {str(dt)[6:]}",
                s,
                flops(n, grid.numel(), 4, OUT * (OUT - 1)) / ceil / 1e9,
                f"certified {int(cert.sum())}/{n}, some box verified {int(ver.sum())}",
            )


if __name__ == "__main__":
    main()
