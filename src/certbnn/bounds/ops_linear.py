"""Bound rules of the weight layers: ``nn.Linear`` and ``nn.Conv2d``.

IBP uses the midpoint-radius form (``c' = W c + b``, ``r' = |W| r``); with a
weight box ``W in [Wc +- Wr]`` the bilinear product adds
``Wr (|c| + r)`` to the radius. Sampled weights ``(S, ...)`` run as one
batched matmul (Linear) or one grouped convolution with ``S * groups`` groups
(Conv2d). CROWN back-substitution is ``A W`` (Linear) or a transposed
convolution (Conv2d).

``tol="sound"``: :func:`~certbnn.bounds.base.affine_ibp_sound` with the dot
length of the layer (``in_features``; ``in_channels / groups * kh * kw``); a
folded spec enters as a weight box ``spec W +- err`` covering the fold's rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from certbnn.bounds.base import Box, LinearOp, affine_ibp, affine_ibp_sound, mid_rad, sum_features
from certbnn.bounds.ops_conv_joint import conv_ibp_with_point
from certbnn.bounds.registry import register_bound
from certbnn.bounds.rounding import dot_error, dot_upper, up
from certbnn.errors import UnsupportedLayerError


def linear_vjp(fn, in_shape: tuple[int, ...], cot: Tensor) -> Tensor:
    """``J^T cot`` for a linear map ``fn`` (differentiable in ``cot``)."""
    with torch.enable_grad():
        x = torch.zeros(in_shape, dtype=cot.dtype, device=cot.device, requires_grad=True)
        (g,) = torch.autograd.grad(fn(x), x, cot, create_graph=cot.requires_grad)
    return g


def _bias_view(b: Tensor, ndim: int) -> Tensor:
    """View a sampled bias ``(S, out)`` against ``(S, ..., out)`` with ``ndim`` dims."""
    return b.view(b.shape[0], *(1,) * (ndim - 2), b.shape[-1])


def linear_apply(x: Tensor, W: Tensor, b: Tensor | None = None) -> Tensor:
    """``x W^T + b`` for ``x`` ``(Sx, B, *mid, in)``, ``W`` ``(out, in)`` or ``(S, out, in)``,
    ``b`` ``(out,)`` or ``(S, out)``; one GEMM / one batched matmul."""
    if W.dim() == 2:
        if b is None or b.dim() == 1:
            return F.linear(x, W, b)
        y = F.linear(x, W)
    else:
        S, out = W.shape[:2]
        bf = None if b is None else (b.flatten() if b.dim() == 2 else b.repeat(S))
        if x.shape[0] == 1:  # shared input: one GEMM against the S stacked weight matrices
            y = F.linear(x[0], W.flatten(0, 1), bf).unflatten(-1, (S, out)).movedim(-2, 0)
            return y
        xf = x.reshape(x.shape[0], -1, x.shape[-1])
        if bf is None:
            y = torch.bmm(xf, W.transpose(1, 2))
        else:
            y = torch.baddbmm(bf.view(S, 1, out), xf, W.transpose(1, 2))
        return y.view(S, *x.shape[1:-1], out)
    return y + _bias_view(b, y.dim())


def affine_ibp_with_point(
    x: Tensor,
    lower: Tensor,
    upper: Tensor,
    apply,
    W: Tensor,
    b: Tensor | None,
    W_rad: Tensor | None = None,
    b_rad: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(apply(x, W, b), *affine_ibp(lower, upper, ...))`` with the point ``x`` and the box
    centre stacked along the batch (dim 1) through ONE ``apply`` (one GEMM / convolution
    shared by the clean and the interval pass); the radius takes a second one with ``|W|``."""
    if W_rad is not None or b_rad is not None:
        return apply(x, W, b), *affine_ibp(lower, upper, apply, W, b, W_rad, b_rad)
    c, r = mid_rad(lower, upper)
    y = apply(torch.cat([x.expand(c.shape[0], *x.shape[1:]), c], 1), W, b)
    yc, yr = y[:, x.shape[1] :], apply(r, W.abs(), None)
    return y[:, : x.shape[1]], yc - yr, yr.add_(yc)


