"""Bound rules of the elementwise activations: ReLU, LeakyReLU, Tanh, Sigmoid.

IBP uses monotonicity (LeakyReLU with a negative slope is handled as the
non-monotone function it is). CROWN relaxations, for ``x`` in ``[l, u]``:

* ReLU, unstable (``l < 0 < u``): upper chord ``u (x - l) / (u - l)``; lower
  ``a x`` with the adaptive slope ``a = 1 if u > -l else 0`` (CROWN-adaptive).
* LeakyReLU(s): the same with ``s`` in place of 0 (``s <= 1``, convex); for
  ``s > 1`` (concave) chord and adaptive line swap roles.
* Tanh / Sigmoid: on every interval two parallel lines of slope
  ``k = min(f'(l), f'(u))`` through ``(l, f(l))`` and ``(u, f(u))`` (sound as
  ``f'`` is unimodal with its peak at 0, so ``f - k x`` is non-decreasing);
  where the interval is one-signed and not tiny, chord and midpoint tangent
  (convex for ``x <= 0``, concave for ``x >= 0``).

``tol="sound"``: ReLU IBP is exact; its chord keeps the float slope and takes
the intercept ``max(up(-a l), up(u - down(a u)))`` so the float line lies above
``relu`` at both end points (hence on ``[l, u]``, by convexity). Tanh/Sigmoid:
``f`` is evaluated with an assumed libm error of at most ``LIBM_ULPS`` ulps
(+ ``tiny``), IBP takes the widened end points, CROWN only the parallel lines
with a slope rounded below ``min(f'(l), f'(u))`` and outward-rounded intercepts
(the chord/tangent lines are not used). LeakyReLU is refused (its slope is not
a float in general).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from certbnn.bounds.base import Box, ElementwiseOp
from certbnn.bounds.registry import register_bound
from certbnn.bounds.rounding import down, scalar_up, unit_roundoff, up

# Assumed bound on the error of torch.tanh / torch.sigmoid, in ulps of the result
# (SLEEF/glibc/CUDA document <= 1-4 ulps for tanh, exp, expm1; sigmoid adds an
# addition and a division). Stated, not proven: see docs/bounds.md.
LIBM_ULPS = 16

Relaxation = tuple[Tensor, Tensor | None, Tensor, Tensor | None]


@register_bound(nn.ReLU)
class BoundReLU(ElementwiseOp):
    """``max(x, 0)``."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x)

    def ibp(self, lower: Tensor, upper: Tensor) -> Box:
        return torch.relu(lower), torch.relu(upper)

    def relax(self, lower: Tensor, upper: Tensor) -> Relaxation:
        active = lower >= 0
        unstable = (lower < 0) & (upper > 0)
        chord = upper / torch.where(unstable, upper - lower, torch.ones_like(lower))
        a_up = torch.where(unstable, chord, active.to(lower.dtype))
        c_up = torch.where(unstable, -lower * chord, torch.zeros_like(lower))
        a_lo = (active | (unstable & (upper > -lower))).to(lower.dtype)
        return a_lo, None, a_up, c_up

    ibp_sound = ibp

    def relax_sound(self, lower: Tensor, upper: Tensor) -> Relaxation:
        a_lo, _, a_up, c_up = self.relax(lower, upper)
        unstable = (lower < 0) & (upper > 0)
        c_safe = torch.maximum(up(-(a_up * lower)), up(upper - down(a_up * upper)))
        return a_lo, None, a_up, torch.where(unstable, c_safe, torch.zeros_like(c_up))


@register_bound(nn.LeakyReLU)
class BoundLeakyReLU(ElementwiseOp):
    """``x if x >= 0 else s x`` for any slope ``s``."""

    def _f(self, x: Tensor) -> Tensor:
        return torch.where(x >= 0, x, x * self.module.negative_slope)

    def forward(self, x: Tensor) -> Tensor:
        return self._f(x)

    def ibp(self, lower: Tensor, upper: Tensor) -> Box:
        fl, fu = self._f(lower), self._f(upper)
        if self.module.negative_slope >= 0:
            return fl, fu
        straddle = (lower <= 0) & (upper >= 0)  # minimum 0 at x = 0
        return torch.where(straddle, torch.zeros_like(fl), torch.minimum(fl, fu)), torch.maximum(fl, fu)

    def relax(self, lower: Tensor, upper: Tensor) -> Relaxation:
        s = self.module.negative_slope
        active, dead = lower >= 0, upper <= 0
        unstable = ~(active | dead)
        one, zero = torch.ones_like(lower), torch.zeros_like(lower)
        stable_slope = torch.where(active, one, one * s)
        chord = (upper - s * lower) / torch.where(unstable, upper - lower, one)
        chord_c = s * lower - chord * lower  # the chord passes through (l, s l)
        line = torch.where(upper > -lower, one, one * s)  # adaptive line through 0
        a_chord = torch.where(unstable, chord, stable_slope)
        c_chord = torch.where(unstable, chord_c, zero)
        a_line = torch.where(unstable, line, stable_slope)
        if s <= 1:  # convex: chord above, line below
            return a_line, None, a_chord, c_chord
        return a_chord, c_chord, a_line, None


