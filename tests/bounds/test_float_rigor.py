"""``tol="sound"``: bounds that contain the EXACT output of the network with its float
weights, against exact rational (``fractions.Fraction``) arithmetic, or mpmath at
100 digits for tanh/sigmoid, on adversarial layers in float32 and float64:
huge and tiny (subnormal-producing) weights, catastrophic cancellation, boxes
straddling 0 and boxes one float wide. Zero violations are allowed. CROWN runs
with ``intersect_ibp=False`` so that its own rounding analysis is what is tested.
"""

from __future__ import annotations

import copy
import math
import os
import random
from fractions import Fraction

import mpmath
import pytest
import torch
from torch import nn

from certbnn.bounds import compute_bounds, margin_spec
from certbnn.bounds.rounding import add_down, add_up, cast_down, cast_up, dot_error
from certbnn.errors import ConfigError, UnsupportedLayerError
from certbnn.evaluation.certify import _input_box

METHODS = ["ibp", "crown", "crown-ibp"]
DTYPES = [torch.float32, torch.float64]
mpmath.mp.dps = 100


# ------------------------------------------------------------------ exact reference arithmetic
def _fr(t: torch.Tensor):
    """A tensor as nested lists of exact Fractions."""
    if t.dim() == 0:
        return Fraction(float(t))
    return [_fr(s) for s in t]


def _mp_to_fr(v) -> Fraction:
    v = mpmath.mpf(v)
    m, e = v.man_exp  # |v| = m 2^e (the sign is not in man_exp)
    return (-1 if v < 0 else 1) * Fraction(int(m)) * (Fraction(2) ** int(e))


def _smooth(f, x: Fraction) -> Fraction:
    return _mp_to_fr(f(mpmath.mpf(x.numerator) / x.denominator))


def _flat(x):
    return [v for row in x for v in _flat(row)] if isinstance(x, list) else [x]


def _map(fn, x):
    return [_map(fn, v) for v in x] if isinstance(x, list) else fn(x)


