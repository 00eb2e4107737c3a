"""The soundness checks catch broken bound rules, including the original code's conv bug
(centre counted twice, stride/padding ignored): register a broken Conv2d rule and
assert the checker reports violations, while the real rule passes the same checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from certbnn.bounds import check_soundness, compute_bounds, registry
from certbnn.bounds.base import mid_rad
from certbnn.bounds.ops_linear import BoundConv2d


class CentreTwiceConv(BoundConv2d):
    """deepbayes' conv IBP: conv(c, W) + conv(c, W) + b as the centre."""

    def ibp(self, lower, upper):
        W, b = self.t.values["weight"], self.t.get("bias")
        c, r = mid_rad(lower, upper)
        yc = self._conv(c, W, None, False, False) + self._conv(c, W, b, False, False)
        yr = self._conv(r, W.abs(), None, False, False)
        return yc - yr, yc + yr


class GeometryIgnoredConv(BoundConv2d):
    """Stride and padding ignored (resized to the right shape so nothing crashes)."""

    def ibp(self, lower, upper):
        W, b = self.t.values["weight"], self.t.get("bias")
        c, r = mid_rad(lower, upper)
        ho, wo = self.forward(lower[:1, :1]).shape[-2:]

        def conv(x, w, bias):
            y = F.conv2d(x.flatten(0, 1), w, bias, dilation=self.module.dilation, groups=self.groups)
            return F.interpolate(y, size=(ho, wo), mode="nearest").unflatten(0, x.shape[:2])

        yc, yr = conv(c, W, b), conv(r, W.abs(), None)
        return yc - yr, yc + yr


class NoBiasBackwardConv(BoundConv2d):
    """CROWN back-substitution that forgets the bias term."""

    def backward_linear(self, A):
        G, _ = super().backward_linear(A)
        return G, None


def _models():
    torch.manual_seed(0)
    yield nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
    yield nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(3, 4, 2, padding="same"),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 3),
    )


def _check(model, method):
    model = model.double()
    x = torch.rand(4, 2, 6, 6, dtype=torch.float64) * 2 - 1
    lower, upper = x - 0.01, x + 0.01
    lo, up = compute_bounds(model, lower, upper, method)
    return check_soundness(model, lower, upper, lo, up, n_inputs=64)


@pytest.mark.parametrize(
    "broken, method",
    [
        (CentreTwiceConv, "ibp"),
        (GeometryIgnoredConv, "ibp"),
        (CentreTwiceConv, "crown-ibp"),
        (NoBiasBackwardConv, "crown-ibp"),
        (NoBiasBackwardConv, "crown"),
    ],
)
@pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")
def test_broken_conv_rule_is_caught(monkeypatch, broken, method):
    for i, model in enumerate(_models()):
        if broken is GeometryIgnoredConv and i == 0:
            continue  # stride 1, no padding: nothing to ignore
        assert _check(model, method).ok, "the real rule must pass"
        with monkeypatch.context() as m:
            m.setitem(registry._REGISTRY, nn.Conv2d, broken)
            report = _check(model, method)
        assert not report.ok and report.n_violations > 0 and report.max_excess > 1e-3, report
