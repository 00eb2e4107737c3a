"""Bound rules of the coordinate-wise affine and shape layers.

:class:`~certbnn.layers.Normalize` and eval-mode BatchNorm are per-channel
affine maps ``y = a x + s`` (IBP exact: ``c' = a c + s``, ``r' = |a| r``; a
diagonal map loses nothing, so BatchNorm needs no folding into the previous
layer). Flatten reshapes; Identity and Dropout are the identity (Dropout in
training mode with ``p > 0`` is refused by :mod:`certbnn.bounds.structure`).

``tol="sound"``: Flatten, Identity and Dropout are exact; Normalize rounds
``(x - mean) / std`` outward; BatchNorm is refused (its ``rsqrt`` is not
correctly rounded).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from certbnn.bounds.base import Box, LinearOp, affine_ibp, channel_view, mid_rad, sum_features
from certbnn.bounds.registry import register_bound
from certbnn.bounds.rounding import down, up
from certbnn.errors import UnsupportedLayerError
from certbnn.layers import Normalize


class ChannelAffineOp(LinearOp):
    """``y = scale[c] * x + shift[c]`` along feature dim 0 (the channel axis)."""

    mixing = False

    def scale_shift(self) -> tuple[Tensor, Tensor, bool]:
        """``(scale, shift, sampled)``, each ``(C,)`` or ``(S, C)``."""
        raise NotImplementedError

    def _views(self, feat_rank: int, n_lead: int) -> tuple[Tensor, Tensor]:
        a, s, sampled = self.scale_shift()
        if sampled:
            a, s = torch.broadcast_tensors(a, s)
        return channel_view(a, sampled, feat_rank, n_lead), channel_view(s, sampled, feat_rank, n_lead)

    def forward(self, x: Tensor) -> Tensor:
        a, s = self._views(x.dim() - 2, 2)
        return a * x + s

    def ibp(self, lower: Tensor, upper: Tensor) -> Box:
        a, s = self._views(lower.dim() - 2, 2)
        return affine_ibp(lower, upper, lambda x, w, b: x * w if b is None else torch.addcmul(b, x, w), a, s)

    def backward_linear(self, A: Tensor) -> tuple[Tensor, Tensor | None]:
        a, s = self._views(A.dim() - 3, 3)
        return A * a, sum_features(A * s)


@register_bound(Normalize)
class BoundNormalize(ChannelAffineOp):
    """``(x - mean[c]) / std[c]`` (input normalisation, pixels stay the box's units)."""

    def scale_shift(self) -> tuple[Tensor, Tensor, bool]:
        mean, std = self.t.values["mean"], self.t.values["std"]
        sampled = self.sampled("mean") or self.sampled("std")
        return 1 / std, -mean / std, sampled

    def _ms(self, feat_rank: int) -> tuple[Tensor, Tensor]:
        sampled = self.sampled("mean") or self.sampled("std")
        mean, std = torch.broadcast_tensors(self.t.values["mean"], self.t.values["std"])
        return channel_view(mean, sampled, feat_rank, 2), channel_view(std, sampled, feat_rank, 2)

    def forward(self, x: Tensor) -> Tensor:
        mean, std = self._ms(x.dim() - 2)
        return (x - mean) / std

    def ibp(self, lower: Tensor, upper: Tensor) -> Box:  # same rounding as forward
        mean, std = self._ms(lower.dim() - 2)
        c, r = mid_rad(lower, upper)
        yc, yr = (c - mean) / std, r / std
        return yc - yr, yc + yr

    def ibp_sound(self, lower: Tensor, upper: Tensor) -> Box:
        """Monotone in ``x`` (either sign of ``std``): end points, every operation rounded outward."""
        mean, std = self._ms(lower.dim() - 2)
        lo_n, hi_n = down(lower - mean), up(upper - mean)
        q = (lo_n / std, hi_n / std)
        return torch.minimum(down(q[0]), down(q[1])), torch.maximum(up(q[0]), up(q[1]))

    def sound_backward_terms(self, m_in: Tensor) -> tuple[Tensor, int]:
        """``J = 1/std``, ``o = -mean/std``, each computed with one rounding, then one product (n >= 2)."""
        mean, std = self._ms(m_in.dim() - 2)
        sa = std.abs()
        return up(up(m_in / sa) + up(mean.abs() / sa)), m_in[0, 0].numel() + 2


@register_bound(nn.modules.batchnorm._BatchNorm)
class BoundBatchNorm(ChannelAffineOp):
    """Eval-mode BatchNorm1d/2d/3d: ``(x - running_mean) / sqrt(running_var + eps) * w + b``."""

    def __init__(self, module: nn.Module, name: str, tensors) -> None:
        super().__init__(module, name, tensors)
        if module.training or tensors.get("running_mean") is None:
            raise UnsupportedLayerError(
                f"layer {self.label()} uses batch statistics (training mode or no running stats); call model.eval()"
            )

    def scale_shift(self) -> tuple[Tensor, Tensor, bool]:
        v = self.t.values
        mean, var = v["running_mean"], v["running_var"]
        a = torch.rsqrt(var + self.module.eps)
        if v.get("weight") is not None:
            a = a * v["weight"]
        s = -mean * a
        if v.get("bias") is not None:
            s = s + v["bias"]
        sampled = any(self.sampled(k) for k in ("running_mean", "running_var", "weight", "bias"))
        return a, s, sampled


@register_bound(nn.Flatten)
class BoundFlatten(LinearOp):
    """``torch.flatten(x, start_dim, end_dim)`` (dims counted with the batch dim, as in nn.Flatten)."""

    mixing = False

    def _dims(self) -> tuple[int, int]:
        m: nn.Flatten = self.module  # type: ignore[assignment]
        if m.start_dim == 0:
            raise UnsupportedLayerError(f"layer {self.label()}: start_dim=0 would merge the batch dim")
        sd, ed = m.start_dim, m.end_dim
        return (sd + 1 if sd >= 0 else sd), (ed + 1 if ed >= 0 else ed)

    def forward(self, x: Tensor) -> Tensor:
        return torch.flatten(x, *self._dims())

    def ibp(self, lower: Tensor, upper: Tensor) -> Box:
        return self.forward(lower), self.forward(upper)

    ibp_sound = ibp

    def sound_backward_terms(self, m_in: Tensor) -> None:
        return None  # a reshape

    def backward_linear(self, A: Tensor) -> tuple[Tensor, Tensor | None]:
        assert self.in_shape is not None
        return A.reshape(*A.shape[:3], *self.in_shape), None


@register_bound(nn.Identity)
@register_bound(nn.Dropout)
@register_bound(nn.Dropout1d)
@register_bound(nn.Dropout2d)
@register_bound(nn.AlphaDropout)
class BoundIdentity(LinearOp):
    """The identity (Dropout bounded as at evaluation)."""

    passthrough = True
    mixing = False

    def forward(self, x: Tensor) -> Tensor:
        return x

    def ibp(self, lower: Tensor, upper: Tensor) -> Box:
        return lower, upper

    ibp_sound = ibp

    def sound_backward_terms(self, m_in: Tensor) -> None:
        return None

    def backward_linear(self, A: Tensor) -> tuple[Tensor, Tensor | None]:
        return A, None
