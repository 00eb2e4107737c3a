"""What a run reports about its Markov chain: per-epoch acceptance, and whether the stored
samples are distinct networks that left the start (a frozen chain is flagged, not hidden)."""

import pytest
import torch

from certbnn.inference.diagnostics import AcceptanceTally, chain_summary


def test_chain_summary_counts_distinct_samples_and_distances():
    start = {"w": torch.ones(2, 3), "b": torch.zeros(3)}
    frozen = {"w": torch.ones(4, 2, 3), "b": torch.zeros(4, 3)}
    assert chain_summary(frozen, start) == {
        "stored_samples": 4,
        "distinct_samples": 1,
        "distance_from_start": 0.0,
        "spread": 0.0,
    }
    moved = {"w": torch.ones(4, 2, 3), "b": torch.zeros(4, 3)}
    moved["b"][1:, 0] = torch.tensor([1.0, 1.0, 3.0])  # samples 1 and 2 equal: 3 distinct
    summary = chain_summary(moved, start)
    assert summary["distinct_samples"] == 3
    assert summary["distance_from_start"] == pytest.approx(3.0 / 6**0.5)
    offsets = torch.tensor([0.0, 1.0, 1.0, 3.0])
    assert summary["spread"] == pytest.approx(float((offsets - offsets.mean()).pow(2).mean().sqrt()) / 6**0.5)


def test_acceptance_tally_counts_only_metropolis_steps():
    tally = AcceptanceTally()
    tally.add({"nll": 0.3})  # an optimiser's step: no proposal
    assert tally.record() == {}
    for accepted, step in ((1.0, 0.1), (0.0, 0.2), (1.0, 0.05), (1.0, 0.05)):
        tally.add({"accepted": accepted, "step_size": step})
    assert tally.record() == {"accept_rate": 0.75, "step_size": 0.05}
