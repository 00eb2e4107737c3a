"""Hamiltonian Monte Carlo (Neal 2011, "MCMC using Hamiltonian dynamics").

Potential (full batch, prior gradient included; SPEC §2.4, §3)::

    U(w) = N * mean_{(x,y) in D} nll(w, x, y) - log p(w)

evaluated over ``batch`` (the whole training set) in chunks of ``chunk_size``
examples, one backward pass per chunk, so memory is bounded by one chunk. An
empty data set contributes nothing (U = -log p(w): the chain samples the prior).

Diagonal mass M (``mass``: a float, or name -> float/tensor broadcastable to the
parameter, missing names 1): ``K(p) = sum p^2 / (2 M)``, ``p ~ N(0, M)``, and the
leapfrog uses the SAME M^{-1}::

    p <- p - (eps/2) grad U(w);  [w <- w + eps M^{-1} p;  p <- p - eps grad U(w)] x L
    (the last momentum update is a half step)

One ``step`` is one proposal, accepted with probability ``min(1, exp(H_old - H_new))``,
``H = U + K``; a non-finite ``H_new`` is a rejection. A rejection returns the old
position, potential and gradient tensors themselves (bit-identical).

Step size: during the first ``num_burnin`` proposals it is adapted (if
``adapt_step_size``) by dual averaging (Hoffman & Gelman 2014, Alg. 5; gamma=0.05,
t0=10, kappa=0.75, mu = log(10 eps_0)) towards ``target_accept``, then fixed to
the averaged iterate. ``jitter`` > 0 draws each proposal's step size uniformly
in ``eps * [1 - jitter, 1 + jitter]`` (Neal 2011 §5.4.2.2) against periodic
trajectories. Burn-in proposals store nothing; afterwards every ``thin``-th
position (accepted or not) is stored as an independent copy (the newest
``max_samples`` if set).

The cached U and grad U at the current position are reused between proposals
after burn-in (the likelihood, e.g. its eps, must then be fixed); during burn-in
they are recomputed at the start of every proposal (and of the first one after
it), so a ramping eps is allowed.

Warm start: ``init(params)`` accepts any params, e.g. an SGD/Adam solution.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from certbnn.errors import ConfigError
from certbnn.inference.base import NLL, Batch, Params, grad_of, register_method, requires_grad
from certbnn.posterior import SamplePosterior
from certbnn.priors import GaussianPrior

_DA_GAMMA, _DA_T0, _DA_KAPPA = 0.05, 10.0, 0.75


# --- helpers shared with sghmc.py ------------------------------------------------

def check_number(name: str, value: object, low: float = 0.0, high: float = math.inf, *,
                 low_inclusive: bool = False, high_inclusive: bool = True) -> None:
    """ConfigError unless ``value`` is a finite real in the given interval."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (low <= value if low_inclusive else low < value) and (value <= high if high_inclusive else value < high)
    if not ok:
        interval = f"{'[' if low_inclusive else '('}{low}, {high}{']' if high_inclusive else ')'}"
        raise ConfigError(f"option {name} must be a finite number in {interval}, got {value!r}")


def check_count(name: str, value: object, minimum: int, allow_none: bool = False) -> None:
    """ConfigError unless ``value`` is an int >= minimum (or None when allowed)."""
    if allow_none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"option {name} must be an integer >= {minimum}, got {value!r}")


def check_prior(prior: object, num_data: object, min_data: int) -> None:
    """ConfigError unless ``prior`` is a GaussianPrior and ``num_data`` an int >= min_data."""
    if not isinstance(prior, GaussianPrior):
        raise ConfigError(f"option prior must be a GaussianPrior, got {type(prior).__name__}")
    check_count("num_data", num_data, min_data)


def check_params(params: Params, prior: GaussianPrior) -> None:
    """ConfigError unless ``params`` has exactly the prior's names."""
    if set(params) != set(prior.names):
        raise ConfigError(f"params names {sorted(params)} do not match the prior's {sorted(prior.names)}")


def copy_params(params: Params) -> Params:
    """Independent detached copies (stored samples never alias the chain state)."""
    return {name: t.detach().clone() for name, t in params.items()}


def store_sample(samples: list[Params], position: Params, max_samples: int | None) -> list[Params]:
    """A new list with a copy of ``position`` appended, oldest dropped beyond ``max_samples``."""
    kept = samples + [copy_params(position)]
    return kept[-max_samples:] if max_samples is not None else kept


def samples_posterior(samples: list[Params], method: str) -> SamplePosterior:
    """Stack stored samples (name -> (M, *shape)); a clear error when there are none."""
    if not samples:
        raise ConfigError(f"{method} has stored no samples yet: run past num_burnin (and thin) steps first")
    return SamplePosterior({name: torch.stack([s[name] for s in samples]) for name in samples[0]})