def exact_forward(model: nn.Sequential, x: list, p: dict[str, torch.Tensor]):
    """Exact output of ``model`` (Linear, Conv2d (no groups/dilation, zero padding), ReLU, Tanh,
    Sigmoid, Flatten, MaxPool2d, AvgPool2d (kernel = stride, no padding)) on one example ``x``."""
    for name, m in model.named_children():
        if isinstance(m, nn.Linear):
            W, b = _fr(p[f"{name}.weight"]), _fr(p[f"{name}.bias"])
            x = [sum((w * v for w, v in zip(row, x)), bb) for row, bb in zip(W, b)]
        elif isinstance(m, nn.Conv2d):
            W, b = _fr(p[f"{name}.weight"]), _fr(p[f"{name}.bias"])
            (kh, kw), (sh, sw), (ph, pw) = m.kernel_size, m.stride, m.padding
            C, H, Wd = len(x), len(x[0]), len(x[0][0])

            def at(c, i, j):
                return x[c][i][j] if 0 <= i < H and 0 <= j < Wd else Fraction(0)

            Ho, Wo = (H + 2 * ph - kh) // sh + 1, (Wd + 2 * pw - kw) // sw + 1
            x = [
                [
                    [
                        sum(
                            (
                                W[o][c][a][d] * at(c, i * sh - ph + a, j * sw - pw + d)
                                for c in range(C)
                                for a in range(kh)
                                for d in range(kw)
                            ),
                            b[o],
                        )
                        for j in range(Wo)
                    ]
                    for i in range(Ho)
                ]
                for o in range(len(W))
            ]
        elif isinstance(m, nn.ReLU):
            x = _map(lambda v: max(v, Fraction(0)), x)
        elif isinstance(m, nn.Tanh):
            x = _map(lambda v: _smooth(mpmath.tanh, v), x)
        elif isinstance(m, nn.Sigmoid):
            x = _map(lambda v: _smooth(lambda z: 1 / (1 + mpmath.exp(-z)), v), x)
        elif isinstance(m, nn.Flatten):
            x = _flat(x)
        elif isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
            k = m.kernel_size if isinstance(m.kernel_size, int) else m.kernel_size[0]
            red = max if isinstance(m, nn.MaxPool2d) else (lambda vs: sum(vs) / len(vs))
            x = [
                [
                    [
                        red([ch[i * k + a][j * k + d] for a in range(k) for d in range(k)])
                        for j in range(len(ch[0]) // k)
                    ]
                    for i in range(len(ch) // k)
                ]
                for ch in x
            ]
        else:
            raise AssertionError(type(m))
    return x


# ------------------------------------------------------------------ adversarial floats
def wild(shape, rng: random.Random, dtype: torch.dtype, lo_exp: int, hi_exp: int) -> torch.Tensor:
    """Floats with random signs, 24-bit mantissas and exponents in ``[lo_exp, hi_exp]``."""
    vals = [
        rng.choice([-1, 1]) * (1 + rng.random()) * 2.0 ** rng.randint(lo_exp, hi_exp) for _ in range(math.prod(shape))
    ]
    return torch.tensor(vals, dtype=torch.float64).view(shape).to(dtype)


EXP = {torch.float32: (-75, 25), torch.float64: (-540, 300)}  # products reach the subnormal range


def adversarial_params(model: nn.Module, rng: random.Random, dtype: torch.dtype, S: int | None = None):
    """Huge/tiny weights and, in some rows, exact cancellation pairs ``(a, -a)`` plus a tiny term."""
    out = {}
    for k, v in model.named_parameters():
        shape = v.shape if S is None else (S, *v.shape)
        t = wild(shape, rng, dtype, *EXP[dtype])
        if k.endswith("weight") and v.dim() == 2 and v.shape[1] >= 3:
            t[..., 0, 1] = -t[..., 0, 0]  # row 0: a x0 - a x1 + tiny: catastrophic cancellation
            t[..., 0, 2] = t[..., 0, 2] * 2.0**-40
        out[k] = t
    return out


def adversarial_box(shape, rng: random.Random, dtype: torch.dtype, kind: str):
    x = wild(shape, rng, dtype, -20, 4)
    if kind == "point":
        return x, x.clone()
    if kind == "ulp":  # one float wide
        return x, torch.nextafter(x, torch.full_like(x, math.inf))
    if kind == "straddle":  # every coordinate straddles 0, asymmetric
        return -x.abs() * 0.75, x.abs()
    w = wild(shape, rng, dtype, -30, -2).abs()
    return x - w, x + w


def box_points(lo: torch.Tensor, hi: torch.Tensor, n: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Both extreme corners, random corners and random floats of the box (floats of its dtype)."""
    pts = [lo, hi]
    for i in range(n):
        t = torch.rand(lo.shape, generator=gen, dtype=torch.float64)
        if i % 2:
            pts.append(torch.where(t < 0.5, lo, hi))
        else:
            p = (lo.double() + t * (hi.double() - lo.double())).to(lo.dtype)
            pts.append(torch.minimum(torch.maximum(p, lo), hi))
    return pts


def check_exact(model, lo_b, hi_b, params_pts, x_pts, out_lo, out_hi, spec=None) -> int:
    """Number of exact outputs (per params point, per input point, per example) outside the bounds."""
    viol = 0
    LO, HI = _fr(out_lo), _fr(out_hi)
    for s, p in params_pts:
        for x in x_pts:
            for b in range(x.shape[0]):
                y = _flat(exact_forward(model, _fr(x[b]), p))
                if spec is not None:
                    sp = _fr(spec[b] if spec.dim() == 3 else spec)
                    y = [sum((a * v for a, v in zip(row, y)), Fraction(0)) for row in sp]
                lo_row = LO[s][b] if s is not None else LO[b]
                hi_row = HI[s][b] if s is not None else HI[b]
                viol += sum(not (lv <= yv <= hv) for lv, yv, hv in zip(_flat(lo_row), y, _flat(hi_row)))
    return viol


def sound_violations(model, lo_b, hi_b, p, pts, **kw) -> int:
    """Exact outputs at ``pts`` outside the ``tol="sound"`` bounds of every method (CROWN without
    the IBP intersection, so its own rounding analysis is what is tested)."""
    viol = 0
    for method in METHODS:
        lo, hi = bounds(model, lo_b, hi_b, method, params=p, tol="sound", intersect_ibp=False, **kw)
        assert torch.isfinite(lo).all() and torch.isfinite(hi).all()
        viol += check_exact(model, lo_b, hi_b, [(None, p)], pts, lo, hi, spec=kw.get("spec"))
    return viol


def mlp(act=nn.ReLU, sizes=(5, 4, 3)):
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def small_cnn(pool=None):
    layers = [nn.Conv2d(2, 3, 2, stride=1, padding=1), nn.ReLU()]
    if pool is not None:
        layers.append(pool(2))
    layers += [nn.Flatten(), nn.Linear(3 * (2 if pool else 4) ** 2, 3)]
    return nn.Sequential(*layers)


# Device of the bounds under test (the exact reference always runs on the CPU):
# ``CERTBNN_TEST_DEVICE=cuda pytest tests/bounds/test_float_rigor.py`` checks the sound mode
# against exact arithmetic with the GPU's matmul and convolution algorithms.
DEVICE = torch.device(os.environ.get("CERTBNN_TEST_DEVICE", "cpu"))


def bounds(model: nn.Module, lower, upper, method, **kw):
    """:func:`compute_bounds` run on ``DEVICE``; results returned on the CPU."""

    def mv(v):
        if isinstance(v, torch.Tensor):
            return v.to(DEVICE)
        if isinstance(v, tuple):
            return tuple(mv(a) for a in v)
        if isinstance(v, dict):
            return {k: mv(a) for k, a in v.items()}
        return v

    lo, hi = compute_bounds(
        copy.deepcopy(model).to(DEVICE), mv(lower), mv(upper), method, **{k: mv(v) for k, v in kw.items()}
    )
    return lo.cpu(), hi.cpu()


# ------------------------------------------------------------------ the issue's regression cases
@pytest.mark.parametrize("dtype,scale", [(torch.float32, 3e7), (torch.float64, 3e8)])
def test_issue_huge_weights_point_box(dtype, scale):
    """A single Linear layer with weights +-scale on a point box: round-to-nearest bounds
    (tol=None) exclude the exact output; tol='sound' contains it, for every method."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 1).to(dtype)
    with torch.no_grad():
        lin.weight.copy_((torch.randint(0, 2, (1, 64)) * 2 - 1).to(dtype) * scale + torch.randn(1, 64, dtype=dtype))
        lin.bias.fill_(0.1)
    model = nn.Sequential(lin)
    x = torch.rand(1, 64, dtype=dtype)
    p = {k: v.detach() for k, v in model.named_parameters()}
    exact = Fraction(exact_forward(model, _fr(x[0]), p)[0])
    with torch.no_grad():
        lo, hi = bounds(model, x, x, "ibp")
    if DEVICE.type == "cpu":  # another device's summation order may round differently
        assert not Fraction(float(lo)) <= exact <= Fraction(float(hi)), "the plain bounds no longer fail: weak test"
    for method in METHODS:
        with torch.no_grad():
            lo, hi = bounds(model, x, x, method, tol="sound")
        assert Fraction(float(lo)) <= exact <= Fraction(float(hi)), method


@pytest.mark.parametrize("dtype,w", [(torch.float32, 3e7), (torch.float64, 3e15)])
def test_crown_backsubstitution_rounding(dtype, w):
    """``A W1`` with catastrophic cancellation: the float back-substitution is off by about
    ``ulp(w)``; the sound CROWN step error (not the IBP intersection) must cover it."""
    model = nn.Sequential(nn.Linear(1, 2), nn.ReLU(), nn.Linear(2, 1)).to(dtype)
    one_up = 1 + torch.finfo(dtype).eps
    p = {
        "0.weight": torch.tensor([[one_up], [1.0]], dtype=dtype),
        "0.bias": torch.zeros(2, dtype=dtype),
        "2.weight": torch.tensor([[w, -w]], dtype=dtype),
        "2.bias": torch.zeros(1, dtype=dtype),
    }
    x = torch.ones(1, 1, dtype=dtype)
    for method in ("crown", "crown-ibp"):
        plain = bounds(model, x, x, method, params=p, intersect_ibp=False)
        lo, hi = bounds(model, x, x, method, params=p, tol="sound", intersect_ibp=False)
        n = check_exact(model, x, x, [(None, p)], [x], lo, hi)
        assert n == 0, method
        if DEVICE.type == "cpu":  # the plain bound does miss it: the case is a real test
            assert check_exact(model, x, x, [(None, p)], [x], *plain) == 1, method


# ------------------------------------------------------------------ adversarial MLPs / CNNs
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["point", "ulp", "straddle", "wide"])
def test_adversarial_mlp_all_methods(dtype, kind):
    rng, gen = random.Random(hash((str(dtype), kind)) % 1000), torch.Generator().manual_seed(1)
    viol = 0
    for _trial in range(3):
        model = mlp().to(dtype)
        p = adversarial_params(model, rng, dtype)
        lo_b, hi_b = adversarial_box((2, 5), rng, dtype, kind)
        pts = box_points(lo_b, hi_b, 6, gen)
        viol += sound_violations(model, lo_b, hi_b, p, pts)
        viol += sound_violations(model, lo_b, hi_b, p, pts, spec=margin_spec(torch.tensor([1, 0]), 3).to(dtype))
    assert viol == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", [nn.Tanh, nn.Sigmoid])
def test_smooth_activations_against_mpmath(dtype, act):
    """tanh/sigmoid: libm margin in IBP, parallel-line relaxations with outward intercepts."""
    rng, gen = random.Random(7), torch.Generator().manual_seed(2)
    viol = 0
    for trial in range(3):
        model = mlp(act).to(dtype)
        p = {k: wild(v.shape, rng, dtype, -6, 1) for k, v in model.named_parameters()}
        lo_b, hi_b = adversarial_box((2, 5), rng, dtype, ["ulp", "straddle", "wide"][trial])
        viol += sound_violations(model, lo_b, hi_b, p, box_points(lo_b, hi_b, 4, gen))
    assert viol == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pool", [None, nn.MaxPool2d, nn.AvgPool2d])
def test_adversarial_conv_all_methods(dtype, pool):
    rng, gen = random.Random(3), torch.Generator().manual_seed(3)
    model = small_cnn(pool).to(dtype)
    p = adversarial_params(model, rng, dtype)
    viol = 0
    for kind in ("ulp", "straddle", "wide"):
        lo_b, hi_b = adversarial_box((1, 2, 3, 3), rng, dtype, kind)
        viol += sound_violations(model, lo_b, hi_b, p, box_points(lo_b, hi_b, 3, gen))
    assert viol == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_stacked_samples_and_weight_boxes(dtype):
    """Stacked samples (all methods, input shared and per-sample) and weight boxes (IBP, with
    and without a leading S), the box sampled at its corners and at random floats."""
    rng, gen = random.Random(11), torch.Generator().manual_seed(4)
    S = 2
    viol = 0
    for model in (mlp().to(dtype), small_cnn(nn.MaxPool2d).to(dtype)):
        shape = (2, 5) if isinstance(model[0], nn.Linear) else (2, 2, 3, 3)
        p = adversarial_params(model, rng, dtype, S)
        lo_b, hi_b = adversarial_box(shape, rng, dtype, "straddle")
        pts = box_points(lo_b, hi_b, 3, gen)
        singles = [(s, {k: v[s] for k, v in p.items()}) for s in range(S)]
        for method in METHODS:
            lo, hi = bounds(model, lo_b, hi_b, method, params=p, tol="sound", sample_chunk=1, intersect_ibp=False)
            assert lo.shape[0] == S
            viol += check_exact(model, lo_b, hi_b, singles, pts, lo, hi)
        # weight boxes, with a leading S, via a spec folded into the last Linear
        boxes = {k: (v - v.abs() * 2.0**-10, v + v.abs() * 2.0**-12) for k, v in p.items()}
        y = torch.tensor([0, 2])
        spec = margin_spec(y, 3, exclude_true=True).to(dtype)
        for sp in (None, spec):
            lo, hi = bounds(model, lo_b, hi_b, "ibp", param_bounds=boxes, spec=sp, tol="sound")
            for w in range(3):
                pick = {
                    k: (a if w == 0 else b if w == 1 else torch.where(torch.rand(a.shape, generator=gen) < 0.5, a, b))
                    for k, (a, b) in boxes.items()
                }
                viol += check_exact(
                    model,
                    lo_b,
                    hi_b,
                    [(s, {k: v[s] for k, v in pick.items()}) for s in range(S)],
                    pts[:3],
                    lo,
                    hi,
                    spec=sp,
                )
    assert viol == 0


# ------------------------------------------------------------------ building blocks
@pytest.mark.parametrize("dtype", DTYPES)
def test_input_box_contains_exact_ball(dtype):
    """``_input_box`` encloses ``[x - eps, x + eps] ∩ [0, 1]`` exactly (x and eps as exact reals)."""
    gen = torch.Generator().manual_seed(5)
    x = torch.rand(64, 7, generator=gen, dtype=torch.float64)
    x[0, 0], x[1, 0] = 0.0, 1.0
    for eps in (0.1, 1e-8, 0.3, 0.0):
        lo, hi = _input_box(x, eps, dtype)
        assert lo.dtype == hi.dtype == dtype
        e = Fraction(eps)
        for xv, lv, hv in zip(_flat(_fr(x)), _flat(_fr(lo)), _flat(_fr(hi))):
            assert lv <= max(xv - e, Fraction(0)) and hv >= min(xv + e, Fraction(1))
            assert lv >= 0 and hv <= 1
        if eps == 0.0 and dtype == torch.float64:
            assert torch.equal(lo, x) and torch.equal(hi, x)  # exact when representable
    assert _input_box(x.float(), 0.1, None)[0].dtype == torch.float64  # certification default


def test_directed_helpers_exact():
    gen = torch.Generator().manual_seed(6)
    a = torch.randn(500, generator=gen, dtype=torch.float64) * 10.0 ** torch.randint(-20, 20, (500,), generator=gen)
    b = torch.randn(500, generator=gen, dtype=torch.float64)
    for f, g, _op in ((add_down, lambda s, e: s <= e, None), (add_up, lambda s, e: s >= e, None)):
        r = f(a, b)
        assert all(g(Fraction(float(s)), Fraction(float(x)) + Fraction(float(y))) for s, x, y in zip(r, a, b))
    lo, hi = cast_down(a, torch.float32), cast_up(a, torch.float32)
    assert all(Fraction(float(l)) <= Fraction(float(v)) <= Fraction(float(h)) for l, v, h in zip(lo, a, hi))
    # dot_error bounds the rounding error of a float32 dot product with cancellation
    w = torch.tensor([3e7, -3e7, 1.0, 1e-3], dtype=torch.float32)
    x = torch.tensor([1.0 + 2**-23, 1.0, 0.3, 7.0], dtype=torch.float32)
    err = dot_error((w.abs() * x.abs()).sum(), 4)
    exact = sum(Fraction(float(p)) * Fraction(float(q)) for p, q in zip(w, x))
    assert abs(Fraction(float(w @ x)) - exact) <= Fraction(float(err))


def test_sound_refusals():
    x = torch.zeros(1, 3)
    with pytest.raises(UnsupportedLayerError, match="LeakyReLU.*tol='sound'"):
        compute_bounds(nn.Sequential(nn.Linear(3, 2), nn.LeakyReLU(), nn.Linear(2, 2)), x, x, "ibp", tol="sound")
    bn = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)).eval()
    with pytest.raises(UnsupportedLayerError, match="BatchNorm1d"):
        compute_bounds(bn, x, x, "crown", tol="sound")
    with pytest.raises(ConfigError, match="float32 and float64"):
        compute_bounds(nn.Sequential(nn.Linear(3, 2)), x, x, "ibp", tol="sound", dtype=torch.float16)
    m64 = nn.Sequential(nn.Linear(3, 2)).double()
    with torch.no_grad():
        m64[0].weight[0, 0] = 0.1
    with pytest.raises(ConfigError, match="not exactly representable in torch.float32"):
        compute_bounds(m64, x, x, "ibp", tol="sound", dtype=torch.float32)
