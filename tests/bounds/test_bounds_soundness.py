"""Randomised soundness of every method on random networks and boxes.

Bounds are computed in float64 and the real model evaluated in float64 at
sampled points of the boxes (box corners included); a true output may exceed
a bound by at most ``1e-9 * (1 + |bound|)`` (rounding). The float32 test uses
``tol="auto"`` instead (see docs/bounds.md, "Tolerance policy").
"""

from __future__ import annotations

import random

import pytest
import torch
from bounds_testlib import random_boxes, random_cnn, random_mlp, sampled_params, weight_boxes

from certbnn.bounds import check_soundness, compute_bounds, margin_spec

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")

METHODS = ["ibp", "crown", "crown-ibp"]
N_INPUTS = 64
DEFAULT_SEEDS = range(40)
SLOW_SEEDS = range(40, 400)


def _setup(seed: int, kind: str):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    depth = 1 + seed % 6
    model, in_shape = (random_cnn if kind == "cnn" else random_mlp)(rng, depth)
    lower, upper = random_boxes(in_shape, rng, gen)
    return rng, gen, model, lower, upper


def _assert_sound(counter, model, lower, upper, lo, up, **kw):
    assert torch.all(lo <= up + 1e-12), "lower bound above upper bound"
    rep = check_soundness(model, lower, upper, lo, up, n_inputs=kw.pop("n_inputs", N_INPUTS), **kw)
    counter["points"] += rep.n_points
    counter["values"] += rep.n_values
    assert rep.ok, f"{rep.n_violations} violations, max excess {rep.max_excess:.3g}"


def _run_all_methods(counter, seed, kind):
    _, gen, model, lower, upper = _setup(seed, kind)
    for method in METHODS:
        lo, up = compute_bounds(model, lower, upper, method)
        _assert_sound(counter, model, lower, upper, lo, up, generator=gen)
        if method != "ibp":  # raw CROWN (no intersection with IBP) must be sound by itself
            lo, up = compute_bounds(model, lower, upper, method, intersect_ibp=False)
            _assert_sound(counter, model, lower, upper, lo, up, generator=gen, n_inputs=16)


@pytest.mark.parametrize("seed", DEFAULT_SEEDS)
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_random_networks_all_methods(soundness_counter, seed, kind):
    _run_all_methods(soundness_counter, seed, kind)


@pytest.mark.slow
@pytest.mark.parametrize("seed", SLOW_SEEDS)
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_random_networks_all_methods_slow(soundness_counter, seed, kind):
    _run_all_methods(soundness_counter, seed, kind)


def _run_sampled(counter, seed, kind):
    _, gen, model, lower, upper = _setup(seed, kind)
    params = sampled_params(model, 3, gen)
    for method in METHODS:
        lo, up = compute_bounds(model, lower, upper, method, params=params)
        assert lo.shape[0] == 3
        _assert_sound(counter, model, lower, upper, lo, up, params=params, generator=gen, n_inputs=32)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_sampled_params(soundness_counter, seed, kind):
    _run_sampled(soundness_counter, seed, kind)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(12, 150))
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_sampled_params_slow(soundness_counter, seed, kind):
    _run_sampled(soundness_counter, seed, kind)


def _run_weight_boxes(counter, seed, kind):
    rng, gen, model, lower, upper = _setup(seed, kind)
    boxes = weight_boxes(model, rng, gen)
    lo, up = compute_bounds(model, lower, upper, "ibp", param_bounds=boxes)
    _assert_sound(counter, model, lower, upper, lo, up, param_bounds=boxes, n_weights=6, n_inputs=24, generator=gen)
    # weight boxes with a sample dimension (S boxes at once), plus a spec
    S = 2
    sboxes = {k: (torch.stack([a, a - 0.01]), torch.stack([b, b])) for k, (a, b) in boxes.items()}
    spec = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    lo, up = compute_bounds(model, lower, upper, "ibp", param_bounds=sboxes, spec=spec)
    assert lo.shape == (S, lower.shape[0], 4) or not sboxes
    _assert_sound(
        counter, model, lower, upper, lo, up, param_bounds=sboxes, spec=spec, n_weights=4, n_inputs=16, generator=gen
    )


@pytest.mark.parametrize("seed", range(16))
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_weight_boxes(soundness_counter, seed, kind):
    _run_weight_boxes(soundness_counter, seed, kind)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(16, 200))
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_weight_boxes_slow(soundness_counter, seed, kind):
    _run_weight_boxes(soundness_counter, seed, kind)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_spec_matrices(soundness_counter, seed, kind):
    _, gen, model, lower, upper = _setup(seed, kind)
    B = lower.shape[0]
    labels = torch.randint(0, 3, (B,), generator=gen)
    specs = [
        margin_spec(labels, 3).double(),
        margin_spec(labels, 3, exclude_true=True).double(),
        torch.randn(5, 3, generator=gen, dtype=torch.float64),
    ]
    params = sampled_params(model, 2, gen) if seed % 2 else None
    for spec in specs:
        for method in METHODS:
            lo, up = compute_bounds(model, lower, upper, method, params=params, spec=spec)
            assert lo.shape[-1] == spec.shape[-2]
            _assert_sound(
                soundness_counter, model, lower, upper, lo, up, params=params, spec=spec, n_inputs=16, generator=gen
            )


@pytest.mark.parametrize("seed", range(8))
def test_float32_with_auto_tolerance(soundness_counter, seed):
    """float32 bounds widened by tol='auto' contain float64 reference outputs."""
    _, gen, model, lower, upper = _setup(seed, "cnn" if seed % 2 else "mlp")
    model32, lower, upper = model.float(), lower.float(), upper.float()
    for method in METHODS:
        lo, up = compute_bounds(model32, lower, upper, method, tol="auto")
        # reference in float64 (the checker runs the model in the bounds' dtype)
        _assert_sound(
            soundness_counter,
            model32.double(),
            lower.double(),
            upper.double(),
            lo.double(),
            up.double(),
            generator=gen,
            rtol=0,
            atol=0,
        )
        model32.float()
