"""Data-parallel scaling of robust (IBP) Bayes by Backprop on MNIST: 1 vs N processes.

Runs ``certbnn train`` (one epoch on a training subset, no validation) as
  * one process with T threads (the usual single-process run),
  * one process with T / N threads (the per-process share),
  * N processes under torchrun with T / N threads each (gloo, loopback),
reads examples/s from each run's metrics.json, and measures the all-reduce the
data-parallel step adds: one gradient all-reduce of every weight tensor per step
(P float32 numbers) plus one scalar, timed in isolation with gloo on loopback.

    python benchmarks/distributed_bench.py --limit-train 20000 --processes 2 --threads 2

Prints a JSON report (and writes it with --json PATH).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_run(out: Path, args, processes: int, threads: int) -> dict:
    cmd = [
        "-m",
        "certbnn",
        "train",
        "--method",
        "bbb",
        "--likelihood",
        "ibp",
        "--eps",
        "0.11",
        "--lr",
        "0.001",
        "--kl-weight",
        "0.01",
        "--epochs",
        str(args.epochs),
        "--limit-train",
        str(args.limit_train),
        "--batch-size",
        str(args.batch_size),
        "--val-size",
        "0",
        "--test-size",
        "100",
        "--device",
        "cpu",
        "--no-progress",
        "--out",
        str(out),
    ]
    launcher = (
        [sys.executable]
        if processes == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc-per-node={processes}",
            "--nnodes=1",
            "--master-addr=127.0.0.1",
            f"--master-port={free_port()}",
        ]
    )
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run(launcher + cmd, env=env, check=True, capture_output=True, text=True)
    metrics = json.loads((out / "metrics.json").read_text())
    return {
        "processes": processes,
        "threads_per_process": threads,
        "examples_per_second": metrics["examples_per_second"],
        "seconds_per_epoch": metrics["seconds_per_epoch"],
    }


ALLREDUCE_WORKER = r"""
import os, sys, time, torch, torch.distributed as dist
dist.init_process_group("gloo")
n, reps = int(sys.argv[1]), int(sys.argv[2])
x = torch.randn(n)
for _ in range(3):
    dist.all_reduce(x)
dist.barrier()
start = time.perf_counter()
for _ in range(reps):
    dist.all_reduce(x)
elapsed = (time.perf_counter() - start) / reps
if dist.get_rank() == 0:
    print(elapsed)
dist.destroy_process_group()
"""


def allreduce_seconds(numel: int, processes: int, reps: int = 50) -> float:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(ALLREDUCE_WORKER)
    try:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                f"--nproc-per-node={processes}",
                "--nnodes=1",
                "--master-addr=127.0.0.1",
                f"--master-port={free_port()}",
                f.name,
                str(numel),
                str(reps),
            ],
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            check=True,
            capture_output=True,
            text=True,
        )
    finally:
        os.unlink(f.name)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit-train", type=int, default=20000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="total threads (all processes)")
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args()
    per_process = max(args.threads // args.processes, 1)

    from certbnn.models import build_model

    params = sum(p.numel() for p in build_model("mlp:512", (1, 28, 28), 10).parameters())
    report = {
        "machine": {"cpu_count": os.cpu_count(), "torch": torch.__version__},
        "workload": f"bbb + ibp likelihood, mlp:512, MNIST subset {args.limit_train}, batch {args.batch_size}",
        "parameters": params,
        "runs": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for i, (processes, threads) in enumerate([(1, args.threads), (1, per_process), (args.processes, per_process)]):
            run = train_run(Path(tmp) / f"run{i}", args, processes, threads)
            report["runs"].append(run)
            print(run, flush=True)
    one_full, one_share, many = (r["examples_per_second"] for r in report["runs"])
    steps_per_second = many / args.batch_size
    bytes_per_step = 4 * (params + 1)  # the averaged gradients (S = 1 weight sample) and the loss
    seconds = allreduce_seconds(params, args.processes)
    report.update(
        {
            "speedup_vs_one_process_same_threads": round(many / one_full, 3),
            "scaling_efficiency_vs_one_share": round(many / (args.processes * one_share), 3),
            "allreduce": {
                "bytes_per_step_per_process": bytes_per_step,
                "ring_bytes_sent_per_step_per_process": round(
                    2 * (args.processes - 1) / args.processes * bytes_per_step
                ),
                "seconds_per_allreduce": seconds,
                "fraction_of_step_time": round(seconds * steps_per_second, 3),
            },
        }
    )
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
