"""SamplePosterior: validation, weighted resampling and weighted mean."""

import math

import pytest
import torch

from certbnn.errors import ConfigError
from certbnn.posterior import SamplePosterior


def stored(m=4, dtype=torch.float64):
    values = torch.arange(m, dtype=dtype)
    return {
        "w": values[:, None, None] * torch.ones(m, 2, 3, dtype=dtype),
        "b": values[:, None] + torch.zeros(m, 2, dtype=dtype),
    }


def test_validation():
    with pytest.raises(ConfigError, match="common leading sample dim"):
        SamplePosterior({"w": torch.zeros(3, 2), "b": torch.zeros(4)})
    with pytest.raises(ConfigError, match="common leading sample dim"):
        SamplePosterior({"w": torch.zeros(0, 2)})
    with pytest.raises(ConfigError, match="NaN"):
        SamplePosterior({"w": torch.tensor([[float("nan")]])})
    with pytest.raises(ConfigError, match=r"shape \(4,\)"):
        SamplePosterior(stored(), torch.ones(3))
    for bad in (torch.tensor([1.0, -1.0, 1.0, 1.0]), torch.zeros(4), torch.tensor([1.0, float("nan"), 1.0, 1.0])):
        with pytest.raises(ConfigError, match="non-negative"):
            SamplePosterior(stored(), bad)


def test_all_samples_and_uniform_mean():
    posterior = SamplePosterior(stored())
    assert posterior.num_samples == 4 and posterior.weights is None
    everything = posterior.sample()
    assert torch.equal(everything["w"], stored()["w"])
    assert torch.allclose(posterior.mean()["w"], torch.full((2, 3), 1.5, dtype=torch.float64))


def test_weights_are_normalised_and_weight_the_mean():
    posterior = SamplePosterior(stored(), torch.tensor([1.0, 0.0, 0.0, 3.0], dtype=torch.float64))
    assert torch.allclose(posterior.weights, torch.tensor([0.25, 0, 0, 0.75], dtype=torch.float64))
    assert torch.equal(posterior.frequencies, torch.tensor([1.0, 0.0, 0.0, 3.0], dtype=torch.float64))
    assert torch.allclose(posterior.mean()["b"], torch.full((2,), 0.75 * 3, dtype=torch.float64))


def test_weighted_draws_follow_the_weights():
    weights = torch.tensor([0.1, 0.2, 0.3, 0.4])
    posterior, n = SamplePosterior(stored(dtype=torch.float32), weights), 20_000
    draws = posterior.sample(n, generator=torch.Generator().manual_seed(0))
    assert draws["w"].shape == (n, 2, 3) and draws["b"].shape == (n, 2)
    index = draws["b"][:, 0].long()
    assert bool((draws["w"] == index[:, None, None].float()).all())  # names stay aligned within a draw
    for i, p in enumerate(weights.tolist()):
        assert abs((index == i).double().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n)


def test_uniform_draws_and_reproducibility():
    posterior = SamplePosterior(stored())
    first = posterior.sample(50, generator=torch.Generator().manual_seed(4))
    second = posterior.sample(50, generator=torch.Generator().manual_seed(4))
    assert torch.equal(first["w"], second["w"])
    assert set(first["b"][:, 0].long().tolist()) <= {0, 1, 2, 3}
    with pytest.raises(ConfigError, match="positive int or None"):
        posterior.sample(0)


def test_to():
    posterior = SamplePosterior(stored(), torch.tensor([1.0, 1.0, 2.0, 0.0]))
    moved = posterior.to(dtype=torch.float32)
    assert moved.sample()["w"].dtype == torch.float32 and torch.equal(moved.weights, posterior.weights)


def test_sample_all_returns_copies_not_the_storage():
    import torch

    from certbnn.posterior import SamplePosterior

    posterior = SamplePosterior({"w": torch.zeros(3, 2)})
    drawn = posterior.sample(None)
    drawn["w"] += 1.0
    assert torch.equal(posterior.sample(None)["w"], torch.zeros(3, 2))
