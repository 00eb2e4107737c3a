"""Analytic squared-gradient sums (certbnn.inference.squared_grads) against per-example gradients
(vmap / weight copies): every supported layer and likelihood, 1 and several samples, weights used
on several paths, conv nets, a whole VOGN step, and the fallback where the rules do not apply."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from certbnn.errors import ConfigError
from certbnn.inference.squared_grads import analytic_moments
from certbnn.inference.vogn import VOGN, AnalyticFallbackWarning, gradient_moments, per_example_grads
from certbnn.likelihoods import Adversarial, BatchNLL, Categorical, GaussianRegression, IntervalRobust
from certbnn.priors import prior_from_model


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 9), nn.ReLU(), nn.Linear(9, 7), nn.Tanh(), nn.Linear(7, 3))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 2, stride=2),
        nn.Sigmoid(),
        nn.AvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 3),
    )


def cnn_variants() -> nn.Module:  # groups, dilation, 'same' padding, a non-zero padding mode
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding="same", dilation=2),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, groups=2, padding=1, padding_mode="reflect"),
        nn.ReLU(),
        nn.Conv2d(4, 2, 2, stride=2),
        nn.Flatten(),
        nn.Linear(32, 3),
    )


def shared() -> nn.Module:  # one Linear used twice: its weight on two paths per pass
    hidden = nn.Linear(8, 8)
    return nn.Sequential(nn.Linear(12, 8), nn.ReLU(), hidden, nn.ReLU(), hidden, nn.ReLU(), nn.Linear(8, 3))


INPUTS = {mlp: (12,), cnn: (1, 8, 8), cnn_variants: (2, 8, 8), shared: (12,)}


def problem(make, samples: int, dtype=torch.float64, batch: int = 5):
    torch.manual_seed(0)
    model = make().to(dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(batch, *INPUTS[make], generator=g, dtype=dtype)
    y = torch.randint(0, 3, (batch,), generator=g)
    weights = {
        n: p.detach() + 0.2 * torch.randn((samples, *p.shape), generator=g, dtype=dtype)
        for n, p in model.named_parameters()
    }
    return model, x, y, weights


def assert_matches_per_example(weights, batch, nll, mode="vmap", rtol=1e-5):
    moments, reason = analytic_moments(weights, batch, nll)
    assert moments is not None, reason
    mean, square, values = moments
    grads, ref_values = per_example_grads(weights, batch, nll, mode)
    assert torch.allclose(values, ref_values, rtol=rtol, atol=1e-12)
    for name, g in grads.items():
        ref_mean, ref_square = g.mean((0, 1)), (g * g).mean((0, 1))
        scale = ref_square.abs().max().sqrt() + 1e-30
        assert mean[name].shape == ref_mean.shape and square[name].shape == ref_square.shape
        assert torch.allclose(mean[name], ref_mean, rtol=rtol, atol=rtol * scale), name
        assert torch.allclose(square[name], ref_square, rtol=rtol, atol=rtol * scale**2), name
        assert float(ref_square.abs().max()) > 0


LIKELIHOODS = [
    Categorical(),
    IntervalRobust(bound="ibp", lam=0.25, mix="prob"),
    IntervalRobust(bound="ibp", lam=0.5, mix="loss"),
    IntervalRobust(bound="ibp", lam=0.25, mix="prob", margins=True),
    IntervalRobust(bound="ibp", lam=0.4, mix="loss", margins=True),
]


CASES = (
    [(mlp, lik, s) for lik in LIKELIHOODS for s in (1, 3)]
    + [(cnn, lik, 2) for lik in LIKELIHOODS]
    + [(cnn_variants, lik, 1) for lik in LIKELIHOODS[1:4:2]]
    + [(shared, lik, 2) for lik in LIKELIHOODS[:4:3]]
)


@pytest.mark.parametrize("make,likelihood,samples", CASES, ids=[f"{m.__name__}-{lik!r}-S{s}" for m, lik, s in CASES])
def test_analytic_sums_equal_per_example_gradients(make, likelihood, samples):
    model, x, y, weights = problem(make, samples)
    assert_matches_per_example(weights, (x, y), BatchNLL(likelihood, model, 0.05), mode="copies")


def test_gaussian_regression_and_float32():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1))
    x, y = torch.randn(7, 4, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    weights = {
        n: p.detach().double() + 0.1 * torch.randn(2, *p.shape, dtype=torch.float64)
        for n, p in model.named_parameters()
    }
    assert_matches_per_example(weights, (x, y), BatchNLL(GaussianRegression(sigma=0.7), model.double(), 0.0))
    model32, x32, y32, w32 = problem(mlp, 2, torch.float32, batch=16)
    assert_matches_per_example(w32, (x32, y32), BatchNLL(IntervalRobust(lam=0.25), model32, 0.05), rtol=1e-4)


@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
def test_adversarial_likelihoods_attack_once_outside(attack):
    model, x, y, weights = problem(mlp, 2)
    nll = BatchNLL(Adversarial(attack=attack, lam=0.25, steps=2, random_start=False), model, 0.1)
    assert nll.attack_stage
    assert_matches_per_example(weights, (x, y), nll)


def test_pgd_random_start_uses_the_generator_like_the_vmap_path():
    model, x, y, weights = problem(mlp, 2)
    nlls = [
        BatchNLL(Adversarial(attack="pgd", lam=0.25, steps=2), model, 0.1, torch.Generator().manual_seed(3))
        for _ in range(2)
    ]
    (_, square, _), _ = analytic_moments(weights, (x, y), nlls[0])
    grads, _ = per_example_grads(weights, (x, y), nlls[1], "vmap")
    for name, g in grads.items():
        assert torch.allclose(square[name], (g * g).mean((0, 1)), rtol=1e-6, atol=1e-12)


def test_several_paths_need_the_cross_terms():
    """sum_i (a_i + b_i)^2 is not sum_i a_i^2 + b_i^2: the shared weight's sums include the cross terms."""
    model, x, y, weights = problem(shared, 1)
    nll = BatchNLL(IntervalRobust(lam=0.25), model, 0.05)
    (_, square, _), _ = analytic_moments(weights, (x, y), nll)
    grads, _ = per_example_grads(weights, (x, y), nll, "copies")
    g = grads["2.weight"]
    assert torch.allclose(square["2.weight"], (g * g).mean((0, 1)), rtol=1e-9)
    assert not torch.allclose(square["2.weight"], 0.5 * (g * g).mean((0, 1)), rtol=1e-3)


