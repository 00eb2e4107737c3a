"""Attacks on the posterior predictive (expectation over transformation, SPEC §5).

The attacked quantity is the Monte Carlo predictive p(y | x) = mean_s
softmax(f_s(x)) over the S posterior samples stacked in ``params`` (point
params: S = 1). Every loss evaluation runs all S samples in one vectorised
forward pass (:func:`certbnn.functional.forward`), so one PGD step costs one
batched forward and backward, whatever S. Inputs live in [0, 1]; adversarial
inputs stay in the l_inf eps-ball around ``x`` intersected with [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from certbnn.attacks import fgsm, pgd
from certbnn.errors import ConfigError
from certbnn.evaluation.metrics import accuracy, evaluate_predictive, predictive_log_probs, predictive_probs

__all__ = ["predictive_loss_fn", "attack", "adversarial_accuracy", "evaluate_predictive", "ATTACKS"]

ATTACKS = ("pgd", "fgsm")


def _labels(y: Tensor, x: Tensor, what: str) -> Tensor:
    if tuple(y.shape) != (x.shape[0],):
        raise ConfigError(f"{what} must have shape ({x.shape[0]},), got {tuple(y.shape)}")
    return y.long().unsqueeze(-1)


def predictive_loss_fn(
    model: nn.Module, params: Mapping[str, Tensor], y: Tensor, *, target: Tensor | None = None
) -> Callable[[Tensor], Tensor]:
    """Per-example loss of the predictive, ``x (B, ...) -> (B,)``, to be maximised.

    Untargeted: -log mean_s softmax(f_s(x))_y (NLL of the true label ``y``).
    Targeted (``target`` (B,) labels): log mean_s softmax(f_s(x))_target, so
    ascent pushes the predictive towards the target class.
    """

    def loss(x: Tensor) -> Tensor:
        log_p = predictive_log_probs(model, params, x)
        if target is not None:
            return log_p.gather(-1, _labels(target, x, "target")).squeeze(-1)
        return -log_p.gather(-1, _labels(y, x, "labels")).squeeze(-1)

    return loss


def attack(
    model: nn.Module,
    params: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    eps: float,
    *,
    kind: str = "pgd",
    steps: int = 20,
    step_size: float | None = None,
    restarts: int = 1,
    random_start: bool = True,
    target: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Adversarial inputs (detached, same shape as ``x``) against the predictive.

    ``kind="pgd"``: :func:`certbnn.attacks.pgd` (``steps``, ``step_size``
    default 2.5 eps / steps, ``restarts``, ``random_start`` from ``generator``);
    ``kind="fgsm"``: one signed step of size eps (the PGD options are ignored).
    ``eps = 0`` returns a copy of ``x``, equal to it exactly.
    """
    if kind not in ATTACKS:
        raise ConfigError(f"attack kind must be one of {', '.join(ATTACKS)}, got {kind!r}")
    loss_fn = predictive_loss_fn(model, params, y, target=target)
    if kind == "fgsm":
        return fgsm(loss_fn, x, eps)
    return pgd(
        loss_fn,
        x,
        eps,
        steps=steps,
        step_size=step_size,
        random_start=random_start,
        restarts=restarts,
        generator=generator,
    )


def adversarial_accuracy(
    model: nn.Module, params: Mapping[str, Tensor], x: Tensor, y: Tensor, eps: float, **attack_kwargs
) -> tuple[float, Tensor]:
    """``(accuracy, x_adv)``: accuracy of the predictive's argmax (as in
    :func:`evaluate_predictive`) on ``x_adv = attack(model, params, x, y, eps, **attack_kwargs)``."""
    x_adv = attack(model, params, x, y, eps, **attack_kwargs)
    with torch.no_grad():
        probs, _ = predictive_probs(model, params, x_adv)
    return accuracy(probs, y), x_adv
