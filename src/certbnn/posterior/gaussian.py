"""Mean-field Gaussian posterior: independent N(mean, std^2) per coordinate."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from certbnn.errors import ConfigError
from certbnn.posterior.paramdict import (
    ParamDict,
    check_finite,
    check_same_structure,
    check_tensors,
    num_coordinates,
    sample_diag_gaussian,
)

__all__ = ["GaussianPosterior", "box_log_mass", "erf_log"]


def erf_log(x: float) -> float:
    """log(erf(x)) for x > 0, accurate both for tiny x and for x where erf(x) ~ 1."""
    if x > 1.0:
        return math.log1p(-math.erfc(x))
    return math.log(math.erf(x))


def box_log_mass(k: float, num_coordinates: int) -> float:
    """Log N(0,1)-mass of the box [-k, k]^num_coordinates: num_coordinates * log erf(k/sqrt 2)."""
    if not (isinstance(k, (int, float)) and math.isfinite(k) and k > 0):
        raise ConfigError(f"box half-width k must be a positive finite number of stds, got {k!r}")
    return num_coordinates * erf_log(k / math.sqrt(2.0))


class GaussianPosterior:
    """Holds ``mean`` and ``std`` dicts (same names and shapes; std > 0; all finite),
    keyed like ``dict(model.named_parameters())``. Tensors are kept by reference (not
    copied or detached); all methods return new dicts."""

    kind = "gaussian"

    def __init__(self, mean: Mapping[str, torch.Tensor], std: Mapping[str, torch.Tensor]):
        self._mean = check_tensors(mean, "posterior mean")
        self._std = check_tensors(std, "posterior std")
        check_same_structure(self._mean, self._std, "posterior mean", "posterior std")
        for name, mu in self._mean.items():
            if self._std[name].dtype != mu.dtype or self._std[name].device != mu.device:
                raise ConfigError(
                    f"posterior std[{name!r}] has dtype/device {self._std[name].dtype}/"
                    f"{self._std[name].device}, mean has {mu.dtype}/{mu.device}"
                )
        check_finite(self._mean, "posterior mean")
        check_finite(self._std, "posterior std", positive=True)

    @property
    def names(self) -> list[str]:
        """Parameter names in insertion order."""
        return list(self._mean)

    @property
    def num_coordinates(self) -> int:
        """Total number of scalar weights."""
        return num_coordinates(self._mean)

    @property
    def reference(self) -> torch.Tensor:
        """The first parameter's mean: its device and dtype are the posterior's."""
        return next(iter(self._mean.values()))

    def mean(self) -> ParamDict:
        """name -> mean tensor of the parameter's shape."""
        return dict(self._mean)

    def std(self) -> ParamDict:
        """name -> standard deviation tensor of the parameter's shape."""
        return dict(self._std)

    def sample(self, n: int, generator: torch.Generator | None = None) -> ParamDict:
        """``n`` independent weight sets stacked: name -> tensor (n, *param_shape).
        Reparameterised (differentiable in mean/std if those require grad)."""
        return sample_diag_gaussian(self._mean, self._std, n, generator)

    def weight_box(self, k: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """name -> (low, high) = (mean - k*std, mean + k*std)."""
        box_log_mass(k, 0)  # validates k
        return {name: (mu - k * self._std[name], mu + k * self._std[name]) for name, mu in self._mean.items()}

    def box_log_mass(self, k: float) -> float:
        """Log posterior mass of ``weight_box(k)``: sum over coordinates of log erf(k/sqrt 2)."""
        return box_log_mass(k, self.num_coordinates)

    def box_mass(self, k: float) -> float:
        """Posterior mass of ``weight_box(k)`` in [0, 1] (may underflow to 0; prefer
        :meth:`box_log_mass` for large models)."""
        return math.exp(self.box_log_mass(k))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> GaussianPosterior:
        """A copy on ``device`` with floating ``dtype`` (either may be None: unchanged)."""
        return GaussianPosterior(
            {n: t.to(device=device, dtype=dtype) for n, t in self._mean.items()},
            {n: t.to(device=device, dtype=dtype) for n, t in self._std.items()},
        )

    def __repr__(self) -> str:
        return f"GaussianPosterior({len(self._mean)} tensors, {self.num_coordinates} coordinates)"
