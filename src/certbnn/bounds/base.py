"""Base classes of the per-operator bound rules, and shared tensor helpers.

Shape conventions (inside the engine):

* a box is ``(lower, upper)``, each ``(Sx, B, *features)`` with ``Sx`` in
  ``{1, S}`` (1 when nothing sampled has been applied yet);
* a linear bound on ``spec @ output`` in terms of a layer's input ``x`` is
  ``A x + b`` with ``A`` of shape ``(Sa, Ba, K, *features)`` (``Sa``, ``Ba``
  may be 1 and broadcast) and ``b`` broadcastable to ``(S, B, K)``;
* a sampled tensor has a leading ``S`` (``(S, out, in)`` for a Linear weight).

Every rule is sound in exact arithmetic. With ``tol="sound"`` the engine calls the
``*_sound`` variants instead, which are sound in floating point (directed
rounding and a-priori error bounds of :mod:`certbnn.bounds.rounding`); a rule
without them is refused in that mode.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from certbnn.bounds.params import LayerTensors
from certbnn.bounds.rounding import dot_error, down, sound_mid_rad, up
from certbnn.errors import ConfigError, UnsupportedLayerError

Box = tuple[Tensor, Tensor]
BackwardResult = tuple[Tensor, Tensor | None, Tensor, Tensor | None]


def mid_rad(lower: Tensor, upper: Tensor) -> Box:
    """Centre and radius of a box."""
    return (lower + upper) / 2, (upper - lower) / 2


def affine_ibp(
    lower: Tensor,
    upper: Tensor,
    apply,
    W: Tensor,
    b: Tensor | None,
    W_rad: Tensor | None = None,
    b_rad: Tensor | None = None,
) -> Box:
    """IBP of a linear map ``apply(x, W, b)`` in midpoint-radius form, with an optional
    weight box ``W +- W_rad`` (bilinear: ``r' = |W| r + W_rad (|c| + r) + b_rad``).

    Works on ``2c = l + u`` and ``2r = u - l`` with halved weights (exact scaling
    by powers of two), which saves two passes over the activations, unless the
    weights outnumber the activations (then it halves ``c`` and ``r``). ``apply``
    must return a fresh tensor whose backward does not need that output.
    """
    if W.numel() <= lower.numel():  # halve the (smaller) weights
        c2, r2 = lower + upper, upper - lower
        W, W_abs, W_rad = W * 0.5, W.abs() * 0.5, None if W_rad is None else W_rad * 0.5
    else:  # halve the (smaller) activations
        c2, r2 = (lower + upper).mul_(0.5), (upper - lower).mul_(0.5)
        W_abs = W.abs()
    yc = apply(c2, W, b)
    yr = apply(r2, W_abs, b_rad)
    if W_rad is not None:
        yr = yr + apply(c2.abs() + r2, W_rad, None)
    lower_out = yc - yr
    # in place: ``apply``'s backward never needs its own output, so autograd allows it
    return lower_out, yr.add_(yc)


def affine_ibp_sound(
    lower: Tensor,
    upper: Tensor,
    apply,
    W: Tensor,
    b: Tensor | None,
    n: int,
    W_rad: Tensor | None = None,
    b_rad: Tensor | None = None,
) -> Box:
    """Floating-point-sound IBP of ``apply(x, W, b)`` (every output a dot product of at most
    ``n`` products plus the bias) over the box and the weight box ``W +- W_rad``, ``b +- b_rad``.

    ``c, r`` enclose the box exactly; ``yc = W c + b``, ``yr = |W| r + W_rad s + b_rad`` with
    ``s = up(|c| + r)``; the rounding errors of the three dot products are at most
    ``gamma_{n+1} T + 3 (n+1) tiny`` with ``T = (|W| + W_rad) s + |b| + b_rad`` (Higham),
    bounded from the computed ``T`` by :func:`dot_error`; the final ``-``/``+`` round outward.
    """
    c, r = sound_mid_rad(lower, upper)
    W_abs = W.abs()
    yc = apply(c, W, b)
    yr = apply(r, W_abs, b_rad)
    s = up(c.abs() + r).masked_fill_((c == 0) & (r == 0), 0.0)  # exact there; up(0) is subnormal: slow matmuls
    W_t, b_t = W_abs, None if b is None else b.abs()
    if W_rad is not None:
        yr = up(yr + apply(s, W_rad, None))
        W_t = up(W_abs + W_rad)
    if b_rad is not None:
        b_t = b_rad if b_t is None else up(b_t + b_rad)
    R = up(yr + dot_error(apply(s, W_t, b_t), n + 1, products=3))
    return down(yc - R), up(yc + R)


def interval_spec_sound(lower: Tensor, upper: Tensor, spec: Tensor) -> Box:
    """Floating-point-sound :func:`interval_spec`."""

    def apply(x: Tensor, W: Tensor, b: Tensor | None) -> Tensor:
        return x @ W.t() if W.dim() == 2 else torch.einsum("bkf,sbf->sbk", W, x)

    return affine_ibp_sound(lower.flatten(2), upper.flatten(2), apply, spec, None, spec.shape[-1])


def add_opt(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    """``a + b`` where None means zero."""
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def sum_features(t: Tensor, n_lead: int = 3) -> Tensor:
    """Sum over every dimension after the first ``n_lead``."""
    return t.flatten(n_lead).sum(-1) if t.dim() > n_lead else t


def channel_view(v: Tensor, sampled: bool, feat_rank: int, n_lead: int) -> Tensor:
    """View a per-channel vector ``(C,)`` / ``(S, C)`` to broadcast against
    ``(*lead, C, *spatial)`` with ``n_lead`` leading dims (2 for a box, 3 for ``A``)."""
    tail = (1,) * max(feat_rank - 1, 0)
    if not sampled:
        return v.view(v.shape[-1], *tail) if feat_rank > 0 else v
    return v.view(v.shape[0], *(1,) * (n_lead - 1), v.shape[-1], *tail)


def interval_spec(lower: Tensor, upper: Tensor, spec: Tensor) -> Box:
    """Bounds of ``spec @ x`` over the box (features flattened).

    ``spec`` is ``(K, F)`` or ``(B, K, F)``; the result is ``(S, B, K)``.
    """
    c, r = mid_rad(lower.flatten(2), upper.flatten(2))
    if spec.dim() == 2:
        yc, yr = c @ spec.t(), r @ spec.abs().t()
    else:
        yc = torch.einsum("bkf,sbf->sbk", spec, c)
        yr = torch.einsum("bkf,sbf->sbk", spec.abs(), r)
    return yc - yr, yc + yr


class BoundOp:
    """Bound rules of one operator type. One instance per layer per call.

    Subclasses implement :meth:`forward` (exact, with the resolved point
    tensors), :meth:`ibp` and :meth:`crown_backward`; the engine sets
    :attr:`in_shape` (feature shape of the input, without ``(S, B)``) before
    calling them and, for ops with ``needs_input_bounds``, :attr:`input_bounds`.
    """

    passthrough: ClassVar[bool] = False  # identity map (Identity, Dropout)
    is_linear: ClassVar[bool] = True  # affine in its input
    mixing: ClassVar[bool] = True  # output coordinates mix several inputs
    needs_input_bounds: ClassVar[bool] = False  # CROWN relaxation needs the input box
    input_rank: ClassVar[int | None] = None  # feature rank it expects, if fixed
    interval_keys: ClassVar[frozenset[str]] = frozenset()  # tensors that may be intervals
    sound: bool = False  # set by the engine: tol="sound" (crown_backward builds float-valid relaxations)

    def __init__(self, module: nn.Module, name: str, tensors: LayerTensors) -> None:
        self.module = module
        self.name = name
        self.t = tensors
        self.in_shape: torch.Size | None = None
        self.input_bounds: Box | None = None
        bad = set(tensors.radius) - self.interval_keys
        if bad:
            raise ConfigError(
                f"param_bounds for {', '.join(sorted(bad))} of layer '{name}' ({type(module).__name__}) not supported"
            )

    def label(self) -> str:
        return f"'{self.name}' ({type(self.module).__name__})"

    def sampled(self, key: str) -> bool:
        return key in self.t.sampled

    def forward(self, x: Tensor) -> Tensor:
        """Exact output for inputs ``x`` of shape ``(Sx, B, *features)``."""
        raise NotImplementedError

    def ibp(self, lower: Tensor, upper: Tensor) -> Box:
        """Interval bounds of the output over the input box (and weight box)."""
        raise NotImplementedError

    def ibp_spec(self, lower: Tensor, upper: Tensor, spec: Tensor) -> Box:
        """Interval bounds of ``spec @ output``; affine ops may fold ``spec`` in."""
        lo, up = self.ibp(lower, upper)
        return interval_spec(lo, up, spec)

    def refuse_sound(self, what: str) -> UnsupportedLayerError:
        return UnsupportedLayerError(f"layer {self.label()}: no floating-point-sound {what} rule (tol='sound')")

    def ibp_sound(self, lower: Tensor, upper: Tensor) -> Box:
        """:meth:`ibp`, sound in floating point (``tol="sound"``); refused unless overridden."""
        raise self.refuse_sound("IBP")

    def ibp_spec_sound(self, lower: Tensor, upper: Tensor, spec: Tensor) -> Box:
        lo, up_ = self.ibp_sound(lower, upper)
        return interval_spec_sound(lo, up_, spec)

    def sound_backward_terms(self, m_in: Tensor) -> tuple[Tensor, int] | None:
        """Rounding model of the last :meth:`crown_backward` (``tol="sound"``).

        None when it is exact in floating point (a reshape, a copy). Else ``(v, n)``: the
        exact step is ``A y >= A' x + beta`` with ``y = J x + o`` (for relaxations: the
        selected lines), and the computed ``A'``, bias are those exact values up to
        ``gamma_n |A| |J|`` entrywise and ``gamma_n |A| |o|`` plus ``n tiny`` each; ``v``
        ``(Sx, B, *out)`` is an upper bound on ``|J| m_in + |o|`` for ``m_in`` ``(Sx, B, *in)``
        ``>= |x|`` on the input box. Refused unless overridden.
        """
        raise self.refuse_sound("CROWN")

    def crown_backward(self, A_lo: Tensor, A_up: Tensor) -> BackwardResult:
        """Push linear bounds ``A_lo y + .`` (lower) / ``A_up y + .`` (upper) on the
        quantity of interest from this op's output ``y`` back to its input.

        Returns ``(A_lo', b_lo, A_up', b_up)``; biases are None for zero.
        ``A_up is A_lo`` is allowed (and kept) while no relaxation split them.
        """
        raise NotImplementedError(f"no CROWN rule for layer {self.label()}")


class LinearOp(BoundOp):
    """An affine op: CROWN back-substitution is exact, ``A -> A J``, ``b += A c``."""

    def backward_linear(self, A: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(A J, A @ offset)`` for the op ``y = J x + offset``."""
        raise NotImplementedError

    def crown_backward(self, A_lo: Tensor, A_up: Tensor) -> BackwardResult:
        if A_up is A_lo:
            A, b = self.backward_linear(A_lo)
            return A, b, A, b
        if A_lo.shape == A_up.shape:
            k = A_lo.shape[2]
            A, b = self.backward_linear(torch.cat([A_lo, A_up], 2))
            b_lo = b_up = None
            if b is not None:
                b_lo, b_up = b[..., :k], b[..., k:]
            return A[:, :, :k], b_lo, A[:, :, k:], b_up
        a1, b1 = self.backward_linear(A_lo)
        a2, b2 = self.backward_linear(A_up)
        return a1, b1, a2, b2


