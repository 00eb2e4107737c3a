"""Calibration, uncertainty and OOD metrics against hand-computed values."""

import math

import pytest
import torch

from certbnn.errors import ConfigError
from certbnn.evaluation.metrics import (
    accuracy,
    auroc,
    brier,
    entropy,
    entropy_histogram,
    evaluate_predictive,
    expected_calibration_error,
    max_probability,
    nll,
    predictive_log_probs,
    predictive_probs,
    reliability_diagram,
    uncertainty_decomposition,
)
from certbnn.functional import detached_params
from certbnn.models import build_model
from certbnn.posterior import GaussianPosterior

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_accuracy_nll_brier_hand_computed():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.5, 0.0], [0.1, 0.3, 0.6]])
    y = torch.tensor([0, 1, 2])
    # argmax: 0 (right), 0 (tie -> first index, wrong), 2 (right)
    assert accuracy(probs, y) == pytest.approx(2 / 3)
    assert nll(probs, y) == pytest.approx(-(math.log(0.7) + math.log(0.5) + math.log(0.6)) / 3)
    # (0.09 + 0.04 + 0.01) + (0.25 + 0.25 + 0) + (0.01 + 0.09 + 0.16)
    assert brier(probs, y) == pytest.approx((0.14 + 0.5 + 0.26) / 3)
    # worst case: all mass on a wrong class -> Brier 2, NLL finite thanks to the clamp
    wrong, label = torch.tensor([[0.0, 1.0]]), torch.tensor([0])
    assert brier(wrong, label) == pytest.approx(2.0)
    assert nll(wrong, label) == pytest.approx(-math.log(torch.finfo(torch.float32).tiny))


def test_ece_hand_computed_with_edges_right_closed():
    # 4 bins, edges 0, .25, .5, .75, 1 (exact in binary). Confidences sit on edges:
    # 0.5 -> bin 1 = (.25, .5]; 0.75 -> bin 2 = (.5, .75]; 1.0 -> bin 3 = (.75, 1].
    probs = torch.tensor([[0.5, 0.5], [0.75, 0.25], [0.25, 0.75], [1.0, 0.0], [0.0, 1.0], [0.875, 0.125]])
    y = torch.tensor([0, 0, 0, 0, 1, 1])
    ece, bins = expected_calibration_error(probs, y, num_bins=4)
    assert bins["edges"].tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert bins["count"].tolist() == [0, 1, 2, 3]
    # bin 1: conf .5, acc 1; bin 2: conf .75, acc .5; bin 3: conf (1+1+.875)/3, acc 2/3
    assert bins["confidence"].tolist() == pytest.approx([0.0, 0.5, 0.75, 2.875 / 3])
    assert bins["accuracy"].tolist() == pytest.approx([0.0, 1.0, 0.5, 2 / 3])
    expected = (1 / 6) * 0.5 + (2 / 6) * 0.25 + (3 / 6) * abs(2 / 3 - 2.875 / 3)
    assert ece == pytest.approx(expected)


def test_ece_first_bin_includes_lowest_confidence_and_perfect_calibration_is_zero():
    # One bin: ECE = |accuracy - mean confidence|.
    probs = torch.tensor([[0.6, 0.4], [0.3, 0.7], [0.9, 0.1]])
    y = torch.tensor([1, 1, 0])
    ece, bins = expected_calibration_error(probs, y, num_bins=1)
    assert bins["count"].tolist() == [3] and ece == pytest.approx(abs(2 / 3 - (0.6 + 0.7 + 0.9) / 3))
    # Uniform predictions over K = 4 (confidence .25 = first inner edge) land in the first bin.
    uniform = torch.full((8, 4), 0.25)
    labels = torch.tensor([0, 0, 0, 1, 2, 3, 1, 2])
    ece, bins = expected_calibration_error(uniform, labels, num_bins=4)
    assert bins["count"].tolist() == [8, 0, 0, 0]
    assert ece == pytest.approx(abs(3 / 8 - 0.25))  # argmax = class 0, right 3 times
    # A predictor that is right exactly as often as it claims has ECE 0.
    probs = torch.tensor([[0.75, 0.25]] * 4)
    ece, _ = expected_calibration_error(probs, torch.tensor([0, 0, 0, 1]), num_bins=15)
    assert ece == pytest.approx(0.0, abs=1e-12)


def test_ece_matches_definition_on_random_data():
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(500, 5, generator=gen), dim=-1)
    y = torch.randint(0, 5, (500,), generator=gen)
    ece, bins = expected_calibration_error(probs, y, num_bins=15)
    conf, pred = probs.double().max(-1)
    reference = 0.0
    for b in range(15):  # reference implementation with explicit right-closed intervals
        lo, hi = b / 15, (b + 1) / 15
        mask = (conf > lo) & (conf <= hi) if b > 0 else conf <= hi
        if mask.any():
            reference += mask.double().mean() * abs((pred[mask] == y[mask]).double().mean() - conf[mask].mean())
            assert bins["count"][b] == mask.sum()
    assert bins["count"].sum() == 500 and ece == pytest.approx(float(reference))


def test_entropy_and_max_probability():
    probs = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    assert entropy(probs).tolist() == pytest.approx([0.0, math.log(2), math.log(3)])
    assert max_probability(probs).tolist() == pytest.approx([1.0, 0.5, 1 / 3])


