"""Sample-based posterior: M stored weight sets with optional probability weights
(HMC samples, SWAG snapshots, ensembles)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from certbnn.errors import ConfigError
from certbnn.posterior.paramdict import ParamDict, check_finite, check_tensors

__all__ = ["SamplePosterior", "mixture_draws"]


class SamplePosterior:
    """``samples``: name -> tensor (M, *param_shape), the same M >= 1 for every name,
    all finite. ``weights``: optional (M,) non-negative frequencies with a positive
    sum; they are normalised to sum to 1 (None means uniform). Tensors are kept by
    reference."""

    kind = "samples"

    def __init__(self, samples: Mapping[str, torch.Tensor], weights: torch.Tensor | None = None):
        self._samples = check_tensors(samples, "posterior samples")
        sizes = {t.shape[0] if t.dim() else 0 for t in self._samples.values()}
        if len(sizes) != 1 or 0 in sizes:
            raise ConfigError(f"posterior samples need one common leading sample dim M >= 1, got sizes {sorted(sizes)}")
        check_finite(self._samples, "posterior samples")
        self._num_samples = sizes.pop()
        self._frequencies = None if weights is None else self._checked(weights)
        self._weights = None if weights is None else self._frequencies / self._frequencies.sum()

    def _checked(self, weights: torch.Tensor) -> torch.Tensor:
        weights = torch.as_tensor(weights)
        if weights.shape != (self._num_samples,) or not weights.is_floating_point():
            raise ConfigError(
                f"posterior weights must be a float tensor of shape ({self._num_samples},), "
                f"got {weights.dtype} {tuple(weights.shape)}"
            )
        if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()) or not float(weights.sum()) > 0:
            raise ConfigError("posterior weights must be finite, non-negative and not all zero")
        return weights

    @property
    def names(self) -> list[str]:
        """Parameter names in insertion order."""
        return list(self._samples)

    @property
    def num_samples(self) -> int:
        """M, the number of stored weight sets."""
        return self._num_samples

    @property
    def weights(self) -> torch.Tensor | None:
        """Normalised (M,) weights, or None for uniform."""
        return self._weights

    @property
    def frequencies(self) -> torch.Tensor | None:
        """The weights exactly as given (unnormalised), or None; this is what is saved."""
        return self._frequencies

    def sample(self, n: int | None = None, generator: torch.Generator | None = None) -> ParamDict:
        """name -> (n, *param_shape): ``n`` draws with replacement according to the
        weights; with ``n=None`` all M stored sets in order (unweighted: see ``weights``).
        The result never aliases the posterior's storage: changing it changes nothing here."""
        if n is None:
            return {name: t.clone() for name, t in self._samples.items()}
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"number of samples must be a positive int or None, got {n!r}")
        first = next(iter(self._samples.values()))
        device = generator.device if generator is not None else first.device
        if self._weights is None:
            index = torch.randint(self._num_samples, (n,), generator=generator, device=device)
        else:
            index = torch.multinomial(
                self._weights.to(device=device, dtype=torch.float64), n, replacement=True, generator=generator
            )
        return {name: t[index.to(t.device)] for name, t in self._samples.items()}

    def mean(self) -> ParamDict:
        """name -> (weighted) mean over the stored samples, of the parameter's shape."""
        if self._weights is None:
            return {name: t.mean(0) for name, t in self._samples.items()}
        out = {}
        for name, t in self._samples.items():
            w = self._weights.to(device=t.device, dtype=t.dtype).reshape(-1, *([1] * (t.dim() - 1)))
            out[name] = (w * t).sum(0)
        return out

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SamplePosterior:
        """A copy on ``device`` with floating ``dtype`` (weights keep float dtype, move device)."""
        weights = None if self._frequencies is None else self._frequencies.to(device=device)
        return SamplePosterior({n: t.to(device=device, dtype=dtype) for n, t in self._samples.items()}, weights)

    def __repr__(self) -> str:
        return f"SamplePosterior({len(self._samples)} tensors, {self._num_samples} samples)"


def mixture_draws(posterior, n: int, generator: torch.Generator | None = None) -> ParamDict:
    """``posterior.sample(n, generator)`` for a consumer that only averages over the sample dim
    or takes fractions of it (predictive, attacks, per-sample rates, the paper and decision
    certificates). A point mass (a :class:`SamplePosterior` with one stored set: SGD, Adam)
    gives that one set, ``(1, *param_shape)``, without touching ``generator``: the uniform
    mixture of ``n`` copies of one network is that network, and bounding it once costs
    ``1/n`` of bounding the copies. Not for consumers whose result depends on the number of
    draws (the statistical test counts them)."""
    if is_point_mass(posterior):
        return posterior.sample(None)
    return posterior.sample(n, generator)


def is_point_mass(posterior) -> bool:
    """True for a posterior whose every draw is the same weight set (one stored sample)."""
    return isinstance(posterior, SamplePosterior) and posterior.num_samples == 1
