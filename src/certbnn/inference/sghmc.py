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
position is stored every ``thin`` steps. With ``max_samples`` set, only the newest
``max_samples`` are kept (a FIFO window: the oldest sample is dropped).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from certbnn.inference.base import NLL, Batch, Params, grad_of, register_method, requires_grad
from certbnn.inference.hmc import (check_count, check_number, check_params, check_prior, copy_params, randn_like,
                                   samples_posterior, store_sample)
from certbnn.posterior import SamplePosterior
from certbnn.priors import GaussianPrior


@dataclass
class SGHMCState:
    position: Params
    velocity: Params
    num_steps: int
    samples: list[Params] = field(default_factory=list)


@register_method
@dataclass(frozen=True)
class SGHMC:
    """Minibatch SG-HMC; options and update in the module docstring."""

    prior: GaussianPrior
    num_data: int
    lr: float = 1e-6
    friction: float = 0.1
    temperature: float = 1.0
    num_burnin: int = 1000
    thin: int = 100
    max_samples: int | None = 100

    name: ClassVar[str] = "sghmc"
    full_batch: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check_prior(self.prior, self.num_data, 1)
        check_number("lr", self.lr)
        check_number("friction", self.friction, 0.0, 1.0)
        check_number("temperature", self.temperature, 0.0, low_inclusive=True)
        check_count("num_burnin", self.num_burnin, 0)
        check_count("thin", self.thin, 1)
        check_count("max_samples", self.max_samples, 1, allow_none=True)

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
        samples = state.samples
        if num_steps > self.num_burnin and (num_steps - self.num_burnin) % self.thin == 0:
            samples = store_sample(samples, position, self.max_samples)
        new = SGHMCState(position=position, velocity=velocity, num_steps=num_steps, samples=samples)
        values = torch.stack([potential.detach(), data_term.detach()]).tolist()  # one device sync
        info = {"potential": values[0], "nll": values[1], "num_samples": float(len(samples))}
        return new, info

    def end_epoch(self, state: SGHMCState, epoch: int) -> SGHMCState:
        return state

    def posterior(self, state: SGHMCState) -> SamplePosterior:
        return samples_posterior(state.samples, "sghmc")
