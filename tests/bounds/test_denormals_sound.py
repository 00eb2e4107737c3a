"""Sound bounds stay sound when the caller turned flush-to-zero on (FTZ/DAZ on every thread,
as ``torch.set_flush_denormal(True)`` at start-up): ``plain_arithmetic`` restores IEEE gradual
underflow for the duration and the caller's setting afterwards. Exact rational checks as in
test_float_rigor; inputs are built and results checked outside FTZ (conversions flush too)."""

from __future__ import annotations

import random
from fractions import Fraction

import pytest
import torch
from test_float_rigor import (
    METHODS,
    adversarial_box,
    adversarial_params,
    bounds,
    box_points,
    check_exact,
    mlp,
)
from torch import nn

from certbnn.denormals import flush_denormals, flushes_anywhere


def under_global_ftz(fn):
    """``fn()`` with FTZ/DAZ on in every thread; also checks the setting is still on afterwards."""
    with flush_denormals(True):
        if not torch.set_flush_denormal(True):
            pytest.skip("this CPU has no flush-to-zero mode")
        assert flushes_anywhere()
        out = fn()
        assert flushes_anywhere(), "the caller's flush-to-zero setting was not restored"
    assert not flushes_anywhere()
    return out


def test_subnormal_weight_times_huge_input_is_bounded():
    """w = 2^-133 (subnormal in float32) times x = 2^100 + 3 2^100: exact output 2^-31. Under
    DAZ the product is computed as 0 (the plain bounds say so); the sound bounds contain 2^-31."""
    model = nn.Sequential(nn.Linear(2, 1))
    p = {"0.weight": torch.full((1, 2), 2.0**-133), "0.bias": torch.zeros(1)}
    x = torch.tensor([[2.0**100, 3 * 2.0**100]])
    exact = Fraction(2) ** -31
    results = under_global_ftz(
        lambda: (
            [(m, bounds(model, x, x, m, params=p, tol="sound")) for m in METHODS]
            + [("plain", bounds(model, x, x, "ibp", params=p))]
        )
    )
    for method, (lo, hi) in results[:-1]:
        assert Fraction(float(lo)) <= exact <= Fraction(float(hi)), method
    assert float(results[-1][1][1]) == 0.0  # FTZ did apply to the plain computation: the case is a real test


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["point", "ulp", "straddle"])
def test_adversarial_tiny_weights_under_global_ftz(dtype, kind):
    """test_float_rigor's adversarial MLPs (weights and products reaching the subnormal range)
    computed with the caller's FTZ on: zero violations against exact arithmetic."""
    rng, gen = random.Random(hash((str(dtype), kind, "ftz")) % 1000), torch.Generator().manual_seed(5)
    viol = 0
    for _ in range(2):
        model = mlp().to(dtype)
        p = adversarial_params(model, rng, dtype)
        lo_b, hi_b = adversarial_box((2, 5), rng, dtype, kind)
        pts = box_points(lo_b, hi_b, 4, gen)
        out = under_global_ftz(
            lambda model=model, lo_b=lo_b, hi_b=hi_b, p=p: [
                bounds(model, lo_b, hi_b, m, params=p, tol="sound", intersect_ibp=False) for m in METHODS
            ]
        )
        viol += sum(check_exact(model, lo_b, hi_b, [(None, p)], pts, lo, hi) for lo, hi in out)
    assert viol == 0


def test_certificate_input_box_is_outward_under_global_ftz():
    """The certificates' input box [clip(x - eps), clip(x + eps)] contains the exact box when the
    caller flushes subnormals: x = 2^-1070 (subnormal in float64), eps = 2^-1070: x + eps = 2^-1069
    would flush to 0 under FTZ, below the exact upper end."""
    from certbnn.evaluation.certify import _input_box

    x = torch.tensor([[2.0**-1070]], dtype=torch.float64)
    lo, hi = under_global_ftz(lambda: _input_box(x, 2.0**-1070, torch.float64))
    exact_hi = Fraction(2) ** -1069
    assert Fraction(float(lo)) <= 0 and Fraction(float(hi)) >= exact_hi
