"""Exactness (affine layers, point boxes), CROWN vs IBP, and margin-spec tightness."""

from __future__ import annotations

import random

import pytest
import torch
from bounds_testlib import random_boxes, random_cnn, random_mlp
from torch import nn

from certbnn.bounds import compute_bounds, margin_spec
from certbnn.layers import Normalize

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")

METHODS = ["ibp", "crown", "crown-ibp"]


def _bn(c: int) -> nn.Module:
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
        bn.weight.normal_()
        bn.bias.normal_()
    return bn.eval()


AFFINE_MODELS = {
    "linear": (lambda: nn.Sequential(nn.Linear(6, 4)), (6,)),
    "linear_nobias": (lambda: nn.Sequential(nn.Linear(6, 4, bias=False)), (6,)),
    "conv_stride_pad": (lambda: nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1)), (2, 7, 6)),
    "conv_same_even": (
        lambda: nn.Sequential(nn.Conv2d(2, 4, (2, 4), padding="same", dilation=(2, 1), groups=2)),
        (2, 5, 6),
    ),
    "conv_reflect": (lambda: nn.Sequential(nn.Conv2d(3, 3, 3, padding=2, padding_mode="reflect", groups=3)), (3, 5, 5)),
    "conv_circular_stride": (
        lambda: nn.Sequential(nn.Conv2d(1, 2, 2, stride=3, padding=1, padding_mode="circular")),
        (1, 8, 7),
    ),
    "normalize_conv_bn": (
        lambda: nn.Sequential(Normalize([0.3, 0.6], [0.2, 0.5]), nn.Conv2d(2, 3, 2), _bn(3)),
        (2, 5, 5),
    ),
    "avgpool": (lambda: nn.Sequential(nn.AvgPool2d(3, 2, 1, count_include_pad=False)), (2, 6, 6)),
    "flatten_linear": (
        lambda: nn.Sequential(nn.Flatten(), nn.Identity(), nn.Linear(2 * 3 * 3, 5), nn.Dropout()),
        (2, 3, 3),
    ),
}


@pytest.mark.parametrize("name", sorted(AFFINE_MODELS))
@pytest.mark.parametrize("method", METHODS)
def test_single_affine_layer_bounds_are_the_exact_range(name, method):
    """For an affine map J x + b the bound equals min/max over the box, attained at
    the corner x* = where(J_j >= 0, l, u) (resp. u, l)."""
    if method == "ibp" and name in ("conv_reflect", "conv_circular_stride"):
        pytest.skip("non-zero padding modes reuse inputs: IBP is sound but not exact there")
    torch.manual_seed(0)
    build, in_shape = AFFINE_MODELS[name]
    model = build().double().eval()
    x = torch.rand((3, *in_shape), dtype=torch.float64)
    r = torch.rand((3, *in_shape), dtype=torch.float64) * 0.5
    lower, upper = x - r, x + r
    lo, up = compute_bounds(model, lower, upper, method)
    for b in range(3):
        J = torch.autograd.functional.jacobian(lambda z: model(z.unsqueeze(0))[0], x[b]).flatten(0, -1 - len(in_shape))
        J = J.reshape(J.shape[0], *in_shape)
        arg_min = torch.where(J >= 0, lower[b], upper[b])
        arg_max = torch.where(J >= 0, upper[b], lower[b])
        attained_lo = torch.stack([model(arg_min[j : j + 1]).flatten()[j] for j in range(J.shape[0])])
        attained_up = torch.stack([model(arg_max[j : j + 1]).flatten()[j] for j in range(J.shape[0])])
        torch.testing.assert_close(lo[b].flatten(), attained_lo, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(up[b].flatten(), attained_up, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_zero_width_box_returns_forward_output(seed, kind):
    rng = random.Random(seed)
    model, in_shape = (random_cnn if kind == "cnn" else random_mlp)(rng, 1 + seed % 6)
    x = torch.rand((4, *in_shape), dtype=torch.float64) * 2 - 1
    y = model(x)
    for method in METHODS:
        lo, up = compute_bounds(model, x, x, method)
        torch.testing.assert_close(lo, y, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(up, y, rtol=1e-12, atol=1e-12)
    # float32 too, where rounding differs between the bound rules and forward
    m32, x32 = model.float(), x.float()
    lo, up = compute_bounds(m32, x32, x32, "ibp")
    torch.testing.assert_close(lo, m32(x32), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(up, m32(x32), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_crown_never_looser_than_ibp(seed, kind):
    """compute_bounds(method='crown'/'crown-ibp') returns the intersection with IBP."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    model, in_shape = (random_cnn if kind == "cnn" else random_mlp)(rng, 2 + seed % 5)
    lower, upper = random_boxes(in_shape, rng, gen)
    labels = torch.randint(0, 3, (lower.shape[0],), generator=gen)
    for spec in (None, margin_spec(labels, 3).double()):
        ilo, iup = compute_bounds(model, lower, upper, "ibp", spec=spec)
        for method in ("crown", "crown-ibp"):
            lo, up = compute_bounds(model, lower, upper, method, spec=spec)
            slack = 1e-12 * (1 + ilo.abs() + iup.abs())  # "crown" re-runs IBP from tighter boxes
            assert torch.all(lo >= ilo - slack) and torch.all(up <= iup + slack)


def test_crown_tighter_than_ibp_on_random_relu_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 50), nn.ReLU(), nn.Linear(50, 50), nn.ReLU(), nn.Linear(50, 10)).double()
    x = torch.rand(16, 20, dtype=torch.float64)
    widths = {}
    for method in METHODS:
        lo, up = compute_bounds(model, x - 0.05, x + 0.05, method, intersect_ibp=False)
        widths[method] = (up - lo).mean().item()
    assert widths["crown"] < widths["crown-ibp"] < widths["ibp"]


def test_margin_spec_is_tighter_than_combined_logit_bounds():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 5)).double()
    x = torch.rand(10, 8, dtype=torch.float64)
    labels = torch.randint(0, 5, (10,))
    spec = margin_spec(labels, 5).double()
    for method in METHODS:
        lo, up = compute_bounds(model, x - 0.1, x + 0.1, method)
        combined = lo.gather(1, labels[:, None]) - up  # z_y lower - z_j upper
        mlo, _ = compute_bounds(model, x - 0.1, x + 0.1, method, spec=spec)
        off = ~torch.nn.functional.one_hot(labels, 5).bool()
        assert torch.all(mlo[off] >= combined[off] - 1e-12)
        assert (mlo[off] - combined[off]).mean() > 1e-3


def test_model_ending_in_conv_has_image_shaped_bounds():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 3, 2, stride=2)).double()
    x = torch.rand(2, 1, 7, 7, dtype=torch.float64)
    for method in METHODS:
        lo, up = compute_bounds(model, x - 0.1, x + 0.1, method)
        assert lo.shape == up.shape == (2, 3, 2, 2)
        y = model(x)
        assert torch.all(lo <= y) and torch.all(y <= up)
