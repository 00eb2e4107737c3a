"""IBP training step of the small CNNs, each figure beside a reference measured in the same run.

    .venv/bin/python benchmarks/cnn_train_bench.py [--quick] [--threads N] [--batch B]

Models: ``cnn:16c4s2,32c4s2,100`` on MNIST (eps 0.1) and ``cifar-small`` (cnn:16c4,32c4,p2,100) on
CIFAR-10 (eps 2/255); batch 128, ``ibp`` likelihood, lam 0.25, mix prob. A step is the loss of one
batch and its parameter gradients (``nll(...).mean()``, ``torch.autograd.grad``); BBB's is a full
``method.step`` (one weight sample, KL, Adam). Cases, per model:

* standard step (categorical likelihood) against a plain-PyTorch step (``model(x)``, cross-entropy);
* IBP step three ways: the general path (``forward`` + ``compute_bounds``, what ``nll`` did for models
  the joint pass refused), the joint pass with the autograd conv / max-pool rules
  (``ops_conv_joint.ENABLED = False``, the code before the hand-written rules), and the joint pass
  with them (the default); each against a hand-written plain-PyTorch IBP step (clean pass, centre /
  radius per layer, ``|W|``, mixed loss) and against the standard step;
* robust BBB step with and without the conv rules, against a hand-written plain-PyTorch BBB step.

Timing: best of interleaved rounds (every case once per round), so load from other processes hits all
cases alike; ratios within one run are what count on a shared machine.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_bench import best_times, plain_bbb_sample, plain_bbb_state, training_batches  # noqa: E402

from certbnn.bounds import ops_conv_joint  # noqa: E402
from certbnn.denormals import flush_denormals  # noqa: E402
from certbnn.functional import detached_params, forward  # noqa: E402
from certbnn.inference import make_method  # noqa: E402
from certbnn.likelihoods import BatchNLL, cross_entropy, make_likelihood, mix_losses  # noqa: E402
from certbnn.models import build_model  # noqa: E402
from certbnn.priors import prior_from_model  # noqa: E402

LAM = 0.25
MODELS = [  # (model, dataset, input shape, eps, training-set size)
    ("cnn:16c4s2,32c4s2,100", "mnist", (1, 28, 28), 0.1, 60000),
    ("cifar-small", "cifar10", (3, 32, 32), 2 / 255, 50000),
]


def with_conv_rules(enabled: bool, fn):
    """``fn`` run with ``ops_conv_joint.ENABLED`` set to ``enabled`` (restored after)."""

    def run() -> None:
        before = ops_conv_joint.ENABLED
        ops_conv_joint.ENABLED = enabled
        try:
            fn()
        finally:
            ops_conv_joint.ENABLED = before

    return run


def general_nll(lik, model, params, x, y, eps):
    """``IntervalRobust.nll`` without the joint pass: ``forward`` and ``compute_bounds``."""
    logits = forward(model, params, x)
    robust = cross_entropy(lik.worst_case_logits(model, params, x, y, eps, logits.shape[-1]), y)
    return mix_losses(cross_entropy(logits, y), robust, lik.lam, lik.mix)


def grad_step(loss_fn, params: dict, batches):
    """A closure: the loss of the next of ``batches`` and its gradients w.r.t. ``params``."""
    cycle = itertools.cycle(batches)
    leaves = list(params.values())

    def step() -> None:
        with flush_denormals():
            x, y = next(cycle)
            torch.autograd.grad(loss_fn(x, y).mean(), leaves)

    return step


# --- hand-written plain-PyTorch references ----------------------------------------------------------


def plain_ibp_logits(model, weights: dict, x, eps):
    """Clean logits and IBP bounds, one layer at a time: the textbook computation."""
    lo, hi, h = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1), x
    for i, layer in enumerate(model):
        if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
            W, b = weights[f"{i}.weight"], weights[f"{i}.bias"]
            if isinstance(layer, torch.nn.Linear):
                op = F.linear
            else:

                def op(z, w, bias=None, layer=layer):
                    return F.conv2d(z, w, bias, layer.stride, layer.padding, layer.dilation, layer.groups)

            c, r = (hi + lo) / 2, (hi - lo) / 2
            h, c, r = op(h, W, b), op(c, W, b), op(r, W.abs())
            lo, hi = c - r, c + r
        else:  # monotone: ReLU, MaxPool2d, Flatten
            h, lo, hi = layer(h), layer(lo), layer(hi)
    return h, lo, hi


def plain_robust_loss(logits, lo, hi, y):
    worst = torch.where(F.one_hot(y, logits.shape[-1]).bool(), lo, hi)
    clean, robust = F.cross_entropy(logits, y, reduction="none"), F.cross_entropy(worst, y, reduction="none")
    return -torch.logsumexp(
        torch.stack([torch.log(torch.tensor(LAM)) - clean, torch.log1p(-torch.tensor(LAM)) - robust]), 0
    )


def plain_bbb_stepper(model, num_data: int, batches, eps: float, kl_weight: float = 0.01):
    """Robust BBB written in one function with torch.optim.Adam on mu and rho."""
    mu, rho, opt, prior_std = plain_bbb_state(model)
    cycle = itertools.cycle(batches)

    def step() -> None:
        with flush_denormals():
            x, y = next(cycle)
            opt.zero_grad()
            w, kl = plain_bbb_sample(mu, rho, prior_std)
            loss = plain_robust_loss(*plain_ibp_logits(model, w, x, eps), y).mean()
            (loss + kl_weight * kl / num_data).backward()
            opt.step()

    return step


def bbb_stepper(model, num_data: int, batches, eps: float):
    """One certbnn robust BBB step (``ibp`` likelihood) on the next of ``batches``."""
    method = make_method("bbb", prior=prior_from_model(model), num_data=num_data)
    generator = torch.Generator().manual_seed(0)
    nll = BatchNLL(make_likelihood("ibp", lam=LAM), model, eps, generator)
    box = {"state": method.init(detached_params(model), generator), "next": itertools.cycle(batches)}

    def step() -> None:
        with flush_denormals():
            box["state"], _ = method.step(box["state"], next(box["next"]), nll, generator)

    return step


def bench_model(arch: str, dataset: str, shape: tuple, eps: float, num_data: int, batch: int, rounds: int, calls: int):
    torch.manual_seed(0)
    model = build_model(arch, shape, 10)
    batches, source = training_batches(dataset, shape, batch, count=8)
    params = {k: v.requires_grad_() for k, v in detached_params(model).items()}
    std, ibp = make_likelihood("standard"), make_likelihood("ibp", lam=LAM)
    plain_model = model.requires_grad_()
    cases = {
        "standard": grad_step(lambda x, y: std.nll(model, params, x, y), params, batches),
        "plain standard": grad_step(
            lambda x, y: F.cross_entropy(plain_model(x), y), dict(plain_model.named_parameters()), batches
        ),
        "ibp general": grad_step(lambda x, y: general_nll(ibp, model, params, x, y, eps), params, batches),
        "ibp joint autograd": with_conv_rules(
            False, grad_step(lambda x, y: ibp.nll(model, params, x, y, eps), params, batches)
        ),
        "ibp joint rules": with_conv_rules(
            True, grad_step(lambda x, y: ibp.nll(model, params, x, y, eps), params, batches)
        ),
        "plain ibp": grad_step(
            lambda x, y: plain_robust_loss(*plain_ibp_logits(model, params, x, eps), y), params, batches
        ),
        "bbb autograd": with_conv_rules(False, bbb_stepper(model, num_data, batches, eps)),
        "bbb rules": with_conv_rules(True, bbb_stepper(model, num_data, batches, eps)),
        "plain bbb": plain_bbb_stepper(model, num_data, batches, eps),
    }
    t = best_times(cases, rounds, calls)
    print(f"\n## {arch} {shape}, batch {batch}, ibp eps {eps:.4g}, lam {LAM} ({source})")
    print(f"{'case':44s} {'ms/step':>8s}  {'reference (same run)':30s} {'ref ms':>8s} {'ratio':>6s}")

    def row(name: str, case: str, ref_name: str, ref: str) -> None:
        print(f"{name:44s} {t[case] * 1e3:8.2f}  {ref_name:30s} {t[ref] * 1e3:8.2f} {t[case] / t[ref]:6.2f}")

    row("standard step", "standard", "plain-PyTorch standard step", "plain standard")
    for label, case in [
        ("ibp step, general path (forward+bounds)", "ibp general"),
        ("ibp step, joint pass, autograd conv/pool", "ibp joint autograd"),
        ("ibp step, joint pass, conv/pool rules", "ibp joint rules"),
    ]:
        row(label, case, "plain-PyTorch ibp step", "plain ibp")
        row("", case, "certbnn standard step", "standard")
    row("bbb (ibp) step, autograd conv/pool", "bbb autograd", "plain-PyTorch bbb (ibp) step", "plain bbb")
    row("bbb (ibp) step, conv/pool rules", "bbb rules", "plain-PyTorch bbb (ibp) step", "plain bbb")
    print(
        f"speed-up of the conv/pool rules: ibp step {t['ibp general'] / t['ibp joint rules']:.2f}x over the general "
        f"path, {t['ibp joint autograd'] / t['ibp joint rules']:.2f}x over the autograd joint pass; "
        f"bbb step {t['bbb autograd'] / t['bbb rules']:.2f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (about two minutes)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--only", choices=[m[0] for m in MODELS], help="one model only")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds, calls = (3, 2) if args.quick else (7, 5)
    print(
        f"# {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, threads "
        f"{torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}, {time.strftime('%Y-%m-%d %H:%M')}, "
        f"certbnn from {os.path.dirname(sys.modules['certbnn'].__file__)}"
    )
    for arch, dataset, shape, eps, num_data in MODELS:
        if args.only in (None, arch):
            bench_model(arch, dataset, shape, eps, num_data, args.batch, rounds, calls)


if __name__ == "__main__":
    main()
