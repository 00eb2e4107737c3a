"""Rigorous floating-point helpers of ``tol="sound"`` (see docs/bounds.md, "Floating point").

Model (assumptions): IEEE 754 binary32/binary64 with round-to-nearest; every
``+ - * /`` and ``sqrt`` is one correctly rounded operation, a matmul or
convolution output is a sum of products computed with such operations in any
order (FMA allowed), no TF32/bf16/Winograd/FFT arithmetic (enforced by
:func:`plain_arithmetic`), no fast-math. Underflow: every rounded operation has
an absolute error of at most ``tiny`` (the smallest *normal* number, which also
covers flush-to-zero of results) on top of the relative error ``u``.

Higham (Accuracy and Stability of Numerical Algorithms, Lemma 3.1/3.4): a dot
product of ``n`` terms computed in any order satisfies
``|fl(sum a_i b_i) - sum a_i b_i| <= gamma_n sum |a_i b_i| + n tiny`` with
``gamma_n = n u / (1 - n u)``; for nonnegative terms ``fl(sum) >= (1 - gamma_n) sum - n tiny``.
Scalar operations on bounds are rounded to nearest and then moved one float
outward (:func:`up`/:func:`down`), which is a directed rounding.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import Tensor

from certbnn.denormals import gradual_underflow
from certbnn.errors import ConfigError

SOUND_DTYPES = (torch.float32, torch.float64)


def check_dtype(dtype: torch.dtype) -> None:
    if dtype not in SOUND_DTYPES:
        raise ConfigError(f"tol='sound' supports float32 and float64, got {dtype}")


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def up(x: Tensor) -> Tensor:
    """The next float above ``x``: ``up(fl(v)) >= v`` for one round-to-nearest result ``fl(v)``."""
    return torch.nextafter(x, x.new_full((), math.inf))


def down(x: Tensor) -> Tensor:
    """The next float below ``x``: ``down(fl(v)) <= v``."""
    return torch.nextafter(x, x.new_full((), -math.inf))


def scalar_up(value: float, like: Tensor) -> Tensor:
    """The smallest float of ``like``'s dtype that is ``>= value`` (a 0-d tensor on its device)."""
    t = torch.tensor(value, dtype=like.dtype, device=like.device)
    return up(t) if float(t) < value else t


def cast_down(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` rounded down to ``dtype`` (exact when representable)."""
    y = x.to(dtype)
    if torch.finfo(dtype).bits >= torch.finfo(x.dtype).bits:
        return y
    return torch.where(y.to(x.dtype) > x, down(y), y)


def cast_up(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` rounded up to ``dtype``."""
    y = x.to(dtype)
    if torch.finfo(dtype).bits >= torch.finfo(x.dtype).bits:
        return y
    return torch.where(y.to(x.dtype) < x, up(y), y)


def kappa(n: int, dtype: torch.dtype) -> float:
    """``gamma_n / (1 - gamma_n)`` (an upper bound, as a Python float) for dot products of length ``n``."""
    u = unit_roundoff(dtype)
    nu = max(int(n), 1) * u
    if nu >= 0.25:
        raise ConfigError(f"tol='sound': dot products of length {n} are too long for {dtype} (n*u = {nu:.2g})")
    gamma = nu / (1 - nu)
    return gamma / (1 - gamma) * (1 + 1e-9)  # slack for this Python-float evaluation


def dot_upper(t: Tensor, n: int) -> Tensor:
    """Upper bound on an exact sum of ``n`` nonnegative products whose computed value is ``t``
    (operands themselves upper bounds): ``exact <= (t + n tiny) / (1 - gamma_n)``."""
    k = kappa(n, t.dtype)
    tiny = torch.finfo(t.dtype).tiny
    return up(t + up(up(t * scalar_up(k, t)) + scalar_up((1 + k) * n * tiny, t)))


def dot_error(abs_t: Tensor, n: int, products: int = 1) -> Tensor:
    """Bound on the total rounding error of ``products`` dot products of length ``n`` whose
    exact absolute values sum to at most ``abs_t`` as computed (i.e. ``abs_t`` is the computed
    ``sum |a_i b_i|`` over all of them): ``gamma_n exact_abs + products * n * tiny``."""
    k = kappa(n, abs_t.dtype)
    tiny = torch.finfo(abs_t.dtype).tiny
    return up(up(abs_t * scalar_up(k, abs_t)) + scalar_up((k + products) * (1 + k) * n * tiny, abs_t))


def sound_mid_rad(lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
    """``(c, r)`` with ``[c - r, c + r]`` containing ``[lower, upper]`` exactly (``c`` any float
    near the midpoint; ``r`` rounded up). A point box (``lower = upper = c``, e.g. an inactive
    ReLU) gets ``r = 0`` exactly, not the subnormal ``up(0)``: subnormal operands slow CPU
    matmuls down by orders of magnitude."""
    c = lower * 0.5 + upper * 0.5
    c = torch.where(torch.isfinite(c), c, (lower + upper) * 0.5)
    r = up(torch.maximum(upper - c, c - lower))
    return c, r.masked_fill_((c == lower) & (c == upper), 0.0)


@contextlib.contextmanager
def plain_arithmetic() -> Iterator[None]:
    """Force IEEE arithmetic for the duration: float32 matmul precision "highest" (no
    TF32/bf16 in cuBLAS or oneDNN), cuDNN TF32 off and cuDNN disabled (it may pick
    Winograd or FFT convolutions, whose errors the gamma_n bound does not cover), and
    gradual underflow on the CPU even where the caller turned flush-to-zero on
    (:func:`certbnn.denormals.gradual_underflow`: ``down(0)`` must stay below 0)."""
    prec = torch.get_float32_matmul_precision()
    cuda_tf32 = torch.backends.cuda.matmul.allow_tf32
    cudnn_tf32, cudnn_on = torch.backends.cudnn.allow_tf32, torch.backends.cudnn.enabled
    try:
        torch.set_float32_matmul_precision("highest")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.enabled = False
        with gradual_underflow():
            yield
    finally:
        torch.set_float32_matmul_precision(prec)
        torch.backends.cuda.matmul.allow_tf32 = cuda_tf32
        torch.backends.cudnn.allow_tf32, torch.backends.cudnn.enabled = cudnn_tf32, cudnn_on


def _two_sum(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """``s = fl(a + b)`` and its exact error ``e = (a + b) - s`` (Knuth's TwoSum; round-to-nearest, no overflow)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def add_down(a: Tensor, b: Tensor) -> Tensor:
    """The largest float ``<= a + b`` when ``a + b`` is not a float, else ``a + b`` exactly."""
    s, e = _two_sum(a, b)
    return torch.where(e < 0, down(s), s)


def add_up(a: Tensor, b: Tensor) -> Tensor:
    """The smallest float ``>= a + b``."""
    s, e = _two_sum(a, b)
    return torch.where(e > 0, up(s), s)