class SShapedOp(ElementwiseOp):
    """A smooth increasing activation, convex on ``x <= 0``, concave on ``x >= 0``,
    whose derivative is unimodal with its peak at 0 (tanh, sigmoid)."""

    def f(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def df(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.f(x)

    def ibp(self, lower: Tensor, upper: Tensor) -> Box:
        return self.f(lower), self.f(upper)

    def relax(self, lower: Tensor, upper: Tensor) -> Relaxation:
        fl, fu = self.f(lower), self.f(upper)
        k = torch.minimum(self.df(lower), self.df(upper))
        a_lo, c_lo, a_up, c_up = k, fl - k * lower, k, fu - k * upper
        width = upper - lower
        tiny = torch.finfo(lower.dtype).eps ** 0.5 * (1 + lower.abs() + upper.abs())
        wide = width > tiny
        m = (lower + upper) / 2
        fm, dm = self.f(m), self.df(m)
        chord = (fu - fl) / torch.where(wide, width, torch.ones_like(width))
        chord_c, tan_c = fl - chord * lower, fm - dm * m
        convex, concave = wide & (upper <= 0), wide & (lower >= 0)
        a_up = torch.where(convex, chord, torch.where(concave, dm, a_up))
        c_up = torch.where(convex, chord_c, torch.where(concave, tan_c, c_up))
        a_lo = torch.where(convex, dm, torch.where(concave, chord, a_lo))
        c_lo = torch.where(convex, tan_c, torch.where(concave, chord_c, c_lo))
        return a_lo, c_lo, a_up, c_up

    f_range: tuple[float, float] = (-1.0, 1.0)

    def f_bounds(self, x: Tensor) -> Box:
        """Float enclosure ``[lo, hi]`` of the exact ``f(x)`` (libm margin ``LIBM_ULPS`` ulps + tiny)."""
        y = self.f(x)
        margin = up(up(y.abs() * scalar_up(2 * LIBM_ULPS * unit_roundoff(y.dtype), y)) + torch.finfo(y.dtype).tiny)
        return down(y - margin).clamp(*self.f_range), up(y + margin).clamp(*self.f_range)

    def df_lower(self, x: Tensor) -> Tensor:
        """A float ``<= f'(x)``, ``>= 0``."""
        raise NotImplementedError

    def ibp_sound(self, lower: Tensor, upper: Tensor) -> Box:
        return self.f_bounds(lower)[0], self.f_bounds(upper)[1]

    def relax_sound(self, lower: Tensor, upper: Tensor) -> Relaxation:
        """Parallel lines of slope ``k <= min f'`` on ``[l, u]``: ``f(x) - k x`` is non-decreasing
        there, so ``k x + (f(l) - k l) <= f(x) <= k x + (f(u) - k u)``; intercepts rounded outward."""
        k = torch.minimum(self.df_lower(lower), self.df_lower(upper))
        c_lo = down(self.f_bounds(lower)[0] - up(k * lower))
        c_up = up(self.f_bounds(upper)[1] - down(k * upper))
        return k, c_lo, k, c_up


@register_bound(nn.Tanh)
class BoundTanh(SShapedOp):
    """``tanh``."""

    def f(self, x: Tensor) -> Tensor:
        return torch.tanh(x)

    def df(self, x: Tensor) -> Tensor:
        return 1 - torch.tanh(x) ** 2

    def df_lower(self, x: Tensor) -> Tensor:
        lo, hi = self.f_bounds(x)
        t = torch.maximum(lo.abs(), hi.abs())  # >= |tanh x|
        return down(down(1 - t) * down(1 + t)).clamp(min=0)


@register_bound(nn.Sigmoid)
class BoundSigmoid(SShapedOp):
    """``1 / (1 + exp(-x))``."""

    def f(self, x: Tensor) -> Tensor:
        return torch.sigmoid(x)

    f_range = (0.0, 1.0)

    def df(self, x: Tensor) -> Tensor:
        s = torch.sigmoid(x)
        return s * (1 - s)

    def df_lower(self, x: Tensor) -> Tensor:
        lo, hi = self.f_bounds(x)
        return down(lo * down(1 - hi)).clamp(min=0)
