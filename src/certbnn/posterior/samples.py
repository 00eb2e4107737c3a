"""Sample-based posterior: M stored weight sets with optional probability weights
(HMC samples, SWAG snapshots, ensembles)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

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
        self._stacked: dict[str, torch.Tensor] | None = check_tensors(samples, "posterior samples")
        self._sets: list[Mapping[str, torch.Tensor]] | None = None
        sizes = {t.shape[0] if t.dim() else 0 for t in self._stacked.values()}
        if len(sizes) != 1 or 0 in sizes:
            raise ConfigError(f"posterior samples need one common leading sample dim M >= 1, got sizes {sorted(sizes)}")
        check_finite(self._stacked, "posterior samples")
        self._names = list(self._stacked)
        self._num_samples = sizes.pop()
        self._frequencies = None if weights is None else self._checked(weights)
        self._weights = None if weights is None else self._frequencies / self._frequencies.sum()

    @classmethod
    def of_sets(cls, sets: Sequence[Mapping[str, torch.Tensor]]) -> SamplePosterior:
        """The uniform posterior over M >= 1 weight sets (each name -> param tensor), kept by
        reference and stacked only when all are needed: ``sample(n, generator)`` stacks the n
        drawn sets alone (the same draws as the stacked posterior's), so a sampler's posterior
        so far costs O(n), not O(M), per validation. The sets must not change afterwards;
        finiteness is checked when they are stacked."""
        if not sets:
            raise ConfigError("posterior samples need M >= 1 weight sets, got none")
        names, first = list(sets[0]), sets[0]
        if not names or any(s.keys() != first.keys() or any(s[n].shape != first[n].shape for n in names) for s in sets):
            raise ConfigError("posterior weight sets must all have the same (non-empty) parameter names and shapes")
        self = cls.__new__(cls)
        self._stacked, self._sets, self._names = None, list(sets), names
        self._num_samples, self._frequencies, self._weights = len(sets), None, None
        return self

    @property
    def _samples(self) -> dict[str, torch.Tensor]:
        if self._stacked is None:
            stacked = {name: torch.stack([s[name] for s in self._sets]) for name in self._names}
            check_finite(check_tensors(stacked, "posterior samples"), "posterior samples")
            self._stacked, self._sets = stacked, None
        return self._stacked

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
        return list(self._names)

    @property
    def reference(self) -> torch.Tensor:
        """A stored tensor (no stacking): its device and dtype are the posterior's."""
        return next(iter(self._stacked.values())) if self._stacked is not None else self._sets[0][self._names[0]]

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
        device = generator.device if generator is not None else self.reference.device
        if self._weights is None:
            index = torch.randint(self._num_samples, (n,), generator=generator, device=device)
        else:
            index = torch.multinomial(
                self._weights.to(device=device, dtype=torch.float64), n, replacement=True, generator=generator
            )
        if self._stacked is None:  # the drawn sets only
            drawn = {name: torch.stack([self._sets[i][name] for i in index.tolist()]) for name in self._names}
            check_finite(drawn, "posterior samples")
            return drawn
        return {name: t[index.to(t.device)] for name, t in self._stacked.items()}

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
