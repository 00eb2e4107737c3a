"""Sample sizes, Clopper-Pearson intervals and the sequential stopping rule."""

import math

import pytest
import torch

from certbnn.errors import ConfigError
from certbnn.evaluation.stats import (clopper_pearson, hoeffding_sample_size, sequential_confidence,
                                      sequential_looks)


def test_hoeffding_sample_sizes_of_the_paper():
    assert hoeffding_sample_size(0.2, 0.3) == 24  # MNIST protocol
    assert hoeffding_sample_size(0.1, 0.3) == 95  # CIFAR-10 protocol
    assert hoeffding_sample_size(0.05, 0.01) == 1060  # the stricter default
    for bad in [(0.0, 0.3), (0.2, 0.0), (0.2, 1.0), (-0.1, 0.5)]:
        with pytest.raises(ConfigError):
            hoeffding_sample_size(*bad)


def test_clopper_pearson_hand_cases():
    lo, up = clopper_pearson(torch.tensor([0, 24, 5]), torch.tensor([24, 24, 10]), 0.95)
    assert lo[0] == 0 and up[1] == 1
    assert up[0].item() == pytest.approx(1 - 0.025 ** (1 / 24), abs=1e-12)  # k = 0: (1-p)^n = alpha/2
    assert lo[1].item() == pytest.approx(0.025 ** (1 / 24), abs=1e-12)  # k = n: p^n = alpha/2
    assert lo[2].item() == pytest.approx(0.18708602, abs=1e-7)  # R: binom.test(5, 10)$conf.int
    assert up[2].item() == pytest.approx(0.81291398, abs=1e-7)


def _tail_ge(k: int, n: int, p: float) -> float:
    return sum(math.comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(k, n + 1))


@pytest.mark.parametrize("n", [1, 7, 24, 95])
def test_clopper_pearson_solves_its_defining_equations(n):
    k = torch.arange(n + 1)
    lo, up = clopper_pearson(k, n, 0.9)
    assert bool((lo <= k / n).all() and (k / n <= up).all() and (lo >= 0).all() and (up <= 1).all())
    for kk in range(n + 1):
        if kk > 0:  # P(X >= k; lower) = alpha/2
            assert _tail_ge(kk, n, lo[kk].item()) == pytest.approx(0.05, rel=1e-9)
        if kk < n:  # P(X <= k; upper) = alpha/2
            assert 1 - _tail_ge(kk + 1, n, up[kk].item()) == pytest.approx(0.05, rel=1e-9)


def test_clopper_pearson_exact_coverage_on_a_grid():
    # Coverage is a finite sum over k: C(p) = sum_k pmf(k; n, p) 1[lo_k <= p <= up_k]; no sampling error.
    n, conf = 24, 0.95
    lo, up = clopper_pearson(torch.arange(n + 1), n, conf)
    k = torch.arange(n + 1, dtype=torch.float64)
    for p in torch.linspace(0.0, 1.0, 401, dtype=torch.float64):
        pmf = torch.distributions.Binomial(n, probs=p.clamp(1e-300, 1 - 1e-16)).log_prob(k).exp()
        covered = ((lo <= p) & (p <= up)).double()
        assert float((pmf * covered).sum()) >= conf - 1e-9, float(p)


@pytest.mark.parametrize("conf", [0.95, 0.99])
def test_clopper_pearson_monte_carlo_coverage(conf):
    # 2000 repetitions per (p, n): if the true coverage c >= conf, the empirical coverage has standard
    # error sqrt(c (1 - c) / reps) <= sqrt(conf (1 - conf) / reps) (c(1-c) decreases for c > 1/2);
    # we allow 3 of those (a one-sided miss of 3 SE has probability ~1e-3 per case; fixed seed).
    reps = 2000
    margin = 3 * math.sqrt(conf * (1 - conf) / reps)
    gen = torch.Generator().manual_seed(1234)
    for n in (24, 95):
        for p in (0.0, 0.02, 0.1, 0.3, 0.5, 0.8, 0.97, 1.0):
            k = torch.binomial(torch.full((reps,), float(n)), torch.full((reps,), p), generator=gen)
            lo, up = clopper_pearson(k, n, conf)
            coverage = ((lo <= p) & (p <= up)).double().mean().item()
            assert coverage >= conf - margin, (n, p, coverage)


def test_clopper_pearson_per_point_trials_and_errors():
    lo, up = clopper_pearson(torch.tensor([3, 3]), torch.tensor([10, 100]), 0.99)
    lo10, up10 = clopper_pearson(torch.tensor([3]), 10, 0.99)
    lo100, up100 = clopper_pearson(torch.tensor([3]), 100, 0.99)
    assert torch.allclose(lo, torch.cat([lo10, lo100]), rtol=0, atol=1e-12)
    assert torch.allclose(up, torch.cat([up10, up100]), rtol=0, atol=1e-12)
    for succ, trials, conf in [(torch.tensor([5]), 4, 0.9), (torch.tensor([-1]), 4, 0.9),
                               (torch.tensor([1]), 4, 1.0), (torch.tensor([1]), 0, 0.9)]:
        with pytest.raises(ConfigError):
            clopper_pearson(succ, trials, conf)


def test_sequential_rule():
    assert sequential_looks(1060, 32) == [32, 64, 128, 256, 512, 1024, 1060]
    assert sequential_looks(20, 32) == [20]
    assert sequential_looks(64, 32) == [32, 64]
    assert sequential_confidence(0.99, 7) == pytest.approx(1 - 0.01 / 7)
    with pytest.raises(ConfigError):
        sequential_confidence(0.99, 0)
