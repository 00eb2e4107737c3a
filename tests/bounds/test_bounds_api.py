"""API contract: errors, registry, parameter names, dtype, tolerance, helpers."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from certbnn.bounds import (
    AUTO_TOL,
    BoundsFallbackWarning,
    LinearOp,
    check_soundness,
    compute_bounds,
    interval_forward,
    margin_spec,
    register_bound,
    registry,
    widen,
    worst_case_logits,
)
from certbnn.errors import CertbnnError, ConfigError, UnsupportedLayerError
from certbnn.layers import Normalize


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def test_unsupported_layer_is_named():
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.ReLU(), nn.GELU()))
    with pytest.raises(UnsupportedLayerError, match=r"'1\.1' \(GELU\)"):
        compute_bounds(model, torch.zeros(1, 4), torch.ones(1, 4))


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(method="deeppoly"), "method must be one of"),
        (dict(params={"5.weight": torch.zeros(3)}), "not in the model: 5.weight"),
        (dict(params={"0.weight": torch.zeros(5, 4)}), "params entry '0.weight' has shape"),
        (dict(params={"0.weight": torch.zeros(2, 6, 4), "2.bias": torch.zeros(3, 3)}), "disagree on the sample count"),
        (dict(spec=torch.zeros(2, 5)), "spec has 5 columns"),
        (dict(spec=torch.zeros(7, 2, 3)), r"spec must be \(K_spec, K\)"),
        (dict(tol="loose"), "tol must be"),
        (dict(param_bounds={"0.bias": (torch.ones(6), torch.zeros(6))}), "low > high"),
    ],
)
def test_config_errors(kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        compute_bounds(_mlp(), torch.zeros(2, 4), torch.ones(2, 4), **kwargs)


def test_box_errors():
    with pytest.raises(ConfigError, match="lower > upper"):
        compute_bounds(_mlp(), torch.ones(2, 4), torch.zeros(2, 4))
    with pytest.raises(ConfigError, match="differ in shape"):
        compute_bounds(_mlp(), torch.zeros(2, 4), torch.ones(3, 4))
    assert issubclass(ConfigError, CertbnnError) and issubclass(UnsupportedLayerError, CertbnnError)


def test_batchnorm_in_training_mode_is_refused():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    with pytest.raises(UnsupportedLayerError, match="call model.eval"):
        compute_bounds(model, torch.zeros(2, 4), torch.ones(2, 4))
    compute_bounds(model.eval(), torch.zeros(2, 4), torch.ones(2, 4))


def test_param_bounds_with_crown_falls_back_to_ibp_with_warning():
    model = _mlp()
    boxes = {"2.weight": (model[2].weight.detach() - 0.1, model[2].weight.detach() + 0.1)}
    x = torch.rand(2, 4)
    ref = compute_bounds(model, x - 0.1, x + 0.1, "ibp", param_bounds=boxes)
    with pytest.warns(BoundsFallbackWarning, match="using IBP"):
        got = compute_bounds(model, x - 0.1, x + 0.1, "crown", param_bounds=boxes)
    torch.testing.assert_close(got, ref)


def test_crown_memory_guard_suggests_crown_ibp():
    model = nn.Sequential(
        nn.Conv2d(3, 16, 4), nn.ReLU(), nn.Conv2d(16, 32, 4), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 26 * 26, 10)
    )
    x = torch.rand(4, 3, 32, 32)
    with pytest.raises(ConfigError, match="crown-ibp"):
        compute_bounds(model, x - 0.01, x + 0.01, "crown")


def test_nested_parameter_names_are_used():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)))
    assert "2.1.bias" in dict(model.named_parameters())
    x = torch.rand(2, 3)
    lo0, up0 = compute_bounds(model, x, x)
    lo1, up1 = compute_bounds(model, x, x, params={"2.1.bias": model[2][1].bias.detach() + 1})
    torch.testing.assert_close(lo1, lo0 + 1)
    torch.testing.assert_close(up1, up0 + 1)


class Scale(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


class BoundScale(LinearOp):
    mixing = False

    def forward(self, x):
        return x * self.module.factor

    def ibp(self, lower, upper):
        a, b = lower * self.module.factor, upper * self.module.factor
        return torch.minimum(a, b), torch.maximum(a, b)

    def backward_linear(self, A):
        return A * self.module.factor, None


def test_user_registered_layer(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    model = nn.Sequential(nn.Linear(4, 5), Scale(-2.0), nn.ReLU(), nn.Linear(5, 2)).double()
    x = torch.rand(3, 4, dtype=torch.float64)
    # without a rule its forward is traced by the graph engine (issue 14): its ops are nodes
    assert "1" not in [n for n, _, _ in interval_forward(model, x, x)]
    for method in ("ibp", "crown", "crown-ibp"):
        lo, up = compute_bounds(model, x - 0.1, x + 0.1, method)
        assert check_soundness(model, x - 0.1, x + 0.1, lo, up).ok
    register_bound(Scale, BoundScale)  # with a rule, the layer is bounded by it
    assert [n for n, _, _ in interval_forward(model, x, x)] == ["0", "1", "2", "3"]
    for method in ("ibp", "crown", "crown-ibp"):
        lo, up = compute_bounds(model, x - 0.1, x + 0.1, method)
        assert check_soundness(model, x - 0.1, x + 0.1, lo, up).ok


def test_subclass_of_registered_layer_uses_its_rule():
    class MyReLU(nn.ReLU):
        pass

    model = nn.Sequential(nn.Linear(2, 2), MyReLU())
    lo, _ = compute_bounds(model, -torch.ones(1, 2), torch.ones(1, 2))
    assert torch.all(lo >= 0)


def test_margin_spec_and_worst_case_logits():
    labels = torch.tensor([2, 0])
    spec = margin_spec(labels, 3)
    assert spec.shape == (2, 3, 3)
    z = torch.tensor([[1.0, 2.0, 5.0], [4.0, 1.0, 0.0]])
    torch.testing.assert_close(torch.einsum("bkj,bj->bk", spec, z), torch.tensor([[4.0, 3.0, 0.0], [0.0, 3.0, 4.0]]))
    short = margin_spec(labels, 3, exclude_true=True)
    assert short.shape == (2, 2, 3)
    torch.testing.assert_close(torch.einsum("bkj,bj->bk", short, z), torch.tensor([[4.0, 3.0], [3.0, 4.0]]))
    lo, up = z - 1, z + 1
    zh = worst_case_logits(lo, up, labels)
    torch.testing.assert_close(zh, torch.tensor([[2.0, 3.0, 4.0], [3.0, 2.0, 1.0]]))
    zs = worst_case_logits(lo.expand(4, 2, 3), up.expand(4, 2, 3), labels)  # leading sample dim
    assert zs.shape == (4, 2, 3) and torch.equal(zs[1], zh)
    with pytest.raises(ConfigError):
        margin_spec(torch.tensor([3]), 3)


def test_float64_option_and_tolerance_widening():
    model = _mlp()  # float32 parameters
    x = torch.rand(2, 4)
    lo, up = compute_bounds(model, x - 0.1, x + 0.1, "crown", dtype=torch.float64)
    assert lo.dtype == torch.float64
    lo_ref, up_ref = compute_bounds(model.double(), (x - 0.1).double(), (x + 0.1).double(), "crown")
    torch.testing.assert_close(lo, lo_ref)
    model.float()
    lo_w, up_w = compute_bounds(model, (x - 0.1).double(), (x + 0.1).double(), "crown", tol="auto")  # float64 input
    rtol, atol = AUTO_TOL[torch.float64]
    torch.testing.assert_close(lo_w, lo_ref - (atol + rtol * lo_ref.abs()))
    torch.testing.assert_close(up_w, up_ref + (atol + rtol * up_ref.abs()))
    a, b = widen(torch.tensor([-1.0, 2.0]), torch.tensor([1.0, 3.0]), 0.1, 0.01)
    torch.testing.assert_close(a, torch.tensor([-1.11, 1.79]))
    torch.testing.assert_close(b, torch.tensor([1.11, 3.31]))


def test_interval_forward_lists_every_layer():
    model = nn.Sequential(Normalize(0.5, 0.25), _mlp())
    x = torch.rand(2, 4)
    layers = interval_forward(model, x - 0.1, x + 0.1)
    assert [n for n, _, _ in layers] == ["0", "1.0", "1.1", "1.2"]
    torch.testing.assert_close(layers[-1][1:], compute_bounds(model, x - 0.1, x + 0.1))
    assert torch.all(layers[2][1] >= 0)


def test_no_warnings_on_plain_calls():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = torch.rand(2, 4)
        for method in ("ibp", "crown", "crown-ibp"):
            compute_bounds(_mlp(), x - 0.1, x + 0.1, method, spec=margin_spec(torch.tensor([0, 1]), 3))
