"""GaussianPosterior: validation, sampling statistics, weight boxes and their mass."""

import math

import pytest
import torch

from certbnn.errors import ConfigError
from certbnn.posterior import GaussianPosterior, box_log_mass


def make_posterior(dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    mean = {"w": torch.randn(3, 2, generator=gen, dtype=dtype), "b": torch.randn(2, generator=gen, dtype=dtype)}
    std = {
        "w": torch.rand(3, 2, generator=gen, dtype=dtype) + 0.1,
        "b": torch.rand(2, generator=gen, dtype=dtype) + 0.1,
    }
    return GaussianPosterior(mean, std)


@pytest.mark.parametrize(
    "mean, std, fragment",
    [
        ({"w": torch.zeros(2)}, {"w": torch.zeros(2)}, "strictly positive"),
        ({"w": torch.zeros(2)}, {"w": torch.tensor([1.0, float("inf")])}, "NaN or infinite"),
        ({"w": torch.tensor([float("nan"), 0.0])}, {"w": torch.ones(2)}, "NaN or infinite"),
        ({"w": torch.zeros(2)}, {"w": torch.ones(2, 1)}, "shape"),
        ({"w": torch.zeros(2)}, {"v": torch.ones(2)}, "lacks parameter 'w'"),
        ({"w": torch.zeros(2)}, {"w": torch.ones(2, dtype=torch.float64)}, "dtype"),
        ({}, {}, "non-empty"),
        ({"w": torch.zeros(2, dtype=torch.int64)}, {"w": torch.ones(2)}, "non-floating"),
    ],
)
def test_validation(mean, std, fragment):
    with pytest.raises(ConfigError, match=fragment):
        GaussianPosterior(mean, std)


def test_sample_is_one_stacked_dict_and_reproducible():
    posterior = make_posterior()
    draws = posterior.sample(5, generator=torch.Generator().manual_seed(1))
    assert isinstance(draws, dict) and list(draws) == ["w", "b"]
    assert draws["w"].shape == (5, 3, 2) and draws["b"].shape == (5, 2)
    again = posterior.sample(5, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(draws[n], again[n]) for n in draws)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match="positive int"):
            posterior.sample(bad)


def test_sample_statistics_within_five_standard_errors():
    posterior, n = make_posterior(), 40_000
    draws = posterior.sample(n, generator=torch.Generator().manual_seed(2))
    for name, values in draws.items():
        mu, sigma = posterior.mean()[name], posterior.std()[name]
        assert bool(((values.mean(0) - mu).abs() < 5 * sigma / math.sqrt(n)).all())
        assert bool(((values.std(0) - sigma).abs() < 5 * sigma / math.sqrt(2 * n)).all())


def test_sample_is_reparameterised():
    mean = {"w": torch.zeros(3, requires_grad=True)}
    std = {"w": torch.ones(3, requires_grad=True)}
    GaussianPosterior(mean, std).sample(4)["w"].sum().backward()
    assert torch.equal(mean["w"].grad, torch.full((3,), 4.0))


def test_weight_box_is_mean_plus_minus_k_std():
    posterior = make_posterior()
    box = posterior.weight_box(1.5)
    for name, (low, high) in box.items():
        assert torch.allclose(low, posterior.mean()[name] - 1.5 * posterior.std()[name])
        assert torch.allclose(high, posterior.mean()[name] + 1.5 * posterior.std()[name])
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ConfigError, match="positive finite"):
            posterior.weight_box(bad)


def test_box_mass_closed_form_and_log_stability():
    posterior = make_posterior()
    assert posterior.num_coordinates == 8
    assert posterior.box_mass(2.0) == pytest.approx(math.erf(2.0 / math.sqrt(2)) ** 8, rel=1e-12)
    assert posterior.box_log_mass(2.0) == pytest.approx(8 * math.log(math.erf(math.sqrt(2))), rel=1e-12)
    # A million coordinates at k = 3: mass underflows nowhere in log space.
    assert box_log_mass(3.0, 10**6) == pytest.approx(10**6 * math.log1p(-math.erfc(3 / math.sqrt(2))), rel=1e-12)
    # Very wide boxes: log erf ~ -erfc, which naive log(erf) would round to 0.
    assert box_log_mass(12.0, 1) == pytest.approx(-math.erfc(12 / math.sqrt(2)), rel=1e-6)
    assert box_log_mass(1e-3, 1) == pytest.approx(math.log(math.erf(1e-3 / math.sqrt(2))), rel=1e-12)


@pytest.mark.parametrize("k", [1.0, 2.0])
def test_weight_box_contains_samples_with_the_predicted_frequency(k):
    posterior, n = make_posterior(), 20_000
    draws = posterior.sample(n, generator=torch.Generator().manual_seed(3))
    inside = torch.ones(n, dtype=torch.bool)
    for name, (low, high) in posterior.weight_box(k).items():
        inside &= ((draws[name] >= low) & (draws[name] <= high)).reshape(n, -1).all(-1)
    p = posterior.box_mass(k)
    assert abs(inside.double().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n)


def test_to_changes_dtype_and_keeps_values():
    posterior = make_posterior()
    single = posterior.to(dtype=torch.float32)
    assert all(t.dtype == torch.float32 for t in single.mean().values())
    assert torch.allclose(single.std()["w"].double(), posterior.std()["w"], rtol=1e-6)
    assert single.sample(2)["w"].dtype == torch.float32
    assert single.names == posterior.names
