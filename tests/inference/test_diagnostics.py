"""R-hat and ESS against known answers: iid chains, shifted chains, AR(1) chains."""

from __future__ import annotations

import math

import pytest
import torch

from certbnn.errors import ConfigError
from certbnn.functional import forward
from certbnn.inference.diagnostics import chain_diagnostics, effective_sample_size, predictive_summaries, split_rhat


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


def mlp_chains(permute: bool, chains: int = 4, length: int = 200, hidden: int = 6):
    """Chains of a 2-layer ReLU MLP's samples, iid around one network; with ``permute`` each chain
    holds the same draws with its hidden units in a different order (the same functions)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 3))
    centre = {n: p.detach() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(1)
    out = []
    for c in range(chains):
        draws = {n: t + 0.05 * torch.randn(length, *t.shape, generator=g) for n, t in centre.items()}
        if permute:
            order = torch.roll(torch.arange(hidden), c)
            draws = {
                "0.weight": draws["0.weight"][:, order],
                "0.bias": draws["0.bias"][:, order],
                "2.weight": draws["2.weight"][:, :, order],
                "2.bias": draws["2.bias"],
            }
        out.append(draws)
    return model, out


def test_predictive_summaries_are_the_probe_nll_and_label_log_probabilities():
    model, (chain, *_) = mlp_chains(permute=False)
    x, y = torch.randn(40, 5, generator=torch.Generator().manual_seed(2)), torch.arange(40) % 3
    summaries = predictive_summaries(model, chain, x, y, num_points=4)
    assert summaries.shape == (5, 200) and summaries.dtype == torch.float64
    for t in (0, 77, 199):
        logp = torch.log_softmax(forward(model, {n: v[t] for n, v in chain.items()}, x).double(), -1)[
            torch.arange(40), y
        ]
        torch.testing.assert_close(summaries[0, t], -logp.mean(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(summaries[1:, t], logp[:4], rtol=1e-5, atol=1e-6)


def test_function_space_rhat_sees_through_permuted_hidden_units():
    """Chains in permuted copies of one weight region: weight R-hat says 'not mixed', the
    predictions' R-hat says they agree; unpermuted chains agree in both spaces."""
    x, y = torch.randn(64, 5, generator=torch.Generator().manual_seed(3)), torch.arange(64) % 3
    for permute in (True, False):
        model, chains = mlp_chains(permute)
        report = chain_diagnostics(chains, predictive=lambda c: predictive_summaries(model, c, x, y))
        assert list(report["function"]["per_quantity"]) == ["nll"] + [f"logp_{i}" for i in range(8)]
        assert report["function"]["rhat_max"] < 1.05 and report["function"]["ess_min"] > 200
        if permute:
            assert report["rhat_max"] > 1.5
        else:
            assert report["rhat_max"] < 1.05
