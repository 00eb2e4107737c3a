"""Point estimates (the deterministic "NN" baseline): MAP by SGD with momentum or Adam.

Both minimise the per-example MAP objective

    L(w) = mean_batch nll(w) - prior_weight * log p(w) / N,

i.e. the negative log posterior divided by N (``prior_weight = 1``: MAP;
``prior_weight = 0``: maximum likelihood). ``prior_weight = t`` is the mode of the tempered
posterior p(D|w)^(1/t) p(w) (divide its negative log by N / t), the posterior the Bayesian
methods target with ``kl_weight = t``: the default t = 0.01 is their default too. With t = 1 and
the default prior (variance 1 / fan_in, i.e. an L2 weight of fan_in / N, 0.08 on the first
MNIST layer of a 10k-image run) SGD reaches only 86 % in 3 epochs (docs/training.md, "Defaults").
``weight_decay`` adds ``weight_decay * w`` to the gradient on top of that (coupled
L2, as ``torch.optim``), default 0. The updates are written out here (not wrapped
``torch.optim``) so the optimiser state is plain tensors in the method state and
checkpoints through :func:`~certbnn.inference.base.flatten_state`:

* SGD with heavy-ball momentum mu (``torch.optim.SGD`` convention, no dampening):
  ``v <- mu v + g;  w <- w - lr v``.
* Adam (Kingma & Ba 2015), bias-corrected, at step t = 1, 2, ...:
  ``m <- b1 m + (1 - b1) g;  s <- b2 s + (1 - b2) g^2;
  w <- w - lr (m / (1 - b1^t)) / (sqrt(s / (1 - b2^t)) + eps)``.

``posterior(state)`` is a :class:`~certbnn.posterior.SamplePosterior` holding the
single weight set (M = 1), so certification code treats point estimates like any
other sample-based posterior. The helpers below are shared with SWAG.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from certbnn.errors import ConfigError
from certbnn.inference.base import NLL, Batch, Params, grad_of, register_method, requires_grad
from certbnn.inference.flat import FlatLayout, adam_flat_, flat_data_gradient, prior_flat, prior_precision_flat
from certbnn.posterior import SamplePosterior
from certbnn.priors import GaussianPrior

__all__ = [
    "SGD",
    "Adam",
    "AdamState",
    "SGDState",
    "adam_update",
    "adam_update_flat",
    "map_gradient",
    "map_gradient_flat",
    "sgd_update",
    "sgd_update_flat",
]

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


# --- validation shared by the point-estimate methods and SWAG ------------------------


def check_common(method: Any) -> None:
    """ConfigError for a bad prior / num_data / lr / weight_decay / prior_weight."""
    if not isinstance(method.prior, GaussianPrior):
        raise ConfigError(f"{method.name}: prior must be a GaussianPrior, got {type(method.prior).__name__}")
    if isinstance(method.num_data, bool) or not isinstance(method.num_data, int) or method.num_data < 1:
        raise ConfigError(f"{method.name}: num_data must be a positive int, got {method.num_data!r}")
    check_number(method, "lr", method.lr, low=0.0, low_open=True)
    check_number(method, "weight_decay", method.weight_decay, low=0.0)
    check_number(method, "prior_weight", method.prior_weight, low=0.0)


def check_number(
    method: Any,
    option: str,
    value: Any,
    low: float,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """ConfigError naming ``option`` unless ``value`` is a finite real in the interval."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        interval = (
            f"{'>' if low_open else '>='} {low:g}"
            if high == math.inf
            else f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        )
        raise ConfigError(f"{method.name}: option {option} must be a finite number {interval}, got {value!r}")


def check_betas(method: Any) -> None:
    betas = method.betas
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ConfigError(f"{method.name}: option betas must be a pair (beta1, beta2), got {betas!r}")
    for value in betas:
        check_number(method, "betas", value, low=0.0, high=1.0, high_open=True)
    check_number(method, "eps", method.eps, low=0.0, low_open=True)


# --- objective and updates ------------------------------------------------------------


