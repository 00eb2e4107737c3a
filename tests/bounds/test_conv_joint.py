"""The joint clean + IBP pass of Conv2d and MaxPool2d (``certbnn.bounds.ops_conv_joint``): the
IBP loss and its gradients equal those of the general path (``forward`` + ``compute_bounds``),
its bounds are sound, and the hand-written rules are the ones that run."""

from __future__ import annotations

import random

import pytest
import torch
from bounds_testlib import random_boxes, random_cnn, sampled_params
from torch import nn
from torch.overrides import TorchFunctionMode

from certbnn.bounds import check_soundness, compute_bounds, ops_conv_joint
from certbnn.bounds.engine import point_and_ibp
from certbnn.functional import detached_params, forward
from certbnn.likelihoods import cross_entropy, make_likelihood, mix_losses
from certbnn.models import build_model

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")

CNNS = [("cnn:16c4s2,32c4s2,100", (1, 28, 28), 0.1), ("cifar-small", (3, 32, 32), 2 / 255)]
TOL = {torch.float64: 1e-10, torch.float32: 5e-5}


def _generic_nll(lik, model, params, x, y, eps):
    """``IntervalRobust.nll`` without its joint pass: ``forward`` and ``compute_bounds``."""
    logits = forward(model, params, x)
    clean = cross_entropy(logits, y)
    if lik.lam == 1.0 or eps == 0.0:
        return clean
    robust = cross_entropy(lik.worst_case_logits(model, params, x, y, eps, logits.shape[-1]), y)
    return mix_losses(clean, robust, lik.lam, lik.mix)


def _assert_close(a: torch.Tensor, b: torch.Tensor, tol: float, what: str) -> None:
    """``|a - b| <= tol * max(1, max |b|)`` entrywise."""
    assert a.shape == b.shape, what
    scale = max(1.0, b.abs().max().item()) if b.numel() else 1.0
    err = (a - b).abs().max().item() if b.numel() else 0.0
    assert err <= tol * scale, f"{what}: max error {err:.3g} (scale {scale:.3g})"


