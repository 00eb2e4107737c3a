"""NoisyAdam / Vadam: variational Adam by weight perturbation (Khan et al. 2018, "Fast and
Scalable Bayesian Deep Learning by Weight-Perturbation in Adam", Algorithm 1 "Vadam";
cf. Zhang et al. 2018 "Noisy Natural Gradient as Variational Inference", Noisy Adam).

q(w) = prod_j N(mu_j, 1 / (N s_j + lambda_j)), with N = ``num_data`` and lambda_j = 1 / prior_std_j^2
the per-coordinate prior precision. One step (t = 1, 2, ...), all ops per coordinate:

    w_k    = mu + eps_k / sqrt(N s + lambda),  eps_k ~ N(0, I),  k = 1..S  (S = num_samples)
    g_k    = grad_w mean_batch nll(w_k)                       (gradient of the data term only)
    m      <- b1 m + (1 - b1) (mean_k g_k + lambda (mu - mu_prior) / N)
    s      <- b2 s + (1 - b2) mean_k g_k^2
    mu     <- mu - lr (m / (1 - b1^t)) / (sqrt((s - b2^t s_0) / (1 - b2^t)) + lambda / N)

as Algorithm 1 of Khan et al. (and their reference PyTorch ``Vadam``): the noise uses the raw s,
the mean update the bias-corrected moments; with S > 1 the MC averages of g and g^2 are used;
mu_prior = 0 in the paper, a non-zero prior mean enters through the gradient of -log p(w) / N.
One deliberate difference: the bias correction of s removes the initial value's share
b2^t s_0 (exact debiasing of the average of g^2). The reference divides the whole s by
(1 - b2^t), which for s_0 > 0 inflates the denominator by b2^t s_0 / (1 - b2^t) and stalls
the first ~1 / (1 - b2) steps with the default s_0 > 0; the two agree for s_0 = 0.

``posterior(state)`` is ``GaussianPosterior(mu, 1 / sqrt(N s + lambda))`` with the raw s used
for the noise -- a precision converted to a std (the original code saved raw s as a std).
``init_precision`` >= 0 is the initial data precision N s_0 (s_0 = init_precision / N), so
q_0 = N(params, 1 / (init_precision + lambda)). The default (None) is s_0 = ``DEFAULT_INIT_S``
= 0.1, i.e. init_precision = 0.1 N: q_0 starts narrow (std ~ 1 / sqrt(0.1 N), 3e-3 for the
tempered N = 1e6 of a 10k-image run), independent of the data-set size. The reference code's
init_precision 0 starts at the prior's width (std 1 / sqrt(fan_in) ~ 0.036 on MNIST): the noise
then swamps the weights until s has grown (~1 / (1 - b2) steps), and a 3-epoch MNIST run
reaches only 62 % (docs/training.md, "Defaults").

Known approximation: s tracks the square of the *minibatch-mean* gradient (Adam's second
moment), not the Gauss-Newton / Fisher diagonal, so N s is not the data precision: for
full-batch linear regression (N = n) the fixed point is N s_j = E[((A w - b)_j)^2] / N, of
order A^2 sigma^2 / N instead of A_jj. The mean is right; the std is only in the right
ballpark (too wide for large N) and depends on the batch size. VOGN learns the curvature.

Temperature: with ``kl_weight`` = t every N above is N / t (the tempered posterior
p(D|w)^(1/t) p(w), the same knob as BBB's KL weight; t < 1 narrows the posterior). The
default t = 0.01 (with lr 3e-3) is the tempered posterior that trains and certifies (docs/training.md,
"Defaults"); ``kl_weight=1`` is the Bayesian posterior.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from certbnn.inference.base import NLL, Batch, Params, grad_of, register_method, requires_grad
from certbnn.inference.bbb import check_beta_pair, check_params_match_prior, check_variational
from certbnn.inference.flat import FlatLayout, flat_data_gradient, prior_flat, prior_precision_flat, randn_flat
from certbnn.inference.sgd import check_number, detached_copy, zeros_like
from certbnn.posterior import GaussianPosterior
from certbnn.priors import GaussianPrior

__all__ = ["DEFAULT_INIT_S", "NoisyAdam", "NoisyAdamState", "precision_std", "prior_precision", "prior_pull"]

DEFAULT_INIT_S = 0.1  # s_0 when init_precision is None (init_precision = 0.1 N / kl_weight)


def prior_precision(prior: GaussianPrior, like: Params) -> Params:
    """lambda = 1 / prior_std^2 per coordinate, on the device/dtype of ``like``."""
    return {name: std.to(like[name]).pow(-2) for name, std in prior.std().items()}


def precision_std(s: Params, lam: Params, num_data: int) -> Params:
    """std = 1 / sqrt(N s + lambda) per coordinate."""
    return {name: torch.rsqrt(num_data * s[name] + lam[name]) for name in s}


def prior_pull(mean: Params, prior: GaussianPrior, lam: Params, num_data: int) -> Params:
    """Gradient of -log p(mu) / N: lambda (mu - mu_prior) / N."""
    prior_mean = prior.mean()
    return {name: lam[name] * (m - prior_mean[name].to(m)) / num_data for name, m in mean.items()}


def data_gradients(weights: Params, batch: Batch, nll: NLL) -> tuple[Params, Tensor]:
    """Per-sample gradients of mean_batch nll at stacked weights (S, *shape), and the mean nll."""
    x, y = batch
    leaves = requires_grad(weights)
    per_sample = nll(leaves, x, y).mean(-1)  # (S,)
    return grad_of(per_sample.sum(), leaves), per_sample.detach().mean()


@dataclass
class NoisyAdamState:
    mean: Params
    exp_avg: Params
    exp_avg_sq: Params
    num_steps: int = 0


@dataclass(frozen=True)
class PrecisionVI:
    """Options and plumbing shared by NoisyAdam and VOGN: a diagonal Gaussian with precision
    N s + lambda (N = ``effective_data``), ``init_precision`` the initial N s (None:
    ``DEFAULT_INIT_S`` N), ``kl_weight`` the temperature (default 0.01, tempered)."""

    prior: GaussianPrior
    num_data: int
    lr: float = 3e-3
    betas: tuple[float, float] = (0.9, 0.999)
    num_samples: int = 1
    init_precision: float | None = None
    kl_weight: float = 0.01

    def __post_init__(self) -> None:
        check_variational(self)
        check_beta_pair(self)
        if self.init_precision is not None:
            check_number(self, "init_precision", self.init_precision, low=0.0)
        check_number(self, "kl_weight", self.kl_weight, low=0.0, low_open=True)

    @property
    def effective_data(self) -> float:
        """N / kl_weight: the tempered posterior p(D|w)^(1/kl_weight) p(w), the same knob as
        BBB's KL weight (kl_weight < 1 sharpens the posterior around the data fit)."""
        return self.num_data / self.kl_weight

    @property
    def initial_precision(self) -> float:
        """The initial data precision N s_0: ``init_precision``, or ``DEFAULT_INIT_S`` N when None."""
        if self.init_precision is None:
            return DEFAULT_INIT_S * self.effective_data
        return float(self.init_precision)

    def initial_moments(self, params: Params) -> tuple[Params, Params, Params]:
        """(mean = params, first moment = 0, s_0 = initial_precision / N)."""
        check_params_match_prior(self, params)
        mean = detached_copy(params)
        s0 = {name: torch.full_like(m, self.initial_precision / self.effective_data) for name, m in mean.items()}
        return mean, zeros_like(mean), s0

    def end_epoch(self, state, epoch: int):
        return state

    def gaussian(self, mean: Params, s: Params) -> GaussianPosterior:
        """The posterior N(mean, 1 / (N s + lambda)): a precision turned into a std."""
        lam = prior_precision(self.prior, mean)
        return GaussianPosterior(
            {n: m.detach().clone() for n, m in mean.items()},
            precision_std({n: v.detach() for n, v in s.items()}, lam, self.effective_data),
        )


