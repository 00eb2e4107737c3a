"""Sample sizes and confidence intervals for Monte Carlo estimates of P_rob.

``hoeffding_sample_size(gamma, delta)``
    ``n = ceil(ln(2/delta) / (2 gamma^2))``: with ``n`` i.i.d. Bernoulli draws,
    ``P(|p_hat - p| > gamma) <= delta`` (two-sided Chernoff-Hoeffding).
``clopper_pearson(successes, trials, confidence)``
    Exact two-sided binomial interval, vectorised over points (no scipy).
``sequential_looks(max_samples, first)`` / ``sequential_confidence(confidence, looks)``
    The stopping rule of the sequential certificate (see below).

Sequential certificate
----------------------
Samples are examined at ``T`` pre-fixed looks ``n_1 < ... < n_T``
(:func:`sequential_looks`: doubling from ``first`` up to ``max_samples``). At
look ``t`` a Clopper-Pearson interval at confidence ``1 - alpha/T`` is
computed (:func:`sequential_confidence`), and a point stops when its interval
lies on one side of the threshold. By the union bound (Bonferroni) over the
``T`` looks, with probability ``>= 1 - alpha`` *every* look's interval covers
``p``, so the interval reported at the (data-dependent) stopping look covers
``p`` with probability ``>= 1 - alpha`` whatever the stopping rule. Geometric
looks keep ``T = O(log(max_samples/first))``, so the price of looking is a
factor ``T`` in ``alpha`` only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from certbnn.errors import ConfigError

__all__ = ["clopper_pearson", "hoeffding_sample_size", "sequential_confidence", "sequential_looks"]

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


def clopper_pearson(successes: Tensor, trials: int | Tensor, confidence: float) -> tuple[Tensor, Tensor]:
    """Exact (Clopper-Pearson) two-sided interval for a binomial proportion.

    ``successes``: ``(B,)`` integer counts; ``trials``: an int or a ``(B,)``
    tensor (per-point counts). Returns float64 ``(lower, upper)``, ``(B,)``:
    ``lower`` solves ``P(X >= k; n, p) = alpha/2`` (0 when ``k = 0``) and
    ``upper`` solves ``P(X <= k; n, p) = alpha/2`` (1 when ``k = n``), with
    ``alpha = 1 - confidence``; coverage is ``>= confidence`` for every ``p``.
    Bisection to float64 resolution, rounded outward (lower down, upper up).
    """
    if not 0 < confidence < 1:
        raise ConfigError(f"confidence must lie in (0, 1), got {confidence}")
    k = torch.as_tensor(successes).to(torch.float64).reshape(-1)
    if k.numel() == 0:
        return k.clone(), k.clone()
    n = torch.as_tensor(trials, device=k.device).to(torch.float64).expand_as(k).clone()
    if bool((n < 1).any()) or bool((k < 0).any()) or bool((k > n).any()) or bool((k != k.round()).any()):
        raise ConfigError("clopper_pearson needs integer 0 <= successes <= trials and trials >= 1")
    pairs, inverse = torch.unique(torch.stack([k, n], 1), dim=0, return_inverse=True)  # solve each (k, n) once
    lower, upper = _clopper_pearson_unique(pairs[:, 0].contiguous(), pairs[:, 1].contiguous(), confidence)
    return lower[inverse], upper[inverse]


def _clopper_pearson_unique(k: Tensor, n: Tensor, confidence: float) -> tuple[Tensor, Tensor]:
    alpha_half = (1.0 - confidence) / 2.0
    j, log_comb = _log_binom_pmf_table(n)
    kk = k.unsqueeze(1)
    # P(X >= k; p) increases with p: the lower end solves it = alpha/2 (keep the bracket's low side).
    low, _ = _bisect_increasing(lambda p: _binom_tail(p, j, log_comb, n, j >= kk), alpha_half, k.numel(), k.device)
    # P(X <= k; p) = alpha/2  <=>  P(X >= k+1; p) = 1 - alpha/2, increasing in p (keep the high side).
    _, up = _bisect_increasing(lambda p: _binom_tail(p, j, log_comb, n, j > kk), 1.0 - alpha_half,
                               k.numel(), k.device)
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