class Partial(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used, self.extra = nn.Linear(3, 2), nn.Linear(2, 2)  # extra: registered, never called

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


def test_unused_parameter_has_zero_moments():
    model = Partial()
    x, y = torch.rand(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
    weights = {n: p.detach().double()[None] for n, p in model.double().named_parameters()}
    (mean, square, _), _ = analytic_moments(weights, (x, y), BatchNLL(Categorical(), model, 0.0))
    assert float(square["extra.weight"].abs().max()) == 0.0 and float(mean["extra.bias"].abs().max()) == 0.0
    assert float(square["used.weight"].abs().max()) > 0.0


@pytest.mark.parametrize("bound", ["crown", "crown-ibp"])
def test_crown_falls_back_with_a_warning_and_the_same_result(bound):
    model, x, y, weights = problem(mlp, 2)
    nll = BatchNLL(IntervalRobust(bound=bound, lam=0.25), model, 0.05)
    moments, reason = analytic_moments(weights, (x, y), nll)
    assert moments is None and reason
    with pytest.warns(AnalyticFallbackWarning, match="analytic squared gradients do not apply"):
        _, square, _ = gradient_moments(weights, (x, y), nll, "auto")
    grads, _ = per_example_grads(weights, (x, y), nll, "vmap")
    assert all(torch.allclose(square[n], (g * g).mean((0, 1))) for n, g in grads.items())
    with pytest.raises(ConfigError, match="per_example='analytic' cannot handle"):
        gradient_moments(weights, (x, y), nll, "analytic")


def test_unknown_use_of_a_weight_falls_back():
    """A weight used through an operation the rules do not know (indexing) is never guessed."""
    model, x, y, weights = problem(mlp, 1)
    base = BatchNLL(Categorical(), model, 0.0)

    def nll(params, xb, yb):
        return base(params, xb, yb) + 0.1 * params["1.weight"][..., 0, 0].square()

    moments, reason = analytic_moments(weights, (x, y), nll)
    assert moments is None and "getitem" in reason
    with pytest.warns(AnalyticFallbackWarning):
        _, square, _ = gradient_moments(weights, (x, y), nll, "auto")
    grads, _ = per_example_grads(weights, (x, y), nll, "vmap")
    assert torch.allclose(square["1.weight"], (grads["1.weight"] ** 2).mean((0, 1)))


@pytest.mark.parametrize(
    "likelihood", [Categorical(), IntervalRobust(lam=0.25), IntervalRobust(lam=0.25, margins=True)], ids=repr
)
def test_vogn_steps_give_the_same_state_as_per_example_gradients(likelihood):
    model, x, y, _ = problem(mlp, 1)
    nll = BatchNLL(likelihood, model, 0.05)
    states = {}
    for mode in ("analytic", "vmap"):
        method = VOGN(prior=prior_from_model(model, 1.0), num_data=50, num_samples=2, per_example=mode)
        state = method.init({n: p.detach().clone() for n, p in model.named_parameters()})
        g = torch.Generator().manual_seed(4)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for _ in range(3):
                state, _ = method.step(state, (x, y), nll, g)
        states[mode] = state
    for field in ("mean", "exp_avg", "precision"):
        a, b = getattr(states["analytic"], field), getattr(states["vmap"], field)
        assert all(torch.allclose(a[n], b[n], rtol=1e-9, atol=1e-12) for n in a), field


def test_per_example_option_is_checked():
    with pytest.raises(ConfigError, match="per_example must be one of auto, analytic, vmap, copies"):
        VOGN(prior=prior_from_model(mlp(), 1.0), num_data=10, per_example="loop")
