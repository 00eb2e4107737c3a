"""Helpers shared by the chain engine (:mod:`certbnn.bounds.engine`) and the graph engine
(:mod:`certbnn.bounds.graph`): spec and output plumbing, the arithmetic of CROWN
back-substitution steps (their floating-point error bounds for ``tol="sound"``) and the
concretisation of a linear bound over the input box."""

from __future__ import annotations

import torch
from torch import Tensor

from certbnn.bounds.base import BoundOp, Box, add_opt, mid_rad
from certbnn.bounds.rounding import dot_error, dot_upper, kappa, scalar_up, sound_mid_rad
from certbnn.bounds.rounding import down as round_down
from certbnn.bounds.rounding import up as round_up
from certbnn.errors import ConfigError

# method="crown" refuses intermediate back-substitutions whose coefficient
# tensor would exceed this many elements (2**28 float32 = 1 GiB).
CROWN_MAX_ELEMENTS = 2**28
# On CPU, posterior samples are bounded in chunks whose activations + weights fit
# in about this many bytes (a third-level cache); see _auto_chunk.
CPU_CHUNK_BYTES = 8 * 2**20


def prepare_spec(spec: Tensor | None, batch: int, dtype: torch.dtype) -> Tensor | None:
    if spec is None:
        return None
    spec = torch.as_tensor(spec).to(dtype)
    if spec.dim() == 3 and spec.shape[0] == 1:
        spec = spec[0]
    if spec.dim() == 2 or (spec.dim() == 3 and spec.shape[0] == batch):
        return spec
    raise ConfigError(f"spec must be (K_spec, K) or (B={batch}, K_spec, K), got {tuple(spec.shape)}")


def linear_bound(A: Tensor, x: Tensor) -> Tensor:
    """``A x`` for ``A`` ``(Sa, Ba, K, *f)`` and ``x`` ``(Sx, B, *f)`` -> ``(S, B, K)``."""
    A, x = A.flatten(3), x.flatten(2)
    if A.shape[1] == 1 and x.shape[1] != 1:
        return torch.matmul(x, A[:, 0].transpose(-1, -2))
    return torch.matmul(A, x.unsqueeze(-1)).squeeze(-1)


def step_error(A: Tensor, v: Tensor, n: int, m_in: Tensor) -> Tensor:
    """``(S, B, K)`` bound on the rounding error of one back-substitution step from ``A``
    (see :meth:`BoundOp.sound_backward_terms`): ``gamma_n |A| v + n tiny (1 + sum m_in)``,
    with ``sum m_in <= numel * max m_in``."""
    w = dot_upper(linear_bound(A.abs(), v), v[0, 0].numel())
    tiny = torch.finfo(A.dtype).tiny
    numel = m_in[0, 0].numel()
    mmax = m_in.flatten(2).amax(-1).unsqueeze(-1)
    per_max, const = scalar_up(n * numel * tiny * (1 + 1e-9), mmax), scalar_up(n * tiny * (1 + 1e-9), mmax)
    tiny_term = round_up(round_up(mmax * per_max) + const)
    return round_up(round_up(w * scalar_up(kappa(n, A.dtype), w)) + tiny_term)


def acc(b: Tensor | None, x: Tensor | None, upward: bool) -> Tensor | None:
    """``b + x`` rounded outward (None means zero)."""
    if b is None or x is None:
        return x if b is None else b
    return round_up(b + x) if upward else round_down(b + x)


def add_step_bias(
    op: BoundOp,
    A_lo: Tensor,
    A_up: Tensor,
    bl: Tensor | None,
    bu: Tensor | None,
    b_lo: Tensor | None,
    b_up: Tensor | None,
    sound: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """The running biases ``(b_lo, b_up)`` plus one back-substitution step's ``(bl, bu)`` through
    ``op`` from the coefficients ``A_lo``/``A_up`` it received. ``sound``: the step's rounding error
    (:func:`step_error`, from ``op.sound_backward_terms`` and its input box ``op.sound_box``) is
    subtracted from the lower bias and added to the upper one, all rounded outward."""
    if not sound:
        return add_opt(b_lo, bl), add_opt(b_up, bu)
    m_in = torch.maximum(op.sound_box[0].abs(), op.sound_box[1].abs())
    terms = op.sound_backward_terms(m_in)
    if terms is not None:
        e_lo = step_error(A_lo, *terms, m_in)
        e_up = e_lo if A_up is A_lo else step_error(A_up, *terms, m_in)
        bl = -e_lo if bl is None else round_down(bl - e_lo)
        bu = e_up if bu is None else round_up(bu + e_up)
    return acc(b_lo, bl, False), acc(b_up, bu, True)


def concretize_sound(A_lo: Tensor, A_up: Tensor, lower: Tensor, upper: Tensor) -> Box:
    """``min/max A x`` over the box, rounded outward: ``A c -+ |A| r`` plus ``gamma_n |A| (|c| + r)``."""
    c, r = sound_mid_rad(lower, upper)
    s = round_up(c.abs() + r)
    n = lower[0, 0].numel()

    def side(A: Tensor, sign: int) -> Tensor:
        Aa = A.abs()
        cen, spread = linear_bound(A, c), linear_bound(Aa, r)
        err = dot_error(linear_bound(Aa, s), n, products=2)
        return round_down(round_down(cen - spread) - err) if sign < 0 else round_up(round_up(cen + spread) + err)

    return side(A_lo, -1), side(A_up, 1)


def finish(lo: Tensor, up: Tensor, sampled: bool, S: int | None) -> Box:
    if not sampled:
        return lo[0], up[0]
    if S is not None and lo.shape[0] != S:
        lo, up = lo.expand(S, *lo.shape[1:]), up.expand(S, *up.shape[1:])
    return lo, up


def outward_radii(ops: list[BoundOp]) -> None:
    """Weight-box radii one float up: params.resolve_tensors computes ``max(hi - c, c - lo)``
    rounded to nearest, so the next float up encloses ``[lo, hi]`` exactly."""
    for op in ops:
        for k, r in op.t.radius.items():
            op.t.radius[k] = round_up(r)


def concretize(
    A_lo: Tensor, A_up: Tensor, b_lo: Tensor | None, b_up: Tensor | None, lower: Tensor, upper: Tensor, sound: bool
) -> Box:
    """``min A_lo x + b_lo`` and ``max A_up x + b_up`` over the box ``(Sx, B, *in)`` -> ``(S, B, K)``
    (``A_up is A_lo`` shares the products); ``sound``: rounded outward with the concretisation error."""
    if sound:
        lo, up_ = concretize_sound(A_lo, A_up, lower, upper)
        return acc(lo, b_lo, False), acc(up_, b_up, True)  # type: ignore[return-value]
    c, r = mid_rad(lower, upper)
    if A_up is A_lo:
        centre, spread = linear_bound(A_lo, c), linear_bound(A_lo.abs(), r)
        lo, up = centre - spread, centre + spread
    else:
        lo = linear_bound(A_lo, c) - linear_bound(A_lo.abs(), r)
        up = linear_bound(A_up, c) + linear_bound(A_up.abs(), r)
    return add_opt(lo, b_lo), add_opt(up, b_up)  # type: ignore[return-value]
