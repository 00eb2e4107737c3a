"""Stochastic-gradient HMC (Chen, Fox & Guestrin 2014, ICML), minibatch.

Target: the tempered posterior p(D|w)^(1/T) p(w) (T = ``temperature``; T = 1 is the Bayesian
posterior), the same density every other method targets with ``--kl-weight T``. Its potential
and the minibatch estimate (prior gradient included)::

    U_T(w) = (N / T) * mean_{D} nll(w, x, y) - log p(w)
    U_tilde_T(w) = (N / T) * mean_batch nll(w, x, y) - log p(w)

Update in the "SGD with momentum" parameterisation (Chen et al. 2014, eq. 15) with friction
alpha = ``friction`` and learning rate eta = ``lr``, gradient-noise estimate beta_hat = 0::

    v <- (1 - alpha) v - eta (N grad mean_batch nll(w) - T grad log p(w)) + N(0, 2 alpha eta T)
    w <- w + v

i.e. Chen et al.'s update on U_T with learning rate eta T (eta T grad U_T is the gradient
term above, and the injected noise variance is 2 (alpha - beta_hat) (eta T)). Its stationary
distribution is exp(-U_T(w)) = p(D|w)^(1/T) p(w) up to O(eta) discretisation error and the
(ignored) minibatch gradient noise. (Before issue 11, ``temperature`` scaled only the noise,
so the chain targeted (p(D|w) p(w))^(1/T): the prior was tempered too.) T = 0 is noise-free
SGD with momentum on the mean NLL (maximum likelihood, the limit of the tempered posterior).
The velocity starts at 0.

Defaults: T = 0.01 (``certbnn train --kl-weight T`` sets it, and the trainer records it);
``lr`` None is 0.1 / N, so the data term takes the step of SGD with learning rate 0.1 and
momentum 1 - alpha = 0.9 on the mean loss (SGD's defaults): a fixed lr does not suit every
N (the data gradient grows like N); ``friction`` 0.1; ``thin`` 10 (a 3-epoch run on 10,000
images, batch 128, eps ramped over half the run, stores 11 samples; ``max_samples`` 100 keeps
the newest).

Sampling: the first ``num_burnin`` steps store nothing; afterwards a copy of the
position is stored every ``thin`` steps, with the eps of the step that produced it
(``state.sample_eps``). With ``max_samples`` set, only the newest ``max_samples`` are
kept (a FIFO window: the oldest sample is dropped). ``num_burnin=None`` (the default)
means "burn in while eps ramps": ``certbnn train`` sets it to the steps before eps
reaches its target (:meth:`SGHMC.for_schedule`) and refuses, before training, explicit
settings that would store a sample earlier or none at all; used directly, None is 0.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from certbnn.inference.base import NLL, Batch, Params, register_method, stored_samples_field
from certbnn.inference.flat import FlatLayout, flat_data_gradient, prior_flat, prior_precision_flat, randn_flat
from certbnn.inference.hmc import (
    check_count,
    check_number,
    check_params,
    check_prior,
    check_sample_window,
    copy_params,
    likelihood_eps,
    samples_posterior,
    store_sample,
)
from certbnn.posterior import SamplePosterior
from certbnn.priors import GaussianPrior

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class SGHMCState:
    position: Params
    velocity: Params
    num_steps: int
    samples: list[Params] = stored_samples_field()  # each written once by a checkpoint
    sample_eps: list[float | None] = field(default_factory=list)  # radius of each stored sample


@register_method
@dataclass(frozen=True)
class SGHMC:
    """Minibatch SG-HMC; options and update in the module docstring."""

    prior: GaussianPrior
    num_data: int
    lr: float | None = None
    friction: float = 0.1
    temperature: float = 0.01
    num_burnin: int | None = None
    thin: int = 10
    max_samples: int | None = 100

    name: ClassVar[str] = "sghmc"
    full_batch: ClassVar[bool] = False
    default_text: ClassVar[dict[str, str]] = {"lr": "0.1/N"}  # defaults that depend on N (``--help``)

    def __post_init__(self) -> None:
        check_prior(self.prior, self.num_data, 1)
        if self.lr is not None:
            check_number("lr", self.lr)
        check_number("friction", self.friction, 0.0, 1.0)
        check_number("temperature", self.temperature, 0.0, low_inclusive=True)
        check_count("num_burnin", self.num_burnin, 0, allow_none=True)
        check_count("thin", self.thin, 1)
        check_count("max_samples", self.max_samples, 1, allow_none=True)

    @property
    def learning_rate(self) -> float:
        """eta: ``lr``, or by default 0.1 / N (module docstring)."""
        return float(self.lr) if self.lr is not None else 0.1 / self.num_data

    @property
    def burnin(self) -> int:
        """Burn-in steps (``num_burnin``; None is 0 when used without a schedule)."""
        return self.num_burnin or 0

    def for_schedule(
        self, first_target_step: int, total_steps: int, steps_per_epoch: int = 1, context: str = ""
    ) -> SGHMC:
        """As :meth:`certbnn.inference.hmc.HMC.for_schedule`: ``num_burnin=None`` becomes the
        steps before eps reaches its target; ConfigError for a sample before it or none at all."""
        method = self if self.num_burnin is not None else dataclasses.replace(self, num_burnin=first_target_step)
        check_sample_window(
            "sghmc",
            f"num_burnin={method.num_burnin}, thin={method.thin}",
            method.burnin + method.thin - 1,
            first_target_step,
            total_steps,
            context,
        )
        return method

    def sampling_metadata(self, state: SGHMCState) -> dict[str, list[float | None]]:
        """``{"sample_eps": [...]}``: the radius each stored sample was drawn at."""
        return {"sample_eps": list(state.sample_eps)}

    def init(self, params: Params, generator: torch.Generator | None = None) -> SGHMCState:
        check_params(params, self.prior)
        position = copy_params(params)
        return SGHMCState(
            position=position, velocity={n: torch.zeros_like(w) for n, w in position.items()}, num_steps=0, samples=[]
        )

    def step(
        self, state: SGHMCState, batch: Batch, nll: NLL, generator: torch.Generator
    ) -> tuple[SGHMCState, dict[str, float]]:
        lr, temperature = self.learning_rate, self.temperature
        layout = FlatLayout(state.position)
        flat = layout.pack(state.position)
        grad, data_term = flat_data_gradient(layout, flat, batch, nll)  # grad of the batch-mean nll
        mean, _, log_std_sum = prior_flat(self.prior, layout, flat)
        precision = prior_precision_flat(self.prior, layout, flat)
        centred = flat if mean is None else flat - mean
        log_prior = -0.5 * precision.quadratic(centred) - log_std_sum - layout.numel * _LOG_SQRT_2PI
        # v <- (1 - alpha) v - lr (N grad nll + T pull) + noise, pull = (w - m) / s^2 = -grad log p(w)
        # (T * grad U_tilde_T = N grad nll + T pull)
        noise = randn_flat(layout, 1, flat, generator)[0]
        velocity = precision.add_scaled_(grad.mul_(-lr * self.num_data), centred, -lr * temperature)
        velocity.add_(layout.pack(state.velocity), alpha=1.0 - self.friction)
        velocity.add_(noise, alpha=(2.0 * self.friction * lr * temperature) ** 0.5)
        position, velocity = layout.views(flat.add_(velocity)), layout.views(velocity)  # in place (donated)
        num_steps = state.num_steps + 1
        samples, sample_eps = state.samples, state.sample_eps
        if num_steps > self.burnin and (num_steps - self.burnin) % self.thin == 0:
            samples, sample_eps = store_sample(samples, sample_eps, position, likelihood_eps(nll), self.max_samples)
        new = SGHMCState(
            position=position, velocity=velocity, num_steps=num_steps, samples=samples, sample_eps=sample_eps
        )
        data_value, prior_value = torch.stack([data_term.detach(), log_prior.detach()]).tolist()  # one sync
        info = {"nll": data_value, "num_samples": float(len(samples))}
        if temperature > 0:  # U_tilde_T (at T = 0 there is no density, only the mean NLL)
            info["potential"] = self.num_data * data_value / temperature - prior_value
        return new, info

    def end_epoch(self, state: SGHMCState, epoch: int) -> SGHMCState:
        return state

    def posterior(self, state: SGHMCState) -> SamplePosterior:
        return samples_posterior(state.samples, "sghmc")
