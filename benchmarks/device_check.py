"""Run every certificate, attack and metric of ``certbnn.evaluation`` on one device.

    .venv/bin/python benchmarks/device_check.py                 # cuda when available, else cpu
    .venv/bin/python benchmarks/device_check.py --device cpu

A tiny MLP and a tiny CNN, each with a Gaussian and a sample posterior; generators on the
device and on the CPU; then ``evaluate_run`` (all certificates, both attacks, OOD, radius)
on a small trained run. Each check prints ``ok`` or ``FAIL`` (with the error); a result
tensor on another device is a failure. Exit status 1 if anything failed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import traceback
from pathlib import Path

import numpy as np
import torch
from torch.utils._pytree import tree_leaves

from certbnn import data, training
from certbnn.config import make_config
from certbnn.evaluation import certify, metrics, robustness, stats
from certbnn.evaluation.runner import EvalOptions, evaluate_run
from certbnn.functional import detached_params
from certbnn.models import build_model
from certbnn.posterior import GaussianPosterior, SamplePosterior

FAILURES: list[str] = []


def _tensors(obj) -> list[torch.Tensor]:
    """Every tensor in a nested result (dicts, tuples, lists)."""
    return [t for t in tree_leaves(obj) if isinstance(t, torch.Tensor)]


def check(name: str, device: torch.device, fn) -> None:
    try:
        out = fn()
        wrong = [tuple(t.shape) for t in _tensors(out) if t.device.type != device.type]
        if wrong:
            raise RuntimeError(f"results on the wrong device: shapes {wrong}")
        print(f"ok    {name}")
    except Exception as exc:  # report every failure, then exit non-zero
        FAILURES.append(name)
        print(f"FAIL  {name}: {type(exc).__name__}: {exc}")
        traceback.print_exc(limit=-3)


def functions(device: torch.device) -> None:
    for arch in ("mlp:8", "cnn:4c3,p2,8"):
        torch.manual_seed(0)
        model = build_model(arch, (1, 6, 6), 3).to(device).requires_grad_(False)
        mean = detached_params(model)
        gaussian = GaussianPosterior(mean, {n: torch.full_like(t, 1e-3) for n, t in mean.items()})
        samples = SamplePosterior(gaussian.sample(4, torch.Generator(device=device).manual_seed(1)))
        x = torch.rand(6, 1, 6, 6, device=device)
        y = model(x).argmax(-1)
        for pname, post in (("gaussian", gaussian), ("samples", samples)):
            for gname, gdev in (("device-gen", device), ("cpu-gen", torch.device("cpu"))):
                gen = torch.Generator(device=gdev).manual_seed(3)
                tag = f"{arch} {pname} {gname}"
                params = post.sample(3, gen)
                check(
                    f"{tag} per_sample_certified",
                    device,
                    lambda: certify.per_sample_certified(model, params, x, y, 0.01),
                )
                check(
                    f"{tag} certify_paper",
                    device,
                    lambda: certify.certify_paper(model, post, x, y, 0.01, generator=gen),
                )
                check(
                    f"{tag} certify_statistical",
                    device,
                    lambda: certify.certify_statistical(model, post, x, y, 0.01, num_samples=20, generator=gen),
                )
                check(
                    f"{tag} certify_statistical sequential",
                    device,
                    lambda: certify.certify_statistical(
                        model, post, x, y, 0.01, num_samples=70, sequential=True, first_look=16, generator=gen
                    ),
                )
                check(
                    f"{tag} certify_decision",
                    device,
                    lambda: certify.certify_decision(
                        model, post, x, y, torch.full((6,), 0.01, device=device), num_samples=3, generator=gen
                    ),
                )
                check(
                    f"{tag} statistical_certified_radius",
                    device,
                    lambda: certify.statistical_certified_radius(
                        model, post, x, y, eps_max=0.05, iters=2, num_samples=10, generator=gen
                    ),
                )
                for kind in ("fgsm", "pgd"):
                    check(
                        f"{tag} attack {kind}",
                        device,
                        lambda: robustness.attack(model, params, x, y, 0.05, kind=kind, steps=2, generator=gen),
                    )
                check(
                    f"{tag} adversarial_accuracy",
                    device,
                    lambda: robustness.adversarial_accuracy(model, params, x, y, 0.05, steps=2, generator=gen)[1],
                )

                def all_metrics():
                    probs, sample_probs = metrics.predictive_probs(model, params, x)
                    metrics.evaluate_predictive(model, params, x, y)
                    metrics.auroc(probs[:, 0], probs[:, 1])
                    return [
                        metrics.predictive_log_probs(model, params, x),
                        metrics.entropy(probs),
                        metrics.max_probability(probs),
                        metrics.uncertainty_decomposition(sample_probs),
                        metrics.expected_calibration_error(probs, y)[1],
                        metrics.accuracy(probs, y),
                        metrics.nll(probs, y),
                        metrics.brier(probs, y),
                    ]

                check(f"{tag} metrics", device, all_metrics)
        check(
            f"{arch} certify_weight_box k",
            device,
            lambda: certify.certify_weight_box(model, gaussian, x, y, 0.01, k=0.5),
        )
        check(
            f"{arch} certify_weight_box search",
            device,
            lambda: certify.certify_weight_box(model, gaussian, x, y, 0.01, iters=3, refine=1, refine_iters=2),
        )
        check(
            f"{arch} certified_radius",
            device,
            lambda: certify.certified_radius(
                lambda a, b, e: certify.per_sample_certified(model, mean, a, b, e)[0], x, y, eps_max=0.05, iters=3
            ),
        )
        check(f"{arch} certified_accuracy", device, lambda: certify.certified_accuracy(y == y, y == y))
    check(
        "stats bounds",
        device,
        lambda: [
            stats.one_sided_bounds(torch.tensor([1, 2], device=device), 5, 0.9),
            stats.clopper_pearson(torch.tensor([1], device=device), 5, 0.9),
        ],
    )


def runner(device: torch.device) -> None:
    rng = np.random.default_rng(0)
    labels = np.arange(240) % 2
    images = rng.integers(0, 60, (240, 1, 6, 6)).astype(np.uint8)
    images[labels == 0, :, :, :3] += 150
    images[labels == 1, :, :, 3:] += 150
    data.register_arrays("device-check", {"train": (images, labels), "test": (images[:40], labels[:40])}, num_classes=2)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            config = make_config(
                {},
                dict(
                    dataset="device-check",
                    model="mlp:16",
                    method="bbb",
                    likelihood="ibp",
                    eps=0.05,
                    epochs=2,
                    batch_size=32,
                    val_size=40,
                    seed=1,
                    lr=0.01,
                    kl_weight=0.01,
                    device=str(device),
                ),
            )
            training.train(config, Path(tmp) / "run", progress=False, log=lambda s: None)
            options = EvalOptions(
                eps=[0.02],
                certificates=["per-sample", "paper", "statistical", "weight-box", "decision"],
                samples=4,
                pgd_steps=3,
                radius=True,
                ood="device-check",
                ood_fgsm_eps=0.3,
                device=str(device),
                chunk_size=16,
            )
            check(
                "evaluate_run",
                device,
                lambda: evaluate_run(Path(tmp) / "run", options, Path(tmp) / "eval", progress=False) and None,
            )
    finally:
        data.unregister("device-check")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu, cuda or cuda:N (default: cuda when available)",
    )
    device = torch.device(parser.parse_args().device)
    print(f"device: {device} (torch {torch.__version__})")
    functions(device)
    runner(device)
    print(f"{len(FAILURES)} failure(s)" + (": " + ", ".join(FAILURES) if FAILURES else ""))
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
