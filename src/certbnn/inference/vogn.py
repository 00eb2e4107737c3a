"""VOGN: Variational Online Gauss-Newton (Khan et al. 2018, "Fast and Scalable Bayesian Deep
Learning by Weight-Perturbation in Adam"; Osawa et al. 2019, "Practical Deep Learning with
Bayesian Principles").

q(w) = prod_j N(mu_j, 1 / (N (s_j + lambda_j / N))), N = ``num_data`` (from the data set, never
hard-coded), lambda_j = 1 / prior_std_j^2. One step (t = 1, 2, ...), per coordinate:

    w_k    = mu + eps_k / sqrt(N s + lambda),  eps_k ~ N(0, I),  k = 1..S  (S = num_samples)
    g_ki   = grad_w nll(w_k; x_i, y_i)               per-example gradients, i in the batch (size B)
    g_hat  = mean_{k,i} g_ki,   h_hat = mean_{k,i} g_ki^2
             (the Gauss-Newton diagonal approximated by squared per-example gradients)
    s      <- b2 s + (1 - b2) h_hat
    m      <- b1 m + (1 - b1) (g_hat + lambda (mu - mu_prior) / N)
    mu     <- mu - lr (m / (1 - b1^t)) / (s + lambda / N + damping)

Beta convention: ``betas = (b1, b2)`` are *decay* rates of exponential moving averages, as in
Adam. Khan et al. (2018) write s <- (1 - beta) s + beta h_hat, i.e.
their beta is our 1 - b2. s is initialised to ``init_precision / N`` (so q_0 = N(params,
1 / (init_precision + lambda))) and is not bias-corrected (its initial value is a genuine
estimate); m is bias-corrected like Adam's.

Initial precision (default None: s_0 = 0.1, i.e. init_precision = 0.1 N, whatever N): s_0 is
also the damping of the first steps, which are mu <- mu - lr m / s_0, momentum SGD at rate
lr / s_0 = 1 with the default lr 0.1, until s (decaying from s_0 by b2 per step) has learnt
the curvature. With s_0 = 0 (the reference code's default) the first steps are undamped
Newton steps lr N m / lambda on the prior precision alone: with the tempered N = 1e6 of a
10k-image run that is ~100 lr times the gradient, and a robust 3-epoch run ends near chance.
s_0 = 0.1 N also starts q narrow (std ~ 1 / sqrt(0.1 N)) instead of as wide as the prior.
``posterior(state)`` is ``GaussianPosterior(mu, 1 / sqrt(N s + lambda))``.

The step is a natural-gradient step: its size is lr times the posterior variance, so VOGN
tolerates large learning rates (0.1 and beyond; lr = 1 with b1 = 0 is a diagonal
Gauss-Newton step). The default lr is 0.1 (with s_0 = 0.1: measured in docs/training.md,
"Defaults").

Squared gradients (``per_example``): ``"analytic"`` computes mean_{k,i} g_ki and
mean_{k,i} g_ki^2 without per-example gradient tensors (:mod:`certbnn.inference.squared_grads`):
for a Linear weight used on paths p (clean pass, IBP centre, IBP radius through |W|) with inputs
a_p, output gradients g_p and derivatives s_p (1 or sign W), sum_i g_i^2 is
sum_{p,q} s_p s_q (g_p g_q)^T (a_p a_q), a few GEMMs of the layer's size; Conv2d kernels, biases
and the margin fold are materialised per example (small). It covers the standard, gaussian,
plain-IBP (logits or margins, both mixes) and fgsm/pgd likelihoods on Sequential models of
Linear, Conv2d, activations, pooling and Flatten, weights used on several paths included, and
refuses (ConfigError) anything else. ``"auto"`` (default) takes it where it applies and
otherwise warns once (:class:`AnalyticFallbackWarning`: CROWN / CROWN-IBP likelihoods, BatchNorm
weights, unknown uses of a weight) and uses per-example gradients; the result is the same up to
float rounding (tests/inference/test_vogn_sqgrad.py). Per-example gradients: ``"vmap"`` uses
``torch.func.vmap(grad(...))`` over the examples (and the samples); ``"copies"`` replicates the
weights once per example (S * B copies, one leading sample dim), evaluates every copy on the
whole batch and reads example i's loss off copy i -- exact, B times the forward cost, for
likelihoods whose code is not vmap-able; vmap falls back to copies with a warning. Memory for
those gradients is S * B * (number of weights). (With copies, an attack-based likelihood attacks
the mean loss over the copies, i.e. over the S samples, as in a stacked call.) An adversarial
:class:`~certbnn.likelihoods.BatchNLL` (``attack_stage``) is split: the batch is attacked once,
against the mean loss over the S samples, then the gradients of the mixed loss are taken at
those fixed inputs (analytic and vmap alike) -- the same gradients as copies.

Temperature: with ``kl_weight`` = t every N above is N / t (the tempered posterior
p(D|w)^(1/t) p(w), the same knob as BBB's KL weight; t < 1 narrows the posterior). Default
t = 0.01 (docs/training.md, "Defaults"); ``kl_weight=1`` is the Bayesian posterior.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor
from torch.func import grad, vmap

from certbnn.errors import ConfigError
from certbnn.inference.base import NLL, Batch, Params, grad_of, register_method
from certbnn.inference.noisy_adam import PrecisionVI, precision_std, prior_precision, prior_pull
from certbnn.inference.sgd import check_number
from certbnn.inference.squared_grads import Moments, analytic_moments
from certbnn.posterior import GaussianPosterior
from certbnn.posterior.paramdict import sample_diag_gaussian

__all__ = ["PER_EXAMPLE_MODES", "VOGN", "VOGNState", "gradient_moments", "per_example_grads"]

PER_EXAMPLE_MODES = ("auto", "analytic", "vmap", "copies")


class PerExampleFallbackWarning(UserWarning):
    """vmap could not trace the likelihood; per-example gradients use weight copies instead."""


class AnalyticFallbackWarning(UserWarning):
    """The analytic squared-gradient sums cannot handle the likelihood or model; per-example
    gradients (vmap, else weight copies) are used instead."""


def _vmap_grads(weights: Params, batch: Batch, nll: NLL) -> tuple[Params, Tensor]:
    x, y = batch
    if getattr(nll, "attack_stage", False):  # an adversarial likelihood: attack once, outside vmap
        x_adv = nll.adversarial_inputs(weights, x, y)

        def one_attacked(w: Params, xi: Tensor, ai: Tensor, yi: Tensor) -> tuple[Tensor, Tensor]:
            value = nll.nll_at(w, xi.unsqueeze(0), ai.unsqueeze(0), yi.unsqueeze(0)).squeeze(0)
            return value, value.detach()

        over_examples = vmap(grad(one_attacked, has_aux=True), in_dims=(None, 0, 0, 0))
        return vmap(over_examples, in_dims=(0, None, None, None))(weights, x, x_adv, y)

    def one_example(w: Params, xi: Tensor, yi: Tensor) -> tuple[Tensor, Tensor]:
        value = nll(w, xi.unsqueeze(0), yi.unsqueeze(0)).squeeze(0)
        return value, value.detach()

    # randomness="different": a likelihood's own draws (e.g. a PGD random start) differ per example
    over_examples = vmap(grad(one_example, has_aux=True), in_dims=(None, 0, 0), randomness="different")
    return vmap(over_examples, in_dims=(0, None, None), randomness="different")(weights, x, y)


def _copies_grads(weights: Params, batch: Batch, nll: NLL) -> tuple[Params, Tensor]:
    x, y = batch
    num_samples, batch_size = next(iter(weights.values())).shape[0], x.shape[0]
    copies = {
        name: w.detach()
        .unsqueeze(1)
        .expand(num_samples, batch_size, *w.shape[1:])
        .reshape(num_samples * batch_size, *w.shape[1:])
        .clone()
        .requires_grad_(True)
        for name, w in weights.items()
    }
    values = nll(copies, x, y).reshape(num_samples, batch_size, batch_size).diagonal(dim1=1, dim2=2)
    grads = grad_of(values.sum(), copies)
    return ({name: g.reshape(num_samples, batch_size, *g.shape[1:]) for name, g in grads.items()}, values.detach())


def per_example_grads(weights: Params, batch: Batch, nll: NLL, mode: str = "auto") -> tuple[Params, Tensor]:
    """Gradients of nll(w_k; x_i, y_i) for stacked weights (S, *shape) and a batch of B examples:
    name -> (S, B, *shape), and the nll values (S, B). See the module doc for the modes."""
    if mode == "copies":
        return _copies_grads(weights, batch, nll)
    try:
        return _vmap_grads(weights, batch, nll)
    except (RuntimeError, NotImplementedError) as exc:
        if mode == "vmap":
            raise
        warnings.warn(
            f"per-example gradients by vmap failed ({str(exc).splitlines()[0][:120]}); "
            "using weight copies (exact, B times the forward cost)",
            PerExampleFallbackWarning,
            stacklevel=3,
        )
        return _copies_grads(weights, batch, nll)


def gradient_moments(weights: Params, batch: Batch, nll: NLL, mode: str = "auto") -> Moments:
    """``mean_{k,i} g_ki`` and ``mean_{k,i} g_ki^2`` per name (the parameter's shape) and the nll
    values (S, B), for stacked weights (S, *shape). ``"auto"``/``"analytic"``: the sums of
    :mod:`certbnn.inference.squared_grads`; where those do not apply, ``"auto"`` warns once
    (:class:`AnalyticFallbackWarning`) and uses per-example gradients, ``"analytic"`` raises
    ConfigError. ``"vmap"``/``"copies"``: per-example gradients (:func:`per_example_grads`)."""
    if mode in ("auto", "analytic"):
        moments, reason = analytic_moments(weights, batch, nll)
        if moments is not None:
            return moments
        if mode == "analytic":
            raise ConfigError(
                f"vogn: per_example='analytic' cannot handle this likelihood or model ({reason}); "
                "use per_example='auto'"
            )
        warnings.warn(
            f"vogn: analytic squared gradients do not apply ({reason}); using per-example gradients (exact, slower)",
            AnalyticFallbackWarning,
            stacklevel=3,
        )
    grads, values = per_example_grads(weights, batch, nll, mode)
    return {n: g.mean((0, 1)) for n, g in grads.items()}, {n: (g * g).mean((0, 1)) for n, g in grads.items()}, values


@dataclass
class VOGNState:
    mean: Params
    exp_avg: Params
    precision: Params  # s: N s + lambda is the posterior precision
    num_steps: int = 0


@register_method
@dataclass(frozen=True)
class VOGN(PrecisionVI):
    """Variational Online Gauss-Newton (see module doc). Options: ``lr`` (0.1), ``betas``
    ((0.9, 0.999), EMA decays), ``num_samples`` (1), ``init_precision`` (None: 0.1 N, the
    initial N s), ``kl_weight`` (0.01, the temperature), ``per_example`` ("auto": analytic
    squared-gradient sums where they apply, else per-example gradients)."""

    name: ClassVar[str] = "vogn"
    full_batch: ClassVar[bool] = False

    lr: float = 0.1
    damping: float = 0.1
    per_example: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number(self, "damping", self.damping, low=0.0)
        if self.per_example not in PER_EXAMPLE_MODES:
            raise ConfigError(
                f"vogn: option per_example must be one of {', '.join(PER_EXAMPLE_MODES)}, got {self.per_example!r}"
            )

    def init(self, params: Params, generator: torch.Generator | None = None) -> VOGNState:
        return VOGNState(*self.initial_moments(params), 0)

    def step(
        self, state: VOGNState, batch: Batch, nll: NLL, generator: torch.Generator | None = None
    ) -> tuple[VOGNState, dict[str, float]]:
        lam = prior_precision(self.prior, state.mean)
        std = precision_std(state.precision, lam, self.effective_data)
        weights = sample_diag_gaussian(state.mean, std, self.num_samples, generator)
        comm = getattr(nll, "comm", None)  # distributed: reduce the batch statistics explicitly
        g_means, g_squares, values = gradient_moments(weights, batch, nll.local() if comm else nll, self.per_example)
        pull = prior_pull(state.mean, self.prior, lam, self.effective_data)
        beta1, beta2 = self.betas
        step = state.num_steps + 1
        correction1 = 1.0 - beta1**step
        mean, exp_avg, precision = {}, {}, {}
        for name, mu in state.mean.items():
            g_mean, g_square = g_means[name], g_squares[name]
            if comm:  # equal shards: the mean of the ranks' means is the global batch mean
                g_mean, g_square = comm.all_reduce(g_mean, "mean"), comm.all_reduce(g_square, "mean")
            s = beta2 * state.precision[name] + (1.0 - beta2) * g_square
            m = beta1 * state.exp_avg[name] + (1.0 - beta1) * (g_mean + pull[name])
            mean[name] = mu - (self.lr / correction1) * m / (s + lam[name] / self.effective_data + self.damping)
            exp_avg[name], precision[name] = m, s
        value = values.mean()
        return VOGNState(mean, exp_avg, precision, step), {
            "nll": float(comm.all_reduce(value, "mean") if comm else value)
        }

    def posterior(self, state: VOGNState) -> GaussianPosterior:
        return self.gaussian(state.mean, state.precision)
