"""Training-step speed (issue 13, items 1 and 5), each figure beside a reference measured in the same run.

    .venv/bin/python benchmarks/train_bench.py [--quick] [--bayesian-torch-python PATH] [--bayesian-torch-path DIR]
    PYTHONPATH=/tmp/before/src .venv/bin/python benchmarks/train_bench.py --quick     # the code of another commit

Item 1 (MNIST MLP 784-512-10, batch 128, IBP likelihood eps 0.11, lam 0.25, mix prob):
robust BBB examples/s against (a) a plain-PyTorch step of the same computation written by hand below
(sample weights, clean pass, IBP, mixed loss, KL, torch.optim.Adam on mu and rho) and (b) the FLOP floor:
the step's matmul FLOPs (counted by FlopCounterMode on the hand-written step: clean, IBP centre and radius
passes) at the matmul ceiling (a 2048x2048 float32 matmul timed in this run); then SGD, Adam, NoisyAdam,
SWAG and SG-HMC step times over robust SGD's; standard BBB (categorical likelihood) against bayesian-torch's
LinearReparameterization
(same MLP, batch, Adam, 1 sample; run in a subprocess by ``--bayesian-torch-python``, with
``--bayesian-torch-path`` added to its sys.path, so it is never a dependency).

Item 5 (cifar-small CNN, batch 64): robust BBB examples/s against a hand-written plain-PyTorch step, and
IBP evaluation (S = 10 posterior samples, no grad) against a hand-written per-sample loop.

Timing: best of interleaved rounds (every case once per round), so load from other processes hits all
cases alike; ratios within one run are what count on a shared machine.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from certbnn import data
from certbnn.bounds import compute_bounds
from certbnn.denormals import flush_denormals
from certbnn.errors import CertbnnError
from certbnn.functional import detached_params
from certbnn.inference import make_method
from certbnn.inference.flat import FlatLayout, adam_flat_, randn_flat
from certbnn.likelihoods import BatchNLL, make_likelihood
from certbnn.models import build_model
from certbnn.priors import prior_from_model

EPS, LAM, BATCH = 0.11, 0.25, 128


def best_times(cases: dict, rounds: int, calls: int) -> dict[str, float]:
    """Seconds per call of each case: the best of ``rounds`` interleaved rounds of ``calls`` calls."""
    for fn in cases.values():
        fn()
    best = {k: float("inf") for k in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            best[name] = min(best[name], (time.perf_counter() - start) / calls)
    return best


def matmul_ceiling(rounds: int) -> float:
    """FLOP/s of a 2048x2048 float32 matmul (best of ``rounds``)."""
    a = torch.randn(2048, 2048)
    seconds = best_times({"mm": lambda: a @ a}, rounds, 2)["mm"]
    return 2 * 2048**3 / seconds


def certbnn_stepper(name: str, model, likelihood: str, num_data: int, batches, **options):
    """A closure running one certbnn step of method ``name`` on the next of ``batches`` (cycled;
    state carried between calls), with subnormals flushed as the trainer does."""
    method = make_method(name, prior=prior_from_model(model), num_data=num_data, **options)
    return method_stepper(method, model, likelihood, batches)


def method_stepper(method, model, likelihood: str, batches):
    """:func:`certbnn_stepper` for a method object (e.g. another code version's)."""
    generator = torch.Generator().manual_seed(0)
    like = make_likelihood(likelihood, lam=LAM) if likelihood == "ibp" else make_likelihood(likelihood)
    nll = BatchNLL(like, model, EPS, generator)
    box = {"state": method.init(detached_params(model), generator), "next": itertools.cycle(batches)}

    def step() -> None:
        with flush_denormals():
            box["state"], _ = method.step(box["state"], next(box["next"]), nll, generator)

    return step


def noise_draw(model):
    """A closure drawing one standard normal per parameter of ``model``, as a BBB step does
    (:func:`certbnn.inference.flat.randn_flat`, one sample)."""
    params = detached_params(model)
    layout, like = FlatLayout(params), next(iter(params.values()))
    generator = torch.Generator().manual_seed(0)
    return lambda: randn_flat(layout, 1, like, generator)


def bbb_own_work(model):
    """A closure doing only what a BBB step must do beyond a point estimate's step, each as ONE
    pass over the flat buffers: the noise draw, sigma = softplus(rho) and a fused Adam step on
    both mu and rho (twice the parameters)."""
    draw = noise_draw(model)
    P = sum(p.numel() for p in model.parameters())
    mu, rho = torch.zeros(P), torch.full((P,), -6.9)
    moments = [torch.zeros(P) for _ in range(4)]

    def work() -> None:
        noise = draw()[0]
        sigma = F.softplus(rho)
        adam_flat_([mu, rho], [noise.clone(), sigma], moments[:2], moments[2:], 1, 1e-9, (0.9, 0.999), 1e-8)

    return work


def training_batches(dataset: str, shape: tuple, batch_size: int, count: int = 32) -> tuple[list, str]:
    """``count`` distinct training batches: real images when the data set loads (CERTBNN_DATA),
    else uniform noise with random labels; and a label saying which."""
    try:
        images, labels = data.load(dataset, "train").tensors()
    except CertbnnError:
        g = torch.Generator().manual_seed(0)
        return [
            (torch.rand(batch_size, *shape, generator=g), torch.randint(0, 10, (batch_size,), generator=g))
            for _ in range(count)
        ], "random images"
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))[: count * batch_size]
    return [
        (images[i].float().reshape(batch_size, *shape), labels[i].long()) for i in order.view(count, batch_size)
    ], f"{dataset} training batches"