@register_method
@dataclass(frozen=True)
class NoisyAdam(PrecisionVI):
    """Vadam (see module doc). Options: ``lr`` (3e-3), ``betas`` ((0.9, 0.999)),
    ``num_samples`` (1), ``init_precision`` (None: 0.1 N, the initial N s), ``kl_weight`` (0.01)."""

    name: ClassVar[str] = "noisy-adam"
    full_batch: ClassVar[bool] = False

    def init(self, params: Params, generator: torch.Generator | None = None) -> NoisyAdamState:
        return NoisyAdamState(*self.initial_moments(params), 0)

    def step(
        self, state: NoisyAdamState, batch: Batch, nll: NLL, generator: torch.Generator | None = None
    ) -> tuple[NoisyAdamState, dict[str, float]]:
        layout = FlatLayout(state.mean)
        mu, m_old, s_old = layout.pack(state.mean), layout.pack(state.exp_avg), layout.pack(state.exp_avg_sq)
        prior_mean, _, _ = prior_flat(self.prior, layout, mu)
        lam = prior_precision_flat(self.prior, layout, mu)
        n_eff, S = self.effective_data, self.num_samples
        # one (P,) work buffer: first 1 / sqrt(s + lambda / N), later the update's denominator;
        # w_k = mu + eps_k / sqrt(N s + lambda) = mu + N^(-1/2) eps_k work, over the noise buffer
        work = lam.shifted(s_old, 1.0 / n_eff).rsqrt_()
        noise = randn_flat(layout, S, mu, generator)
        weights = torch.addcmul(mu, work, noise, value=n_eff**-0.5, out=noise)
        # (S, P): gradient of the mean over samples and batch = the per-sample gradients g_k / S
        grads, nll_value = flat_data_gradient(layout, weights, batch, nll)
        beta1, beta2 = self.betas
        step = state.num_steps + 1
        correction1, correction2 = 1.0 - beta1**step, 1.0 - beta2**step
        initial_share = beta2**step * self.initial_precision / n_eff  # b2^t s_0
        centred = mu if prior_mean is None else mu - prior_mean
        # m <- b1 m + (1 - b1) (mean_k g_k + lambda (mu - mu_prior) / N);  s <- b2 s + (1 - b2) mean_k g_k^2
        # (1 - b2) mean_k g_k^2 as (sum_k (g_k / S)^2) (S (1 - b2)); one sample: b2 s + (1 - b2) g^2 by one
        # addcmul_ (s - b2^t s_0 cancels below: the reference test pins the rounding's effect)
        if S == 1:
            g = grads[0]
            exp_avg_sq = s_old.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        else:
            g = grads.sum(0)
            exp_avg_sq = s_old.mul_(beta2).add_(grads.square_().sum(0).mul_(S * (1.0 - beta2)))
        # in place (donated; g is this step's own buffer): m <- m + (1 - b1) (target - m), one pass
        exp_avg = m_old.lerp_(lam.add_scaled_(g, centred, 1.0 / n_eff), 1.0 - beta1)
        # mu <- mu - (lr / c1) m / (sqrt((s - b2^t s_0) / c2) + lambda / N)
        #     = mu - (lr sqrt(c2) / c1) m / (sqrt(s - b2^t s_0) + sqrt(c2) lambda / N)   (one pass fewer)
        root_c2 = math.sqrt(correction2)
        denominator = torch.sub(exp_avg_sq, initial_share, out=work).clamp_min_(0.0).sqrt_()
        lam.add_scaled_(denominator, None, root_c2 / n_eff)
        mean = mu.addcdiv_(exp_avg, denominator, value=-self.lr * root_c2 / correction1)
        views = layout.views
        return NoisyAdamState(views(mean), views(exp_avg), views(exp_avg_sq), step), {"nll": float(nll_value)}

    def posterior(self, state: NoisyAdamState) -> GaussianPosterior:
        return self.gaussian(state.mean, state.exp_avg_sq)
