"""Resolve each layer's tensors (the layers come from :mod:`certbnn.bounds.structure` or,
for general graphs, :mod:`certbnn.bounds.graph_trace`).

Import order inside ``certbnn.bounds`` (no cycles): ``params`` and ``rounding`` import
nothing of the package; ``base`` imports them; ``registry`` imports ``base``; the
``ops_*`` rules import ``base`` and ``registry``; ``structure`` and ``graph_trace``
import ``registry``; ``engine`` and ``graph`` import everything above.

A layer's tensors are its own parameters and buffers, replaced by entries of
``params`` (point values, optionally with a leading sample dimension ``S``)
and of ``param_bounds`` (weight intervals ``(low, high)``, also optionally with
a leading ``S``). Names are those of ``model.named_parameters()`` /
``model.named_buffers()``, e.g. ``"0.weight"`` or ``"2.1.bias"``: a tensor
reached under several names (a module used twice, tied weights) has one
canonical name, the first one (as there and in ``torch.func.functional_call``),
and an entry replaces it at every use.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from certbnn.errors import ConfigError


@dataclass
class LayerTensors:
    """Resolved tensors of one layer (keys are local names, e.g. ``"weight"``).

    ``values[k]`` is the point value (the centre for interval tensors);
    ``radius[k]`` exists for interval tensors only; keys in ``sampled`` carry a
    leading sample dimension ``S`` on both.
    """

    values: dict[str, Tensor] = field(default_factory=dict)
    radius: dict[str, Tensor] = field(default_factory=dict)
    sampled: set[str] = field(default_factory=set)

    def get(self, key: str) -> Tensor | None:
        return self.values.get(key)


def tensor_names(model: nn.Module) -> dict[int, str]:
    """Canonical name of every parameter and buffer of ``model``, keyed by ``id(tensor)``."""
    names = {id(t): n for n, t in model.named_parameters()}
    names.update({id(t): n for n, t in model.named_buffers()})
    return names


def _check_names(model: nn.Module, given: set[str], canonical: set[str]) -> None:
    """Refuse names that are not canonical names of the model's tensors (naming aliases)."""
    unknown = given - canonical
    if not unknown:
        return
    names = tensor_names(model)
    for name in sorted(unknown):
        path, _, key = name.rpartition(".")
        try:
            owner = model.get_submodule(path)
        except AttributeError:
            continue
        t = owner._parameters.get(key, owner._buffers.get(key))
        if t is not None and id(t) in names:
            raise ConfigError(
                f"params/param_bounds name '{name}' is a second name of '{names[id(t)]}' "
                f"(a module or tensor used twice); pass it as '{names[id(t)]}'"
            )
    raise ConfigError(f"params/param_bounds name(s) not in the model: {', '.join(sorted(unknown))}")


def _sample_dim(name: str, given: Tensor, own: Tensor) -> bool:
    """True if ``given`` is ``own``-shaped with one extra leading sample dim."""
    if given.shape == own.shape:
        return False
    if given.dim() == own.dim() + 1 and given.shape[1:] == own.shape:
        return True
    raise ConfigError(
        f"params entry '{name}' has shape {tuple(given.shape)}, expected {tuple(own.shape)} or (S, *{tuple(own.shape)})"
    )


def resolve_tensors(
    model: nn.Module,
    layers: list[tuple[str, nn.Module]],
    params: Mapping[str, Tensor] | None,
    param_bounds: Mapping[str, tuple[Tensor, Tensor]] | None,
    dtype: torch.dtype | None,
) -> tuple[list[LayerTensors], int | None]:
    """Resolve every layer's tensors; return them and the sample count ``S`` (None if unsampled).

    ``layers`` are ``(name, module)`` of ``model`` (a module may appear twice);
    entries of ``params``/``param_bounds`` are looked up by each tensor's
    canonical name, so every use of a shared tensor gets the same value.
    """
    params = dict(params or {})
    param_bounds = dict(param_bounds or {})
    canon = tensor_names(model)
    _check_names(model, set(params) | set(param_bounds), set(canon.values()))
    sizes: dict[str, int] = {}
    resolved: list[LayerTensors] = []
    for _lname, module in layers:
        lt = LayerTensors()
        if module._modules:
            own = dict(module.named_parameters(recurse=True))
            own.update(dict(module.named_buffers(recurse=True)))
        else:  # fast path for leaf layers
            own = {**module._parameters, **module._buffers}
        for key, t in own.items():
            if t is None:
                continue
            full = canon[id(t)]
            if full in param_bounds:
                pair = param_bounds[full]
                if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
                    raise ConfigError(f"param_bounds entry '{full}' must be a (low, high) pair")
                lo, hi = (torch.as_tensor(p) for p in pair)
                if lo.shape != hi.shape:
                    raise ConfigError(
                        f"param_bounds entry '{full}': low {tuple(lo.shape)} and high {tuple(hi.shape)} differ in shape"
                    )
                if dtype is not None:
                    lo, hi = lo.to(dtype), hi.to(dtype)
                if bool((lo > hi).any()):
                    raise ConfigError(f"param_bounds entry '{full}' has low > high")
                if _sample_dim(full, lo, t):
                    lt.sampled.add(key)
                    sizes[full] = lo.shape[0]
                centre = (lo + hi) / 2
                lt.values[key] = centre
                # max() keeps the box outward-rounded: centre +- radius contains [lo, hi]
                lt.radius[key] = torch.maximum(hi - centre, centre - lo)
            elif full in params:
                v = torch.as_tensor(params[full])
                if _sample_dim(full, v, t):
                    lt.sampled.add(key)
                    sizes[full] = v.shape[0]
                lt.values[key] = v if dtype is None else v.to(dtype)
            else:
                lt.values[key] = t if dtype is None else t.to(dtype)
        resolved.append(lt)
    distinct = set(sizes.values())
    if len(distinct) > 1:
        raise ConfigError(f"sampled tensors disagree on the sample count S: {sizes}")
    return resolved, (distinct.pop() if distinct else None)


def sample_slices(
    model: nn.Module,
    params: Mapping[str, Tensor] | None,
    param_bounds: Mapping[str, tuple[Tensor, Tensor]] | None,
    start: int,
    stop: int,
):
    """``params`` / ``param_bounds`` restricted to samples ``start:stop`` (unsampled entries unchanged)."""
    own = dict(model.named_parameters())
    own.update(dict(model.named_buffers()))

    def cut(name: str, t: Tensor) -> Tensor:
        t = torch.as_tensor(t)
        return t[start:stop] if name in own and t.dim() == own[name].dim() + 1 else t

    p = None if params is None else {k: cut(k, v) for k, v in params.items()}
    pb = None if param_bounds is None else {k: (cut(k, a), cut(k, b)) for k, (a, b) in param_bounds.items()}
    return p, pb
