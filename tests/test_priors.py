"""Gaussian priors: fan-in scaling, log density, sampling and exact summed KL."""

import math

import pytest
import torch
from torch import nn

from certbnn.errors import ConfigError
from certbnn.models import build_model
from certbnn.priors import GaussianPrior, fan_in_of, prior_from_model


def test_fan_in_of_linear_and_convs_with_groups():
    assert fan_in_of(nn.Linear(7, 3)) == 7
    assert fan_in_of(nn.Conv2d(3, 16, 4)) == 3 * 4 * 4
    assert fan_in_of(nn.Conv2d(4, 8, (3, 5), groups=2)) == 2 * 3 * 5
    assert fan_in_of(nn.Conv2d(6, 6, 3, groups=6)) == 9  # depthwise
    assert fan_in_of(nn.Conv1d(4, 2, 5, groups=2)) == 10
    assert fan_in_of(nn.ReLU()) is None


def test_prior_from_model_uses_layer_fan_in_for_weights_and_biases():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.ReLU(), nn.Flatten(), nn.Sequential(nn.Linear(8, 5)))
    prior = prior_from_model(model, scale=2.0)
    std = prior.std()
    assert list(std) == ["0.weight", "0.bias", "3.0.weight", "3.0.bias"]
    assert torch.allclose(std["0.weight"], torch.full((8, 2, 3, 3), math.sqrt(2.0 / 18)))
    assert torch.allclose(std["0.bias"], torch.full((8,), math.sqrt(2.0 / 18)))
    assert torch.allclose(std["3.0.weight"], torch.full((5, 8), math.sqrt(2.0 / 8)))
    assert torch.allclose(std["3.0.bias"], torch.full((5,), math.sqrt(2.0 / 8)))
    assert all(bool((m == 0).all()) for m in prior.mean().values())


def test_prior_for_the_papers_mlp():
    model = build_model("mlp:512", (1, 28, 28), 10)
    std = prior_from_model(model, scale=2.0).std()
    assert std["1.weight"][0, 0].item() == pytest.approx(math.sqrt(2 / 784))
    assert std["3.bias"][0].item() == pytest.approx(math.sqrt(2 / 512))


def test_user_scales_and_unscaled_prior():
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    with pytest.raises(ConfigError, match="'1.weight'"):
        prior_from_model(model)
    prior = prior_from_model(model, stds={"1.weight": 0.5, "1.bias": torch.tensor([1.0, 2.0, 3.0])})
    assert torch.equal(prior.std()["1.bias"], torch.tensor([1.0, 2.0, 3.0]))
    assert torch.allclose(prior.std()["1.weight"], torch.full((3,), 0.5))
    flat = prior_from_model(model, scale=4.0, fan_in_scaled=False)
    assert all(torch.allclose(s, torch.full_like(s, 2.0)) for s in flat.std().values())
    with pytest.raises(ConfigError, match="not a parameter"):
        prior_from_model(model, stds={"nope": 1.0})
    with pytest.raises(ConfigError, match="positive"):
        prior_from_model(model, scale=-1.0)


def test_validation():
    with pytest.raises(ConfigError, match="strictly positive"):
        GaussianPrior({"w": torch.zeros(2)}, {"w": torch.tensor([1.0, 0.0])})
    with pytest.raises(ConfigError, match="NaN"):
        GaussianPrior({"w": torch.tensor([0.0, float("nan")])}, {"w": torch.ones(2)})
    with pytest.raises(ConfigError, match="shape"):
        GaussianPrior({"w": torch.zeros(2)}, {"w": torch.ones(3)})
    with pytest.raises(ConfigError, match="'v'"):
        GaussianPrior({"w": torch.zeros(2)}, {"w": torch.ones(2), "v": torch.ones(1)})


