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


def _sets(m: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    return [{"w": torch.randn(2, 3, generator=g), "b": torch.randn(2, generator=g)} for _ in range(m)]


def test_a_posterior_of_weight_sets_draws_what_the_stacked_one_draws_without_stacking_them():
    sets = _sets(50)
    lazy = SamplePosterior.of_sets(sets)
    stacked = SamplePosterior({n: torch.stack([s[n] for s in sets]) for n in ("w", "b")})
    assert lazy.names == ["w", "b"] and lazy.num_samples == 50 and lazy.weights is None
    for seed in range(3):
        got = lazy.sample(7, torch.Generator().manual_seed(seed))
        want = stacked.sample(7, torch.Generator().manual_seed(seed))
        assert all(torch.equal(got[n], want[n]) for n in want)
    assert lazy.reference is sets[0]["w"]
    assert lazy._stacked is None  # draws and reference stacked nothing else (a sampler validates every epoch)
    got = lazy.sample(7, torch.Generator().manual_seed(0))
    got["w"].zero_()  # draws are copies
    assert torch.equal(lazy.sample(None)["w"], stacked.sample(None)["w"])
    assert all(torch.equal(lazy.mean()[n], stacked.mean()[n]) for n in ("w", "b"))


@pytest.mark.parametrize(
    "sets, fragment",
    [
        ([], "M >= 1 weight sets"),
        ([{"w": torch.zeros(2)}, {"v": torch.zeros(2)}], "same .*names and shapes"),
        ([{"w": torch.zeros(2)}, {"w": torch.zeros(3)}], "same .*names and shapes"),
    ],
)
def test_weight_sets_are_checked(sets, fragment):
    with pytest.raises(ConfigError, match=fragment):
        SamplePosterior.of_sets(sets)


def test_a_non_finite_weight_set_is_refused_when_drawn_or_stacked():
    sets = _sets(3)
    sets[1]["w"][0, 0] = float("nan")
    with pytest.raises(ConfigError, match="finite"):
        SamplePosterior.of_sets(sets).sample(None)
    with pytest.raises(ConfigError, match="finite"):
        SamplePosterior.of_sets(sets[1:2]).sample(4, torch.Generator().manual_seed(0))


def test_validating_a_samplers_posterior_stacks_only_the_drawn_samples():
    import numpy as np
    from torch import nn

    from certbnn.data.dataset import ArrayDataset
    from certbnn.validation import validate

    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    g = torch.Generator().manual_seed(1)
    sets = [{"1.weight": torch.randn(3, 4, generator=g), "1.bias": torch.randn(3, generator=g)} for _ in range(30)]
    rng = np.random.default_rng(0)
    val = ArrayDataset(rng.random((20, 1, 2, 2), dtype=np.float32), rng.integers(0, 3, 20), num_classes=3)
    lazy = SamplePosterior.of_sets(sets)
    got = validate(model, lazy, val, 0.05, num_samples=4, seed=3)
    assert lazy._stacked is None  # not mean(), not all 30 sets: the 4 drawn ones
    stacked = SamplePosterior({n: torch.stack([s[n] for s in sets]) for n in sets[0]})
    assert got == validate(model, stacked, val, 0.05, num_samples=4, seed=3)
