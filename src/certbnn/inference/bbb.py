"""Bayes by Backprop (Blundell et al. 2015): mean-field Gaussian VI by reparameterised gradients.

q(w) = prod_j N(mu_j, sigma_j^2) with sigma = softplus(rho). Each step draws S = ``num_samples``
weight sets w_s = mu + sigma * eps_s (eps_s ~ N(0, I)) as ONE stacked dict (leading dim S, so
the likelihood runs as one batched call) and takes an Adam step on (mu, rho) for the
per-example negative ELBO

    L(mu, rho) = (1/S) sum_s mean_batch nll(w_s) + kl_weight * KL(q || prior) / N,

N = ``num_data``; the KL is exact for Gaussians and summed over every coordinate of every
parameter (:meth:`GaussianPrior.kl_from`). With ``kl_weight = 1`` this is -ELBO / N, a proper
ELBO. ``kl_weight = t`` targets the tempered posterior p(D|w)^(1/t) p(w): for a Gaussian
likelihood with data precision A (= -Hessian of log p(D|w)) the mean-field optimum has
variances t / (A_jj + t / prior_std_j^2). Small t (e.g. 0.01) gives the narrower posteriors
that are much easier to certify (SPEC section 3): always report the value used. The default
is t = 0.01 (``certbnn train`` records it in metrics.json and the posterior's metadata): with
t = 1 and the default prior (variance 1 / fan_in) a 3-epoch run on 10k MNIST images reaches
85 % clean (76 % IBP-trained), with 0.01 and lr 3e-3 94 % (92 %) (docs/training.md, "Defaults").

Adam (Kingma & Ba 2015, bias-corrected, step t = 1, 2, ...) on theta in {mu, rho}:
``m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2;
theta <- theta - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)``,
moments kept as tensors in the state (checkpointable).

Initialisation: mu = the given params; sigma = ``init_std`` everywhere (default 1e-3, an
absolute std: small against the usual prior std sqrt(scale / fan_in), so training starts
near the deterministic net), i.e. rho = softplus^{-1}(init_std).
``posterior(state)`` is ``GaussianPosterior(mu, softplus(rho))``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from certbnn.errors import ConfigError
from certbnn.inference.base import NLL, Batch, Params, register_method
from certbnn.inference.flat import (
    FlatLayout,
    adam_flat_,
    flat_data_gradient,
    prior_flat,
    prior_precision_flat,
    randn_flat,
)
from certbnn.inference.sgd import check_betas, check_number, detached_copy, zeros_like
from certbnn.posterior import GaussianPosterior
from certbnn.posterior.paramdict import check_same_structure, sample_diag_gaussian
from certbnn.priors import GaussianPrior

__all__ = ["BBBState", "BayesByBackprop", "check_beta_pair", "check_variational", "inverse_softplus"]


def check_variational(method: Any) -> None:
    """ConfigError for a bad prior / num_data / lr / num_samples (shared by the VI methods)."""
    if not isinstance(method.prior, GaussianPrior):
        raise ConfigError(f"{method.name}: prior must be a GaussianPrior, got {type(method.prior).__name__}")
    for option in ("num_data", "num_samples"):
        value = getattr(method, option)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{method.name}: option {option} must be a positive int, got {value!r}")
    check_number(method, "lr", method.lr, low=0.0, low_open=True)


def check_beta_pair(method: Any) -> None:
    """ConfigError unless ``method.betas`` is a pair of numbers in [0, 1)."""
    betas = method.betas
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ConfigError(f"{method.name}: option betas must be a pair (beta1, beta2), got {betas!r}")
    for value in betas:
        check_number(method, "betas", value, low=0.0, high=1.0, high_open=True)


def check_params_match_prior(method: Any, params: Params) -> None:
    """ConfigError unless ``params`` has exactly the prior's names and shapes."""
    check_same_structure(method.prior.mean(), params, f"{method.name}'s prior", "initial params")


def inverse_softplus(sigma: Tensor) -> Tensor:
    """rho with softplus(rho) = sigma (sigma > 0), stable for tiny and large sigma."""
    return sigma + torch.log(-torch.expm1(-sigma))


@dataclass
class BBBState:
    mu: Params
    rho: Params
    exp_avg_mu: Params
    exp_avg_sq_mu: Params
    exp_avg_rho: Params
    exp_avg_sq_rho: Params
    num_steps: int = 0


