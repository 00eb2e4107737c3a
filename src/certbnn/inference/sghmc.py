"""Stochastic-gradient HMC (Chen, Fox & Guestrin 2014, ICML), minibatch.

Minibatch potential (prior gradient included)::

    U_tilde(w) = N * mean_batch nll(w, x, y) - log p(w)

Update in the "SGD with momentum" parameterisation (Chen et al. 2014, eq. 15, with
learning rate eta = ``lr`` = eps^2 M^{-1}, friction alpha = ``friction`` = eps M^{-1} C,
temperature T = ``temperature``, and gradient-noise estimate beta_hat = 0)::

    v <- (1 - alpha) v - eta grad U_tilde(w) + N(0, 2 alpha eta T)
    w <- w + v

so the injected noise variance is 2 (alpha - beta_hat) eta T with beta_hat = 0; the
stationary distribution is ~ exp(-U / T) up to O(eta) discretisation error and the
(ignored) minibatch gradient noise. The velocity starts at 0. Because U is the
N-scaled potential, ``lr`` is about (an SGD learning rate on the mean loss) / N.

Sampling: the first ``num_burnin`` steps store nothing; afterwards a copy of the
position is stored every ``thin`` steps, with the eps of the step that produced it
(``state.sample_eps``). With ``max_samples`` set, only the newest ``max_samples`` are
kept (a FIFO window: the oldest sample is dropped). ``num_burnin=None`` (the default)
means "burn in while eps ramps": ``certbnn train`` sets it to the steps before eps
reaches its target (:meth:`SGHMC.for_schedule`) and refuses, before training, explicit
settings that would store a sample earlier or none at all; used directly, None is 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import dataclasses

import torch

from certbnn.inference.base import NLL, Batch, Params, grad_of, register_method, requires_grad
from certbnn.inference.hmc import (check_count, check_number, check_params, check_prior, check_sample_window,
                                   copy_params, likelihood_eps, randn_like, samples_posterior, store_sample)
from certbnn.posterior import SamplePosterior
from certbnn.priors import GaussianPrior


@dataclass
class SGHMCState:
    position: Params
    velocity: Params
    num_steps: int
    samples: list[Params] = field(default_factory=list)
    sample_eps: list[float | None] = field(default_factory=list)  # radius of each stored sample


@register_method
@dataclass(frozen=True)
class SGHMC:
    """Minibatch SG-HMC; options and update in the module docstring."""

    prior: GaussianPrior
    num_data: int
    lr: float = 1e-6
    friction: float = 0.1
    temperature: float = 1.0
    num_burnin: int | None = None
    thin: int = 100
    max_samples: int | None = 100

    name: ClassVar[str] = "sghmc"
    full_batch: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check_prior(self.prior, self.num_data, 1)
        check_number("lr", self.lr)
        check_number("friction", self.friction, 0.0, 1.0)
        check_number("temperature", self.temperature, 0.0, low_inclusive=True)
        check_count("num_burnin", self.num_burnin, 0, allow_none=True)
        check_count("thin", self.thin, 1)
        check_count("max_samples", self.max_samples, 1, allow_none=True)

    @property
    def burnin(self) -> int:
        """Burn-in steps (``num_burnin``; None is 0 when used without a schedule)."""
        return self.num_burnin or 0

    def for_schedule(self, first_target_step: int, total_steps: int, steps_per_epoch: int = 1,
                     context: str = "") -> SGHMC:
        """As :meth:`certbnn.inference.hmc.HMC.for_schedule`: ``num_burnin=None`` becomes the
        steps before eps reaches its target; ConfigError for a sample before it or none at all."""
        method = self if self.num_burnin is not None else dataclasses.replace(self, num_burnin=first_target_step)
        check_sample_window("sghmc", f"num_burnin={method.num_burnin}, thin={method.thin}",
                            method.burnin + method.thin - 1, first_target_step, total_steps, context)
        return method

    def sampling_metadata(self, state: SGHMCState) -> dict[str, list[float | None]]:
        """``{"sample_eps": [...]}``: the radius each stored sample was drawn at."""
        return {"sample_eps": list(state.sample_eps)}

    def init(self, params: Params, generator: torch.Generator | None = None) -> SGHMCState:
        check_params(params, self.prior)
        position = copy_params(params)
        return SGHMCState(position=position, velocity={n: torch.zeros_like(w) for n, w in position.items()},
                          num_steps=0, samples=[])

    def step(self, state: SGHMCState, batch: Batch, nll: NLL,
             generator: torch.Generator) -> tuple[SGHMCState, dict[str, float]]:
        x, y = batch
        w = requires_grad(state.position)
        with torch.enable_grad():
            data_term = nll(w, x, y).mean()
            potential = self.num_data * data_term - self.prior.log_prob(w)
            grad = grad_of(potential, w)
        noise_std = (2.0 * self.friction * self.lr * self.temperature) ** 0.5
        velocity, position = {}, {}
        for n, v in state.velocity.items():
            noise = randn_like(v, generator) * noise_std
            velocity[n] = (1.0 - self.friction) * v - self.lr * grad[n] + noise
            position[n] = state.position[n] + velocity[n]
        num_steps = state.num_steps + 1
        samples, sample_eps = state.samples, state.sample_eps
        if num_steps > self.burnin and (num_steps - self.burnin) % self.thin == 0:
            samples, sample_eps = store_sample(samples, sample_eps, position, likelihood_eps(nll), self.max_samples)
        new = SGHMCState(position=position, velocity=velocity, num_steps=num_steps, samples=samples,
                         sample_eps=sample_eps)
        values = torch.stack([potential.detach(), data_term.detach()]).tolist()  # one device sync
        info = {"potential": values[0], "nll": values[1], "num_samples": float(len(samples))}
        return new, info

    def end_epoch(self, state: SGHMCState, epoch: int) -> SGHMCState:
        return state

    def posterior(self, state: SGHMCState) -> SamplePosterior:
        return samples_posterior(state.samples, "sghmc")
