"""Specification matrices, worst-case logits and the rounding-tolerance widening."""

from __future__ import annotations

import torch
from torch import Tensor

from certbnn.errors import ConfigError

# Outward widening (rtol, atol) used by ``tol="auto"``, per dtype: about 40x the
# largest float32-vs-float64 discrepancy measured by benchmarks/bounds_bench.py
# on trained MNIST MLPs (2.5e-5 * (1 + |bound|)), scaled by the unit roundoff for
# the other dtypes. Empirical and NOT rigorous (a layer with weights of 3e7 defeats
# it in float32): certificates use ``tol="sound"`` (see docs/bounds.md, "Floating point").
AUTO_TOL: dict[torch.dtype, tuple[float, float]] = {
    torch.float16: (1e-1, 1e-1),
    torch.bfloat16: (5e-1, 5e-1),
    torch.float32: (1e-3, 1e-3),
    torch.float64: (1e-10, 1e-10),
}


def known_true(flag: Tensor) -> bool:
    """``bool(flag)``, or False inside torch.func transforms where it cannot be read."""
    try:
        return bool(flag)
    except RuntimeError:
        return False


def margin_spec(labels: Tensor, num_classes: int, *, exclude_true: bool = False) -> Tensor:
    """Rows ``e_y - e_j``: ``spec @ z`` gives the margins ``z_y - z_j``.

    Returns ``(B, K, K)`` (row ``j``; the row ``j = y`` is zero) or, with
    ``exclude_true``, ``(B, K-1, K)`` (rows ``j != y`` in increasing ``j``).
    The sample is certified iff every margin lower bound (``j != y``) is > 0.
    """
    labels = torch.as_tensor(labels).long()
    if labels.dim() != 1:
        raise ConfigError(f"margin_spec: labels must be 1-D (B,), got shape {tuple(labels.shape)}")
    if labels.numel() and known_true((labels.min() < 0) | (labels.max() >= num_classes)):
        raise ConfigError(f"margin_spec: labels must lie in [0, {num_classes})")
    eye = torch.eye(num_classes, device=labels.device)
    spec = eye[labels].unsqueeze(1) - eye.unsqueeze(0)  # (B, K, K)
    if not exclude_true:
        return spec
    keep = ~torch.nn.functional.one_hot(labels, num_classes).bool()  # (B, K)
    return spec[keep].view(labels.numel(), num_classes - 1, num_classes)


def worst_case_logits(lower: Tensor, upper: Tensor, labels: Tensor) -> Tensor:
    """``z_hat_j = upper_j`` for ``j != y`` and ``z_hat_y = lower_y``.

    ``lower``/``upper`` are ``(..., B, K)`` logit bounds (any leading dims,
    e.g. samples ``S``); ``labels`` is ``(B,)``. Then
    ``softmax(z_hat)_y <= softmax(f(x'))_y`` for every ``x'`` in the box.
    """
    labels = torch.as_tensor(labels).long()
    mask = labels.unsqueeze(-1) == torch.arange(lower.shape[-1], device=labels.device)
    return torch.where(mask, lower, upper)


def resolve_tol(tol: float | tuple[float, float] | str | None, dtype: torch.dtype) -> tuple[float, float] | None:
    """``(rtol, atol)`` from the ``tol`` argument of :func:`compute_bounds`."""
    if tol is None:
        return None
    if isinstance(tol, str):
        if tol != "auto":
            raise ConfigError(f"tol must be None, 'sound', 'auto', a float or (rtol, atol), got '{tol}'")
        return AUTO_TOL.get(dtype, AUTO_TOL[torch.float32])
    if isinstance(tol, (int, float)):
        return float(tol), float(tol)
    rtol, atol = tol
    if rtol < 0 or atol < 0:
        raise ConfigError("tol: rtol and atol must be >= 0")
    return float(rtol), float(atol)


def widen(lower: Tensor, upper: Tensor, rtol: float, atol: float) -> tuple[Tensor, Tensor]:
    """Outward widening ``lower - (atol + rtol |lower|)``, ``upper + (atol + rtol |upper|)``."""
    return lower - (atol + rtol * lower.abs()), upper + (atol + rtol * upper.abs())
