"""MCMC convergence diagnostics across chains: split R-hat and effective sample size.

Both follow Gelman et al., *Bayesian Data Analysis* (3rd ed., ch. 11) as used by
Stan: chains are split in halves; R-hat compares between- and within-chain
variance; the ESS sums autocorrelations (combined across chains through the
variogram) over Geyer's initial positive sequence. Weight vectors are reduced to
scalars first (:func:`weight_summaries`: the norm and fixed random projections).

A network's posterior is invariant under permutations of hidden units (and sign flips for
odd activations), so chains that travel far can settle in different, equivalent weight
regions: weight-space R-hat then stays above 1 although the chains agree on every
prediction. Function-space quantities (:func:`predictive_summaries`: the mean NLL of a
fixed probe set and the log-probability of single probe labels) do not see these
symmetries; both are reported (cf. Izmailov et al. 2021, "What are Bayesian neural network
posteriors really like?", who assess their HMC chains in function space).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from certbnn.errors import ConfigError

#: predictive quantities per probe set: the mean NLL, then log p(y_i | x_i) of the first points
NUM_PROBE_POINTS = 8
SAMPLE_CHUNK = 32  # posterior samples per forward pass in :func:`predictive_summaries`


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


def predictive_summaries(
    model: torch.nn.Module, samples: dict[str, Tensor], x: Tensor, y: Tensor, num_points: int = NUM_PROBE_POINTS
) -> Tensor:
    """Function-space functionals of stacked samples (T, *shape): (1 + num_points, T), the mean
    negative log-likelihood of the probe set ``x`` (B, ...), ``y`` (B,) under each sample, then
    ``log p(y_i | x_i)`` of its first ``num_points`` points (float64)."""
    from certbnn.functional import forward

    rows = []
    count = next(iter(samples.values())).shape[0]
    with torch.no_grad():
        for start in range(0, count, SAMPLE_CHUNK):
            chunk = {name: t[start : start + SAMPLE_CHUNK] for name, t in samples.items()}
            logp = torch.log_softmax(forward(model, chunk, x).double(), dim=-1)  # (S, B, K)
            label_logp = logp.gather(-1, y.view(1, -1, 1).expand(logp.shape[0], -1, 1)).squeeze(-1)  # (S, B)
            rows.append(torch.cat([-label_logp.mean(dim=1, keepdim=True), label_logp[:, :num_points]], dim=1))
    return torch.cat(rows).T


def _quantity_report(summaries: Tensor, names: list[str]) -> dict[str, object]:
    """R-hat / ESS of every row of ``summaries`` (Q, C, T), with their max / min."""
    rhats = [split_rhat(q) for q in summaries]
    ess = [effective_sample_size(q) for q in summaries]
    return {
        "rhat_max": max(rhats),
        "ess_min": min(ess),
        "per_quantity": {n: {"rhat": r, "ess": e} for n, r, e in zip(names, rhats, ess)},
    }


def chain_diagnostics(
    per_chain: list[dict[str, Tensor]],
    num_projections: int = 8,
    predictive: Callable[[dict[str, Tensor]], Tensor] | None = None,
) -> dict[str, object]:
    """R-hat and ESS of :func:`weight_summaries` over chains given as sample dicts (T, *shape) each
    (``rhat_max``, ``ess_min``, ``per_quantity``), and, with ``predictive`` (a chain's samples ->
    (Q, T), e.g. :func:`predictive_summaries` on a probe set), the same for those function-space
    quantities under ``function`` (named ``nll``, ``logp_0``, ... for :func:`predictive_summaries`)."""
    lengths = {next(iter(c.values())).shape[0] for c in per_chain}
    if len(lengths) != 1:
        raise ConfigError(f"chains have different lengths {sorted(lengths)}")
    summaries = torch.stack([weight_summaries(c, num_projections) for c in per_chain], dim=1)  # (Q, C, T)
    names = ["norm"] + [f"projection_{i}" for i in range(num_projections)]
    report: dict[str, object] = {
        "num_chains": len(per_chain),
        "samples_per_chain": lengths.pop(),
        **_quantity_report(summaries, names),
    }
    if predictive is not None:
        function = torch.stack([predictive(c) for c in per_chain], dim=1)  # (Q, C, T)
        names = ["nll"] + [f"logp_{i}" for i in range(function.shape[0] - 1)]
        report["function"] = _quantity_report(function, names)
    return report


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
