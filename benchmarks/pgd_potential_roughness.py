"""How rough is HMC's potential under a PGD likelihood? (docs/RESULTS.md, "`fashion`")

    .venv/bin/python benchmarks/pgd_potential_roughness.py RUN [--images 2000] [--num-data 10000]

RUN is a `certbnn train` run folder of a PGD-trained network (e.g. the `fashion` preset's
``cells/grid__sgd__pgd/run``); its config names the data set, model, training eps and PGD steps.
U(w) = (N / T) mean nll(w, x_adv(w)) over the first ``--images`` training images, N =
``--num-data`` and T = ``--temperature``, with the attack as ``certbnn train`` runs it for HMC
(no random start). Prints U at the posterior mean w0, then U(w0 + delta d) - U(w0) along one
Gaussian direction d for delta = 1e-9 ... 1e-5 beside the first-order prediction delta * <grad
U, d> (the gradient at the attack's inputs, as HMC's leapfrog uses it). A smooth potential
follows the prediction; HMC's leapfrog step must keep the gap below about 1.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from certbnn import data
from certbnn.api import load
from certbnn.likelihoods import BatchNLL, make_likelihood
from certbnn.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="a certbnn train run folder (PGD-trained)")
    parser.add_argument("--images", type=int, default=2000, help="training images U is evaluated on")
    parser.add_argument("--num-data", type=int, default=10000, help="N in U = (N / T) mean nll")
    parser.add_argument("--temperature", type=float, default=0.01, help="T in U = (N / T) mean nll")
    parser.add_argument("--seed", type=int, default=0, help="seed of the direction d")
    args = parser.parse_args()
    config = json.loads((args.run / "config.json").read_text())
    x, y = data.load(config["dataset"], "train").tensors()
    x, y = x[: args.images], y[: args.images]
    model = build_model(config["model"], tuple(x.shape[1:]), int(y.max()) + 1)
    w0 = dict(load(args.run).posterior.mean())
    options = {**config.get("likelihood_options", {}), "random_start": False}
    nll = BatchNLL(make_likelihood("pgd", lam=config["lam"], mix=config["mix"], **options), model, config["eps"])
    scale = args.num_data / args.temperature

    def potential(w: dict[str, torch.Tensor]) -> torch.Tensor:
        return nll(w, x, y).mean() * scale

    w = {n: t.clone().requires_grad_(True) for n, t in w0.items()}
    u0 = potential(w)
    grads = torch.autograd.grad(u0, list(w.values()))
    direction = {n: torch.randn(t.shape, generator=torch.Generator().manual_seed(args.seed)) for n, t in w0.items()}
    slope = sum((g * direction[n]).sum() for g, n in zip(grads, w)).item()
    with torch.no_grad():
        print(f"U(w0) = {u0.item():.1f} (again: {potential(w0).item() - u0.item():+.3g}); <grad U, d> = {slope:.4g}")
        for delta in (1e-9, 1e-8, 1e-7, 1e-6, 1e-5):
            moved = potential({n: w0[n] + delta * direction[n] for n in w0}).item() - u0.item()
            print(f"delta {delta:.0e}: U change {moved:+10.4g}   first-order prediction {slope * delta:+10.4g}")


if __name__ == "__main__":
    main()
