"""Sample sizes, exact binomial bounds, the statistical certificate's test and the sequential stopping rule."""

import math

import pytest
import torch

from certbnn.errors import ConfigError
from certbnn.evaluation import certify
from certbnn.evaluation.certify import certify_statistical
from certbnn.evaluation.stats import (
    binomial_lower_bound,
    binomial_upper_bound,
    clopper_pearson,
    hoeffding_sample_size,
    one_sided_bounds,
    sequential_confidence,
    sequential_looks,
)
from certbnn.posterior import GaussianPosterior


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


def monte_carlo_coverage(covers, conf: float, reps: int, seed: int, ns, ps) -> None:
    """Draw ``reps`` binomial counts per ``(n, p)`` and assert the fraction with ``covers(k, n, p)``
    is ``>= conf - 3 SE``: if the true coverage c >= conf its standard error is
    ``sqrt(c (1 - c) / reps) <= sqrt(conf (1 - conf) / reps)`` (c(1-c) decreases for c > 1/2);
    a one-sided miss of 3 SE has probability ~1e-3 per case (fixed seed)."""
    margin = 3 * math.sqrt(conf * (1 - conf) / reps)
    gen = torch.Generator().manual_seed(seed)
    for n in ns:
        for p in ps:
            k = torch.binomial(torch.full((reps,), float(n)), torch.full((reps,), p), generator=gen)
            coverage = covers(k, n, p).double().mean().item()
            assert coverage >= conf - margin, (n, p, coverage)


@pytest.mark.parametrize("conf", [0.95, 0.99])
def test_clopper_pearson_monte_carlo_coverage(conf):
    def covers(k, n, p):
        lo, up = clopper_pearson(k, n, conf)
        return (lo <= p) & (p <= up)

    monte_carlo_coverage(covers, conf, 2000, 1234, (24, 95), (0.0, 0.02, 0.1, 0.3, 0.5, 0.8, 0.97, 1.0))


def test_clopper_pearson_per_point_trials_and_errors():
    lo, up = clopper_pearson(torch.tensor([3, 3]), torch.tensor([10, 100]), 0.99)
    lo10, up10 = clopper_pearson(torch.tensor([3]), 10, 0.99)
    lo100, up100 = clopper_pearson(torch.tensor([3]), 100, 0.99)
    assert torch.allclose(lo, torch.cat([lo10, lo100]), rtol=0, atol=1e-12)
    assert torch.allclose(up, torch.cat([up10, up100]), rtol=0, atol=1e-12)
    for succ, trials, conf in [
        (torch.tensor([5]), 4, 0.9),
        (torch.tensor([-1]), 4, 0.9),
        (torch.tensor([1]), 4, 1.0),
        (torch.tensor([1]), 0, 0.9),
    ]:
        with pytest.raises(ConfigError):
            clopper_pearson(succ, trials, conf)


def test_sequential_rule():
    assert sequential_looks(1060, 32) == [32, 64, 128, 256, 512, 1024, 1060]
    assert sequential_looks(20, 32) == [20]
    assert sequential_looks(64, 32) == [32, 64]
    assert sequential_confidence(0.99, 7) == pytest.approx(1 - 0.01 / 7)
    with pytest.raises(ConfigError):
        sequential_confidence(0.99, 0)


def _pmf(n: int, p: float | torch.Tensor) -> torch.Tensor:
    """Binomial(n, p) pmf over k = 0..n, ``(..., n + 1)`` for ``p`` of shape ``(...)`` (float64, exact at 0 and 1)."""
    p = torch.as_tensor(p, dtype=torch.float64).unsqueeze(-1)
    k = torch.arange(n + 1, dtype=torch.float64)
    log_comb = math.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)
    return (log_comb + torch.special.xlogy(k, p) + torch.special.xlogy(n - k, 1 - p)).exp()


@pytest.mark.parametrize("n", [1, 10, 95])
def test_one_sided_lower_bound_solves_its_equation_at_the_stated_level(n):
    conf = 0.95
    k = torch.arange(n + 1)
    lower, upper = one_sided_bounds(k, n, conf)
    assert torch.equal(lower, binomial_lower_bound(k, n, conf)) and torch.equal(upper, binomial_upper_bound(k, n, conf))
    assert lower[0] == 0 and upper[n] == 1
    two_sided_90, two_sided_95 = clopper_pearson(k, n, 0.90)[0], clopper_pearson(k, n, conf)[0]
    for kk in range(1, n + 1):  # P(X >= k; L) = alpha (not alpha/2: the two-sided interval's end)
        assert _tail_ge(kk, n, lower[kk].item()) == pytest.approx(0.05, rel=1e-9)
        assert lower[kk].item() == pytest.approx(two_sided_90[kk].item(), abs=1e-12)  # the 2-sided 90 % lower end
        assert lower[kk].item() > two_sided_95[kk].item()  # tighter than the two-sided 95 % one
    assert lower[n].item() == pytest.approx(0.05 ** (1 / n), abs=1e-12)  # k = n: p^n = alpha


