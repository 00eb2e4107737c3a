"""Independent Gaussian priors over named parameters.

The default prior of a layer is N(0, s^2) with ``s^2 = prior_scale / fan_in`` (the
paper's "inflate_prior"): fan_in is ``in_features`` for ``nn.Linear`` and
``c_in / groups * prod(kernel)`` for ``nn.Conv1d/2d/3d``; a bias uses the fan_in of
its layer. A prior is data: mean/std dicts keyed like ``model.named_parameters()``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from certbnn.errors import ConfigError
from certbnn.posterior.paramdict import (
    ParamDict,
    check_finite,
    check_same_structure,
    check_tensors,
    leading_shape,
    sample_diag_gaussian,
)

__all__ = ["GaussianPrior", "prior_from_model", "fan_in_of"]

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


class GaussianPrior:
    """Product of independent N(mean, std^2) over every coordinate of every parameter.

    ``mean`` and ``std`` map the same names to tensors of equal shapes; std > 0, both finite.
    """

    def __init__(self, mean: Mapping[str, torch.Tensor], std: Mapping[str, torch.Tensor]):
        self._mean = check_tensors(mean, "prior mean")
        self._std = check_tensors(std, "prior std")
        check_same_structure(self._mean, self._std, "prior mean", "prior std")
        check_finite(self._mean, "prior mean")
        check_finite(self._std, "prior std", positive=True)

    @property
    def names(self) -> list[str]:
        return list(self._mean)

    def mean(self) -> ParamDict:
        """name -> mean tensor (a new dict; tensors shared)."""
        return dict(self._mean)

    def std(self) -> ParamDict:
        """name -> standard deviation tensor (a new dict; tensors shared)."""
        return dict(self._std)

    def log_prob(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Log density of ``params`` (every name, shapes (*batch, *param_shape)), summed
        over coordinates: a tensor of shape ``batch`` (0-dim without batch dims).
        Differentiable in ``params``."""
        shapes = {name: m.shape for name, m in self._mean.items()}
        batch = leading_shape(params, shapes, "params")
        total = torch.zeros(batch, dtype=next(iter(params.values())).dtype, device=next(iter(params.values())).device)
        for name, value in params.items():
            mu, sigma = self._mean[name].to(value), self._std[name].to(value)
            z = (value - mu) / sigma
            per_coord = -0.5 * z * z - torch.log(sigma) - _LOG_SQRT_2PI
            total = total + per_coord.reshape(*batch, -1).sum(-1)
        return total

    def sample(self, n: int, generator: torch.Generator | None = None) -> ParamDict:
        """``n`` draws: name -> tensor (n, *param_shape)."""
        return sample_diag_gaussian(self._mean, self._std, n, generator)

    def kl_from(self, mean: Mapping[str, torch.Tensor], std: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Exact KL( N(mean, std^2) || prior ), **summed** over all coordinates of all
        parameters (0-dim tensor, nats, differentiable in ``mean`` and ``std``).
        ``mean``/``std`` must have exactly this prior's names and shapes."""
        check_same_structure(self._mean, mean, "the prior", "posterior mean")
        check_same_structure(self._mean, std, "the prior", "posterior std")
        total = None
        for name, q_mean in mean.items():
            q_std = std[name]
            p_mean, p_std = self._mean[name].to(q_mean), self._std[name].to(q_mean)
            kl = (
                torch.log(p_std) - torch.log(q_std) + (q_std**2 + (q_mean - p_mean) ** 2) / (2 * p_std**2) - 0.5
            ).sum()
            total = kl if total is None else total + kl
        assert total is not None
        return total

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> GaussianPrior:
        """A copy on ``device`` with floating ``dtype``."""
        return GaussianPrior(
            {n: t.to(device=device, dtype=dtype) for n, t in self._mean.items()},
            {n: t.to(device=device, dtype=dtype) for n, t in self._std.items()},
        )


def fan_in_of(module: nn.Module) -> int | None:
    """fan_in of a Linear / ConvNd layer (None for other modules)."""
    if isinstance(module, nn.Linear):
        return module.in_features
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return module.weight[0].numel()  # (c_in / groups) * prod(kernel)
    return None


def prior_from_model(
    model: nn.Module,
    scale: float = 1.0,
    *,
    fan_in_scaled: bool = True,
    stds: Mapping[str, float | torch.Tensor] | None = None,
) -> GaussianPrior:
    """Zero-mean prior for every parameter of ``model``.

    Variance is ``scale / fan_in`` (``fan_in_scaled=True``) or ``scale``; ``stds`` maps
    parameter names to a user std (float, or tensor broadcastable to the parameter)
    that overrides the rule. Parameters of layers without a known fan_in (neither
    Linear nor ConvNd) need an entry in ``stds`` when ``fan_in_scaled``.
    """
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ConfigError(f"prior scale must be a positive finite number, got {scale!r}")
    params = dict(model.named_parameters())
    stds = dict(stds or {})
    unknown = [name for name in stds if name not in params]
    if unknown:
        raise ConfigError(f"prior stds name {unknown[0]!r}, which is not a parameter of the model")
    fan_ins = _fan_ins(model)
    mean, std = {}, {}
    for name, param in params.items():
        template = param.detach()
        mean[name] = torch.zeros_like(template)
        if name in stds:
            std[name] = (
                torch.as_tensor(stds[name], dtype=template.dtype, device=template.device).expand_as(template).clone()
            )
        elif not fan_in_scaled:
            std[name] = torch.full_like(template, math.sqrt(scale))
        elif name in fan_ins:
            std[name] = torch.full_like(template, math.sqrt(scale / fan_ins[name]))
        else:
            raise ConfigError(f"cannot infer fan_in of parameter {name!r}; give its prior std in stds")
    return GaussianPrior(mean, std)


def _fan_ins(model: nn.Module) -> dict[str, int]:
    """Parameter name -> fan_in of its owning Linear/ConvNd layer."""
    fan_ins: dict[str, int] = {}
    for prefix, module in model.named_modules():
        fan_in = fan_in_of(module)
        if fan_in is None:
            continue
        for local, _ in module.named_parameters(recurse=False):
            fan_ins.setdefault(f"{prefix}.{local}" if prefix else local, fan_in)
    return fan_ins
