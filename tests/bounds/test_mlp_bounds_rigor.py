"""The fast MLP path of the paper protocol (:mod:`certbnn.evaluation.mlp_bounds`), ``sound=True``:
its bounds contain the EXACT outputs (``fractions.Fraction``) of every stacked sample on
adversarial MLPs and boxes (huge/tiny weights, cancellation, subnormal products, boxes one float
wide or straddling 0), in float32 and float64, with one and with several Cauchy-Schwarz groups."""

from __future__ import annotations

import random

import pytest
import torch
from test_float_rigor import DTYPES, adversarial_box, adversarial_params, box_points, check_exact, mlp
from torch import nn

from certbnn.evaluation import mlp_bounds
from certbnn.evaluation.mlp_bounds import mlp_linears, mlp_logit_bounds


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [28, 2])
def test_fast_sound_bounds_contain_exact_outputs(dtype, group, monkeypatch):
    monkeypatch.setattr(mlp_bounds, "GROUP", group)
    monkeypatch.setattr(mlp_bounds, "SAMPLE_GROUP", 2)  # several sample groups and point chunks
    monkeypatch.setattr(mlp_bounds, "POINT_CHUNK", 1)
    rng, gen = random.Random(hash((str(dtype), group)) % 1000), torch.Generator().manual_seed(1)
    S, viol = 3, 0
    for sizes in ((5, 4, 3), (5, 6, 4, 3), (5, 3)):
        model = mlp(sizes=sizes).to(dtype)
        assert mlp_linears(model) is not None
        for kind in ("point", "ulp", "straddle", "wide"):
            p = adversarial_params(model, rng, dtype, S)
            lo_b, hi_b = adversarial_box((2, 5), rng, dtype, kind)
            lo, hi = mlp_logit_bounds(model, p, lo_b, hi_b, sound=True)
            assert lo.shape == (S, 2, sizes[-1]) and not (lo.isnan().any() or hi.isnan().any())
            if len(sizes) == 3:  # deeper nets may overflow the float range (+-inf bounds are sound)
                assert torch.isfinite(lo).all() and torch.isfinite(hi).all()
            singles = [(s, {k: v[s] for k, v in p.items()}) for s in range(S)]
            viol += check_exact(model, lo_b, hi_b, singles, box_points(lo_b, hi_b, 4, gen), lo, hi)
    assert viol == 0


def test_mlp_linears_recognises_only_relu_mlps():
    assert mlp_linears(nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))) == ["1", "3"]
    assert mlp_linears(nn.Sequential(nn.Linear(4, 3))) == ["0"]
    assert mlp_linears(nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))) is None
    assert mlp_linears(nn.Sequential(nn.Linear(4, 3), nn.ReLU())) is None
    assert mlp_linears(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 2))) is None


def test_fast_sound_refuses_weights_not_exact_in_the_dtype():
    from certbnn.errors import ConfigError

    model = mlp()
    p = {k: v.detach().double().unsqueeze(0) + 1e-12 for k, v in model.named_parameters()}
    lo = torch.zeros(1, 5)
    with pytest.raises(ConfigError, match="not exactly representable"):
        mlp_logit_bounds(model, p, lo, lo + 0.1, sound=True)
    lo_p, hi_p = mlp_logit_bounds(model, p, lo, lo + 0.1, sound=False)  # the authors' arithmetic rounds
    assert lo_p.dtype == torch.float32 and bool((lo_p <= hi_p).all())