def test_one_sided_lower_bound_exact_coverage_is_at_the_stated_level():
    # P_p(L(X) <= p) = sum_k pmf(k) 1[L_k <= p], exactly: >= 1 - alpha for every p, and the worst case comes
    # close to 1 - alpha (the two-sided Clopper-Pearson end would stay above 1 - alpha/2).
    for n, conf in ((24, 0.95), (200, 0.99)):
        lower = binomial_lower_bound(torch.arange(n + 1), n, conf)
        p = torch.linspace(0.0, 1.0, 2001, dtype=torch.float64)
        coverage = (_pmf(n, p) * (lower <= p.unsqueeze(-1)).double()).sum(-1)
        assert bool((coverage >= conf - 1e-9).all()), (n, p[coverage.argmin()])
        assert float(coverage.min()) < 1 - 0.7 * (1 - conf), (n, float(coverage.min()))


@pytest.mark.parametrize("conf", [0.9, 0.99])
def test_one_sided_lower_bound_monte_carlo_coverage(conf):
    """The statistical certificate's lower bound L covers p (L <= p) with probability >= conf."""
    monte_carlo_coverage(
        lambda k, n, p: binomial_lower_bound(k, n, conf) <= p,
        conf,
        4000,
        99,
        (24, 300),
        (0.0, 0.05, 0.3, 0.5, 0.77, 0.99, 1.0),
    )


@pytest.fixture
def bernoulli_certifier(monkeypatch):
    """``make(p, reps)`` -> (posterior, x, y) for ``reps`` points at which each posterior sample is
    certified independently with probability ``p``: the fake ``per_sample_certified`` certifies
    sample ``s`` at point ``b`` (``x[b] = b``) iff ``u[s, b] < Phi^-1(p)``, ``u ~ N(0, 1)`` drawn by
    the posterior from the certificate's own generator."""

    def fake(model, params, x, y, eps, **kwargs):
        return params["u"][:, x[:, 0].long()] < params["z"][:, :1]

    monkeypatch.setattr(certify, "per_sample_certified", fake)

    def make(p, reps):
        z = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor([p], dtype=torch.float64))
        posterior = GaussianPosterior(
            {"u": torch.zeros(reps, dtype=torch.float64), "z": z},
            {"u": torch.ones(reps, dtype=torch.float64), "z": torch.full_like(z, 1e-300)},
        )
        return posterior, torch.arange(reps, dtype=torch.float64).unsqueeze(1), torch.zeros(reps, dtype=torch.int64)

    return make


@pytest.mark.parametrize("sequential", [False, True])
def test_false_certification_rate_under_h0_is_at_most_alpha(bernoulli_certifier, sequential):
    # H0 true: P_rob = 0.49 < threshold 0.5. Each of 4000 independent points is one repetition of the test.
    reps, alpha, t, p, n = 4000, 0.05, 0.5, 0.49, 256
    posterior, x, y = bernoulli_certifier(p, reps)
    res = certify_statistical(
        None,
        posterior,
        x,
        y,
        0.0,
        num_samples=n,
        confidence=1 - alpha,
        threshold=t,
        sequential=sequential,
        generator=torch.Generator().manual_seed(7),
    )
    rate = res["certified"].double().mean().item()
    assert rate <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / reps)
    if not sequential:  # the rate is the one-sided exact test's size at p, computed exactly (not a looser test)
        assert abs(res["p_hat"].mean().item() - p) < 4 * math.sqrt(p * (1 - p) / (n * reps))
        lower = binomial_lower_bound(torch.arange(n + 1), n, 1 - alpha)
        exact = float((_pmf(n, p) * (lower >= t).double()).sum())
        two_sided = float((_pmf(n, p) * (clopper_pearson(torch.arange(n + 1), n, 1 - alpha)[0] >= t).double()).sum())
        assert two_sided < exact <= alpha  # the stated level is used, not 1 - alpha/2
        assert abs(rate - exact) <= 4 * math.sqrt(exact * (1 - exact) / reps), (rate, exact)
        assert torch.equal(res["lower"], binomial_lower_bound(res["p_hat"] * n, n, 1 - alpha))
    else:
        assert bool((res["num_samples"] < n).any())  # some points stopped early (futility)
    # ... and the same test has power when H1 holds clearly
    posterior, x, y = bernoulli_certifier(0.8, reps)
    res = certify_statistical(
        None,
        posterior,
        x,
        y,
        0.0,
        num_samples=n,
        confidence=1 - alpha,
        threshold=t,
        sequential=sequential,
        generator=torch.Generator().manual_seed(8),
    )
    assert res["certified"].double().mean().item() > 0.99
