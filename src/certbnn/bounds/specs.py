"""Specification matrices, worst-case logits and the rounding-tolerance widening."""

from __future__ import annotations

import torch
from torch import Tensor

from certbnn.errors import ConfigError

# Outward widening (rtol, atol) used by ``tol="auto"``, per dtype. Chosen at
# ~100x the largest rounding discrepancy measured between float32/float64
# bounds and float64 references in tests/bounds and benchmarks/bounds_bench.py
# (see docs/bounds.md, "Tolerance policy").
AUTO_TOL: dict[torch.dtype, tuple[float, float]] = {
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
    torch.float32: (1e-4, 1e-5),
    torch.float64: (1e-11, 1e-12),
}


def margin_spec(labels: Tensor, num_classes: int, *, exclude_true: bool = False) -> Tensor:
    """Rows ``e_y - e_j``: ``spec @ z`` gives the margins ``z_y - z_j``.

    Returns ``(B, K, K)`` (row ``j``; the row ``j = y`` is zero) or, with
    ``exclude_true``, ``(B, K-1, K)`` (rows ``j != y`` in increasing ``j``).
    The sample is certified iff every margin lower bound (``j != y``) is > 0.
    """
    labels = torch.as_tensor(labels).long()
    if labels.dim() != 1:
        raise ConfigError(f"margin_spec: labels must be 1-D (B,), got shape {tuple(labels.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
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
    mask = torch.nn.functional.one_hot(torch.as_tensor(labels).long(), lower.shape[-1]).bool()
    return torch.where(mask, lower, upper)


def resolve_tol(tol: float | tuple[float, float] | str | None, dtype: torch.dtype) -> tuple[float, float] | None:
    """``(rtol, atol)`` from the ``tol`` argument of :func:`compute_bounds`."""
    if tol is None:
        return None
    if isinstance(tol, str):
        if tol != "auto":
            raise ConfigError(f"tol must be None, 'auto', a float or (rtol, atol), got '{tol}'")
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
