"""Every tensor the evaluation code creates is put on the input's device.

A CPU-only machine cannot see a tensor left on the wrong device, so the torch factory
functions are wrapped and every call made *from* ``certbnn/evaluation`` or
``certbnn/attacks.py`` without an explicit ``device`` is recorded (``torch.as_tensor`` of an
existing tensor keeps its device and is allowed). ``benchmarks/device_check.py`` runs the same
functions on a real GPU.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._pytree import tree_leaves

from certbnn.evaluation import certify, metrics, robustness, stats
from certbnn.functional import detached_params
from certbnn.models import build_model
from certbnn.posterior import GaussianPosterior, SamplePosterior

FACTORIES = (
    "zeros",
    "ones",
    "full",
    "empty",
    "arange",
    "eye",
    "tensor",
    "as_tensor",
    "rand",
    "randn",
    "randint",
    "linspace",
    "logspace",
    "randperm",
)
WATCHED = (str(Path("certbnn", "evaluation")), str(Path("certbnn", "attacks.py")))


@pytest.fixture
def deviceless(monkeypatch):
    """List of ``file:line factory`` for each factory call without ``device`` from the watched code."""
    found: list[str] = []

    def wrap(name, fn):
        @functools.wraps(fn)
        def recorder(*args, **kwargs):
            caller = sys._getframe(1)
            if "device" not in kwargs and any(w in caller.f_code.co_filename for w in WATCHED):
                if not (name == "as_tensor" and args and isinstance(args[0], torch.Tensor)):
                    found.append(f"{Path(caller.f_code.co_filename).name}:{caller.f_lineno} torch.{name}")
            return fn(*args, **kwargs)

        return recorder

    for name in FACTORIES:
        monkeypatch.setattr(torch, name, wrap(name, getattr(torch, name)))
    return found


def test_the_recorder_catches_a_deviceless_tensor(deviceless):
    def certify_like():  # pretend to be evaluation code
        return torch.full((3,), 0.5, dtype=torch.float64)

    certify_like.__code__ = certify_like.__code__.replace(co_filename=certify.__file__)
    certify_like()
    assert len(deviceless) == 1 and "torch.full" in deviceless[0]


@pytest.mark.parametrize("arch", ["mlp:8", "cnn:4c3,p2,8"])
def test_evaluation_creates_every_tensor_on_the_input_device(deviceless, arch):
    torch.manual_seed(0)
    model = build_model(arch, (1, 6, 6), 3).requires_grad_(False)
    mean = detached_params(model)
    gaussian = GaussianPosterior(mean, {n: torch.full_like(t, 1e-3) for n, t in mean.items()})
    samples = SamplePosterior(gaussian.sample(4, torch.Generator().manual_seed(1)))
    x = torch.rand(6, 1, 6, 6, generator=torch.Generator().manual_seed(2))
    y = model(x).argmax(-1)
    gen = torch.Generator().manual_seed(3)
    outputs = []
    for post in (gaussian, samples):
        params = post.sample(3, gen)
        outputs += [
            certify.per_sample_certified(model, params, x, y, 0.01),
            certify.certify_paper(model, post, x, y, 0.01, generator=gen),
            certify.certify_statistical(model, post, x, y, 0.01, num_samples=20, generator=gen),
            certify.certify_statistical(
                model, post, x, y, 0.01, num_samples=70, sequential=True, first_look=16, generator=gen
            ),
            certify.certify_decision(model, post, x, y, torch.full((6,), 0.01), num_samples=3, generator=gen),
            certify.statistical_certified_radius(
                model, post, x, y, eps_max=0.05, iters=2, num_samples=10, generator=gen
            ),
        ]
        probs, sample_probs = metrics.predictive_probs(model, params, x)
        outputs += [
            metrics.predictive_log_probs(model, params, x),
            metrics.expected_calibration_error(probs, y)[1],
            metrics.uncertainty_decomposition(sample_probs),
            metrics.entropy(probs),
        ]
        metrics.evaluate_predictive(model, params, x, y)
        metrics.auroc(probs[:, 0], probs[:, 1])
        for kind in ("fgsm", "pgd"):
            outputs.append(robustness.attack(model, params, x, y, 0.05, kind=kind, steps=2, generator=gen))
        outputs.append(robustness.adversarial_accuracy(model, params, x, y, 0.05, steps=2)[1])
    outputs += [
        certify.certify_weight_box(model, gaussian, x, y, 0.01, k=0.5),
        certify.certify_weight_box(model, gaussian, x, y, 0.01, iters=2, refine=1, refine_iters=1),
        certify.certified_radius(
            lambda a, b, e: certify.per_sample_certified(model, mean, a, b, e)[0], x, y, eps_max=0.05, iters=2
        ),
        stats.one_sided_bounds(torch.tensor([1, 2]), 5, 0.9),
        stats.clopper_pearson(torch.tensor([1]), 5, 0.9),
    ]
    certify.certified_accuracy(y == y, y == y)
    assert deviceless == []

    assert all(t.device == x.device for out in outputs for t in tree_leaves(out) if isinstance(t, torch.Tensor))
