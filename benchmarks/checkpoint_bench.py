"""Per-epoch bookkeeping of a sampler with M stored samples: the checkpoint and the posterior
that validation draws from.

    .venv/bin/python benchmarks/checkpoint_bench.py [--model mlp:512] [--samples 10,50,200] [--dir DIR]

For each M, with an HMC state of M stored samples of the model's weights (mlp:512: 407,050
weights, 1.6 MB a sample in float32):

* ``checkpoint, all samples``: a save that writes every sample (a fresh store: what every epoch
  cost before checkpoints wrote each sample once);
* ``checkpoint, 1 new``: the next epoch's save, one sample more (what an epoch costs now);
* ``stack all``: the posterior of the M samples stacked (what validation built every epoch before);
* ``draw 8``: 8 validation draws from the posterior of the samples kept as sets (now).

Run it on a quiet machine; the saves fsync, so the disk matters.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from hmc_bench import best_of as seconds  # noqa: E402  (best of 3 wall-clock seconds)

from certbnn.checkpoint import Checkpoint, CheckpointStore  # noqa: E402
from certbnn.inference.hmc import HMCState, samples_posterior  # noqa: E402
from certbnn.models import build_model  # noqa: E402
from certbnn.posterior import SamplePosterior  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="mlp:512")
    parser.add_argument("--samples", default="10,50,200", help="values of M, comma-separated")
    parser.add_argument("--dir", default=None, help="where to write the checkpoints (default: a temporary folder)")
    args = parser.parse_args()
    model = build_model(args.model, (1, 28, 28), 10)
    params = {n: p.detach() for n, p in model.named_parameters()}
    size = sum(p.numel() for p in params.values())
    print(f"{args.model}: {size:,} weights, {4 * size / 1e6:.1f} MB a sample; torch {torch.__version__}")
    print("M | checkpoint, all samples (s) | checkpoint, 1 new (s) | stack all (s) | draw 8 (s)")
    for m in map(int, args.samples.split(",")):
        samples = [{n: p + 0.001 * i for n, p in params.items()} for i in range(m + 3)]

        def state(first: int) -> HMCState:  # the M samples from ``first`` on
            window = samples[first : first + m]
            return HMCState(dict(params), None, None, 1e-3, 0.0, 0.0, m, m, samples=window, sample_eps=[0.1] * m)

        with tempfile.TemporaryDirectory(dir=args.dir) as folder:
            rng = torch.Generator().get_state()

            def fresh() -> None:
                path = Path(tempfile.mkdtemp(dir=folder)) / "checkpoint.safetensors"
                CheckpointStore(path).save(Checkpoint(state(0), rng, 1, 1, []), {})

            store = CheckpointStore(Path(folder) / "checkpoint.safetensors")
            store.save(Checkpoint(state(0), rng, 1, 1, []), {})
            shift = iter(range(1, 4))

            def one_new() -> None:  # the window moves by one (as max_samples trims): one new item a save
                store.save(Checkpoint(state(next(shift)), rng, 1, 1, []), {})

            all_s, new_s = seconds(fresh), seconds(one_new)
        stack_s = seconds(lambda: SamplePosterior({n: torch.stack([s[n] for s in samples[:m]]) for n in params}))
        lazy = samples_posterior(samples[:m], "hmc")
        draw_s = seconds(lambda: lazy.sample(8, torch.Generator().manual_seed(0)))
        print(f"{m} | {all_s:.3f} | {new_s:.3f} | {stack_s:.3f} | {draw_s:.4f}")


if __name__ == "__main__":
    main()
