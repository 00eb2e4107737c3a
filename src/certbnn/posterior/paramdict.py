"""Checks and helpers for parameter dicts: ``name -> tensor`` with the names of
``dict(model.named_parameters())``, optionally with leading batch (sample) dims."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from certbnn.errors import ConfigError

ParamDict = dict[str, torch.Tensor]


def check_tensors(tensors: Mapping[str, object], what: str) -> ParamDict:
    """A plain dict copy of ``tensors``; ConfigError unless non-empty with tensor values."""
    if not isinstance(tensors, Mapping) or not tensors:
        raise ConfigError(f"{what} must be a non-empty dict of name -> tensor")
    for name, value in tensors.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise ConfigError(f"{what}[{name!r}] must be a tensor keyed by a str name")
        if not value.is_floating_point():
            raise ConfigError(f"{what}[{name!r}] has non-floating dtype {value.dtype}")
    return dict(tensors)


def check_same_structure(
    reference: Mapping[str, torch.Tensor],
    other: Mapping[str, torch.Tensor],
    ref_what: str,
    other_what: str,
    batch_dims: int = 0,
) -> None:
    """ConfigError naming the first name missing/extra or shape mismatch; ``other``'s
    tensors may carry ``batch_dims`` extra leading dims."""
    for name, ref in reference.items():
        if name not in other:
            raise ConfigError(f"{other_what} lacks parameter {name!r} present in {ref_what}")
        shape = tuple(other[name].shape[batch_dims:])
        if shape != tuple(ref.shape) or other[name].dim() != ref.dim() + batch_dims:
            raise ConfigError(
                f"{other_what}[{name!r}] has shape {tuple(other[name].shape)}, "
                f"expected {tuple(ref.shape)} after {batch_dims} leading dim(s)"
            )
    for name in other:
        if name not in reference:
            raise ConfigError(f"{other_what} has parameter {name!r} not in {ref_what}")


def check_finite(tensors: Mapping[str, torch.Tensor], what: str, positive: bool = False) -> None:
    """ConfigError naming the first tensor with a NaN/inf (or, if ``positive``, a value <= 0)."""
    for name, value in tensors.items():
        if not bool(torch.isfinite(value).all()):
            raise ConfigError(f"{what}[{name!r}] contains NaN or infinite values")
        if positive and not bool((value > 0).all()):
            raise ConfigError(f"{what}[{name!r}] must be strictly positive")


def leading_shape(params: Mapping[str, torch.Tensor], shapes: Mapping[str, torch.Size], what: str) -> torch.Size:
    """The common leading (batch) shape of ``params``, whose names must be those of
    ``shapes`` and whose trailing dims must equal them. ConfigError otherwise."""
    batch: torch.Size | None = None
    for name, shape in shapes.items():
        if name not in params:
            raise ConfigError(f"{what} lacks parameter {name!r}")
        value, extra = params[name], params[name].dim() - len(shape)
        if extra < 0 or tuple(value.shape[extra:]) != tuple(shape):
            raise ConfigError(f"{what}[{name!r}] has shape {tuple(value.shape)}, expected (..., *{tuple(shape)})")
        if batch is not None and value.shape[:extra] != batch:
            raise ConfigError(f"{what} mixes leading shapes {tuple(batch)} and {tuple(value.shape[:extra])}")
        batch = value.shape[:extra]
    unknown = [name for name in params if name not in shapes]
    if unknown:
        raise ConfigError(f"{what} has unknown parameter {unknown[0]!r}")
    assert batch is not None
    return batch


def num_coordinates(tensors: Mapping[str, torch.Tensor]) -> int:
    """Total number of scalar coordinates."""
    return sum(t.numel() for t in tensors.values())


def sample_diag_gaussian(
    mean: Mapping[str, torch.Tensor], std: Mapping[str, torch.Tensor], n: int, generator: torch.Generator | None = None
) -> ParamDict:
    """``n`` independent draws of N(mean, std^2) per coordinate: name -> (n, *shape).

    The noise is drawn on the generator's device (when given) and moved to the
    parameters' device, so a CPU generator gives the same draws for any device.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"number of samples must be a positive int, got {n!r}")
    out: ParamDict = {}
    for name, mu in mean.items():
        device = generator.device if generator is not None else mu.device
        noise = torch.randn((n, *mu.shape), generator=generator, dtype=mu.dtype, device=device)
        out[name] = mu + std[name] * noise.to(mu.device)
    return out