@register_method
@dataclass(frozen=True)
class BayesByBackprop:
    """Mean-field Gaussian VI with the reparameterisation trick and Adam (see module doc).

    Options: ``lr`` (3e-3), ``num_samples`` (1), ``kl_weight`` (0.01; the temperature, 1 = ELBO),
    ``init_std`` (1e-3), ``betas`` ((0.9, 0.999)), ``eps`` (1e-8).
    """

    name: ClassVar[str] = "bbb"
    full_batch: ClassVar[bool] = False

    prior: GaussianPrior
    num_data: int
    lr: float = 3e-3
    num_samples: int = 1
    kl_weight: float = 0.01
    init_std: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self) -> None:
        check_variational(self)
        check_number(self, "kl_weight", self.kl_weight, low=0.0)
        check_number(self, "init_std", self.init_std, low=0.0, low_open=True)
        check_betas(self)

    def init(self, params: Params, generator: torch.Generator | None = None) -> BBBState:
        check_params_match_prior(self, params)
        mu = detached_copy(params)
        rho = {name: inverse_softplus(torch.full_like(m, float(self.init_std))) for name, m in mu.items()}
        return BBBState(mu, rho, zeros_like(mu), zeros_like(mu), zeros_like(rho), zeros_like(rho), 0)

    def loss(
        self, mu: Params, rho: Params, batch: Batch, nll: NLL, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(negative per-example ELBO, its data term, KL) at (mu, rho), one MC estimate."""
        x, y = batch
        sigma = {name: F.softplus(r) for name, r in rho.items()}
        weights = sample_diag_gaussian(mu, sigma, self.num_samples, generator)  # name -> (S, *shape)
        data_term = nll(weights, x, y).mean()  # (S, B) -> mean over samples of the batch mean
        kl = self.prior.kl_from(mu, sigma)
        return data_term + (self.kl_weight / self.num_data) * kl, data_term, kl

    def step(
        self, state: BBBState, batch: Batch, nll: NLL, generator: torch.Generator | None = None
    ) -> tuple[BBBState, dict[str, float]]:
        """One Adam step on (mu, rho) for the loss of :meth:`loss`, fused over flat buffers
        (:mod:`certbnn.inference.flat`): the noise is one ``(S, P)`` draw, the weights one
        set whose gradient is one ``(S, P)`` buffer, and the KL gradient is analytic:
        ``d/dmu = c (mu - m) / s^2``, ``d/dsigma = c (sigma / s^2 - 1 / sigma)``
        (prior N(m, s^2), ``c = kl_weight / N``), ``d/drho = d/dsigma * sigmoid(rho)``."""
        layout = FlatLayout(state.mu)
        mu, rho = layout.pack(state.mu), layout.pack(state.rho)
        noise = randn_flat(layout, self.num_samples, mu, generator)
        sigma = F.softplus(rho)
        weights = torch.addcmul(mu, sigma, noise)
        grad_w, data_term = flat_data_gradient(layout, weights, batch, nll)
        mean, _, log_std_sum = prior_flat(self.prior, layout, mu)
        precision = prior_precision_flat(self.prior, layout, mu)
        scale = self.kl_weight / self.num_data
        centred = mu if mean is None else mu - mean
        kl_quadratic = precision.quadratic(sigma, centred)  # sum (sigma^2 + (mu - m)^2) / s^2
        # the step's own buffers are reused (no fresh (P,) buffers): noise becomes grad_sigma, the
        # weights sigmoid(rho)
        if self.num_samples > 1:
            grad_mu, grad_sigma = grad_w.sum(0), noise.mul_(grad_w).sum(0)
        else:
            grad_sigma = noise[0].mul_(grad_w[0])
            grad_mu = grad_w[0]
        precision.add_scaled_(grad_mu, centred, scale)
        ones = sigma.new_ones(()).expand_as(sigma)  # - scale / sigma in one pass, no reciprocal buffer
        precision.add_scaled_(grad_sigma, sigma, scale).addcdiv_(ones, sigma, value=-scale)
        grad_rho = grad_sigma.mul_(torch.sigmoid(rho, out=weights[0]))
        kl = log_std_sum - sigma.log_().sum() + 0.5 * kl_quadratic - 0.5 * layout.numel
        step = state.num_steps + 1
        avg_mu, avg_rho = layout.pack(state.exp_avg_mu), layout.pack(state.exp_avg_rho)
        sq_mu, sq_rho = layout.pack(state.exp_avg_sq_mu), layout.pack(state.exp_avg_sq_rho)
        data_value, kl_value = torch.stack([data_term.detach(), kl.detach()]).tolist()  # before mu, rho change
        adam_flat_(
            [mu, rho],
            [grad_mu, grad_rho],
            [avg_mu, avg_rho],
            [sq_mu, sq_rho],
            step,
            self.lr,
            tuple(self.betas),
            self.eps,
        )
        info = {"loss": data_value + scale * kl_value, "nll": data_value, "kl": kl_value}
        views = layout.views
        return BBBState(views(mu), views(rho), views(avg_mu), views(sq_mu), views(avg_rho), views(sq_rho), step), info

    def end_epoch(self, state: BBBState, epoch: int) -> BBBState:
        return state

    def posterior(self, state: BBBState) -> GaussianPosterior:
        return GaussianPosterior(
            {n: m.detach().clone() for n, m in state.mu.items()},
            {n: F.softplus(r.detach()) for n, r in state.rho.items()},
        )
