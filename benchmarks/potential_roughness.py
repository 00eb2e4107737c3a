"""How smooth is HMC's potential U(w)? (docs/RESULTS.md, "`fashion`" and "Bayesian rows")

    .venv/bin/python benchmarks/potential_roughness.py RUN [--likelihood pgd|standard|ibp]
        [--dtype float32|float64] [--images 2000] [--num-data 10000] [--temperature 0.01]

RUN is a `certbnn train` run folder (e.g. the `fashion` preset's ``cells/grid__sgd__pgd/run``); its
config names the data set, model, training eps, lambda, mix and PGD steps. U(w) = (N / T) mean
nll(w, x) over the first ``--images`` training images, N = ``--num-data``, T = ``--temperature``,
under the run's robust likelihood (``--likelihood``; PGD as ``certbnn train`` runs it for HMC: no
random start). The per-example NLLs are summed in float64, as HMC sums U; ``--dtype float64``
also runs the network in float64, so that float32 rounding of the forward pass (~0.01 in U) is
not what is measured either.

Prints U at the posterior mean w0 and, along one Gaussian direction d, for delta = 1e-9 ... 1e-5:
the change U(w0 + delta d) - U(w0); the odd part (U(w0 + delta d) - U(w0 - delta d)) / 2 beside
the first-order prediction delta <grad U, d> (the gradient HMC's leapfrog uses); and the even
part U(w0 + delta d) + U(w0 - delta d) - 2 U(w0). For a smooth U the odd part equals the
prediction and the even part grows like delta^2; a kink (|w| at w = 0, a ReLU bound crossing 0)
makes the even part grow like |delta|; a jump (PGD's inputs switching as w moves: sign steps,
projection) makes the odd part leave the prediction. ``--move-above 1e-4`` keeps the weights
with |w0| <= 1e-4 fixed (d is 0 there), which tells kinks of |W| at w = 0 from others. HMC's
leapfrog keeps its energy error below about 1 only where U is smooth on the scale of its steps.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from certbnn import data
from certbnn.api import load
from certbnn.likelihoods import BatchNLL, Likelihood, make_likelihood
from certbnn.models import build_model


def run_likelihood(name: str, config: dict) -> Likelihood:
    """The likelihood ``name`` with the run's lambda, mix and (PGD) attack options, as HMC uses it."""
    if name == "standard":
        return make_likelihood("standard")
    options = {**config.get("likelihood_options", {}), "random_start": False} if name == "pgd" else {}
    return make_likelihood(name, lam=config["lam"], mix=config["mix"], **options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="a certbnn train run folder")
    parser.add_argument("--likelihood", choices=("pgd", "standard", "ibp"), default="pgd", help="U's likelihood")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="the network's dtype")
    parser.add_argument("--images", type=int, default=2000, help="training images U is evaluated on")
    parser.add_argument("--num-data", type=int, default=10000, help="N in U = (N / T) mean nll")
    parser.add_argument("--temperature", type=float, default=0.01, help="T in U = (N / T) mean nll")
    parser.add_argument("--seed", type=int, default=0, help="seed of the direction d")
    parser.add_argument(
        "--move-above", type=float, default=0.0, help="d moves only weights with |w0| above this (default 0: all)"
    )
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    config = json.loads((args.run / "config.json").read_text())
    x, y = data.load(config["dataset"], "train").tensors()
    x, y = x[: args.images].to(dtype), y[: args.images]
    model = build_model(config["model"], tuple(x.shape[1:]), int(y.max()) + 1).to(dtype)
    w0 = {n: t.to(dtype) for n, t in load(args.run).posterior.mean().items()}
    nll = BatchNLL(run_likelihood(args.likelihood, config), model, config["eps"])
    scale = args.num_data / args.temperature / x.shape[0]

    def potential(w: dict[str, torch.Tensor]) -> torch.Tensor:
        return nll(w, x, y).sum(dtype=torch.float64) * scale

    w = {n: t.clone().requires_grad_(True) for n, t in w0.items()}
    u0 = potential(w)
    grads = torch.autograd.grad(u0, list(w.values()))
    generator = torch.Generator().manual_seed(args.seed)
    direction = {
        n: torch.randn(t.shape, generator=generator).to(dtype) * (t.abs() > args.move_above) for n, t in w0.items()
    }
    slope = sum((g * direction[n]).sum() for g, n in zip(grads, w)).item()
    u0 = u0.item()
    magnitudes = torch.cat([t.abs().flatten().double() for t in w0.values()])
    near_zero = ", ".join(f"{int((magnitudes < b).sum())} below {b:.0e}" for b in (1e-9, 1e-6))
    print(f"{magnitudes.numel()} weights; |w| (a kink of IBP's |W| r at w = 0): {near_zero}")
    with torch.no_grad():
        again = potential(w0).item() - u0
        print(f"{args.likelihood} U(w0) = {u0:.1f} (again: {again:+.3g}); <grad U, d> = {slope:.4g}")
        print(f"{'delta':>7} {'change':>11} {'odd part':>11} {'prediction':>11} {'even part':>11}")
        for delta in (1e-9, 1e-8, 1e-7, 1e-6, 1e-5):
            up = potential({n: w0[n] + delta * direction[n] for n in w0}).item()
            down = potential({n: w0[n] - delta * direction[n] for n in w0}).item()
            odd, even = (up - down) / 2, up + down - 2 * u0
            print(f"{delta:7.0e} {up - u0:+11.4g} {odd:+11.4g} {slope * delta:+11.4g} {even:+11.4g}")


if __name__ == "__main__":
    main()
