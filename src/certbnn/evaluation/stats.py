"""Sample sizes, exact binomial confidence bounds and the statistical certificate's test.

``hoeffding_sample_size(gamma, delta)``
    ``n = ceil(ln(2/delta) / (2 gamma^2))``: with ``n`` i.i.d. Bernoulli draws,
    ``P(|p_hat - p| > gamma) <= delta`` (two-sided Chernoff-Hoeffding).
``binomial_lower_bound(successes, trials, confidence)`` / ``binomial_upper_bound``
    Exact one-sided (Clopper-Pearson) confidence bounds, vectorised over points (no scipy).
``clopper_pearson(successes, trials, confidence)``
    Exact two-sided binomial interval (each end at ``(1 - confidence)/2``).
``sequential_looks(max_samples, first)`` / ``sequential_confidence(confidence, looks)``
    The stopping rule of the sequential certificate (see below).

The statistical certificate as a test
-------------------------------------
``X`` of ``n`` i.i.d. posterior samples are certified (``X ~ Binomial(n, p)``,
``p <= P_rob``). For a threshold ``t`` and ``alpha = 1 - confidence`` the
certificate tests ``H0: p < t`` against ``H1: p >= t`` and certifies (rejects
``H0``) iff the one-sided exact lower bound ``L(X)`` at level ``1 - alpha`` is
``>= t``. ``L(k)`` solves ``P(X >= k; n, L) = alpha`` (``L(0) = 0``), so
``P_p(L(X) > p) <= alpha`` for every ``p``: under ``H0`` the certificate is
wrong with probability ``<= alpha``.

Sequential certificate
----------------------
Samples are examined at ``T`` pre-fixed looks ``n_1 < ... < n_T``
(:func:`sequential_looks`: doubling from ``first`` up to ``max_samples``). At
look ``j`` the one-sided bounds are computed at level ``1 - alpha/T``
(:func:`sequential_confidence`); a point is certified and stops when its lower
bound reaches ``t``, and stops uncertified when its upper bound falls below
``t`` (futility: stopping without certifying can only lower the chance of a
false certificate). Under ``H0`` each look certifies with probability
``<= alpha/T``, so by the union bound (Bonferroni) over the ``T`` looks the
false-certification rate is ``<= alpha`` whatever the stopping rule, and the
lower bound reported at the stopping look is a ``1 - alpha`` lower confidence
bound. Geometric looks keep ``T = O(log(max_samples/first))``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from certbnn.errors import ConfigError

__all__ = [
    "binomial_lower_bound",
    "binomial_upper_bound",
    "clopper_pearson",
    "hoeffding_sample_size",
    "one_sided_bounds",
    "sequential_confidence",
    "sequential_looks",
]

_BISECTION_STEPS = 64  # halves [0, 1] down to 2^-64 < float64 resolution near 1


def hoeffding_sample_size(gamma: float, delta: float) -> int:
    """``ceil(ln(2/delta) / (2 gamma^2))`` samples for precision ``gamma`` at confidence ``1 - delta``."""
    if not (0 < gamma < 1 and 0 < delta < 1):
        raise ConfigError(f"hoeffding_sample_size needs 0 < gamma < 1 and 0 < delta < 1, got {gamma}, {delta}")
    return math.ceil(math.log(2.0 / delta) / (2.0 * gamma * gamma))


def _log_binom_pmf_table(trials: Tensor) -> tuple[Tensor, Tensor]:
    """``j = 0..max(trials)`` as ``(1, J)`` and ``log C(n, j)`` as ``(B, J)`` (-inf where ``j > n``)."""
    j = torch.arange(int(trials.max()) + 1, dtype=torch.float64, device=trials.device).unsqueeze(0)
    n = trials.unsqueeze(1)
    valid = j <= n
    jc = torch.where(valid, j, torch.zeros_like(j))
    log_comb = torch.lgamma(n + 1) - torch.lgamma(jc + 1) - torch.lgamma(n - jc + 1)
    return j, torch.where(valid, log_comb, torch.full_like(log_comb, -math.inf))


def _binom_tail(p: Tensor, j: Tensor, log_comb: Tensor, n: Tensor, keep: Tensor) -> Tensor:
    """``sum_{j in keep} C(n,j) p^j (1-p)^(n-j)`` for ``p`` ``(B,)`` in (0, 1), via log-sum-exp."""
    p = p.unsqueeze(1)
    log_pmf = log_comb + j * torch.log(p) + (n.unsqueeze(1) - j) * torch.log1p(-p)
    log_pmf = torch.where(keep, log_pmf, torch.full_like(log_pmf, -math.inf))
    return torch.logsumexp(log_pmf, dim=1).exp()


def _bisect_increasing(fn, target: float, batch: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Bracket ``(lo, hi)`` per element with ``fn(lo) < target <= fn(hi)``, for ``fn`` increasing in ``p``."""
    lo = torch.zeros(batch, dtype=torch.float64, device=device)
    hi = torch.ones(batch, dtype=torch.float64, device=device)
    for _ in range(_BISECTION_STEPS):
        mid = (lo + hi) / 2
        above = fn(mid) >= target
        hi, lo = torch.where(above, mid, hi), torch.where(above, lo, mid)
    return lo, hi