class ElementwiseOp(BoundOp):
    """A coordinate-wise nonlinearity with a linear relaxation on ``[l, u]``."""

    is_linear = False
    mixing = False
    needs_input_bounds = True

    def relax(self, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
        """``(a_lo, c_lo, a_up, c_up)`` with ``a_lo x + c_lo <= f(x) <= a_up x + c_up``
        for all ``x`` in ``[lower, upper]`` (None offsets mean 0)."""
        raise NotImplementedError

    def relax_sound(self, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
        """:meth:`relax` with lines valid in exact arithmetic for the float coefficients returned."""
        raise self.refuse_sound("CROWN relaxation")

    def sound_backward_terms(self, m_in: Tensor) -> tuple[Tensor, int]:
        a_lo, c_lo, a_up, c_up = self._relaxation
        v = up(torch.maximum(a_lo.abs(), a_up.abs()) * m_in)
        c = [t.abs() for t in (c_lo, c_up) if t is not None]
        if c:
            v = up(v + (c[0] if len(c) == 1 else torch.maximum(*c)))
        return v, m_in[0, 0].numel() + 1

    def crown_backward(self, A_lo: Tensor, A_up: Tensor) -> BackwardResult:
        assert self.input_bounds is not None
        rel = (self.relax_sound if self.sound else self.relax)(*self.input_bounds)
        if self.sound:
            self._relaxation = rel
        a_lo, c_lo, a_up, c_up = (None if t is None else t.unsqueeze(2) for t in rel)

        def side(A: Tensor, pos: tuple, neg: tuple) -> tuple[Tensor, Tensor | None]:
            Ap, An = A.clamp(min=0), A.clamp(max=0)
            A_new = Ap * pos[0] + An * neg[0]
            b = add_opt(
                None if pos[1] is None else sum_features(Ap * pos[1]),
                None if neg[1] is None else sum_features(An * neg[1]),
            )
            return A_new, b

        lo = (a_lo, c_lo)
        up = (a_up, c_up)
        A1, b1 = side(A_lo, lo, up)
        A2, b2 = side(A_up, up, lo)
        return A1, b1, A2, b2
