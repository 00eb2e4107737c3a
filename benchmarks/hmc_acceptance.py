"""HMC acceptance probability against the step size, at a trained network.

    .venv/bin/python benchmarks/hmc_acceptance.py RUN_DIR --likelihood ibp [--factors 1,10] [--proposals 2]

Loads RUN_DIR's posterior (its last sample, or its mean for a Gaussian), rebuilds the training
set of RUN_DIR's config (same seed, ``limit_train`` and held-out split), and makes
``--proposals`` HMC proposals at the target eps (``--eps``, default the run's) from that point
for each step size ``factor x`` HMC's default 0.01 sqrt(T / N) (T = ``--temperature``, default
0.01), printing the acceptance probability min(1, exp(-dH)) of each. Used for the step-size
default in docs/training.md ("Defaults").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from certbnn import data
from certbnn.config import make_config
from certbnn.inference import make_method
from certbnn.likelihoods import BatchNLL, make_likelihood
from certbnn.models import build_model
from certbnn.posterior import load_posterior
from certbnn.priors import prior_from_model
from certbnn.training import CONFIG, POSTERIOR, _likelihood_options, split_train_val


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--likelihood", default="standard")
    parser.add_argument("--eps", type=float, default=None)
    parser.add_argument("--temperature", type=float, default=0.01)
    parser.add_argument("--factors", default="1,3,10")
    parser.add_argument("--proposals", type=int, default=2)
    args = parser.parse_args()

    saved = json.loads((args.run / CONFIG).read_text())
    config = make_config({}, {**saved, "method": "hmc", "likelihood": args.likelihood, "method_options": {}})
    eps = config.eps if args.eps is None else args.eps
    train, _ = split_train_val(config)
    spec = data.get_spec(config.dataset)
    model = build_model(config.model, spec.image_shape, spec.num_classes)
    posterior, _ = load_posterior(args.run / POSTERIOR)
    stacked = posterior.sample(None) if hasattr(posterior, "num_samples") else None
    position = {n: t[-1].clone() for n, t in stacked.items()} if stacked else posterior.mean()
    x, y = train.tensors()
    likelihood = make_likelihood(args.likelihood, **_likelihood_options(config, full_batch=True))
    hmc = make_method(
        "hmc",
        prior=prior_from_model(model, config.prior_scale),
        num_data=len(train),
        temperature=args.temperature,
        warm_start_epochs=0,
        num_burnin=0,
    )
    print(f"N={len(train)} T={args.temperature} eps={eps} default step {hmc.initial_step_size:.3g}")
    for factor in (float(f) for f in args.factors.split(",")):
        method = dataclasses.replace(hmc, step_size=factor * hmc.initial_step_size)
        generator = torch.Generator().manual_seed(1)
        state, probs, start = method.init(position, generator), [], time.perf_counter()
        for _ in range(args.proposals):
            state, info = method.step(state, (x, y), BatchNLL(likelihood, model, eps, generator), generator)
            probs.append(round(info["accept_prob"], 3))
        seconds = (time.perf_counter() - start) / args.proposals
        print(
            f"{args.likelihood} step {method.initial_step_size:.3g} (x{factor:g}): accept_prob {probs}, "
            f"{seconds:.1f} s / proposal",
            flush=True,
        )


if __name__ == "__main__":
    main()
