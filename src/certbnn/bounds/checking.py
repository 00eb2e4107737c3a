"""Sampling-based soundness checker: evaluate the real model at points of the
input box (and weight box) -- box corners included -- and count outputs that
fall outside given bounds. A check, not a proof; use it to test bound rules
(including user-registered ones)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from certbnn.errors import ConfigError
from certbnn.functional import slots_restored


@dataclass
class SoundnessReport:
    """Outcome of :func:`check_soundness`.

    ``n_points``: (input, weight) points evaluated; ``n_values``: scalar
    comparisons; ``n_violations``: outputs outside ``[lower - tol, upper + tol]``;
    ``max_excess``: largest ``distance outside the bounds - tol`` (<= 0 when sound).
    """

    n_points: int
    n_values: int
    n_violations: int
    max_excess: float

    @property
    def ok(self) -> bool:
        return self.n_violations == 0


def sample_box(lower: Tensor, upper: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
    """``n`` points of the box, shape ``(n, *lower.shape)``: the two extreme
    corners, the centre, then alternately random corners and uniform points."""
    t = torch.rand((n, *lower.shape), generator=generator, dtype=lower.dtype)
    corner = torch.where(t < 0.5, lower, upper)
    uniform = torch.minimum(torch.maximum(lower + t * (upper - lower), lower), upper)
    pick_corner = (torch.arange(n) % 2 == 1).view(n, *(1,) * lower.dim())
    x = torch.where(pick_corner, corner, uniform)
    fixed = [lower, upper, (lower + upper) / 2][:n]
    if fixed:
        x[: len(fixed)] = torch.stack(fixed)
    return x


def reference_call(model: nn.Module, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
    """``model(x)`` with ``params`` (canonical names) replacing the model's tensors at every use;
    the model is left unchanged (also when it reuses a module)."""
    with slots_restored(model):
        return functional_call(model, dict(params), (x,))


def _split_sampled(model: nn.Module, given: Mapping[str, Tensor]) -> tuple[set[str], int | None]:
    own = dict(model.named_parameters())
    own.update(dict(model.named_buffers()))
    sampled, S = set(), None
    for k, v in given.items():
        if k not in own:
            raise ConfigError(f"check_soundness: '{k}' is not a parameter/buffer of the model")
        if v.dim() == own[k].dim() + 1:
            sampled.add(k)
            S = v.shape[0]
    return sampled, S


def check_soundness(
    model: nn.Module,
    lower: Tensor,
    upper: Tensor,
    out_lower: Tensor,
    out_upper: Tensor,
    *,
    params: Mapping[str, Tensor] | None = None,
    param_bounds: Mapping[str, tuple[Tensor, Tensor]] | None = None,
    spec: Tensor | None = None,
    n_inputs: int = 64,
    n_weights: int = 4,
    rtol: float = 1e-9,
    atol: float = 1e-9,
    generator: torch.Generator | None = None,
    input_has_samples: bool = False,
) -> SoundnessReport:
    """Sample the boxes and compare ``model`` (or ``spec @ model``) with the bounds.

    Arguments mirror :func:`~certbnn.bounds.compute_bounds`; the model runs in
    the bounds' dtype, one posterior sample at a time (a loop: this is the
    reference path). Weight boxes are sampled at their low and high corners,
    random corners and uniform points (``n_weights`` weight draws).
    """
    dtype = out_lower.dtype
    base = {k: v.detach().to(dtype) for k, v in model.named_parameters()}
    base.update({k: v.detach().to(dtype) for k, v in model.named_buffers()})
    params = {k: torch.as_tensor(v).detach().to(dtype) for k, v in (params or {}).items()}
    boxes = {
        k: (torch.as_tensor(a).detach().to(dtype), torch.as_tensor(b).detach().to(dtype))
        for k, (a, b) in (param_bounds or {}).items()
    }
    sampled, S = _split_sampled(model, {**params, **{k: a for k, (a, _) in boxes.items()}})
    if input_has_samples:
        S = S or lower.shape[0]
    lower, upper = lower.detach().to(dtype), upper.detach().to(dtype)
    out_lower, out_upper = out_lower.detach(), out_upper.detach()
    spec = None if spec is None else torch.as_tensor(spec).detach().to(dtype)
    n_points = n_values = n_viol = 0
    worst = -float("inf")
    for s in range(S or 1):

        def pick(k: str, v: Tensor) -> Tensor:
            return v[s] if k in sampled else v

        lo_b, up_b = (out_lower[s], out_upper[s]) if S is not None else (out_lower, out_upper)
        x_lo, x_up = (lower[s], upper[s]) if input_has_samples else (lower, upper)
        for w in range(n_weights if boxes else 1):
            p = dict(base)
            p.update({k: pick(k, v) for k, v in params.items()})
            for k, (a, b) in boxes.items():
                a, b = pick(k, a), pick(k, b)
                p[k] = sample_box(a, b, 3 + w, generator)[[0, 1, 3][w] if w < 3 else -1]
            xs = sample_box(x_lo, x_up, n_inputs, generator)
            with torch.no_grad():
                y = reference_call(model, p, xs.reshape(-1, *x_lo.shape[1:]))
            y = y.reshape(n_inputs, x_lo.shape[0], -1)
            if spec is not None:
                y = y @ spec.t() if spec.dim() == 2 else torch.einsum("bkf,nbf->nbk", spec, y)
            lo, up = lo_b.reshape(lo_b.shape[0], -1), up_b.reshape(up_b.shape[0], -1)
            tol = atol + rtol * torch.maximum(lo.abs(), up.abs())
            excess = torch.maximum(lo - y, y - up) - tol
            n_points += n_inputs * x_lo.shape[0]
            n_values += excess.numel()
            n_viol += int((excess > 0).sum())
            worst = max(worst, float(excess.max()))
    return SoundnessReport(n_points, n_values, n_viol, worst)
