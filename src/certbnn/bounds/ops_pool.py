"""Bound rules of the pooling layers: ``nn.MaxPool2d`` and ``nn.AvgPool2d``.

IBP: both are monotone, so pool the lower and upper bounds. CROWN:
AvgPool2d is linear (exact back-substitution through its adjoint);
MaxPool2d is relaxed per window by ``x_j <= y <= max_i u_i``, ``j`` the
window's argmax of the lower bounds (sound: ``y >= x_j`` always, and
``y <= max_i u_i``).

``tol="sound"``: max pooling is exact; average pooling (a nonnegative linear
map of ``k`` = kernel-size terms, then a division) adds the Higham bound
``gamma_{k+1} pool(|x|)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from certbnn.bounds.base import BackwardResult, BoundOp, Box, LinearOp, sum_features
from certbnn.bounds.ops_conv_joint import maxpool_ibp_with_point
from certbnn.bounds.ops_linear import linear_vjp
from certbnn.bounds.registry import register_bound
from certbnn.bounds.rounding import dot_error, dot_upper, down, up


def _fold(fn, x: Tensor) -> Tensor:
    """Apply a 4-D op to ``(S, B, C, H, W)`` (without a copy when S is stored inside B)."""
    if x.shape[0] > 1 and x.transpose(0, 1).is_contiguous():
        return fn(x.transpose(0, 1).flatten(0, 1)).unflatten(0, (x.shape[1], x.shape[0])).transpose(0, 1)
    return fn(x.flatten(0, 1)).unflatten(0, x.shape[:2])


@register_bound(nn.AvgPool2d)
class BoundAvgPool2d(LinearOp):
    """Average pooling (any kernel, stride, padding, ceil_mode, count_include_pad, divisor)."""

    input_rank = 3

    def _pool(self, x4: Tensor) -> Tensor:
        m: nn.AvgPool2d = self.module  # type: ignore[assignment]
        return F.avg_pool2d(
            x4, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad, m.divisor_override
        )

    def forward(self, x: Tensor) -> Tensor:
        return _fold(self._pool, x)

    def ibp(self, lower: Tensor, upper: Tensor) -> Box:
        return self.forward(lower), self.forward(upper)

    def _taps(self) -> int:
        k = self.module.kernel_size
        return (k * k if isinstance(k, int) else k[0] * k[1]) + 1

    def ibp_sound(self, lower: Tensor, upper: Tensor) -> Box:
        n = self._taps()
        return (
            down(self.forward(lower) - dot_error(self.forward(lower.abs()), n)),
            up(self.forward(upper) + dot_error(self.forward(upper.abs()), n)),
        )

    def sound_backward_terms(self, m_in: Tensor) -> tuple[Tensor, int]:
        v = dot_upper(self.forward(m_in), self._taps())
        return v, v[0, 0].numel() + 1

    def backward_linear(self, A: Tensor) -> tuple[Tensor, Tensor | None]:
        assert self.in_shape is not None
        G = linear_vjp(self._pool, (A.shape[:3].numel(), *self.in_shape), A.reshape(-1, *A.shape[3:]))
        return G.view(*A.shape[:3], *self.in_shape), None


@register_bound(nn.MaxPool2d)
class BoundMaxPool2d(BoundOp):
    """Max pooling (any kernel, stride, padding, dilation, ceil_mode)."""

    is_linear = False
    needs_input_bounds = True
    input_rank = 3

    def _pool(self, x4: Tensor, return_indices: bool = False):
        m: nn.MaxPool2d = self.module  # type: ignore[assignment]
        return F.max_pool2d(x4, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, return_indices)

    def forward(self, x: Tensor) -> Tensor:
        return _fold(self._pool, x)

    def ibp(self, lower: Tensor, upper: Tensor) -> Box:
        return self.forward(lower), self.forward(upper)

    ibp_sound = ibp

    def ibp_with_point(self, x: Tensor, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(forward(x), *ibp(lower, upper))`` for the joint pass (:func:`maxpool_ibp_with_point`)."""
        return maxpool_ibp_with_point(self, x, lower, upper)

    def sound_backward_terms(self, m_in: Tensor) -> tuple[Tensor, int]:
        """Routing ``A`` to the argmax sums at most ``numel(out)`` coefficients per input;
        ``|x_j| <= maxpool(m)`` and ``|u_max| <= maxpool(m)`` (exact max, exact doubling)."""
        v = self.forward(m_in) * 2
        return v, v[0, 0].numel() + 1

    def crown_backward(self, A_lo: Tensor, A_up: Tensor) -> BackwardResult:
        assert self.input_bounds is not None
        lower, upper = self.input_bounds
        Sx, B, C, H, W = lower.shape
        _, idx = self._pool(lower.flatten(0, 1), return_indices=True)
        idx = idx.unflatten(0, (Sx, B)).unsqueeze(2)  # (Sx, B, 1, C, Ho, Wo)
        u_max = self.forward(upper).unsqueeze(2)

        def to_argmax(Ap: Tensor) -> Tensor:  # route coefficients to x_j (y >= x_j)
            shape = torch.broadcast_shapes(Ap.shape, idx.shape)
            out = Ap.new_zeros(*shape[:4], H * W)
            src = Ap.expand(shape).flatten(-2)
            return out.scatter_add(-1, idx.expand(shape).flatten(-2), src).view(*shape[:4], H, W)

        A1 = to_argmax(A_lo.clamp(min=0))
        b1 = sum_features(A_lo.clamp(max=0) * u_max)
        A2 = to_argmax(A_up.clamp(max=0))
        b2 = sum_features(A_up.clamp(min=0) * u_max)
        return A1, b1, A2, b2
