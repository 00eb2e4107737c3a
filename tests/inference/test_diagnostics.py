"""R-hat and ESS against known answers: iid chains, shifted chains, AR(1) chains."""

from __future__ import annotations

import math

import pytest
import torch

from certbnn.errors import ConfigError
from certbnn.inference.diagnostics import chain_diagnostics, effective_sample_size, split_rhat


def ar1(chains: int, length: int, rho: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(chains, length, generator=g, dtype=torch.float64)
    x = torch.empty_like(noise)
    x[:, 0] = noise[:, 0] / math.sqrt(1 - rho**2)
    for t in range(1, length):
        x[:, t] = rho * x[:, t - 1] + noise[:, t]
    return x


def test_rhat_is_one_for_agreeing_chains_and_large_for_disagreeing_ones():
    iid = torch.randn(4, 1000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert abs(split_rhat(iid) - 1.0) < 0.01
    shifted = iid + torch.tensor([0.0, 0.0, 0.0, 3.0], dtype=torch.float64)[:, None]
    assert split_rhat(shifted) > 1.5
    trending = iid + torch.linspace(0, 5, 1000, dtype=torch.float64)  # one chain, not stationary: split catches it
    assert split_rhat(trending[:1]) > 1.5


@pytest.mark.parametrize("rho", [0.0, 0.5, 0.9])
def test_ess_matches_the_ar1_value(rho):
    chains = ar1(4, 4000, rho)
    expected = chains.numel() * (1 - rho) / (1 + rho)
    assert effective_sample_size(chains) == pytest.approx(expected, rel=0.15)


def test_chain_diagnostics_on_weight_samples_and_bad_input():
    g = torch.Generator().manual_seed(0)
    chains = [{"w": torch.randn(50, 3, 2, generator=g), "b": torch.randn(50, 2, generator=g)} for _ in range(3)]
    report = chain_diagnostics(chains)
    assert report["num_chains"] == 3 and report["samples_per_chain"] == 50
    assert report["rhat_max"] < 1.1 and report["ess_min"] > 50
    with pytest.raises(ConfigError, match="different lengths"):
        chain_diagnostics([chains[0], {k: v[:10] for k, v in chains[1].items()}])
    with pytest.raises(ConfigError, match="T >= 4"):
        split_rhat(torch.zeros(2, 3))
