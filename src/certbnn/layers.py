"""Layers certbnn adds to plain ``torch.nn``.

:class:`Normalize` is the per-channel input normalisation ``(x - mean) / std``
that the bound engine (:mod:`certbnn.bounds`) propagates boxes through. Put it
first in a model so that boxes stay in pixel units ([0, 1]); never clip a
normalised box.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from certbnn.errors import ConfigError


class Normalize(nn.Module):
    """Per-channel normalisation ``y = (x - mean[c]) / std[c]``.

    Channel axis is dimension 1 of the input (``(B, C, H, W)`` or ``(B, C)``).
    A single value broadcasts over all channels. ``mean`` and ``std`` are
    buffers (saved with ``state_dict``, moved with ``.to()``), not parameters.
    """

    mean: Tensor
    std: Tensor

    def __init__(self, mean: Sequence[float] | float | Tensor, std: Sequence[float] | float | Tensor) -> None:
        super().__init__()
        m = torch.as_tensor(mean, dtype=torch.get_default_dtype()).flatten().clone()
        s = torch.as_tensor(std, dtype=torch.get_default_dtype()).flatten().clone()
        if m.numel() != s.numel() and 1 not in (m.numel(), s.numel()):
            raise ConfigError(f"Normalize: mean has {m.numel()} channels but std has {s.numel()}")
        if not bool(torch.all(s > 0)):
            raise ConfigError("Normalize: every std must be > 0")
        m, s = torch.broadcast_tensors(m, s)
        self.register_buffer("mean", m.contiguous())
        self.register_buffer("std", s.contiguous())

    def forward(self, x: Tensor) -> Tensor:
        shape = (-1,) + (1,) * (x.dim() - 2)
        return (x - self.mean.view(shape)) / self.std.view(shape)

    def extra_repr(self) -> str:
        return f"channels={self.mean.numel()}"
