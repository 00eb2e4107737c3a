"""What a BBB step's own elementwise work costs on this machine (issue 13, item 1): drawing one
standard normal per weight of the MNIST MLP (407,050 float32), by every generator at hand, and a
fresh buffer against the same pass in place.

    .venv/bin/python benchmarks/noise_bench.py [--numel N]

Printed: microseconds per call, the best of interleaved rounds (``train_bench.best_times``):

* ``torch.randn`` with a CPU ``torch.Generator`` (mt19937, what every certbnn method draws);
* the same numbers split in two halves drawn by two generators on two Python threads (a parallel
  draw that would change every method's random stream);
* NumPy ``default_rng`` (PCG64, ziggurat) and its SFC64 and Philox bit generators, float32 output
  written in place;
* three elementwise ops writing fresh buffers against the same three written in place.
"""

from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from train_bench import best_times  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--numel", type=int, default=407_050, help="numbers per draw (default: the MLP's weights)")
    args = parser.parse_args()
    n = args.numel
    print(f"torch {torch.__version__}, numpy {np.__version__}, threads {torch.get_num_threads()}, {n:,} float32")

    out = torch.empty(n)
    generator = torch.Generator().manual_seed(0)
    halves = [out[: n // 2], out[n // 2 :]]
    generators = [torch.Generator().manual_seed(i) for i in range(2)]
    pool = ThreadPoolExecutor(2)

    def two_threads() -> None:
        for f in [pool.submit(torch.randn, h.shape, generator=g, out=h) for h, g in zip(halves, generators)]:
            f.result()

    array = out.numpy()
    bit_generators = {
        "numpy PCG64 (default_rng), ziggurat": np.random.PCG64(0),
        "numpy SFC64": np.random.SFC64(0),
        "numpy Philox": np.random.Philox(0),
    }
    cases = {"torch.randn, CPU generator": lambda: torch.randn(n, generator=generator, out=out)}
    cases["torch.randn, two halves on two threads"] = two_threads
    for name, bits in bit_generators.items():
        rng = np.random.Generator(bits)
        cases[name] = lambda rng=rng: rng.standard_normal(out=array, dtype=np.float32)

    a, b = torch.randn(n), torch.randn(n)

    def fresh() -> None:
        torch.sub(torch.mul(torch.add(a, b), b), a)

    def in_place() -> None:
        torch.add(a, b, out=out).mul_(b).sub_(a)

    cases["add, mul, sub into fresh buffers"] = fresh
    cases["add, mul, sub in place"] = in_place
    times = best_times(cases, rounds=7, calls=50)
    for name, seconds in times.items():
        print(f"{name:42s} {seconds * 1e6:9.1f} us")
    pool.shutdown()


if __name__ == "__main__":
    main()