def test_uncertainty_decomposition():
    agree = torch.tensor([[0.7, 0.3], [0.2, 0.8]]).expand(5, 2, 2)
    parts = uncertainty_decomposition(agree)
    assert parts["epistemic"].abs().max() < 1e-6
    assert torch.allclose(parts["total"], parts["aleatoric"], atol=1e-6)
    # Two confident samples that disagree: all uncertainty is epistemic.
    disagree = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    parts = uncertainty_decomposition(disagree)
    assert parts["total"].item() == pytest.approx(math.log(2))
    assert parts["aleatoric"].item() == pytest.approx(0.0)
    assert parts["epistemic"].item() == pytest.approx(math.log(2))
    # Random samples: total = aleatoric + epistemic, epistemic >= 0 (Jensen).
    gen = torch.Generator().manual_seed(1)
    sample_probs = torch.softmax(2 * torch.randn(16, 50, 4, generator=gen, dtype=torch.float64), dim=-1)
    parts = uncertainty_decomposition(sample_probs)
    assert torch.allclose(parts["total"], parts["aleatoric"] + parts["epistemic"])
    assert (parts["epistemic"] > 0).all()
    with pytest.raises(ConfigError):
        uncertainty_decomposition(sample_probs[0])


def _brute_force_auroc(scores_in, scores_out):
    diff = scores_out[:, None] - scores_in[None, :]
    return ((diff > 0).double() + 0.5 * (diff == 0).double()).mean().item()


def test_auroc_hand_cases():
    assert auroc(torch.tensor([0.1, 0.2]), torch.tensor([0.3, 0.9])) == 1.0
    assert auroc(torch.tensor([0.3, 0.9]), torch.tensor([0.1, 0.2])) == 0.0
    assert auroc(torch.full((3,), 0.5), torch.full((4,), 0.5)) == 0.5
    assert auroc(torch.tensor([0.1, 0.4]), torch.tensor([0.35, 0.8])) == pytest.approx(0.75)
    # ties count 1/2: pairs (out, in) = (2,1) 1, (2,2) 1/2, (3,1) 1, (3,2) 1
    assert auroc(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 3.0])) == pytest.approx(3.5 / 4)
    with pytest.raises(ConfigError):
        auroc(torch.tensor([]), torch.tensor([1.0]))
    with pytest.raises(ConfigError):
        auroc(torch.tensor([float("nan")]), torch.tensor([1.0]))


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_pairwise_counting_with_ties(seed):
    gen = torch.Generator().manual_seed(seed)
    scores_in = torch.randint(0, 6, (37 + seed,), generator=gen).float()  # many ties
    scores_out = torch.randint(1, 8, (23,), generator=gen).float()
    assert auroc(scores_in, scores_out) == pytest.approx(_brute_force_auroc(scores_in, scores_out), abs=1e-12)
    continuous_in, continuous_out = torch.randn(100, generator=gen), torch.randn(80, generator=gen) + 0.5
    assert auroc(continuous_in, continuous_out) == pytest.approx(
        _brute_force_auroc(continuous_in, continuous_out), abs=1e-12
    )


def test_plots_write_png(tmp_path):
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(200, 3, generator=gen), dim=-1)
    _, bins = expected_calibration_error(probs, torch.randint(0, 3, (200,), generator=gen))
    for path in (
        reliability_diagram(bins, tmp_path / "sub" / "rel.png", title="test"),
        entropy_histogram(
            entropy(probs[:100]), entropy(probs[100:]), tmp_path / "hist.png", labels=("MNIST", "Fashion-MNIST")
        ),
    ):
        assert path.exists() and path.read_bytes()[:8] == PNG_MAGIC


def test_predictive_probs_point_and_sampled_params():
    torch.manual_seed(0)
    model = build_model("mlp:8", (1, 4, 4), 3)
    x = torch.rand(10, 1, 4, 4)
    point = detached_params(model)
    mean, samples = predictive_probs(model, point, x)
    assert samples.shape == (1, 10, 3) and torch.allclose(mean, torch.softmax(model(x), -1))
    posterior = GaussianPosterior(point, {k: torch.full_like(v, 0.3) for k, v in point.items()})
    stacked = posterior.sample(6, torch.Generator().manual_seed(0))
    mean, samples = predictive_probs(model, stacked, x)
    assert samples.shape == (6, 10, 3) and torch.allclose(mean, samples.mean(0))
    assert torch.allclose(mean.sum(-1), torch.ones(10))
    assert torch.allclose(predictive_log_probs(model, stacked, x).exp(), mean, atol=1e-6)
    y = torch.randint(0, 3, (10,))
    report = evaluate_predictive(model, stacked, x, y)
    assert set(report) == {"accuracy", "nll", "brier", "ece"}
    assert report["nll"] == pytest.approx(nll(mean, y), rel=1e-5)


def test_input_errors():
    with pytest.raises(ConfigError):
        accuracy(torch.rand(3), torch.tensor([0, 1, 2]))
    with pytest.raises(ConfigError):
        nll(torch.rand(3, 2), torch.tensor([0, 1]))
    with pytest.raises(ConfigError):
        expected_calibration_error(torch.rand(3, 2), torch.tensor([0, 1, 0]), num_bins=0)