# --- hand-written plain-PyTorch references ----------------------------------------------------------


def plain_layers(model) -> list:
    """The Sequential's layers, for the hand-written references (Linear, Conv2d, ReLU, MaxPool2d, Flatten)."""
    return list(model)


def plain_ibp_logits(layers, weights: dict, x, eps):
    """Clean logits and IBP bounds, one layer at a time: the textbook computation."""
    lo, hi, h, i = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1), x, 0
    for layer in layers:
        if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
            W, b = weights[f"{i}.weight"], weights[f"{i}.bias"]
            op = F.linear if isinstance(layer, torch.nn.Linear) else F.conv2d
            c, r = (hi + lo) / 2, (hi - lo) / 2
            h, c, r = op(h, W, b), op(c, W, b), op(r, W.abs())
            lo, hi = c - r, c + r
        elif isinstance(layer, torch.nn.Flatten):
            h, lo, hi = h.flatten(1), lo.flatten(1), hi.flatten(1)
        else:  # monotone: ReLU, MaxPool2d
            h, lo, hi = layer(h), layer(lo), layer(hi)
        i += 1
    return h, lo, hi


def robust_loss(logits, lo, hi, y):
    worst = torch.where(F.one_hot(y, logits.shape[-1]).bool(), lo, hi)
    clean, robust = F.cross_entropy(logits, y, reduction="none"), F.cross_entropy(worst, y, reduction="none")
    return -torch.logsumexp(
        torch.stack([torch.log(torch.tensor(LAM)) - clean, torch.log(torch.tensor(1 - LAM)) - robust]), 0
    ).mean()


def plain_bbb_state(model, lr: float = 3e-3):
    """``(mu, rho, Adam over both, prior std)`` of a plain BBB: mu from the model's weights,
    sigma = softplus(-6.9) ~ 1e-3."""
    prior_std = dict(prior_from_model(model).std().items())
    mu = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    rho = {n: torch.full_like(p, -6.9).requires_grad_() for n, p in mu.items()}
    return mu, rho, torch.optim.Adam([*mu.values(), *rho.values()], lr=lr), prior_std


def plain_bbb_sample(mu: dict, rho: dict, prior_std: dict):
    """Reparameterised weights ``mu + softplus(rho) * noise`` and the Gaussian KL(q || prior)."""
    sigma = {n: F.softplus(r) for n, r in rho.items()}
    w = {n: mu[n] + sigma[n] * torch.randn_like(mu[n]) for n in mu}
    kl = sum(
        (torch.log(prior_std[n] / sigma[n]) + (sigma[n] ** 2 + mu[n] ** 2) / (2 * prior_std[n] ** 2) - 0.5).sum()
        for n in mu
    )
    return w, kl


def plain_bbb_stepper(model, num_data: int, batches, robust: bool = True, kl_weight: float = 0.01):
    """Robust (or standard) BBB written in one function with torch.optim.Adam on mu and rho
    (the next of ``batches`` each call, subnormals flushed like the certbnn steps)."""
    layers = plain_layers(model)
    mu, rho, opt, prior_std = plain_bbb_state(model)
    cycle = itertools.cycle(batches)

    def step() -> None:
        with flush_denormals():
            plain_step(*next(cycle))

    def plain_step(x, y) -> None:
        opt.zero_grad()
        w, kl = plain_bbb_sample(mu, rho, prior_std)
        if robust:
            loss = robust_loss(*plain_ibp_logits(layers, w, x, EPS), y)
        else:
            loss = F.cross_entropy(torch.func.functional_call(model, w, (x,)), y)
        (loss + kl_weight * kl / num_data).backward()
        opt.step()

    return step


