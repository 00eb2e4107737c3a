"""Apply a model to parameters kept outside it (posterior samples, variational means).

``params`` maps names of ``dict(model.named_parameters())`` to tensors; every
tensor either has the parameter's own shape, or one extra leading sample
dimension S (all entries the same S). Missing names fall back to the module's
own tensors. Sampled parameters give outputs with a leading S dimension,
computed in one vectorised call (``torch.vmap``) -- except for convolutional
models on CPU, where vmap's batched convolution (a grouped convolution) was 2.2x
slower than one convolution per sample (cifar-small, S = 10, B = 200, forward and
input gradient), so those loop over the samples.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

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


@contextmanager
def slots_restored(model: nn.Module) -> Iterator[None]:
    """Restore every module's parameter/buffer slots on exit. ``functional_call`` leaves a
    module reached under two names (a shared instance, tied weights) holding the tensors
    passed in (pytorch#164759); wrapping each call in this keeps the model unchanged."""
    saved = [(m, dict(m._parameters), dict(m._buffers)) for m in model.modules()]
    try:
        yield
    finally:
        for m, params, buffers in saved:
            m._parameters.update(params)
            m._buffers.update(buffers)


def forward(model: nn.Module, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
    """Model output for input ``x`` (B, ...) under ``params``: (B, K), or (S, B, K)
    when ``params`` carry a sample dimension S. The model itself is left unchanged."""
    size = sample_size(model, params)
    with slots_restored(model):
        if size is None:
            return functional_call(model, dict(params), (x,))
        if x.device.type == "cpu" and _is_convolutional(model):
            return torch.stack(
                [functional_call(model, {k: v[i] for k, v in params.items()}, (x,)) for i in range(size)]
            )
        return torch.vmap(lambda p: functional_call(model, p, (x,)))(dict(params))


def _is_convolutional(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())


def detached_params(model: nn.Module) -> Params:
    """A copy of the model's parameters, detached, as a plain dict (a starting point)."""
    return {name: p.detach().clone() for name, p in model.named_parameters()}
