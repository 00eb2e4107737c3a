"""Batched posterior samples (S) against the per-sample loop; gradients of every method."""

from __future__ import annotations

import random

import pytest
import torch
from bounds_testlib import random_boxes, random_cnn, random_mlp, sampled_params
from torch import nn

from certbnn.bounds import compute_bounds, margin_spec
from certbnn.layers import Normalize

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")
METHODS = ["ibp", "crown", "crown-ibp"]


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_batched_samples_equal_per_sample_loop(seed, kind):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    model, in_shape = (random_cnn if kind == "cnn" else random_mlp)(rng, 1 + seed % 6)
    lower, upper = random_boxes(in_shape, rng, gen)
    S = 4
    params = sampled_params(model, S, gen)
    # also sample the buffers of Normalize / BatchNorm sometimes (they are tensors like any other)
    for name, buf in model.named_buffers():
        if buf.is_floating_point() and rng.random() < 0.5 and "var" not in name and "std" not in name:
            params[name] = buf.unsqueeze(0) + 0.1 * torch.randn((S, *buf.shape), generator=gen, dtype=buf.dtype)
    spec = margin_spec(torch.randint(0, 3, (lower.shape[0],), generator=gen), 3).double() if seed % 2 else None
    for method, chunk in zip(METHODS * 2, [None, None, None, 1, 3, 4]):  # auto, per-sample, ragged, one pass
        lo, up = compute_bounds(model, lower, upper, method, params=params, spec=spec, sample_chunk=chunk)
        for s in range(S):
            one = {k: v[s] for k, v in params.items()}
            lo1, up1 = compute_bounds(model, lower, upper, method, params=one, spec=spec)
            torch.testing.assert_close(lo[s], lo1, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(up[s], up1, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_input_with_sample_dim(kind):
    """Per-sample inputs (S, B, ...) with S sampled weights: sample s uses input s."""
    rng = random.Random(3)
    gen = torch.Generator().manual_seed(3)
    model, in_shape = (random_cnn if kind == "cnn" else random_mlp)(rng, 3)
    S = 3
    params = sampled_params(model, S, gen)
    boxes = [random_boxes(in_shape, rng, gen) for _ in range(S)]
    L, U = torch.stack([b[0] for b in boxes]), torch.stack([b[1] for b in boxes])
    for method in METHODS:
        lo, up = compute_bounds(model, L, U, method, params=params)  # auto-detected
        lo2, up2 = compute_bounds(model, L, U, method, params=params, input_has_samples=True, sample_chunk=2)
        torch.testing.assert_close(lo, lo2)
        torch.testing.assert_close(up, up2)
        for s in range(S):
            lo1, up1 = compute_bounds(model, L[s], U[s], method, params={k: v[s] for k, v in params.items()})
            torch.testing.assert_close(lo[s], lo1, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(up[s], up1, rtol=1e-10, atol=1e-10)


def _grad_model() -> nn.Sequential:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.running_var.uniform_(0.5, 2)
    return nn.Sequential(
        Normalize([0.4, 0.5], [0.3, 0.2]),
        nn.Conv2d(2, 4, 3, padding=1),
        bn.eval(),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, groups=2),
        nn.LeakyReLU(0.1),
        nn.MaxPool2d(2),
        nn.AvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 8),
        nn.Tanh(),
        nn.Linear(8, 6),
        nn.Sigmoid(),
        nn.Linear(6, 3),
    ).double()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("use_params", [False, True])
def test_gradients_reach_parameters_and_box(method, use_params):
    model = _grad_model()
    x = torch.rand(5, 2, 7, 7, dtype=torch.float64)
    lower = (x - 0.05).requires_grad_()
    upper = (x + 0.05).requires_grad_()
    params = None
    if use_params:
        params = {
            k: (v.detach().unsqueeze(0) + 0.01 * torch.randn(2, *v.shape, dtype=v.dtype)).requires_grad_()
            for k, v in model.named_parameters()
        }
    spec = margin_spec(torch.tensor([0, 1, 2, 0, 1]), 3).double()
    lo, up = compute_bounds(model, lower, upper, method, params=params, spec=spec)
    (up.sum() - 2 * lo.sum()).backward()
    tensors = dict(params) if use_params else dict(model.named_parameters())
    tensors.update(lower=lower, upper=upper)
    for name, t in tensors.items():
        assert t.grad is not None, name
        assert torch.isfinite(t.grad).all(), name
        if name not in ("2.weight", "2.bias"):  # BN scale can sit entirely on dead ReLUs
            assert t.grad.abs().sum() > 0, name


@pytest.mark.parametrize("method", METHODS)
def test_gradcheck_smooth_network(method):
    """Analytic gradients of the bounds match finite differences (tanh net, generic point)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    x = torch.rand(2, 3, dtype=torch.float64)
    w = model[2].weight.detach().clone().requires_grad_()

    def f(lower, upper, w):
        lo, up = compute_bounds(model, lower, upper, method, params={"2.weight": w})
        return lo, up

    assert torch.autograd.gradcheck(f, ((x - 0.1).requires_grad_(), (x + 0.1).requires_grad_(), w), eps=1e-7, atol=1e-6)


def test_gradients_through_weight_boxes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).double()
    boxes = {
        k: ((v.detach() - 0.01).requires_grad_(), (v.detach() + 0.01).requires_grad_())
        for k, v in model.named_parameters()
    }
    x = torch.rand(2, 1, 6, 6, dtype=torch.float64)
    lo, up = compute_bounds(model, x - 0.1, x + 0.1, param_bounds=boxes)
    (up - lo).sum().backward()
    for k, (a, b) in boxes.items():
        assert a.grad is not None and b.grad is not None and (a.grad.abs().sum() + b.grad.abs().sum()) > 0, k