def plain_ibp_eval(model, weights: dict, x, S: int):
    layers = plain_layers(model)

    def run() -> None:
        with torch.no_grad():
            for s in range(S):
                plain_ibp_logits(layers, {n: w[s] for n, w in weights.items()}, x, EPS)

    return run


# --- bayesian-torch -----------------------------------------------------------------------------------

BT_SCRIPT = r"""
import sys, time, json, torch, torch.nn as nn, torch.nn.functional as F
sys.path.insert(0, sys.argv[1]) if sys.argv[1] else None
from bayesian_torch.layers import LinearReparameterization
torch.manual_seed(0)
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = LinearReparameterization(784, 512)
        self.l2 = LinearReparameterization(512, 10)
    def forward(self, x):
        h, kl1 = self.l1(x.flatten(1)); out, kl2 = self.l2(F.relu(h)); return out, kl1 + kl2
net = Net(); opt = torch.optim.Adam(net.parameters(), lr=3e-3)
x, y = torch.rand(128, 1, 28, 28), torch.randint(0, 10, (128,))
def step():
    opt.zero_grad(); out, kl = net(x); (F.cross_entropy(out, y) + 0.01 * kl / 60000).backward(); opt.step()
rounds, calls = int(sys.argv[2]), int(sys.argv[3])
for _ in range(3): step()
best = float("inf")
for _ in range(rounds):
    t = time.perf_counter()
    for _ in range(calls): step()
    best = min(best, (time.perf_counter() - t) / calls)
print(json.dumps({"seconds": best}))
"""


