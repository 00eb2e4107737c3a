"""Apply a model to parameters kept outside it (posterior samples, variational means).

``params`` maps names of ``dict(model.named_parameters())`` to tensors; every
tensor either has the parameter's own shape, or one extra leading sample
dimension S (all entries the same S). Missing names fall back to the module's
own tensors. Sampled parameters give outputs with a leading S dimension,
computed in one vectorised call (``torch.vmap``), never a Python loop.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

from certbnn.errors import ConfigError

Params = dict[str, Tensor]


def sample_size(model: nn.Module, params: Mapping[str, Tensor]) -> int | None:
    """S when every given tensor carries a leading sample dimension, None when none does."""
    own = dict(model.named_parameters())
    own.update(dict(model.named_buffers()))
    sizes: set[int | None] = set()
    for name, tensor in params.items():
        if name not in own:
            raise ConfigError(f"params entry {name!r} is not a parameter of the model")
        shape = own[name].shape
        if tensor.shape == shape:
            sizes.add(None)
        elif tensor.dim() == len(shape) + 1 and tensor.shape[1:] == shape:
            sizes.add(int(tensor.shape[0]))
        else:
            raise ConfigError(
                f"params entry {name!r} has shape {tuple(tensor.shape)}, expected "
                f"{tuple(shape)} or (S, *{tuple(shape)})"
            )
    if len(sizes) > 1:
        raise ConfigError(f"params mix sample sizes {sorted(sizes, key=str)}; use one S for all")
    return sizes.pop() if sizes else None


def forward(model: nn.Module, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
    """Model output for input ``x`` (B, ...) under ``params``: (B, K), or (S, B, K)
    when ``params`` carry a sample dimension S."""
    if sample_size(model, params) is None:
        return functional_call(model, dict(params), (x,))
    return torch.vmap(lambda p: functional_call(model, p, (x,)))(dict(params))


def detached_params(model: nn.Module) -> Params:
    """A copy of the model's parameters, detached, as a plain dict (a starting point)."""
    return {name: p.detach().clone() for name, p in model.named_parameters()}
