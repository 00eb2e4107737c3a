"""Gradient attacks in the l_inf ball intersected with the pixel domain.

Both attacks take a loss function of the input (per-example losses, shape
(B,)), so the same code attacks one network, a stack of posterior samples, or
the posterior predictive (expectation over samples, EOT). They attack the
loss the caller defines (for us: the loss of the **true** label), and project
onto ``[x - eps, x + eps] ∩ [lo, hi]`` after **every** step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from certbnn.errors import ConfigError

LossOfInput = Callable[[Tensor], Tensor]


def project(x_adv: Tensor, x: Tensor, eps: float, lo: float = 0.0, hi: float = 1.0) -> Tensor:
    """Closest point of the l_inf eps-ball around ``x`` inside ``[lo, hi]`` (element-wise)."""
    return torch.clamp(torch.minimum(torch.maximum(x_adv, x - eps), x + eps), lo, hi)


def _input_grad(loss_fn: LossOfInput, x: Tensor) -> tuple[Tensor, Tensor]:
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(x)
        (grad,) = torch.autograd.grad(loss.sum(), x)
    return grad, loss.detach()


def pgd(
    loss_fn: LossOfInput,
    x: Tensor,
    eps: float,
    *,
    steps: int = 10,
    step_size: float | None = None,
    random_start: bool = True,
    restarts: int = 1,
    generator: torch.Generator | None = None,
    lo: float = 0.0,
    hi: float = 1.0,
) -> Tensor:
    """Projected gradient ascent on ``loss_fn``; returns detached adversarial inputs.

    ``step_size`` defaults to 2.5 * eps / steps. With ``restarts > 1`` each
    example keeps the restart with the highest final loss. ``eps == 0`` returns
    ``x`` unchanged.
    """
    if eps < 0 or steps < 1 or restarts < 1:
        raise ConfigError(f"PGD needs eps >= 0, steps >= 1, restarts >= 1 (got {eps}, {steps}, {restarts})")
    x = x.detach()
    if eps == 0:
        return x.clone()
    alpha = 2.5 * eps / steps if step_size is None else step_size
    best, best_loss = x.clone(), torch.full(x.shape[:1], -torch.inf, dtype=x.dtype, device=x.device)
    for _ in range(restarts):
        x_adv = x.clone()
        if random_start:
            gen_device = generator.device if generator is not None else x.device  # a CPU generator works for any x
            noise = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=gen_device).to(x.device)
            x_adv = project(x + (2 * noise - 1) * eps, x, eps, lo, hi)
        for _ in range(steps):
            grad, _ = _input_grad(loss_fn, x_adv)
            x_adv = project(x_adv + alpha * grad.sign(), x, eps, lo, hi)
        with torch.no_grad():
            loss = loss_fn(x_adv)
        better = loss > best_loss
        best[better], best_loss[better] = x_adv[better], loss[better]
    return best


def fgsm(loss_fn: LossOfInput, x: Tensor, eps: float, lo: float = 0.0, hi: float = 1.0) -> Tensor:
    """One signed-gradient step of size eps (then projected onto [lo, hi])."""
    if eps < 0:
        raise ConfigError(f"FGSM needs eps >= 0, got {eps}")
    x = x.detach()
    if eps == 0:
        return x.clone()
    grad, _ = _input_grad(loss_fn, x)
    return project(x + eps * grad.sign(), x, eps, lo, hi)