def bayesian_torch_step(python: str, path: str, rounds: int, calls: int) -> float:
    out = subprocess.run(
        [python, "-c", BT_SCRIPT, path or "", str(rounds), str(calls)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": ""},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds"]


def flops_of(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (about a minute)")
    parser.add_argument("--bayesian-torch-python", help="python of an environment where bayesian-torch imports")
    parser.add_argument("--bayesian-torch-path", default="", help="extra sys.path entry holding bayesian_torch")
    parser.add_argument("--skip-cnn", action="store_true")
    args = parser.parse_args()
    rounds, calls = (3, 5) if args.quick else (7, 20)
    torch.manual_seed(0)
    print(
        f"# {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, threads "
        f"{torch.get_num_threads()}, certbnn from {os.path.dirname(sys.modules['certbnn'].__file__)}"
    )
    ceiling = matmul_ceiling(rounds)
    print(f"matmul ceiling (2048^2 float32): {ceiling / 1e9:.1f} GFLOP/s")

    # item 1 ------------------------------------------------------------------------------------------
    model = build_model("mnist-mlp", (1, 28, 28), 10)
    batches, source = training_batches("mnist", (1, 28, 28), BATCH)
    print(f"data: {source} ({len(batches)} batches, cycled)")
    batch = batches[0]
    robust = {
        name: certbnn_stepper(name, model, "ibp", 60000, batches)
        for name in ("bbb", "sgd", "adam", "noisy-adam", "swag", "sghmc")
    }
    cases = {f"{k} (ibp)": v for k, v in robust.items()}
    cases["plain-pytorch bbb (ibp)"] = plain_bbb_stepper(model, 60000, batches)
    cases["bbb (standard)"] = certbnn_stepper("bbb", model, "standard", 60000, batches)
    cases["noise draw"] = noise_draw(model)
    cases["bbb's own work"] = bbb_own_work(model)
    times = best_times(cases, rounds, calls)
    step_flops = flops_of(plain_bbb_stepper(model, 60000, [batch]))  # the same GEMMs (engine refuses global hooks)
    floor = step_flops / ceiling
    bbb = times["bbb (ibp)"]
    print("\n## 1. robust BBB, MNIST MLP 784-512-10, batch 128, IBP eps 0.11, lam 0.25")
    print(f"{'case':34s} {'ms/step':>8s} {'ex/s':>8s}  reference")
    print(f"{'bbb (ibp)':34s} {bbb * 1e3:8.2f} {BATCH / bbb:8.0f}")
    plain = times["plain-pytorch bbb (ibp)"]
    print(
        f"{'plain-pytorch bbb (ibp)':34s} {plain * 1e3:8.2f} {BATCH / plain:8.0f}  certbnn / plain speed "
        f"{plain / bbb:.2f}x"
    )
    print(
        f"{'FLOP floor at the ceiling':34s} {floor * 1e3:8.2f} {BATCH / floor:8.0f}  {step_flops / 1e6:.0f} "
        f"MFLOP/step; certbnn at {step_flops / bbb / 1e9:.1f} GFLOP/s = {floor / bbb:.0%} of the ceiling"
    )
    sgd = times["sgd (ibp)"]
    noise, own = times["noise draw"], times["bbb's own work"]
    print(
        f"{'lower bound: sgd step + noise draw':34s} {(sgd + noise) * 1e3:8.2f} {BATCH / (sgd + noise):8.0f}  "
        f"robust SGD's step {sgd * 1e3:.2f} ms (BBB does all its work) + {noise * 1e3:.2f} ms for the "
        f"{sum(p.numel() for p in model.parameters()):,} normals BBB draws (torch's CPU generator, serial)"
    )
    print(
        f"BBB's own work (noise, softplus, Adam on mu and rho; one pass each): {own * 1e3:.2f} ms = "
        f"{own / sgd:.2f} of robust SGD's step (a 1.3x target leaves 0.30)"
    )
    print("\nstep time over robust SGD's (target <= 1.3):")
    for name in ("sgd", "adam", "noisy-adam", "swag", "sghmc", "bbb"):
        t = times[f"{name} (ibp)"]
        print(f"  {name:12s} {t * 1e3:8.2f} ms  {BATCH / t:8.0f} ex/s  {t / sgd:5.2f}x")
    std = times["bbb (standard)"]
    print(f"\nstandard BBB: {std * 1e3:.2f} ms/step, {BATCH / std:.0f} ex/s")
    if args.bayesian_torch_python:
        bt = bayesian_torch_step(args.bayesian_torch_python, args.bayesian_torch_path, rounds, calls)
        std2 = best_times({"bbb (standard)": cases["bbb (standard)"]}, rounds, calls)["bbb (standard)"]
        std = min(std, std2)
        print(
            f"bayesian-torch LinearReparameterization: {bt * 1e3:.2f} ms/step, {BATCH / bt:.0f} ex/s; "
            f"certbnn / bayesian-torch speed {bt / std:.2f}x (target >= 1.3)"
        )

    if args.skip_cnn:
        return
    # item 5 ------------------------------------------------------------------------------------------
    cnn = build_model("cifar-small", (3, 32, 32), 10)
    cb = (torch.rand(64, 3, 32, 32), torch.randint(0, 10, (64,)))
    S = 10
    post = {n: p.detach() + 0.01 * torch.randn(S, *p.shape) for n, p in cnn.named_parameters()}
    lower, upper = (cb[0] - EPS).clamp(0, 1), (cb[0] + EPS).clamp(0, 1)

    def certbnn_eval() -> None:
        with torch.no_grad():
            compute_bounds(cnn, lower, upper, params=post)

    cases = {
        "bbb (ibp)": certbnn_stepper("bbb", cnn, "ibp", 50000, [cb]),
        "plain-pytorch bbb (ibp)": plain_bbb_stepper(cnn, 50000, [cb]),
        "ibp eval": certbnn_eval,
        "plain-pytorch ibp eval": plain_ibp_eval(cnn, post, cb[0], S),
    }
    times = best_times(cases, rounds, max(1, calls // 4))
    print("\n## 5. cifar-small CNN, batch 64")
    t, p = times["bbb (ibp)"], times["plain-pytorch bbb (ibp)"]
    print(
        f"robust BBB step: {64 / t:.0f} ex/s; plain-pytorch {64 / p:.0f} ex/s; certbnn / plain time "
        f"{t / p:.2f}x (target <= 1.5)"
    )
    t, p = times["ibp eval"], times["plain-pytorch ibp eval"]
    print(
        f"IBP evaluation, S = {S} samples: {64 / t:.0f} ex/s; plain-pytorch loop {64 / p:.0f} ex/s; "
        f"certbnn / plain time {t / p:.2f}x (target <= 1.5)"
    )


if __name__ == "__main__":
    main()