def point_box_operands(x: Tensor, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
    """``(X, r)``, the operands :class:`_LinearPointIBP` multiplies by ``W`` and ``|W|``:
    ``X = [x; (lower + upper) / 2]`` ``(Bx + B, in)`` (the point and the box centre stacked for
    ONE GEMM) and the radius ``r = (upper - lower) / 2`` ``(B, in)``; fresh tensors. Writes
    through ``out=``: no autograd (inputs must not require grad outside the Function)."""
    Bx = x.shape[0]
    X = x.new_empty((Bx + lower.shape[0], x.shape[1]))
    X[:Bx].copy_(x)
    torch.add(lower, upper, out=X[Bx:]).div_(2)
    return X, torch.sub(upper, lower).div_(2)


class _LinearPointIBP(torch.autograd.Function):
    """:func:`affine_ibp_with_point` of a Linear layer with a point weight ``W`` ``(out, in)``, one
    batch ``x`` ``(Bx, in)`` and one box ``[lower, upper]`` ``(B, in)``, with a hand-written backward:
    the same values and gradients as the autograd of the plain ops, in fewer passes (no ``cat``
    in either direction, the ``|W|`` path's weight gradient ``sign(W) * (g_r^T r)`` folded into the
    weight gradient's GEMM, no input gradients where none is needed). ``operands``: the
    :func:`point_box_operands` of ``(x, lower, upper)`` computed by the caller (then ``x``,
    ``lower``, ``upper`` are None and get no gradient)."""

    @staticmethod
    def forward(
        ctx,
        x: Tensor | None,
        lower: Tensor | None,
        upper: Tensor | None,
        W: Tensor,
        b: Tensor | None,
        operands: tuple[Tensor, Tensor] | None = None,
    ):
        X, r = point_box_operands(x, lower, upper) if operands is None else operands
        Bx = X.shape[0] - r.shape[0]
        absW = W.abs()
        y = F.linear(X, W, b)
        yr = F.linear(r, absW)
        yc = y[Bx:]
        ctx.save_for_backward(X, r, W, absW)
        ctx.has_bias, ctx.Bx = b is not None, Bx
        return y[:Bx], yc - yr, yr.add_(yc)

    @staticmethod
    @once_differentiable  # first-order only: a double backward raises instead of treating saved tensors as constants
    def backward(ctx, g_x: Tensor | None, g_lo: Tensor | None, g_hi: Tensor | None):
        X, r, W, absW = ctx.saved_tensors
        Bx = ctx.Bx
        zero = X.new_zeros(())
        g_lo = zero.expand(X.shape[0] - Bx, W.shape[0]) if g_lo is None else g_lo
        g_hi = zero.expand(X.shape[0] - Bx, W.shape[0]) if g_hi is None else g_hi
        g_y = X.new_empty((X.shape[0], W.shape[0]))
        if g_x is None:
            g_y[:Bx].zero_()
        else:
            g_y[:Bx].copy_(g_x)
        torch.add(g_lo, g_hi, out=g_y[Bx:])  # d/dc of yc - yr and yc + yr
        g_r = g_hi - g_lo
        grad_x = grad_lower = grad_upper = grad_W = grad_b = None
        if ctx.needs_input_grad[3]:
            grad_W = torch.mm(g_r.t(), r).mul_(torch.sgn(W)).addmm_(g_y.t(), X)
        if ctx.has_bias and ctx.needs_input_grad[4]:
            grad_b = g_y.sum(0)
        if any(ctx.needs_input_grad[:3]):
            g_X, g_rin = torch.mm(g_y, W), torch.mm(g_r, absW)
            grad_x, g_c = g_X[:Bx], g_X[Bx:]
            grad_lower, grad_upper = (g_c - g_rin).div_(2), g_rin.add_(g_c).div_(2)
        return grad_x, grad_lower, grad_upper, grad_W, grad_b, None


def _plain_autograd() -> bool:
    """No torch-function mode (e.g. VOGN's analytic squared gradients) or functorch transform
    (vmap, grad) is active: a custom autograd Function sees the same ops the plain code would."""
    return not torch._C._is_torch_function_mode_enabled() and not torch._C._are_functorch_transforms_active()


def linear_ibp_with_point(
    x: Tensor, lower: Tensor, upper: Tensor, W: Tensor, b: Tensor | None
) -> tuple[Tensor, Tensor, Tensor] | None:
    """:func:`affine_ibp_with_point` with :func:`linear_apply` through :class:`_LinearPointIBP`
    when ``W`` is one matrix (``(out, in)`` or one sample ``(1, out, in)``) and ``x``, ``lower``,
    ``upper`` are ``(1, B, in)``; None otherwise (the caller then takes the general path)."""
    if not (
        x.dim() == lower.dim() == upper.dim() == 3
        and x.shape[0] == lower.shape[0] == 1
        and lower.shape == upper.shape
        and _plain_autograd()
    ):
        return None
    matrix = _one_matrix(W, b)
    if matrix is None or x.dtype != W.dtype or lower.dtype != W.dtype or upper.dtype != W.dtype:
        return None
    p, lo, hi = _LinearPointIBP.apply(
        x.reshape(x.shape[1:]), lower.reshape(lower.shape[1:]), upper.reshape(upper.shape[1:]), *matrix
    )
    return p.unsqueeze(0), lo.unsqueeze(0), hi.unsqueeze(0)


def _one_matrix(W: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor | None] | None:
    """``(W, b)`` as one ``(out, in)`` matrix and ``(out,)`` bias (one sample ``(1, out, in)``
    viewed so), or None for several samples."""
    if W.dim() == 3:
        if W.shape[0] != 1 or (b is not None and b.dim() != 2):
            return None
        return W.view(W.shape[1:]), None if b is None else b.view(b.shape[1:])
    if W.dim() != 2 or (b is not None and b.dim() != 1):
        return None
    return W, b


def linear_ibp_from_operands(
    operands: tuple[Tensor, Tensor], W: Tensor, b: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`linear_ibp_with_point` given the :func:`point_box_operands` of its ``x``, ``lower``,
    ``upper`` (``(B, in)`` each) and ``(W, b)`` of :meth:`BoundLinear.point_matrix`: the same
    values and parameter gradients, ``(1, B, out)`` each; no gradient to the inputs."""
    p, lo, hi = _LinearPointIBP.apply(None, None, None, W, b, operands)
    return p.unsqueeze(0), lo.unsqueeze(0), hi.unsqueeze(0)


def _per_example_apply(W: Tensor, x: Tensor) -> Tensor:
    """``W_b x_b`` for per-example ``W`` ``([S,] B, K, in)`` and ``x`` ``(Sx, B, in)`` -> ``(S, B, K)``."""
    if W.dim() == 3:
        return torch.einsum("bki,sbi->sbk", W, x)
    return torch.einsum("sbki,sbi->sbk", W, x.expand(W.shape[0], *x.shape[1:]))


@register_bound(nn.Linear)
class BoundLinear(LinearOp):
    """``y = x W^T + b``. Folds a final ``spec`` into ``W`` for tighter IBP."""

    input_rank = 1
    interval_keys = frozenset({"weight", "bias"})

    def forward(self, x: Tensor) -> Tensor:
        return linear_apply(x, self.t.values["weight"], self.t.get("bias"))

    def ibp(self, lower: Tensor, upper: Tensor) -> Box:
        v, rad = self.t.values, self.t.radius
        return affine_ibp(lower, upper, linear_apply, v["weight"], v.get("bias"), rad.get("weight"), rad.get("bias"))

    def ibp_with_point(self, x: Tensor, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(forward(x), *ibp(lower, upper))`` sharing one GEMM (:func:`affine_ibp_with_point`;
        :func:`linear_ibp_with_point` for one weight matrix)."""
        v, rad = self.t.values, self.t.radius
        if rad.get("weight") is None and rad.get("bias") is None:
            fast = linear_ibp_with_point(x, lower, upper, v["weight"], v.get("bias"))
            if fast is not None:
                return fast
        return affine_ibp_with_point(
            x, lower, upper, linear_apply, v["weight"], v.get("bias"), rad.get("weight"), rad.get("bias")
        )

    def point_matrix(self) -> tuple[Tensor, Tensor | None] | None:
        """``(W, b)``, one ``(out, in)`` matrix and ``(out,)`` bias, where :meth:`ibp_with_point`
        takes the one-GEMM path for ``(1, B, in)`` inputs of the weights' dtype (point weights,
        one sample at most, plain autograd); else None."""
        v, rad = self.t.values, self.t.radius
        if rad.get("weight") is not None or rad.get("bias") is not None or not _plain_autograd():
            return None
        return _one_matrix(v["weight"], v.get("bias"))

    def ibp_spec(self, lower: Tensor, upper: Tensor, spec: Tensor) -> Box:
        if lower.dim() != 3:
            return super().ibp_spec(lower, upper, spec)
        v, rad = self.t.values, self.t.radius
        W, Wr, b, br = v["weight"], rad.get("weight"), v.get("bias"), rad.get("bias")
        sa = spec.abs()
        if spec.dim() == 2:  # (K, out): an ordinary Linear with K outputs
            Wf = spec @ W
            bf = None if b is None else b @ spec.t()
            Wrf = None if Wr is None else sa @ Wr
            brf = None if br is None else br @ sa.t()
            return affine_ibp(lower, upper, linear_apply, Wf, bf, Wrf, brf)
        # (B, K, out): the centre goes through the layer then the spec; the radius
        # uses the per-example folded weights |spec_b W| ([S,] B, K, in)
        c, r = mid_rad(lower, upper)
        yc = torch.einsum("bko,sbo->sbk", spec, linear_apply(c, W, b))
        yr = _per_example_apply(torch.einsum("bko,...oi->...bki", spec, W).abs(), r)
        if Wr is not None:
            yr = yr + _per_example_apply(torch.einsum("bko,...oi->...bki", sa, Wr), c.abs() + r)
        if br is not None:
            yr = yr + torch.einsum("bko,...o->...bk", sa, br)
        return yc - yr, yc + yr

    def ibp_sound(self, lower: Tensor, upper: Tensor) -> Box:
        v, rad = self.t.values, self.t.radius
        W = v["weight"]
        return affine_ibp_sound(
            lower, upper, linear_apply, W, v.get("bias"), W.shape[-1], rad.get("weight"), rad.get("bias")
        )

    def ibp_spec_sound(self, lower: Tensor, upper: Tensor, spec: Tensor) -> Box:
        """Spec folded into the weights; the fold ``spec W`` (dot length ``out``) is computed with
        rounding, so ``W' = fl(spec W) +- (dot_error(|spec| |W|) + |spec| W_rad)`` encloses the exact fold."""
        if lower.dim() != 3:
            return super().ibp_spec_sound(lower, upper, spec)
        v, rad = self.t.values, self.t.radius
        W, Wr, b, br = v["weight"], rad.get("weight"), v.get("bias"), rad.get("bias")
        out = W.shape[-2]
        sa = spec.abs()
        if spec.dim() == 2:  # (K, out)

            def fold_w(s: Tensor, w: Tensor) -> Tensor:
                return s @ w

            def fold_b(s: Tensor, bb: Tensor) -> Tensor:
                return bb @ s.t()

            apply = linear_apply
        else:  # (B, K, out): per-example weights ([S,] B, K, in)

            def fold_w(s: Tensor, w: Tensor) -> Tensor:
                return torch.einsum("bko,...oi->...bki", s, w)

            def fold_b(s: Tensor, bb: Tensor) -> Tensor:
                return torch.einsum("bko,...o->...bk", s, bb)

            def apply(x: Tensor, w: Tensor, bb: Tensor | None) -> Tensor:
                y = _per_example_apply(w, x)
                return y if bb is None else y + bb

        Wf, Wf_rad = fold_w(spec, W), dot_error(fold_w(sa, W.abs()), out)
        if Wr is not None:
            Wf_rad = up(Wf_rad + dot_upper(fold_w(sa, Wr), out))
        bf = bf_rad = None
        if b is not None:
            bf, bf_rad = fold_b(spec, b), dot_error(fold_b(sa, b.abs()), out)
        if br is not None:
            br_f = dot_upper(fold_b(sa, br), out)
            bf_rad = br_f if bf_rad is None else up(bf_rad + br_f)
        return affine_ibp_sound(lower, upper, apply, Wf, bf, W.shape[-1], Wf_rad, bf_rad)

    def sound_backward_terms(self, m_in: Tensor) -> tuple[Tensor, int]:
        """``|W| m + |b|`` (dot length ``in + 1``); ``A W`` and ``A b`` sum over the outputs."""
        W, b = self.t.values["weight"], self.t.get("bias")
        v = dot_upper(linear_apply(m_in, W.abs(), None if b is None else b.abs()), W.shape[-1] + 1)
        return v, v[0, 0].numel() + 1

    def backward_linear(self, A: Tensor) -> tuple[Tensor, Tensor | None]:
        W, b = self.t.values["weight"], self.t.get("bias")
        if W.dim() == 2:
            A_new = torch.matmul(A, W)
        else:
            A_new = torch.matmul(A.reshape(A.shape[0], -1, A.shape[-1]), W)
            A_new = A_new.view(A_new.shape[0], *A.shape[1:-1], W.shape[-1])
        if b is None:
            return A_new, None
        if b.dim() == 1:
            return A_new, sum_features(torch.matmul(A, b))
        return A_new, sum_features((A * _bias_view(b, A.dim())).sum(-1))


@register_bound(nn.Conv2d)
class BoundConv2d(LinearOp):
    """2-D convolution, any stride / padding (incl. 'same', non-zero modes) / dilation / groups."""

    input_rank = 3
    interval_keys = frozenset({"weight", "bias"})

    def __init__(self, module: nn.Module, name: str, tensors) -> None:
        super().__init__(module, name, tensors)
        m: nn.Conv2d = module  # type: ignore[assignment]
        kh, kw = m.kernel_size
        dh, dw = m.dilation
        if isinstance(m.padding, str):
            if m.padding == "valid":
                pads = (0, 0, 0, 0)
            else:  # 'same' (stride 1): torch pads total d*(k-1), the extra one at the end
                th, tw = dh * (kh - 1), dw * (kw - 1)
                pads = (tw // 2, tw - tw // 2, th // 2, th - th // 2)
        else:
            ph, pw = m.padding
            pads = (pw, pw, ph, ph)
        self.mode = {"zeros": "constant"}.get(m.padding_mode, m.padding_mode)
        if self.mode not in ("constant", "reflect", "replicate", "circular"):
            raise UnsupportedLayerError(f"layer {self.label()}: padding_mode '{m.padding_mode}' not supported")
        symmetric = pads[0] == pads[1] and pads[2] == pads[3]
        if self.mode == "constant" and symmetric:
            self.sym_pad, self.pads = (pads[2], pads[0]), None
        else:
            self.sym_pad, self.pads = (0, 0), pads
        self.conv_args = dict(stride=m.stride, dilation=m.dilation)
        self.groups = m.groups

    def _pad4(self, x: Tensor) -> Tensor:
        return x if self.pads is None or not any(self.pads) else F.pad(x, self.pads, mode=self.mode)

    def _conv(self, x: Tensor, W: Tensor, b: Tensor | None, w_sampled: bool, b_sampled: bool) -> Tensor:
        """Convolve ``x`` ``(Sx, B, C, H, W)`` with point weights (sampled: ``(S, Co, ...)``)."""
        Sx, B = x.shape[:2]
        args = dict(self.conv_args, padding=self.sym_pad)
        if not w_sampled:
            fused = b if not b_sampled else None
            y = F.conv2d(self._pad4(x.flatten(0, 1)), W, fused, groups=self.groups, **args).unflatten(0, (Sx, B))
            return y if b is None or fused is not None else y + _bias_view(b, 3).unsqueeze(-1).unsqueeze(-1)
        S, Co = W.shape[:2]
        bf = None if b is None else (b.flatten() if b_sampled else b.repeat(S))  # fused (S * Co,) bias
        if Sx == 1 and self.groups == 1:  # shared input: stack the S kernels as output channels
            y = F.conv2d(self._pad4(x[0]), W.flatten(0, 1), bf, groups=1, **args)
        else:  # fold S into channels: one grouped conv with S * groups groups
            xs = x.expand(S, *x.shape[1:]).transpose(0, 1).flatten(1, 2)
            y = F.conv2d(self._pad4(xs), W.flatten(0, 1), bf, groups=self.groups * S, **args)
        # (B, S*Co, ..) -> (S, B, Co, ..) as a view: a following conv folds it back for free
        return y.unflatten(1, (S, Co)).transpose(0, 1)

    def forward(self, x: Tensor) -> Tensor:
        s = self.sampled
        return self._conv(x, self.t.values["weight"], self.t.get("bias"), s("weight"), s("bias"))

    def ibp(self, lower: Tensor, upper: Tensor) -> Box:
        v, rad, s = self.t.values, self.t.radius, self.sampled

        def apply(x: Tensor, W: Tensor, b: Tensor | None) -> Tensor:
            return self._conv(x, W, b, s("weight"), s("bias"))

        return affine_ibp(lower, upper, apply, v["weight"], v.get("bias"), rad.get("weight"), rad.get("bias"))

    def ibp_with_point(self, x: Tensor, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(forward(x), *ibp(lower, upper))`` sharing one convolution (:func:`affine_ibp_with_point`;
        :func:`~certbnn.bounds.ops_conv_joint.conv_ibp_with_point` where it applies)."""
        fast = conv_ibp_with_point(self, x, lower, upper)
        if fast is not None:
            return fast
        v, rad, s = self.t.values, self.t.radius, self.sampled

        def apply(z: Tensor, W: Tensor, b: Tensor | None) -> Tensor:
            return self._conv(z, W, b, s("weight"), s("bias"))

        return affine_ibp_with_point(
            x, lower, upper, apply, v["weight"], v.get("bias"), rad.get("weight"), rad.get("bias")
        )

    def ibp_sound(self, lower: Tensor, upper: Tensor) -> Box:
        v, rad, s = self.t.values, self.t.radius, self.sampled

        def apply(x: Tensor, W: Tensor, b: Tensor | None) -> Tensor:
            return self._conv(x, W, b, s("weight"), s("bias"))

        W = v["weight"]
        return affine_ibp_sound(
            lower,
            upper,
            apply,
            W,
            v.get("bias"),
            W[0, 0].numel() if s("weight") else W[0].numel(),
            rad.get("weight"),
            rad.get("bias"),
        )

    def sound_backward_terms(self, m_in: Tensor) -> tuple[Tensor, int]:
        """``|W| m + |b|``; each coefficient of the transposed convolution sums at most
        ``Co/groups * kh * kw`` products (times the copies a non-zero padding mode makes,
        bounded by the output size), the bias term ``Co * Ho * Wo``."""
        W, b, s = self.t.values["weight"], self.t.get("bias"), self.sampled
        taps = W[0, 0].numel() if s("weight") else W[0].numel()
        v = dot_upper(self._conv(m_in, W.abs(), None if b is None else b.abs(), s("weight"), s("bias")), taps + 1)
        Co, kh, kw = W.shape[-4], W.shape[-2], W.shape[-1]
        n_out = v[0, 0].numel()
        n = Co // self.groups * kh * kw if self.pads is None or self.mode == "constant" else n_out * kh * kw
        return v, max(n, n_out) + 1

    def _unpad(self, G: Tensor, H: int, Wd: int) -> Tensor:
        if self.pads is None or not any(self.pads):
            return G
        pl, _, pt, _ = self.pads
        if self.mode == "constant":
            return G[..., pt : pt + H, pl : pl + Wd]
        shape = (*G.shape[:-2], H, Wd)
        return linear_vjp(lambda z: F.pad(z, self.pads, mode=self.mode), shape, G)

    def backward_linear(self, A: Tensor) -> tuple[Tensor, Tensor | None]:
        assert self.in_shape is not None
        W, b = self.t.values["weight"], self.t.get("bias")
        Sa, Ba, K, Co, Ho, Wo = A.shape
        C, H, Wd = self.in_shape
        pl, pr, pt, pb = self.pads or (0, 0, 0, 0)
        (sh, sw), (dh, dw) = self.conv_args["stride"], self.conv_args["dilation"]
        kh, kw = W.shape[-2:]
        ph, pw = self.sym_pad
        out_pad = (
            H + pt + pb - ((Ho - 1) * sh - 2 * ph + dh * (kh - 1) + 1),
            Wd + pl + pr - ((Wo - 1) * sw - 2 * pw + dw * (kw - 1) + 1),
        )
        args = dict(stride=(sh, sw), padding=(ph, pw), output_padding=out_pad, dilation=(dh, dw))
        if not self.sampled("weight"):
            G = F.conv_transpose2d(A.reshape(-1, Co, Ho, Wo), W, None, groups=self.groups, **args)
            G = self._unpad(G, H, Wd).view(Sa, Ba, K, C, H, Wd)
        else:
            S = W.shape[0]
            A5 = A.expand(S, Ba, K, Co, Ho, Wo).permute(1, 2, 0, 3, 4, 5).reshape(Ba * K, S * Co, Ho, Wo)
            G = F.conv_transpose2d(A5, W.flatten(0, 1), None, groups=self.groups * S, **args)
            G = self._unpad(G, H, Wd).view(Ba, K, S, C, H, Wd).permute(2, 0, 1, 3, 4, 5)
        if b is None:
            return G, None
        As = A.sum((-2, -1))
        bias = As @ b if b.dim() == 1 else (As * b.view(b.shape[0], 1, 1, -1)).sum(-1)
        return G, bias