def _images(shape, n: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Images in [0, 1] with a constant (black) top half and some saturated pixels: equal conv
    outputs in that region, hence ties in the max-pooling windows, and clamped box bounds."""
    x = torch.rand((n, *shape), generator=gen, dtype=dtype)
    x[..., : shape[-2] // 2, :] = 0.0
    x[x > 0.9] = 1.0
    return x


class _Counter:
    def __init__(self, monkeypatch) -> None:
        self.conv = self.pool = 0
        conv_apply, pool_apply = ops_conv_joint._ConvPointIBP.apply, ops_conv_joint._MaxPool2d.apply

        def conv(*a):
            self.conv += 1
            return conv_apply(*a)

        def pool(*a):
            self.pool += 1
            return pool_apply(*a)

        monkeypatch.setattr(ops_conv_joint._ConvPointIBP, "apply", conv)
        monkeypatch.setattr(ops_conv_joint._MaxPool2d, "apply", pool)


@pytest.mark.parametrize("arch,shape,eps", CNNS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("samples", [None, 1, 3])
def test_cnn_ibp_loss_and_gradients_match_general_path(monkeypatch, arch, shape, eps, dtype, samples):
    """The two training CNNs, point params and S stacked samples (BBB's S = 1 included): the loss
    and every parameter and input gradient of ``nll`` equal the general path's (float64 to 1e-10,
    float32 to 5e-5 of the gradient's scale), for eps 0 and > 0 and lam 0, 0.25, 1."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = build_model(arch, shape, 10).to(dtype)
    base = detached_params(model)
    params = {
        k: (v if samples is None else v + 0.02 * torch.randn((samples, *v.shape), generator=gen, dtype=dtype))
        for k, v in base.items()
    }
    params = {k: v.clone().requires_grad_() for k, v in params.items()}
    x, y = _images(shape, 6, dtype, gen).requires_grad_(), torch.randint(0, 10, (6,), generator=gen)
    leaves = {"input": x, **params}  # input gradients see the max-pooling ties' routing
    counter = _Counter(monkeypatch)
    for e, lam in [(eps, 0.25), (eps, 0.0), (eps, 1.0), (0.0, 0.25), (0.0, 0.0)]:
        lik = make_likelihood("ibp", lam=lam)
        fast = lik.nll(model, params, x, y, e)
        ref = _generic_nll(lik, model, params, x, y, e)
        _assert_close(fast, ref, TOL[dtype], f"loss eps={e} lam={lam}")
        g_fast = torch.autograd.grad(fast.sum(), list(leaves.values()))
        g_ref = torch.autograd.grad(ref.sum(), list(leaves.values()))
        for name, a, b in zip(leaves, g_fast, g_ref):
            _assert_close(a, b, TOL[dtype], f"grad {name} eps={e} lam={lam}")
    convs_per_call = 0 if samples == 3 else 2  # several samples: the general conv rule
    assert counter.conv == 2 * convs_per_call  # the two calls with eps > 0 and lam < 1
    assert counter.pool == (2 * 3 if arch == "cifar-small" else 0)


@pytest.mark.parametrize("seed", range(30))
def test_random_cnns_point_and_ibp_match_general_path(seed):
    """Random conv stacks (groups, stride, dilation, padding modes, max/avg pooling, BN): values
    of ``point_and_ibp`` and the gradients of the parameters and of the input (through the point
    and the box) equal those of ``forward`` + ``compute_bounds`` in float64."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    model, in_shape = random_cnn(rng, 1 + seed % 6)
    lower, upper = random_boxes(in_shape, rng, gen)
    params = {k: v.clone().requires_grad_() for k, v in detached_params(model).items()}
    weights = None

    def run(joint: bool):
        nonlocal weights
        x = ((lower + upper) / 2).requires_grad_()
        r = (upper - lower) / 2
        if joint:
            out = point_and_ibp(model, x, x - r, x + r, params=params)
        else:
            out = (forward(model, params, x), *compute_bounds(model, x - r, x + r, params=params))
        if weights is None:
            weights = [torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in out]
        total = sum((w * t).sum() for w, t in zip(weights, out))
        leaves = [x, *params.values()]
        return out, torch.autograd.grad(total, leaves, allow_unused=True)

    out_fast, g_fast = run(True)
    out_ref, g_ref = run(False)
    for a, b, what in zip(out_fast, out_ref, ("point", "lower", "upper")):
        _assert_close(a, b, 1e-10, what)
    for a, b, name in zip(g_fast, g_ref, ["input", *params]):
        if b is None:
            assert a is None or not a.abs().max() > 0, name
        else:
            _assert_close(a, b, 1e-10, f"grad {name}")


@pytest.mark.parametrize("arch,shape,eps", CNNS)
@pytest.mark.parametrize("samples", [None, 2])
def test_joint_bounds_are_sound_on_training_cnns(arch, shape, eps, samples):
    """IBP bounds of the joint pass contain the network's output at random points of the
    eps-box (float64, corners included), for point and sampled weights."""
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    model = build_model(arch, shape, 10).double()
    params = None if samples is None else sampled_params(model, samples, gen, scale=0.02)
    x = _images(shape, 4, torch.float64, gen)
    lower, upper = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    with torch.no_grad():
        point, lo, hi = point_and_ibp(model, x, lower, upper, params=params)
        _assert_close(point, forward(model, params or {}, x), 1e-10, "point")
    assert torch.all(lo <= hi)
    rep = check_soundness(model, lower, upper, lo, hi, params=params, n_inputs=32, generator=gen)
    assert rep.ok, f"{rep.n_violations} violations, max excess {rep.max_excess:.3g}"


@pytest.mark.parametrize("seed", range(20))
def test_joint_bounds_are_sound_on_random_cnns(seed):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    model, in_shape = random_cnn(rng, 1 + seed % 6)
    lower, upper = random_boxes(in_shape, rng, gen)
    params = sampled_params(model, 2, gen) if seed % 3 == 0 else None
    with torch.no_grad():
        _, lo, hi = point_and_ibp(model, (lower + upper) / 2, lower, upper, params=params)
    rep = check_soundness(model, lower, upper, lo, hi, params=params, n_inputs=32, generator=gen)
    assert rep.ok, f"{rep.n_violations} violations, max excess {rep.max_excess:.3g}"


def test_fallbacks_and_switch(monkeypatch):
    """A torch-function mode (VOGN's), ``ENABLED = False`` and several weight samples take the
    autograd path; ``ENABLED`` only changes rounding."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(12, 2))
    model = model.double()
    x = torch.rand(3, 2, 4, 4, dtype=torch.float64)
    lower, upper = x - 0.1, x + 0.1
    counter = _Counter(monkeypatch)
    ref = point_and_ibp(model, x, lower, upper)
    assert (counter.conv, counter.pool) == (1, 3)

    class Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Mode():
        in_mode = point_and_ibp(model, x, lower, upper)
    monkeypatch.setattr(ops_conv_joint, "ENABLED", False)
    disabled = point_and_ibp(model, x, lower, upper)
    assert (counter.conv, counter.pool) == (1, 3)
    for a, b, c in zip(ref, in_mode, disabled):
        _assert_close(a, c, 1e-12, "disabled")
        _assert_close(b, c, 1e-12, "torch-function mode")


def test_conv_rule_gradcheck():
    """The hand-written backward against finite differences, all inputs and parameters."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 4, 6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    c = torch.rand(3, 4, 6, 5, generator=gen, dtype=torch.float64)
    r = torch.rand(3, 4, 6, 5, generator=gen, dtype=torch.float64)
    lower, upper = (c - r).requires_grad_(), (c + r).requires_grad_()
    W = torch.randn(6, 2, 3, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, generator=gen, dtype=torch.float64, requires_grad=True)
    geometry = ((2, 1), (1, 0), (1, 2), 2)
    assert torch.autograd.gradcheck(
        lambda *a: ops_conv_joint._ConvPointIBP.apply(*a, geometry), (x, lower, upper, W, b)
    )
    assert torch.autograd.gradcheck(
        lambda *a: ops_conv_joint._ConvPointIBP.apply(*a, None, geometry), (x, lower, upper, W)
    )
