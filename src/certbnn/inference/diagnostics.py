"""MCMC convergence diagnostics across chains: split R-hat and effective sample size.

Both follow Gelman et al., *Bayesian Data Analysis* (3rd ed., ch. 11) as used by
Stan: chains are split in halves; R-hat compares between- and within-chain
variance; the ESS sums autocorrelations (combined across chains through the
variogram) over Geyer's initial positive sequence. Weight vectors are reduced to
scalars first (:func:`weight_summaries`: the norm and fixed random projections).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from certbnn.errors import ConfigError


def _split(chains: Tensor) -> Tensor:
    """(C, T) -> (2C, T // 2): each chain cut in halves (a middle draw of an odd T dropped)."""
    if chains.dim() != 2 or chains.shape[1] < 4:
        raise ConfigError(f"diagnostics need chains of shape (C, T) with T >= 4, got {tuple(chains.shape)}")
    half = chains.shape[1] // 2
    return torch.cat([chains[:, :half], chains[:, -half:]]).double()


def split_rhat(chains: Tensor) -> float:
    """Split R-hat of one scalar quantity, ``chains`` (C, T); about 1 when the chains agree."""
    x = _split(chains)
    n = x.shape[1]
    within = x.var(dim=1, unbiased=True).mean()
    between = n * x.mean(dim=1).var(unbiased=True)
    if within == 0:
        return 1.0 if between == 0 else math.inf
    var_plus = (n - 1) / n * within + between / n
    return float(torch.sqrt(var_plus / within))


def _autocovariance(x: Tensor) -> Tensor:
    """Biased autocovariance of each row of (C, n) at lags 0..n-1, by FFT."""
    n = x.shape[1]
    centred = x - x.mean(dim=1, keepdim=True)
    spectrum = torch.fft.rfft(centred, n=2 * n)
    return torch.fft.irfft(spectrum * spectrum.conj(), n=2 * n)[:, :n] / n


def effective_sample_size(chains: Tensor) -> float:
    """Bulk ESS of one scalar quantity from ``chains`` (C, T), at most C * T (split chains)."""
    x = _split(chains)
    m, n = x.shape
    acov = _autocovariance(x)
    within = acov[:, 0].mean() * n / (n - 1)
    var_plus = within * (n - 1) / n + (x.mean(dim=1).var(unbiased=True) if m > 1 else 0.0)
    if var_plus == 0:
        return float(m * n)
    rho = 1.0 - (within - acov.mean(dim=0)) / var_plus
    rho[0] = 1.0
    total, t = 0.0, 0
    previous = math.inf
    while t + 1 < n:  # Geyer: sum pairs while positive, forcing them to decrease
        pair = float(rho[t] + rho[t + 1])
        if pair <= 0:
            break
        pair = min(pair, previous)
        total += pair
        previous = pair
        t += 2
    tau = max(-1.0 + 2.0 * total, 1.0 / math.log10(m * n + 10))
    return float(m * n / tau)


def weight_summaries(samples: dict[str, Tensor], num_projections: int = 8, seed: int = 0) -> Tensor:
    """Scalar functionals of stacked weight samples (T, *shape) per tensor: (1 + P, T), the
    norm of the whole weight vector and ``num_projections`` fixed Gaussian projections."""
    flat = torch.cat([t.reshape(t.shape[0], -1).double() for t in samples.values()], dim=1)  # (T, D)
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(flat.shape[1], num_projections, generator=generator, dtype=torch.float64)
    directions = directions.to(flat.device) / math.sqrt(flat.shape[1])
    return torch.cat([flat.norm(dim=1, keepdim=True), flat @ directions], dim=1).T


def chain_diagnostics(per_chain: list[dict[str, Tensor]], num_projections: int = 8) -> dict[str, object]:
    """R-hat and ESS of :func:`weight_summaries` over chains given as sample dicts (T, *shape) each."""
    lengths = {next(iter(c.values())).shape[0] for c in per_chain}
    if len(lengths) != 1:
        raise ConfigError(f"chains have different lengths {sorted(lengths)}")
    summaries = torch.stack([weight_summaries(c, num_projections) for c in per_chain], dim=1)  # (Q, C, T)
    rhats = [split_rhat(q) for q in summaries]
    ess = [effective_sample_size(q) for q in summaries]
    names = ["norm"] + [f"projection_{i}" for i in range(num_projections)]
    return {
        "num_chains": len(per_chain),
        "samples_per_chain": lengths.pop(),
        "rhat_max": max(rhats),
        "ess_min": min(ess),
        "per_quantity": {n: {"rhat": r, "ess": e} for n, r, e in zip(names, rhats, ess)},
    }


class AcceptanceTally:
    """Metropolis-Hastings proposals of one epoch, from the step infos that carry ``accepted``
    (HMC): :meth:`record` gives ``accept_rate`` (the fraction accepted) and ``step_size`` (the
    last proposal's), or nothing for a method without a Metropolis test."""

    def __init__(self) -> None:
        self.proposals, self.accepted, self.step_size = 0, 0.0, None

    def add(self, info: dict[str, float]) -> None:
        if "accepted" in info:
            self.proposals += 1
            self.accepted += float(info["accepted"])
            self.step_size = info.get("step_size")

    def record(self) -> dict[str, float]:
        if not self.proposals:
            return {}
        out = {"accept_rate": self.accepted / self.proposals}
        if self.step_size is not None:
            out["step_size"] = float(self.step_size)
        return out


def chain_summary(samples: dict[str, Tensor], start: dict[str, Tensor]) -> dict[str, float | int]:
    """How far a chain's stored samples ``name -> (M, *shape)`` got from its ``start`` weights:
    ``stored_samples`` M, ``distinct_samples`` (bit-identical samples count once: a chain that
    rejected every proposal stores M copies of one network), ``distance_from_start`` (the last
    sample's L2 distance from ``start``, relative to ``||start||``) and ``spread`` (the RMS
    distance of the samples from their mean, relative to ``||start||``)."""
    flat = torch.cat([t.reshape(t.shape[0], -1).double() for t in samples.values()], dim=1)  # (M, D)
    origin = torch.cat([start[name].reshape(-1).double().to(flat.device) for name in samples])
    scale = float(origin.norm()) or 1.0
    return {
        "stored_samples": flat.shape[0],
        "distinct_samples": int(torch.unique(flat, dim=0).shape[0]),
        "distance_from_start": float((flat[-1] - origin).norm()) / scale,
        "spread": float((flat - flat.mean(0)).pow(2).sum(1).mean().sqrt()) / scale,
    }
