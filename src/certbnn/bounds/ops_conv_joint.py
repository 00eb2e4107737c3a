"""Joint clean + IBP rules of ``nn.Conv2d`` and ``nn.MaxPool2d`` for training losses.

:func:`certbnn.bounds.engine.point_and_ibp` maps the clean batch and the input box through
the layers in one pass. For a convolution with point weights (one sample at most) and
symmetric zero padding, :class:`_ConvPointIBP` convolves the clean batch stacked on the
box centre with ``W`` (one convolution of ``Bx + B`` images) and the box radius with
``|W|``, with a hand-written backward (no ``cat`` or slice gradients, no input gradients
where none is needed, the ``|W|`` path's weight gradient folded into ``W``'s). On CPU with
oneDNN these activations are kept channels-last: there convolutions ran 1.3-2x and max
pooling ~10x faster than in NCHW (``docs/speed.md``). Max pooling runs on channels-last
copies with the kernel semantics of NCHW (the first maximal element of a window takes
the gradient), so the values and gradients equal those of ``forward`` / ``ibp`` up to
the float rounding of the convolutions.

Plain float bounds for training only: ``tol="sound"`` never reaches these rules.
:data:`ENABLED` = False (tests, benchmarks) restores the autograd composition of
``forward`` and ``ibp``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from certbnn.bounds.base import BoundOp

ENABLED = True
"""Use the rules of this module in :meth:`ibp_with_point` (False: the autograd path)."""

Triple = tuple[Tensor, Tensor, Tensor]


def _plain_autograd() -> bool:
    """No torch-function mode (VOGN's squared gradients) or functorch transform is active."""
    return not torch._C._is_torch_function_mode_enabled() and not torch._C._are_functorch_transforms_active()


def _layout(t: Tensor) -> torch.memory_format:
    """Memory format of the joint pass's activations: channels-last on CPU with oneDNN."""
    cpu = t.device.type == "cpu" and torch.backends.mkldnn.is_available() and torch._C._get_mkldnn_enabled()
    return torch.channels_last if cpu else torch.contiguous_format


class _ConvPointIBP(torch.autograd.Function):
    """``(conv(x, W, b), c' - r', c' + r')`` with ``c' = conv(c, W, b)``, ``r' = conv(r, |W|)``,
    ``c, r`` the centre and radius of ``[lower, upper]``: ``x`` ``(Bx, C, H, W)``, ``lower``,
    ``upper`` ``(B, C, H, W)``, ``W`` ``(Co, C / groups, kh, kw)``, ``b`` ``(Co,)`` or None,
    ``geometry`` ``(stride, padding, dilation, groups)`` (zero padding). Outputs in the
    :func:`_layout` of ``x``; gradients equal the autograd of the plain ops up to rounding."""

    @staticmethod
    def forward(ctx, x: Tensor, lower: Tensor, upper: Tensor, W: Tensor, b: Tensor | None, geometry: tuple):
        stride, padding, dilation, groups = geometry
        fmt = _layout(x)
        Bx = x.shape[0]
        X = torch.empty((Bx + lower.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device, memory_format=fmt)
        X[:Bx].copy_(x)
        torch.add(lower, upper, out=X[Bx:]).div_(2)
        r = torch.empty_like(X[Bx:], memory_format=fmt)
        torch.sub(upper, lower, out=r).div_(2)
        absW = W.abs()
        y = F.conv2d(X, W, b, stride, padding, dilation, groups)
        yr = F.conv2d(r, absW, None, stride, padding, dilation, groups)
        yc = y[Bx:]
        ctx.save_for_backward(X, r, W, absW)
        ctx.geometry, ctx.Bx, ctx.has_bias = geometry, Bx, b is not None
        return y[:Bx], yc - yr, yr.add_(yc)

    @staticmethod
    @once_differentiable  # first-order only: a double backward raises
    def backward(ctx, g_x: Tensor | None, g_lo: Tensor | None, g_hi: Tensor | None):
        X, r, W, absW = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geometry
        Bx = ctx.Bx
        out_shape = (X.shape[0], *next(g.shape[1:] for g in (g_x, g_lo, g_hi) if g is not None))
        g_y = torch.empty(out_shape, dtype=X.dtype, device=X.device, memory_format=_layout(X))
        zero = X.new_zeros(())
        if g_x is None:
            g_y[:Bx].zero_()
        else:
            g_y[:Bx].copy_(g_x)
        g_lo = zero.expand(g_y[Bx:].shape) if g_lo is None else g_lo
        g_hi = zero.expand(g_y[Bx:].shape) if g_hi is None else g_hi
        torch.add(g_lo, g_hi, out=g_y[Bx:])  # d/dc' of c' - r' and c' + r'
        g_r = torch.empty_like(g_y[Bx:])
        torch.sub(g_hi, g_lo, out=g_r)
        need_in = any(ctx.needs_input_grad[:3])
        need_w = ctx.needs_input_grad[3]
        need_b = ctx.has_bias and ctx.needs_input_grad[4]
        conv = (list(stride), list(padding), list(dilation), False, [0, 0], groups)
        bias_sizes = [W.shape[0]] if ctx.has_bias else None
        gX, gW, grad_b = torch.ops.aten.convolution_backward(g_y, X, W, bias_sizes, *conv, [need_in, need_w, need_b])
        g_rin, gW_r, _ = torch.ops.aten.convolution_backward(g_r, r, absW, None, *conv, [need_in, need_w, False])
        grad_W = gW_r.mul_(torch.sgn(W)).add_(gW) if need_w else None
        grad_x = grad_lower = grad_upper = None
        if need_in:
            grad_x, g_c = gX[:Bx], gX[Bx:]
            grad_lower, grad_upper = (g_c - g_rin).div_(2), g_rin.add_(g_c).div_(2)
        return grad_x, grad_lower, grad_upper, grad_W, grad_b if need_b else None, None


def _single(W: Tensor, b: Tensor | None, sampled_w: bool, sampled_b: bool) -> tuple[Tensor, Tensor | None] | None:
    """``(W, b)`` as one ``(Co, C/g, kh, kw)`` kernel and ``(Co,)`` bias (a single sample viewed
    so), or None for several samples."""
    if sampled_w:
        if W.shape[0] != 1:
            return None
        W = W.squeeze(0)
    if b is not None and sampled_b:
        if b.shape[0] != 1:
            return None
        b = b.squeeze(0)
    return W, b


def conv_ibp_with_point(op: BoundOp, x: Tensor, lower: Tensor, upper: Tensor) -> Triple | None:
    """:meth:`~certbnn.bounds.ops_linear.BoundConv2d.ibp_with_point` through :class:`_ConvPointIBP`
    for ``x``, ``lower``, ``upper`` ``(1, B, C, H, W)`` of the weights' dtype, point weights (one
    sample at most), symmetric zero padding and plain autograd: ``(1, B, Co, Ho, Wo)`` each.
    None where that does not apply (the caller then takes the general path)."""
    t = op.t
    if not ENABLED or t.radius or op.pads is not None or not _plain_autograd():  # type: ignore[attr-defined]
        return None
    if not (x.dim() == lower.dim() == upper.dim() == 5 and x.shape[0] == lower.shape[0] == 1):
        return None
    if lower.shape != upper.shape:
        return None
    kernel = _single(t.values["weight"], t.get("bias"), op.sampled("weight"), op.sampled("bias"))
    if kernel is None or not x.dtype == lower.dtype == upper.dtype == kernel[0].dtype:
        return None
    geometry = (op.conv_args["stride"], op.sym_pad, op.conv_args["dilation"], op.groups)  # type: ignore[attr-defined]
    p, lo, hi = _ConvPointIBP.apply(x.squeeze(0), lower.squeeze(0), upper.squeeze(0), *kernel, geometry)
    return p.unsqueeze(0), lo.unsqueeze(0), hi.unsqueeze(0)


class _MaxPool2d(torch.autograd.Function):
    """``F.max_pool2d`` of ``x`` ``(N, C, H, W)`` on a :func:`_layout` copy, with
    ``pool = (kernel, stride, padding, dilation, ceil_mode)``: the values, indices and
    gradient routing of the NCHW kernel (``max_pool2d_with_indices`` and its backward),
    the gradient ``(N, C, H, W)`` in that layout."""

    @staticmethod
    def forward(ctx, x: Tensor, pool: tuple) -> Tensor:
        xl = x.contiguous(memory_format=_layout(x))
        out, idx = torch.ops.aten.max_pool2d_with_indices(xl, *pool)
        ctx.save_for_backward(xl, idx)
        ctx.pool = pool
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor):
        xl, idx = ctx.saved_tensors
        g = g.contiguous(memory_format=_layout(xl))
        return torch.ops.aten.max_pool2d_with_indices_backward(g, xl, *ctx.pool, idx), None


def _pool_arg(v, n: int = 2) -> list[int]:
    return list(v) if isinstance(v, (tuple, list)) else [v] * n


def maxpool_ibp_with_point(op: BoundOp, x: Tensor, lower: Tensor, upper: Tensor) -> Triple:
    """``(op.forward(x), *op.ibp(lower, upper))`` of a ``BoundMaxPool2d`` (IBP of max pooling: the
    pooled lower and upper bounds, sound as max is monotone), each of ``(Sx, B, C, H, W)``
    pooled through :class:`_MaxPool2d` (the autograd path where :data:`ENABLED` is False or
    autograd is not plain)."""
    if not ENABLED or not _plain_autograd():
        return op.forward(x), *op.ibp(lower, upper)
    m = op.module
    pool = (
        _pool_arg(m.kernel_size),  # type: ignore[attr-defined]
        _pool_arg(m.stride),  # type: ignore[attr-defined]
        _pool_arg(m.padding),  # type: ignore[attr-defined]
        _pool_arg(m.dilation),  # type: ignore[attr-defined]
        bool(m.ceil_mode),  # type: ignore[attr-defined]
    )

    def run(t: Tensor) -> Tensor:
        y = _MaxPool2d.apply(t.flatten(0, 1), pool)
        return y.unflatten(0, t.shape[:2])

    return run(x), run(lower), run(upper)