def _counts(successes: Tensor, trials: int | Tensor, confidence: float) -> tuple[Tensor, Tensor]:
    """Checked float64 ``(k, n)``, ``(B,)`` each."""
    if not 0 < confidence < 1:
        raise ConfigError(f"confidence must lie in (0, 1), got {confidence}")
    k = torch.as_tensor(successes).to(torch.float64).reshape(-1)
    n = torch.as_tensor(trials, device=k.device).to(torch.float64).expand_as(k).clone()
    if bool((n < 1).any()) or bool((k < 0).any()) or bool((k > n).any()) or bool((k != k.round()).any()):
        raise ConfigError("binomial bounds need integer 0 <= successes <= trials and trials >= 1")
    return k, n


def _bounds(
    successes: Tensor, trials: int | Tensor, confidence: float, alpha_lower: float, alpha_upper: float
) -> tuple[Tensor, Tensor]:
    k, n = _counts(successes, trials, confidence)
    if k.numel() == 0:
        return k.clone(), k.clone()
    pairs, inverse = torch.unique(torch.stack([k, n], 1), dim=0, return_inverse=True)  # solve each (k, n) once
    lower, upper = _exact_bounds_unique(pairs[:, 0].contiguous(), pairs[:, 1].contiguous(), alpha_lower, alpha_upper)
    return lower[inverse], upper[inverse]


def binomial_lower_bound(successes: Tensor, trials: int | Tensor, confidence: float) -> Tensor:
    """Exact one-sided lower confidence bound for a binomial proportion, ``(B,)`` float64.

    ``L`` solves ``P(X >= k; n, L) = 1 - confidence`` (0 when ``k = 0``), so
    ``P_p(L > p) <= 1 - confidence`` for every ``p`` (coverage ``>= confidence``).
    ``successes``: ``(B,)`` integer counts; ``trials``: an int or a ``(B,)``
    tensor. Bisection to float64 resolution, keeping the low end of the bracket
    (the returned value is ``<=`` the exact root).
    """
    return _bounds(successes, trials, confidence, 1.0 - confidence, 1.0 - confidence)[0]


def binomial_upper_bound(successes: Tensor, trials: int | Tensor, confidence: float) -> Tensor:
    """Exact one-sided upper confidence bound (solves ``P(X <= k; n, U) = 1 - confidence``,
    1 when ``k = n``; rounded up); ``P_p(U < p) <= 1 - confidence``. Arguments as
    :func:`binomial_lower_bound`."""
    return _bounds(successes, trials, confidence, 1.0 - confidence, 1.0 - confidence)[1]


def one_sided_bounds(successes: Tensor, trials: int | Tensor, confidence: float) -> tuple[Tensor, Tensor]:
    """``(binomial_lower_bound, binomial_upper_bound)``, each at level ``confidence``
    (separately; jointly ``2 confidence - 1``), in one pass."""
    return _bounds(successes, trials, confidence, 1.0 - confidence, 1.0 - confidence)


def clopper_pearson(successes: Tensor, trials: int | Tensor, confidence: float) -> tuple[Tensor, Tensor]:
    """Exact (Clopper-Pearson) two-sided interval for a binomial proportion.

    Returns float64 ``(lower, upper)``, ``(B,)``: the one-sided bounds of
    :func:`binomial_lower_bound` / :func:`binomial_upper_bound` at level
    ``1 - alpha/2`` each (``alpha = 1 - confidence``); coverage ``>= confidence``
    for every ``p``. For a one-sided decision (``p >= t``?) use
    :func:`binomial_lower_bound` at ``confidence`` instead: it is tighter.
    """
    alpha_half = (1.0 - confidence) / 2.0
    return _bounds(successes, trials, confidence, alpha_half, alpha_half)


def _exact_bounds_unique(k: Tensor, n: Tensor, alpha_lower: float, alpha_upper: float) -> tuple[Tensor, Tensor]:
    j, log_comb = _log_binom_pmf_table(n)
    kk = k.unsqueeze(1)
    # P(X >= k; p) increases with p: the lower end solves it = alpha_lower (keep the bracket's low side).
    low, _ = _bisect_increasing(lambda p: _binom_tail(p, j, log_comb, n, j >= kk), alpha_lower, k.numel(), k.device)
    # P(X <= k; p) = alpha_upper  <=>  P(X >= k+1; p) = 1 - alpha_upper, increasing in p (keep the high side).
    _, up = _bisect_increasing(lambda p: _binom_tail(p, j, log_comb, n, j > kk), 1.0 - alpha_upper, k.numel(), k.device)
    lower = torch.where(k == 0, torch.zeros_like(k), low)
    upper = torch.where(k == n, torch.ones_like(k), up)
    return lower, upper


def sequential_looks(max_samples: int, first: int = 32) -> list[int]:
    """Sample counts at which the sequential certificate looks: ``first, 2 first, 4 first, ...``
    capped by (and always ending at) ``max_samples``."""
    if max_samples < 1 or first < 1:
        raise ConfigError(f"sequential looks need max_samples >= 1 and first >= 1, got {max_samples}, {first}")
    looks, n = [], min(first, max_samples)
    while n < max_samples:
        looks.append(n)
        n *= 2
    return looks + [max_samples]


def sequential_confidence(confidence: float, looks: int) -> float:
    """Per-look confidence ``1 - (1 - confidence)/looks`` (Bonferroni over the looks)."""
    if not 0 < confidence < 1 or looks < 1:
        raise ConfigError(f"sequential_confidence needs 0 < confidence < 1 and looks >= 1, got {confidence}, {looks}")
    return 1.0 - (1.0 - confidence) / looks