def map_gradient(
    params: Params, batch: Batch, nll: NLL, prior: GaussianPrior, prior_weight: float, num_data: int
) -> tuple[Params, dict[str, float]]:
    """Gradient of ``mean nll - prior_weight * log p(w) / N`` at ``params``, and an info
    dict with the objective (``loss``) and the batch mean NLL (``nll``)."""
    x, y = batch
    leaves = requires_grad(params)
    data_term = nll(leaves, x, y).mean()
    loss = data_term
    if prior_weight != 0:
        loss = data_term - (prior_weight / num_data) * prior.log_prob(leaves)
    grads = grad_of(loss, leaves)
    loss_value, nll_value = torch.stack([loss.detach(), data_term.detach()]).tolist()
    return grads, {"loss": loss_value, "nll": nll_value}


def _with_decay(grad: Tensor, param: Tensor, weight_decay: float) -> Tensor:
    return grad if weight_decay == 0 else grad + weight_decay * param


def sgd_update(
    params: Params, grads: Params, velocity: Params, lr: float, momentum: float, weight_decay: float
) -> tuple[Params, Params]:
    """One heavy-ball step: ``v <- momentum v + g; w <- w - lr v`` (out of place)."""
    new_params, new_velocity = {}, {}
    for name, param in params.items():
        v = momentum * velocity[name] + _with_decay(grads[name], param, weight_decay)
        new_velocity[name] = v
        new_params[name] = param - lr * v
    return new_params, new_velocity


