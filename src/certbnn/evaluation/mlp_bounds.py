"""Fast IBP logit bounds of a ReLU MLP under many posterior samples (issue 13, item 4).

A model whose bound chain is ``[Flatten] Linear (ReLU Linear)*`` is bounded for all samples
and a chunk of points at once: the first layer is ONE GEMM of the points' box centres against
the ``S`` stacked weight matrices (``(S * out, in)``; the input is shared by every sample), and
one of the radii against the stacked ``|W|``; later layers are batched matmuls. Points go in
chunks whose activations fit in a few MiB, so the elementwise passes run in cache.

``sound=False``: the authors' arithmetic, plain round-to-nearest midpoint-radius IBP.

``sound=True``: rigorous in floating point (the model of :mod:`certbnn.bounds.rounding`:
IEEE round-to-nearest, any summation order in a GEMM, ``tiny`` absolute error on underflow)
at almost the plain cost: no directed-rounding pass over the activations. Each layer computes
``c = fl((l + u) / 2)``, ``r = fl((u - l) / 2)``, ``yc = fl(W c + b)``,
``yr = fl(|W| r + alpha sigma + beta)`` (the extra term is one more column of the GEMM),
``lower = fl(yc - yr)``, ``upper = fl(yc + yr)``, where ``sigma >= ||max(|l|, |u|)||_2`` per
point and ``alpha_j = a ||W_j||_2``, ``beta_j = b_1 ||W_j||_2 + b_2 |b_j| + b_3`` are rounded up
and cover, by Cauchy-Schwarz (``sum_i |W_ji| v_i <= ||W_j||_2 ||v||_2``) and Higham's
``gamma_n`` bound: the error of ``c`` and ``r`` as a centre/radius of ``[l, u]``, the rounding
of both dot products (including the extra term itself) and of the final ``-``/``+``. See
:func:`_error_coefficients` for the derivation. Bounds are looser than the generic engine's
``tol="sound"`` by a few ``gamma_n ||W_j||_2 ||v||_2`` (``1e-4``-relative in float32).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from certbnn.bounds.rounding import cast_up, check_dtype, plain_arithmetic, unit_roundoff
from certbnn.bounds.structure import model_layers
from certbnn.errors import ConfigError

__all__ = ["mlp_linears", "mlp_logit_bounds"]

SAMPLE_GROUP = 4  # samples per block (first-layer GEMM: the group's weights stacked)
POINT_CHUNK = 1024  # points per block
GROUP = 28  # features per Cauchy-Schwarz group of the sound error term (MNIST: one image row)
_MARGIN = 1 + 1e-6  # relative slack for the float64 evaluation of the error coefficients


def mlp_linears(model: nn.Module) -> list[str] | None:
    """Module names of the Linear layers when the bound chain of ``model`` is
    ``[Flatten(start_dim=1)] Linear (ReLU Linear)*`` (nothing else), else None."""
    try:
        layers = model_layers(model)
    except Exception:  # noqa: BLE001  (any model the chain engine refuses: the generic path decides)
        return None
    kinds = [(name, module) for name, module, _ in layers]
    if kinds and isinstance(kinds[0][1], nn.Flatten) and kinds[0][1].start_dim == 1 and kinds[0][1].end_dim == -1:
        kinds = kinds[1:]
    if not kinds or len(kinds) % 2 == 0:
        return None
    for i, (_, module) in enumerate(kinds):
        if type(module) is not (nn.Linear if i % 2 == 0 else nn.ReLU):
            return None
    return [name for name, _ in kinds[::2]]


def _stacked(
    model: nn.Module, params: Mapping[str, Tensor], name: str, S: int, dtype: torch.dtype, sound: bool
) -> tuple[Tensor, Tensor | None]:
    """``(S, out, in)`` weights and ``(S, out)`` bias (or None) of Linear ``name`` in ``dtype``;
    ``sound``: a tensor not exactly representable in ``dtype`` is refused (as by ``tol="sound"``)."""
    module = model.get_submodule(name)
    out = []
    for key in ("weight", "bias"):
        t = params.get(f"{name}.{key}")
        if t is None:
            own = getattr(module, key)
            t = None if own is None else own.detach().unsqueeze(0).expand(S, *own.shape)
        elif t.shape[0] != S:
            raise ConfigError(f"params entry '{name}.{key}' has {t.shape[0]} samples, expected {S}")
        if t is not None:
            t = t.detach()
            if sound and t.dtype != dtype and not torch.equal(t.to(dtype).to(t.dtype), t):
                raise ConfigError(
                    f"tol='sound': params entry '{name}.{key}' ({t.dtype}) is not exactly "
                    f"representable in {dtype}; pass dtype={t.dtype}"
                )
            t = t.to(dtype)
        out.append(t)
    return out[0], out[1]


def _gamma(n: int, u: float) -> float:
    nu = n * u
    if nu >= 0.25:
        raise ConfigError(f"tol='sound': dot products of length {n} are too long (n*u = {nu:.2g})")
    return nu / (1 - nu)


def _groups(t: Tensor) -> Tensor:
    """``t`` ``(..., n)`` zero-padded and viewed as ``(..., G, GROUP)`` (contiguous groups of features)."""
    n = t.shape[-1]
    G = -(-n // GROUP)
    padded = t if G * GROUP == n else torch.nn.functional.pad(t, (0, G * GROUP - n))
    return padded.reshape(*t.shape[:-1], G, GROUP)


def _norm_up(t: Tensor) -> Tensor:
    """Upper bound (float64) on the 2-norm over the last dim of ``t``. float32 ``t``: the float64
    norm (no float32 value overflows or underflows when squared in float64) with a ``1e-9``
    relative slack, far above the float64 error of any summation order (``n 2^-53``, ``n < 2^20``).
    float64 ``t``: a float64 sum of squares after an exact power-of-two scaling by the largest
    entry (no overflow; what underflows is below ``2^-1000`` of the norm), then the same slack."""
    if t.dtype == torch.float32:
        return torch.linalg.vector_norm(t, dim=-1, dtype=torch.float64) * (1 + 1e-9)
    t = t.double().abs()
    m = t.amax(-1, keepdim=True)
    scale = torch.where(m > 0, torch.exp2(torch.frexp(m).exponent.double()), torch.ones_like(m))
    z = t / scale
    return ((z * z).sum(-1).sqrt() * (1 + 1e-9) + 1e-300) * scale.squeeze(-1)


def _error_coefficients(W: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(alpha, beta)``: ``(S, out, G)`` and ``(S, out)`` in ``W``'s dtype, rounded up, such that
    ``fl(yc -+ fl(|W| r + alpha . sigma + beta))`` bounds ``W x + b`` over ``[l, u]`` outward, where
    ``sigma_g >= ||v_g||_2`` for the ``G`` groups of :data:`GROUP` features (:func:`_groups`).

    With ``v = max(|l|, |u|)``, ``V = sum_i |W_ji| v_i <= sum_g w_g ||v_g||_2`` (``w_g = ||W_j,g||_2``;
    Cauchy-Schwarz per group) and ``w = ||W_j||_2``: ``c = fl(m)``, ``r = fl(h)`` (``m``, ``h`` the
    exact centre and radius) give ``|c| + r <= (1 + u) v + 2 tiny``, so ``Q = (1 + u) V + 2 tiny
    sqrt(n) w`` bounds ``|W| (|c| + r)``, and the exact radius of ``[l, u]`` about ``c`` is
    ``<= r + u v + 2 tiny``. With ``g = gamma_{n+G+1}`` (the dot length of ``yr``) the errors of
    ``yc`` and ``yr`` (with its extra terms) sum to ``<= g (Q + |b| + E) + (2n + 2G + 3) tiny``,
    and the final addition adds ``u [(1 + g)(Q + |b| + E) + (2n + 2G + 3) tiny]``. The upper bound
    is sound when ``E = alpha . sigma + beta`` covers all of it plus ``u V + 2 tiny sqrt(n) w``;
    solved for ``E`` this is linear in the ``sigma_g``. The lower bound is symmetric.
    Coefficients are evaluated in float64 with a relative slack far above its rounding."""
    dt = W.dtype
    n = W.shape[-1]
    G = -(-n // GROUP)
    u, tiny = unit_roundoff(dt), torch.finfo(dt).tiny
    g = _gamma(n + G + 1, u)
    q = g + u * (1 + g)  # coefficient of Q + |b|
    d = 1 - q
    w_g, w = _norm_up(_groups(W)), _norm_up(W)
    alpha = w_g * ((q * (1 + u) + u) / d * _MARGIN)
    beta = w * ((2 * q + 2) * tiny * math.sqrt(n) / d * _MARGIN) + (2 * n + 2 * G + 3) * (1 + u) * tiny / d * 2
    if b is not None:
        beta = beta + b.double().abs() * (q / d * _MARGIN)
    return cast_up(alpha, dt), cast_up(beta, dt)


def _sigma_sq(s2: Tensor, n: int, dt: torch.dtype) -> Tensor:
    """Upper bound, in ``dt``, on ``sqrt(sum_i v_i^2)`` from ``s2``, a ``dt`` evaluation of
    ``sum_i v_i * v_i`` (``n`` terms, any order): the exact sum is ``<= (s2 + n tiny) / (1 - gamma_n)``."""
    u, tiny = unit_roundoff(dt), torch.finfo(dt).tiny
    exact = (s2.double() + n * tiny) / (1 - _gamma(n, u)) * (1 + 1e-9)
    return cast_up(exact.sqrt() * (1 + 1e-9), dt)


def _first_sigma(lo: Tensor, hi: Tensor) -> Tensor:
    """``(P, G)`` upper bounds on ``||v_g||_2``, ``v = max(|lo|, |hi|)`` (float64 sums of squares, then slack)."""
    return cast_up(_norm_up(_groups(torch.maximum(lo.abs(), hi.abs()))), lo.dtype)


def _augmented(W: Tensor, alpha: Tensor) -> Tensor:
    """``[|W|, alpha]``: ``(S, out, in + G)``, written in place (no intermediate ``|W|``)."""
    out = W.new_empty(*W.shape[:-1], W.shape[-1] + alpha.shape[-1])
    torch.abs(W, out=out[..., : W.shape[-1]])
    out[..., W.shape[-1] :] = alpha
    return out


def _hidden(W: Tensor, b: Tensor | None, alpha: Tensor | None, beta: Tensor | None) -> tuple:
    """A later layer's operands for :func:`_block`: ``W^T``, ``|W|^T`` (both halved when that is
    exact: no subnormal weight), bias, ``alpha^T``, ``beta`` and whether they were halved."""
    half = W * 0.5
    halved = bool(torch.equal(half * 2, W))
    Wb = half if halved else W
    return (
        Wb.transpose(1, 2),
        None if b is None else b.unsqueeze(1),
        Wb.abs().transpose(1, 2),
        None if alpha is None else alpha.transpose(1, 2),
        None if beta is None else beta.unsqueeze(1),
        halved,
    )


def _block(first: tuple, rest: list[tuple], c: Tensor, r: Tensor, sound: bool) -> tuple[Tensor, Tensor]:
    """Bounds ``(S', P, K)`` of one block of ``S'`` samples and ``P`` points (see :func:`mlp_logit_bounds`)."""
    W1t, b1, R1t, beta1, S = first
    yc = c @ W1t if b1 is None else torch.addmm(b1, c, W1t)
    yr = r @ R1t if beta1 is None else torch.addmm(beta1, r, R1t)
    l, u = torch.sub(yc, yr), yc.add_(yr)  # (P, S' * H)
    l, u = l.view(l.shape[0], S, -1).transpose(0, 1), u.view(u.shape[0], S, -1).transpose(0, 1)  # (S', P, H)
    for Wt, bb, Rt, alpha, beta, halved in rest:
        l, u = l.relu_(), u.relu_()  # 0 <= l <= u: max(|l|, |u|) = u
        if sound:  # sigma from u before it is overwritten
            sigma = _sigma_sq(_groups(u * u).sum(-1), GROUP, u.dtype)
            overflow = torch.isinf(sigma)
            if bool(overflow.any()):  # squares above the float range: the scaled float64 norm there
                sigma = torch.where(overflow, cast_up(_norm_up(_groups(u)), u.dtype), sigma)
        # c = (l + u) / 2 and r = (u - l) / 2; the halving is folded into the weights when exact there
        cc, rr = torch.add(l, u), u.sub_(l)
        if not halved:
            cc, rr = cc.mul_(0.5), rr.mul_(0.5)
        yc = torch.bmm(cc, Wt) if bb is None else torch.baddbmm(bb, cc, Wt)
        if sound:  # the Cauchy-Schwarz terms alpha . sigma: G more products of the dot product yr
            yr = torch.baddbmm(beta, rr, Rt).baddbmm_(sigma, alpha)
        else:
            yr = torch.bmm(rr, Rt)
        l, u = torch.sub(yc, yr), yc.add_(yr)
    return l, u


def mlp_logit_bounds(
    model: nn.Module,
    params: Mapping[str, Tensor],
    lower: Tensor,
    upper: Tensor,
    *,
    sound: bool,
    linears: list[str] | None = None,
) -> tuple[Tensor, Tensor]:
    """``(S, B, K)`` lower and upper bounds of the logits of every sample over the input box.

    ``params``: name -> ``(S, *shape)`` (tensors missing from it are the model's own);
    ``lower``/``upper``: ``(B, *in)`` in the dtype of the computation (float32 or float64 when
    ``sound``); ``linears``: :func:`mlp_linears` of ``model`` (computed when None; a model
    that is not such an MLP is refused). Samples go in groups of :data:`SAMPLE_GROUP`, points
    in chunks of :data:`POINT_CHUNK`; results do not depend on either."""
    linears = linears if linears is not None else mlp_linears(model)
    if linears is None:
        raise ConfigError(f"mlp_logit_bounds needs a [Flatten] Linear (ReLU Linear)* model, got {type(model).__name__}")
    dt = lower.dtype
    if sound:
        check_dtype(dt)
    S = next(iter(params.values())).shape[0]
    layers = [_stacked(model, params, name, S, dt, sound) for name in linears]
    coeffs = [_error_coefficients(W, b) if sound else (None, None) for W, b in layers]
    B = lower.shape[0]
    lo0, hi0 = lower.reshape(B, -1), upper.reshape(B, -1)
    K = layers[-1][0].shape[1]
    out_lo, out_hi = lower.new_empty(S, B, K), lower.new_empty(S, B, K)
    with plain_arithmetic():
        # centre and radius of the input box (shared by every sample); sound: sigma appended to r
        c0 = (lo0 + hi0).mul_(0.5)
        r0 = torch.sub(hi0, lo0).mul_(0.5)
        if sound:
            r0 = torch.cat([r0, _first_sigma(lo0, hi0)], -1)
        for s in range(0, S, SAMPLE_GROUP):
            g = slice(s, s + SAMPLE_GROUP)
            (W1, b1), (alpha1, beta1) = layers[0], coeffs[0]
            n_s, H = W1[g].shape[:2]
            # first layer: the group's samples stacked as the output features of one GEMM
            R1 = _augmented(W1[g], alpha1[g]) if sound else W1[g].abs()
            first = (
                W1[g].reshape(n_s * H, -1).t(),
                None if b1 is None else b1[g].reshape(-1),
                R1.reshape(n_s * H, -1).t(),
                None if beta1 is None else beta1[g].reshape(-1),
                n_s,
            )
            rest = [
                _hidden(W[g], None if b is None else b[g], None if a is None else a[g], None if be is None else be[g])
                for (W, b), (a, be) in zip(layers[1:], coeffs[1:])
            ]
            for p in range(0, B, POINT_CHUNK):
                pts = slice(p, p + POINT_CHUNK)
                out_lo[g, pts], out_hi[g, pts] = _block(first, rest, c0[pts], r0[pts], sound)
    return out_lo, out_hi