def small_prior(dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    mean = {"a": torch.randn(3, 2, generator=gen, dtype=dtype), "b": torch.randn(4, generator=gen, dtype=dtype)}
    std = {
        "a": torch.rand(3, 2, generator=gen, dtype=dtype) + 0.5,
        "b": torch.rand(4, generator=gen, dtype=dtype) + 0.5,
    }
    return GaussianPrior(mean, std)


def test_log_prob_matches_torch_distributions_and_batches():
    prior = small_prior()
    draws = prior.sample(7, generator=torch.Generator().manual_seed(1))
    assert draws["a"].shape == (7, 3, 2) and draws["b"].shape == (7, 4)
    expected = sum(
        torch.distributions.Normal(prior.mean()[n], prior.std()[n]).log_prob(draws[n]).reshape(7, -1).sum(-1)
        for n in draws
    )
    assert torch.allclose(prior.log_prob(draws), expected)
    single = prior.log_prob({n: t[0] for n, t in draws.items()})
    assert single.shape == () and torch.allclose(single, expected[0])
    with pytest.raises(ConfigError, match="mixes leading shapes"):
        prior.log_prob({"a": draws["a"], "b": draws["b"][0]})
    with pytest.raises(ConfigError, match="lacks parameter 'b'"):
        prior.log_prob({"a": draws["a"]})


def test_kl_closed_form_scalar_and_sum_over_coordinates():
    prior = GaussianPrior(
        {"w": torch.tensor([0.5], dtype=torch.float64)}, {"w": torch.tensor([2.0], dtype=torch.float64)}
    )
    mq, sq = torch.tensor([1.5], dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64)
    closed = math.log(2.0 / 0.5) + (0.5**2 + 1.0**2) / (2 * 2.0**2) - 0.5
    assert prior.kl_from({"w": mq}, {"w": sq}).item() == pytest.approx(closed, rel=1e-12)
    # Summed, not averaged: n identical coordinates give n times the KL of one.
    wide = GaussianPrior(
        {"w": torch.full((10, 3), 0.5, dtype=torch.float64)}, {"w": torch.full((10, 3), 2.0, dtype=torch.float64)}
    )
    kl = wide.kl_from(
        {"w": torch.full((10, 3), 1.5, dtype=torch.float64)}, {"w": torch.full((10, 3), 0.5, dtype=torch.float64)}
    )
    assert kl.item() == pytest.approx(30 * closed, rel=1e-12)
    prior = small_prior()
    assert prior.kl_from(prior.mean(), prior.std()).item() == pytest.approx(0.0, abs=1e-12)
    reference = sum(
        torch.distributions.kl_divergence(
            torch.distributions.Normal(m, s), torch.distributions.Normal(prior.mean()[n], prior.std()[n])
        ).sum()
        for n, (m, s) in {
            "a": (torch.zeros(3, 2, dtype=torch.float64), torch.ones(3, 2, dtype=torch.float64)),
            "b": (torch.ones(4, dtype=torch.float64), torch.full((4,), 0.3, dtype=torch.float64)),
        }.items()
    )
    kl = prior.kl_from(
        {"a": torch.zeros(3, 2, dtype=torch.float64), "b": torch.ones(4, dtype=torch.float64)},
        {"a": torch.ones(3, 2, dtype=torch.float64), "b": torch.full((4,), 0.3, dtype=torch.float64)},
    )
    assert kl.item() == pytest.approx(reference.item(), rel=1e-12)


def test_kl_matches_monte_carlo_within_five_standard_errors():
    prior = small_prior()
    q_mean = {"a": torch.full((3, 2), 0.3, dtype=torch.float64), "b": torch.linspace(-1, 1, 4, dtype=torch.float64)}
    q_std = {"a": torch.full((3, 2), 0.8, dtype=torch.float64), "b": torch.full((4,), 1.2, dtype=torch.float64)}
    q = GaussianPrior(q_mean, q_std)  # the same density code evaluates log q
    draws = q.sample(200_000, generator=torch.Generator().manual_seed(2))
    log_ratio = q.log_prob(draws) - prior.log_prob(draws)
    standard_error = log_ratio.std().item() / math.sqrt(log_ratio.numel())
    assert abs(log_ratio.mean().item() - prior.kl_from(q_mean, q_std).item()) < 5 * standard_error


def test_kl_is_differentiable_and_checks_structure():
    prior = small_prior(torch.float32)
    mean = {n: torch.zeros_like(t, requires_grad=True) for n, t in prior.mean().items()}
    rho = {n: torch.zeros_like(t, requires_grad=True) for n, t in prior.mean().items()}
    kl = prior.kl_from(mean, {n: nn.functional.softplus(r) for n, r in rho.items()})
    kl.backward()
    assert all(m.grad is not None and bool(torch.isfinite(m.grad).all()) for m in mean.values())
    assert all(r.grad is not None for r in rho.values())
    with pytest.raises(ConfigError, match="lacks parameter 'b'"):
        prior.kl_from({"a": mean["a"]}, {"a": rho["a"]})


def test_sample_statistics_and_device_dtype_move():
    prior = small_prior().to(dtype=torch.float32)
    draws = prior.sample(50_000, generator=torch.Generator().manual_seed(3))
    for name, values in draws.items():
        assert values.dtype == torch.float32
        se = prior.std()[name] / math.sqrt(50_000)
        assert bool(((values.mean(0) - prior.mean()[name]).abs() < 5 * se).all())
        assert bool(((values.std(0) - prior.std()[name]).abs() < 5 * prior.std()[name] / math.sqrt(2 * 50_000)).all())