def adam_update(
    params: Params,
    grads: Params,
    exp_avg: Params,
    exp_avg_sq: Params,
    step: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> tuple[Params, Params, Params]:
    """One bias-corrected Adam step number ``step`` (1-based), out of place."""
    beta1, beta2 = betas
    correction1, correction2 = 1.0 - beta1**step, 1.0 - beta2**step
    new_params, new_avg, new_avg_sq = {}, {}, {}
    for name, param in params.items():
        g = _with_decay(grads[name], param, weight_decay)
        m = beta1 * exp_avg[name] + (1.0 - beta1) * g
        s = beta2 * exp_avg_sq[name] + (1.0 - beta2) * g * g
        new_avg[name], new_avg_sq[name] = m, s
        new_params[name] = param - (lr / correction1) * m / ((s / correction2).sqrt() + eps)
    return new_params, new_avg, new_avg_sq


def map_gradient_flat(
    layout: FlatLayout, params: Tensor, batch: Batch, nll: NLL, prior: GaussianPrior, prior_weight: float, num_data: int
) -> tuple[Tensor, dict[str, float]]:
    """:func:`map_gradient` on the flat ``(P,)`` buffer ``params``: a flat gradient, the prior
    term analytic (``-d log p / dw = (w - m) / s^2``, ``log p = -sum (w - m)^2 / (2 s^2) - sum log s
    - P log sqrt(2 pi)``)."""
    grad, data_term = flat_data_gradient(layout, params, batch, nll)
    if prior_weight == 0:
        nll_value = float(data_term)
        return grad, {"loss": nll_value, "nll": nll_value}
    mean, _, log_std_sum = prior_flat(prior, layout, params)
    precision = prior_precision_flat(prior, layout, params)
    centred = params if mean is None else params - mean
    precision.add_scaled_(grad, centred, prior_weight / num_data)
    log_prior = -0.5 * precision.quadratic(centred) - log_std_sum - layout.numel * _LOG_SQRT_2PI
    nll_value, log_prior_value = torch.stack([data_term, log_prior]).tolist()
    return grad, {"loss": nll_value - (prior_weight / num_data) * log_prior_value, "nll": nll_value}


def sgd_update_flat(
    params: Tensor, grad: Tensor, velocity: Tensor, lr: float, momentum: float, weight_decay: float
) -> tuple[Tensor, Tensor]:
    """:func:`sgd_update` on flat buffers: ``(params, new velocity)``, ``params`` updated in
    place, the new velocity in ``grad``'s buffer (``grad`` is consumed)."""
    if weight_decay != 0:
        grad.add_(params, alpha=weight_decay)
    new_velocity = grad.add_(velocity, alpha=momentum) if momentum != 0 else grad
    return params.add_(new_velocity, alpha=-lr), new_velocity


def adam_update_flat(
    params: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`adam_update` on flat buffers, in place (``grad`` is consumed); returns the three buffers."""
    if weight_decay != 0:
        grad.add_(params, alpha=weight_decay)
    adam_flat_([params], [grad], [exp_avg], [exp_avg_sq], step, lr, betas, eps)
    return params, exp_avg, exp_avg_sq


def zeros_like(params: Params) -> Params:
    return {name: torch.zeros_like(p) for name, p in params.items()}


def detached_copy(params: Params) -> Params:
    return {name: p.detach().clone() for name, p in params.items()}


def point_posterior(params: Params) -> SamplePosterior:
    """A one-sample posterior (M = 1) at ``params``."""
    return SamplePosterior({name: p.detach().clone().unsqueeze(0) for name, p in params.items()})


# --- the methods ------------------------------------------------------------------------


@dataclass
class SGDState:
    params: Params
    velocity: Params
    num_steps: int = 0


@dataclass
class AdamState:
    params: Params
    exp_avg: Params
    exp_avg_sq: Params
    num_steps: int = 0


@register_method
@dataclass(frozen=True)
class SGD:
    """MAP / maximum-likelihood point estimate by SGD with momentum (see module doc)."""

    name: ClassVar[str] = "sgd"
    full_batch: ClassVar[bool] = False

    prior: GaussianPrior
    num_data: int
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    prior_weight: float = 0.01

    def __post_init__(self) -> None:
        check_common(self)
        check_number(self, "momentum", self.momentum, low=0.0, high=1.0, high_open=True)

    def init(self, params: Params, generator: torch.Generator | None = None) -> SGDState:
        start = detached_copy(params)
        return SGDState(start, zeros_like(start), 0)

    def step(
        self, state: SGDState, batch: Batch, nll: NLL, generator: torch.Generator | None = None
    ) -> tuple[SGDState, dict[str, float]]:
        layout = FlatLayout(state.params)
        params = layout.pack(state.params)
        grad, info = map_gradient_flat(layout, params, batch, nll, self.prior, self.prior_weight, self.num_data)
        params, velocity = sgd_update_flat(
            params, grad, layout.pack(state.velocity), self.lr, self.momentum, self.weight_decay
        )
        return SGDState(layout.views(params), layout.views(velocity), state.num_steps + 1), info

    def end_epoch(self, state: SGDState, epoch: int) -> SGDState:
        return state

    def posterior(self, state: SGDState) -> SamplePosterior:
        return point_posterior(state.params)


@register_method
@dataclass(frozen=True)
class Adam:
    """MAP / maximum-likelihood point estimate by bias-corrected Adam (see module doc)."""

    name: ClassVar[str] = "adam"
    full_batch: ClassVar[bool] = False

    prior: GaussianPrior
    num_data: int
    lr: float = 3e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    prior_weight: float = 0.01

    def __post_init__(self) -> None:
        check_common(self)
        check_betas(self)

    def init(self, params: Params, generator: torch.Generator | None = None) -> AdamState:
        start = detached_copy(params)
        return AdamState(start, zeros_like(start), zeros_like(start), 0)

    def step(
        self, state: AdamState, batch: Batch, nll: NLL, generator: torch.Generator | None = None
    ) -> tuple[AdamState, dict[str, float]]:
        layout = FlatLayout(state.params)
        params = layout.pack(state.params)
        grad, info = map_gradient_flat(layout, params, batch, nll, self.prior, self.prior_weight, self.num_data)
        step = state.num_steps + 1
        new, exp_avg, exp_avg_sq = adam_update_flat(
            params,
            grad,
            layout.pack(state.exp_avg),
            layout.pack(state.exp_avg_sq),
            step,
            self.lr,
            tuple(self.betas),
            self.eps,
            self.weight_decay,
        )
        return AdamState(layout.views(new), layout.views(exp_avg), layout.views(exp_avg_sq), step), info

    def end_epoch(self, state: AdamState, epoch: int) -> AdamState:
        return state

    def posterior(self, state: AdamState) -> SamplePosterior:
        return point_posterior(state.params)