def randn_like(t: Tensor, generator: torch.Generator) -> Tensor:
    """Standard normal noise drawn on the generator's device, moved to ``t``'s."""
    return torch.randn(t.shape, generator=generator, dtype=t.dtype, device=generator.device).to(t.device)


# --- HMC ----------------------------------------------------------------------------

@dataclass
class HMCState:
    position: Params
    potential: Tensor | None      # U(position), cached (None before the first step)
    gradient: Params | None       # grad U(position), cached
    step_size: float              # current nominal step size (adapted during burn-in)
    da_log_step_avg: float        # dual averaging: averaged log step size
    da_h_bar: float               # dual averaging: running mean of (target - accept prob)
    num_steps: int                # proposals made
    num_accepted: int             # accepted proposals in the current phase (burn-in / sampling)
    samples: list[Params] = field(default_factory=list)


@register_method
@dataclass(frozen=True)
class HMC:
    """Full-batch HMC; options in the module docstring. One ``step`` = one proposal."""

    prior: GaussianPrior
    num_data: int
    step_size: float = 1e-3
    num_leapfrog: int = 20
    num_burnin: int = 100
    target_accept: float = 0.8
    adapt_step_size: bool = True
    jitter: float = 0.0
    mass: float | Mapping[str, Tensor | float] = 1.0
    thin: int = 1
    max_samples: int | None = None
    chunk_size: int = 4096

    name: ClassVar[str] = "hmc"
    full_batch: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_prior(self.prior, self.num_data, 0)
        check_number("step_size", self.step_size)
        check_count("num_leapfrog", self.num_leapfrog, 1)
        check_count("num_burnin", self.num_burnin, 0)
        check_number("target_accept", self.target_accept, 0.0, 1.0, high_inclusive=False)
        check_number("jitter", self.jitter, 0.0, 1.0, low_inclusive=True, high_inclusive=False)
        check_count("thin", self.thin, 1)
        check_count("max_samples", self.max_samples, 1, allow_none=True)
        check_count("chunk_size", self.chunk_size, 1)
        if not isinstance(self.adapt_step_size, bool):
            raise ConfigError(f"option adapt_step_size must be true or false, got {self.adapt_step_size!r}")
        for name, m in (self.mass.items() if isinstance(self.mass, Mapping) else [("", self.mass)]):
            if name and name not in self.prior.names:
                raise ConfigError(f"option mass names {name!r}, which is not a parameter of the prior")
            try:
                values = torch.as_tensor(m, dtype=torch.float64)
            except (TypeError, ValueError, RuntimeError):
                values = torch.tensor(float("nan"))
            if not bool((values > 0).all() and torch.isfinite(values).all()):
                raise ConfigError(f"option mass must be positive and finite, got {m!r}")

    # --- energies -------------------------------------------------------------------

    def masses(self, like: Params) -> dict[str, Tensor | float]:
        """name -> diagonal mass M (a float, or a tensor on ``like``'s device/dtype)."""
        out: dict[str, Tensor | float] = {}
        for n, w in like.items():
            m = self.mass.get(n, 1.0) if isinstance(self.mass, Mapping) else self.mass
            out[n] = float(m) if isinstance(m, (int, float)) else torch.as_tensor(m).to(w)
            if isinstance(out[n], Tensor) and torch.broadcast_shapes(out[n].shape, w.shape) != w.shape:
                raise ConfigError(f"option mass[{n!r}] of shape {tuple(out[n].shape)} "
                                  f"does not broadcast to {tuple(w.shape)}")
        return out

    @staticmethod
    def kinetic(momentum: Params, masses: Mapping[str, Tensor | float]) -> Tensor:
        """K(p) = sum p^2 / (2 M)."""
        return sum((0.5 * p * p / masses[n]).sum() for n, p in momentum.items())

    def leapfrog(self, position: Params, momentum: Params, gradient: Params, step_size: float,
                 masses: Mapping[str, Tensor | float], batch: Batch, nll: NLL) -> tuple[Params, Params, Tensor, Params]:
        """``num_leapfrog`` leapfrog steps of dH with H = U + K(p; masses): (w, p, U(w), grad U(w)) at the end."""
        p = {n: momentum[n] - 0.5 * step_size * gradient[n] for n in momentum}
        w = position
        for leap in range(self.num_leapfrog):
            w = {n: w[n] + step_size * p[n] / masses[n] for n in p}
            potential, gradient = self.potential_and_grad(w, batch, nll)
            kick = 0.5 * step_size if leap == self.num_leapfrog - 1 else step_size
            p = {n: p[n] - kick * gradient[n] for n in p}
        return w, p, potential, gradient

    def potential_and_grad(self, position: Params, batch: Batch, nll: NLL) -> tuple[Tensor, Params]:
        """U(w) and grad U(w), detached; the data term summed over chunks (and, in a
        distributed run, over the ranks' data shards: ``nll.comm``)."""
        x, y = batch
        comm = getattr(nll, "comm", None)
        local = nll.local() if comm else nll
        count = x.shape[0]
        if comm:
            count = int(comm.all_reduce(torch.tensor(float(count), dtype=torch.float64)).item())
        scale = self.num_data / max(count, 1)
        w = requires_grad(position)
        with torch.enable_grad():
            prior_term = -self.prior.log_prob(w)
            grads = grad_of(prior_term, w)
            data_total = torch.zeros((), dtype=prior_term.dtype, device=prior_term.device)
            data_grads = {n: torch.zeros_like(g) for n, g in grads.items()}
            for start in range(0, x.shape[0], self.chunk_size) if self.num_data > 0 else []:
                chunk = slice(start, start + self.chunk_size)
                loss = local(w, x[chunk], y[chunk]).sum() * scale
                data_grads = {n: data_grads[n] + g for n, g in grad_of(loss, w).items()}
                data_total = data_total + loss.detach()
        if comm:
            data_total = comm.all_reduce(data_total)
            data_grads = {n: comm.all_reduce(g) for n, g in data_grads.items()}
        return prior_term.detach() + data_total, {n: grads[n] + data_grads[n] for n in grads}

    # --- protocol -------------------------------------------------------------------

    def init(self, params: Params, generator: torch.Generator | None = None) -> HMCState:
        check_params(params, self.prior)
        self.masses(params)  # shape check
        return HMCState(position=copy_params(params), potential=None, gradient=None,
                        step_size=float(self.step_size), da_log_step_avg=0.0, da_h_bar=0.0,
                        num_steps=0, num_accepted=0, samples=[])

    def step(self, state: HMCState, batch: Batch, nll: NLL,
             generator: torch.Generator) -> tuple[HMCState, dict[str, float]]:
        burning_in = state.num_steps < self.num_burnin
        potential, gradient = state.potential, state.gradient
        if potential is None or gradient is None or state.num_steps <= self.num_burnin:
            potential, gradient = self.potential_and_grad(state.position, batch, nll)
        jitter_u, accept_u = torch.rand(2, generator=generator, dtype=torch.float64,
                                        device=generator.device).tolist()
        eps = state.step_size * (1.0 + self.jitter * (2.0 * jitter_u - 1.0))
        masses = self.masses(state.position)
        momentum = {n: randn_like(w, generator) * masses[n] ** 0.5 for n, w in state.position.items()}
        w_new, p_new, u_new, g_new = self.leapfrog(state.position, momentum, gradient, eps, masses, batch, nll)
        h_diff = potential + self.kinetic(momentum, masses) - u_new - self.kinetic(p_new, masses)
        log_ratio, u_old_value, u_new_value = torch.stack([h_diff, potential, u_new]).tolist()  # one sync
        accept_prob = math.exp(min(0.0, log_ratio)) if math.isfinite(log_ratio) else 0.0
        accepted = accept_u < accept_prob
        position = w_new if accepted else state.position
        if accepted:
            potential, gradient = u_new, g_new
        new = HMCState(position=position, potential=potential, gradient=gradient, step_size=state.step_size,
                       da_log_step_avg=state.da_log_step_avg, da_h_bar=state.da_h_bar,
                       num_steps=state.num_steps + 1, num_accepted=state.num_accepted + int(accepted),
                       samples=state.samples)
        phase_steps = new.num_steps if burning_in else new.num_steps - self.num_burnin
        rate = new.num_accepted / phase_steps
        if burning_in and self.adapt_step_size:
            self._adapt(new, accept_prob)
        if burning_in and new.num_steps == self.num_burnin:
            new.num_accepted = 0  # the sampling phase counts its own acceptance rate
        elif not burning_in and (new.num_steps - self.num_burnin) % self.thin == 0:
            new.samples = store_sample(state.samples, position, self.max_samples)
        info = {"potential": u_new_value if accepted else u_old_value, "accept_prob": accept_prob,
                "accepted": float(accepted), "step_size": eps, "accept_rate": rate,
                "num_samples": float(len(new.samples))}
        return new, info

    def _adapt(self, state: HMCState, accept_prob: float) -> None:
        """Dual averaging update (Hoffman & Gelman 2014, Alg. 5) of ``state`` in place."""
        m = state.num_steps
        mu = math.log(10.0 * self.step_size)
        weight = 1.0 / (m + _DA_T0)
        state.da_h_bar = (1.0 - weight) * state.da_h_bar + weight * (self.target_accept - accept_prob)
        log_step = min(max(mu - math.sqrt(m) / _DA_GAMMA * state.da_h_bar, -300.0), 300.0)  # no overflow
        avg = m ** -_DA_KAPPA
        state.da_log_step_avg = avg * log_step + (1.0 - avg) * state.da_log_step_avg
        last = m == self.num_burnin
        state.step_size = math.exp(state.da_log_step_avg if last else log_step)

    def end_epoch(self, state: HMCState, epoch: int) -> HMCState:
        return state

    def posterior(self, state: HMCState) -> SamplePosterior:
        return samples_posterior(state.samples, "hmc")
