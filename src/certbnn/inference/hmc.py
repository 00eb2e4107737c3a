"""Hamiltonian Monte Carlo (Neal 2011, "MCMC using Hamiltonian dynamics").

Target: the tempered posterior p(D|w)^(1/T) p(w), T = ``temperature`` (default 0.01, as
every other method's ``--kl-weight``; T = 1 is the Bayesian posterior). Potential (full
batch, prior gradient included; SPEC §2.4, §3)::

    U(w) = (N / T) * mean_{(x,y) in D} nll(w, x, y) - log p(w)

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
position tensors themselves (bit-identical) with U and grad U at it.

The likelihood may change between steps (``certbnn train`` ramps eps): U and grad U at
the current position are cached together with the radius they were computed at
(``nll.eps``; a callable without ``eps`` is one fixed likelihood) and recomputed before
a proposal whenever it differs, so H_old and H_new always come from the same likelihood.
(Comparing a stale U at a smaller eps with U_new at a larger one rejects every
proposal: the chain froze.)

U must be a function of w alone, so the likelihood's randomness (PGD's random starts) is
drawn from a fresh generator at the fixed seed ``POTENTIAL_SEED`` at every evaluation of U:
every proposal then sees the same random starts for the same data, the adversarial inputs
depend on w only, and the Metropolis test compares one function at two points. (`certbnn
train` already turns PGD's random start off for full-batch methods; this guards every other
caller, e.g. the API or ``random_start = true``. With the run's generator, at the `fashion`
preset's SGD PGD network and N / T = 1e6, two evaluations of U at the same w differed by 193.)
The leapfrog's force is the gradient at the attack's inputs (Danskin), a deterministic function
of w, so the integrator stays volume-preserving and reversible and MH remains exact for this U.
A likelihood callable without a ``generator`` field must itself be deterministic.

Even so a PGD potential is discontinuous: the attack's inputs jump as w moves (sign steps,
projection). Along a random direction at the same network (no random start, as `certbnn
train` runs it; network and sums in float64) U followed its gradient at a displacement of 1e-9,
then jumped by 1.4 at 1e-8 and 6.3 at 1e-7, where the gradient predicts 0.002 and 0.02
(benchmarks/potential_roughness.py). The energy error then forces steps near 1e-8 and the chain
barely leaves its start: a property of the PGD likelihood at this N / T, not of the sampler
(docs/RESULTS.md, "`fashion`"). An IBP potential is continuous but kinked wherever a weight
crosses 0 (the |W| of the interval radius), and IBP training leaves many weights within 1e-6 of
0: hence its small adapted steps (docs/RESULTS.md, "Bayesian rows").

Step size: during the first ``num_burnin`` proposals it is adapted (if
``adapt_step_size``) by dual averaging (Hoffman & Gelman 2014, Alg. 5; gamma=0.05,
t0=10, kappa=0.75, mu = log(10 eps_0)) towards ``target_accept``, then fixed to
the averaged iterate; with fewer than ``MIN_ADAPT_BURNIN`` (20) burn-in proposals the
step size stays fixed (dual averaging explores around 10 eps_0 first: after a handful of
proposals its averaged iterate is a multiple of eps_0 and the chain would reject
everything). ``jitter`` > 0 draws each proposal's step size uniformly
in ``eps * [1 - jitter, 1 + jitter]`` (Neal 2011 §5.4.2.2) against periodic
trajectories. Burn-in proposals store nothing; afterwards every ``thin``-th
position (accepted or not) is stored as an independent copy (the newest
``max_samples`` if set), with the eps it was drawn at (``state.sample_eps``).

``num_burnin=None`` (the default) means "burn in while eps ramps": ``certbnn train``
sets it (:meth:`HMC.for_schedule`) to the proposals before eps reaches its target,
and refuses, before any training, explicit settings that would store a sample
earlier or store none at all. Used directly (no schedule), None is 0.

Warm start: ``init(params)`` accepts any params, e.g. an SGD solution (``--init-from``).
Besides, the first ``warm_start_epochs`` steps (default 1) are not proposals: each runs
one epoch of minibatch SGD (momentum 0.9, ``warm_start_lr`` 0.05, batches of
``warm_start_batch_size`` 32 drawn from ``batch`` with the generator) on the MAP objective
``(T / N) U = mean nll - T log p(w) / N`` (the objective of ``sgd`` with ``prior_weight`` T),
so that a chain started from random weights begins near a mode of the posterior it samples (a chain
from a random initialisation needs far more proposals than a training budget allows). One
epoch on 10,000 MNIST images reached 88.9 % test accuracy with batches of 128, 92.4 % with 32
(docs/training.md, "Defaults").
Under data-parallel training every rank takes the same number of local batches and the
gradients are averaged. ``warm_start_epochs=0`` turns it off (e.g. after ``--init-from``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from certbnn.denormals import flush_denormals
from certbnn.errors import ConfigError
from certbnn.inference.base import NLL, Batch, Params, grad_of, register_method, requires_grad, stored_samples_field
from certbnn.inference.sgd import map_gradient, sgd_update
from certbnn.posterior import SamplePosterior
from certbnn.priors import GaussianPrior

_DA_GAMMA, _DA_T0, _DA_KAPPA = 0.05, 10.0, 0.75
POTENTIAL_SEED = 0x5EED  # the likelihood's randomness inside U(w): fixed, so U is a function of w
MIN_ADAPT_BURNIN = 20  # dual averaging with fewer burn-in proposals ends on its early, 10x-too-large steps


# --- helpers shared with sghmc.py ------------------------------------------------


def check_number(
    name: str,
    value: object,
    low: float = 0.0,
    high: float = math.inf,
    *,
    low_inclusive: bool = False,
    high_inclusive: bool = True,
) -> None:
    """ConfigError unless ``value`` is a finite real in the given interval."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (low <= value if low_inclusive else low < value) and (value <= high if high_inclusive else value < high)
    if not ok:
        interval = (
            f"{'>=' if low_inclusive else '>'} {low:g}"
            if high == math.inf
            else f"in {'[' if low_inclusive else '('}{low:g}, {high:g}{']' if high_inclusive else ')'}"
        )
        raise ConfigError(f"option {name} must be a finite number {interval}, got {value!r}")


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


def store_sample(
    samples: list[Params], sample_eps: list[float | None], position: Params, eps: float | None, max_samples: int | None
) -> tuple[list[Params], list[float | None]]:
    """New lists with a copy of ``position`` (drawn at radius ``eps``) appended, oldest dropped
    beyond ``max_samples``."""
    kept, kept_eps = samples + [copy_params(position)], sample_eps + [eps]
    if max_samples is not None:
        return kept[-max_samples:], kept_eps[-max_samples:]
    return kept, kept_eps


def likelihood_eps(nll: NLL) -> float | None:
    """The radius ``nll`` evaluates the likelihood at (``nll.eps``, as on a
    :class:`~certbnn.likelihoods.BatchNLL`), or None for a callable without one."""
    eps = getattr(nll, "eps", None)
    return None if eps is None else float(eps)


def check_sample_window(
    method: str, settings: str, first_sample_step: int, first_target_step: int, total_steps: int, context: str = ""
) -> None:
    """ConfigError (one line) unless the first stored sample (0-based step ``first_sample_step``)
    comes once eps has reached its target (step ``first_target_step``) and within ``total_steps``."""
    where = f" ({context})" if context else ""
    if first_sample_step < first_target_step:
        raise ConfigError(
            f"{method}: {settings} would store samples from step {first_sample_step + 1} of "
            f"{total_steps}, before eps reaches its target at step {first_target_step + 1}{where}; "
            f"burn in longer (or leave the burn-in option unset) or shorten the eps ramp"
        )
    if first_sample_step >= total_steps:
        raise ConfigError(
            f"{method}: {settings} stores no sample in {total_steps} steps (the first would come "
            f"at step {first_sample_step + 1}){where}; train longer or shorten the burn-in"
        )


def samples_posterior(samples: list[Params], method: str) -> SamplePosterior:
    """The posterior of the stored samples (kept by reference, stacked when all are needed: a
    validation draw costs the drawn samples only); a clear error when there are none."""
    if not samples:
        raise ConfigError(f"{method} has stored no samples yet: run past num_burnin (and thin) steps first")
    return SamplePosterior.of_sets(samples)


def fixed_randomness(nll: NLL) -> NLL:
    """``nll`` with its ``generator`` replaced by a fresh one at ``POTENTIAL_SEED`` (a CPU
    generator, which serves data on any device), so that U(w) is deterministic; a callable
    without a ``generator`` field is returned as it is."""
    if dataclasses.is_dataclass(nll) and any(f.name == "generator" for f in dataclasses.fields(nll)):
        return dataclasses.replace(nll, generator=torch.Generator().manual_seed(POTENTIAL_SEED))
    return nll


def randn_like(t: Tensor, generator: torch.Generator) -> Tensor:
    """Standard normal noise drawn on the generator's device, moved to ``t``'s."""
    return torch.randn(t.shape, generator=generator, dtype=t.dtype, device=generator.device).to(t.device)


# --- HMC ----------------------------------------------------------------------------


@dataclass
class HMCState:
    position: Params
    potential: Tensor | None  # U(position), cached (None before the first step)
    gradient: Params | None  # grad U(position), cached
    step_size: float  # current nominal step size (adapted during burn-in)
    da_log_step_avg: float  # dual averaging: averaged log step size
    da_h_bar: float  # dual averaging: running mean of (target - accept prob)
    num_steps: int  # proposals made
    num_accepted: int  # accepted proposals in the current phase (burn-in / sampling)
    samples: list[Params] = stored_samples_field()  # each written once by a checkpoint
    potential_eps: float | None = None  # the radius the cached U and grad U were computed at
    sample_eps: list[float | None] = field(default_factory=list)  # radius of each stored sample
    warm_epochs_done: int = 0  # warm-start SGD epochs run (they precede the proposals)


@register_method
@dataclass(frozen=True)
class HMC:
    """Full-batch HMC; options in the module docstring. One ``step`` = one proposal."""

    prior: GaussianPrior
    num_data: int
    temperature: float = 0.01
    step_size: float | None = None
    num_leapfrog: int = 20
    num_burnin: int | None = None
    target_accept: float = 0.8
    adapt_step_size: bool = True
    jitter: float = 0.0
    mass: float | Mapping[str, Tensor | float] = 1.0
    thin: int = 1
    max_samples: int | None = None
    chunk_size: int = 4096
    flush_denormals: bool = True
    warm_start_epochs: int = 1
    warm_start_lr: float = 0.05
    warm_start_batch_size: int = 32

    name: ClassVar[str] = "hmc"
    full_batch: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_prior(self.prior, self.num_data, 0)
        check_number("temperature", self.temperature)
        if self.step_size is not None:
            check_number("step_size", self.step_size)
        check_count("num_leapfrog", self.num_leapfrog, 1)
        check_count("num_burnin", self.num_burnin, 0, allow_none=True)
        check_count("warm_start_epochs", self.warm_start_epochs, 0)
        check_number("warm_start_lr", self.warm_start_lr)
        check_count("warm_start_batch_size", self.warm_start_batch_size, 1)
        check_number("target_accept", self.target_accept, 0.0, 1.0, high_inclusive=False)
        check_number("jitter", self.jitter, 0.0, 1.0, low_inclusive=True, high_inclusive=False)
        check_count("thin", self.thin, 1)
        check_count("max_samples", self.max_samples, 1, allow_none=True)
        check_count("chunk_size", self.chunk_size, 1)
        for flag in ("adapt_step_size", "flush_denormals"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"option {flag} must be true or false, got {getattr(self, flag)!r}")
        for name, m in self.mass.items() if isinstance(self.mass, Mapping) else [("", self.mass)]:
            if name and name not in self.prior.names:
                raise ConfigError(f"option mass names {name!r}, which is not a parameter of the prior")
            try:
                values = torch.as_tensor(m, dtype=torch.float64)
            except (TypeError, ValueError, RuntimeError):
                values = torch.tensor(float("nan"))
            if not bool((values > 0).all() and torch.isfinite(values).all()):
                raise ConfigError(f"option mass must be positive and finite, got {m!r}")

    @property
    def initial_step_size(self) -> float:
        """``step_size``, or by default 0.01 sqrt(T / N): U's curvature grows like N / T, so the
        stable leapfrog step shrinks like sqrt(T / N). Measured at T = 1 on a 9,000-image MNIST
        subset at an SGD solution (MLP 784-512-10, 20 leapfrog steps), acceptance probability:
        standard likelihood 1e-5 at step 1e-3, 0.87 at 3e-4, 0.92 at 1e-4; IBP at eps 0.11
        1e-4 at 3.2e-4, 0.37 at 1e-4 (the robust potential is rougher). At the default T = 0.01
        see docs/training.md ("Defaults") for the measured acceptance."""
        if self.step_size is not None:
            return self.step_size
        return 0.01 * math.sqrt(self.temperature / max(self.num_data, 1))

    @property
    def burnin(self) -> int:
        """Burn-in proposals (``num_burnin``; None is 0 when used without a schedule)."""
        return self.num_burnin or 0

    def for_schedule(
        self, first_target_step: int, total_steps: int, steps_per_epoch: int = 1, context: str = ""
    ) -> HMC:
        """This sampler for a run of ``total_steps`` steps whose eps reaches its target at
        0-based step ``first_target_step``: ``num_burnin=None`` becomes the proposals before
        it; ConfigError when a sample would be stored earlier, or none at all."""
        method = self
        if self.num_burnin is None:
            method = dataclasses.replace(self, num_burnin=max(first_target_step - self.warm_start_epochs, 0))
        first = method.warm_start_epochs + method.burnin + method.thin - 1
        settings = f"warm_start_epochs={method.warm_start_epochs}, num_burnin={method.num_burnin}, thin={method.thin}"
        check_sample_window("hmc", settings, first, first_target_step, total_steps, context)
        return method

    def sampling_metadata(self, state: HMCState) -> dict[str, list[float | None]]:
        """``{"sample_eps": [...]}``: the radius each stored sample was drawn at."""
        return {"sample_eps": list(state.sample_eps)}

    # --- energies -------------------------------------------------------------------

    def masses(self, like: Params) -> dict[str, Tensor | float]:
        """name -> diagonal mass M (a float, or a tensor on ``like``'s device/dtype)."""
        out: dict[str, Tensor | float] = {}
        for n, w in like.items():
            m = self.mass.get(n, 1.0) if isinstance(self.mass, Mapping) else self.mass
            out[n] = float(m) if isinstance(m, (int, float)) else torch.as_tensor(m).to(w)
            if isinstance(out[n], Tensor) and torch.broadcast_shapes(out[n].shape, w.shape) != w.shape:
                raise ConfigError(
                    f"option mass[{n!r}] of shape {tuple(out[n].shape)} does not broadcast to {tuple(w.shape)}"
                )
        return out

    @staticmethod
    def kinetic(momentum: Params, masses: Mapping[str, Tensor | float]) -> Tensor:
        """K(p) = sum p^2 / (2 M), in float64 (a 0-dim float64 tensor): it enters the
        energy error H_old - H_new of the Metropolis test beside U (see ``potential_and_grad``)."""
        return sum((0.5 * p.double() ** 2 / masses[n]).sum() for n, p in momentum.items())

    def leapfrog(
        self,
        position: Params,
        momentum: Params,
        gradient: Params,
        step_size: float,
        masses: Mapping[str, Tensor | float],
        batch: Batch,
        nll: NLL,
    ) -> tuple[Params, Params, Tensor, Params]:
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
        distributed run, over the ranks' data shards: ``nll.comm``). The chunks' gradients
        accumulate in place (one autograd call per chunk, no per-chunk copies); with
        ``flush_denormals`` subnormal floats are flushed to zero meanwhile (plain arithmetic,
        not a certificate; subnormal matmul operands are 10-30x slower on x86), the caller's
        setting restored after. U is a 0-dim float64 tensor: the prior term and the sums over
        examples and chunks are accumulated in float64 (the gradient keeps the parameters'
        dtype). A float32 sum would round U, about (N / T) x mean NLL, to ~1e-7 of itself: a
        floor of ~1 on the energy error at N / T = 6e6, whatever the step size."""
        x, y = batch
        comm = getattr(nll, "comm", None)
        local = fixed_randomness(nll.local() if comm else nll)
        count = x.shape[0]
        if comm:
            count = int(comm.all_reduce(torch.tensor(float(count), dtype=torch.float64)).item())
        scale = self.num_data / (max(count, 1) * self.temperature)
        w = requires_grad(position)
        names = list(w)
        with torch.enable_grad(), flush_denormals(self.flush_denormals):
            prior_term = -self.prior.log_prob({n: v.double() for n, v in w.items()})
            grads = [g.clone() for g in grad_of(prior_term, w).values()]  # fresh: accumulated in place
            data_total = torch.zeros((), dtype=torch.float64, device=prior_term.device)
            data_grads = [torch.zeros_like(g) for g in grads] if comm else grads
            for start in range(0, x.shape[0], self.chunk_size) if self.num_data > 0 else []:
                chunk = slice(start, start + self.chunk_size)
                loss = local(w, x[chunk], y[chunk]).sum(dtype=torch.float64) * scale
                for acc, g in zip(data_grads, torch.autograd.grad(loss, [w[n] for n in names], allow_unused=True)):
                    if g is not None:
                        acc.add_(g)
                data_total += loss.detach()
        if comm:
            data_total = comm.all_reduce(data_total)
            grads = [g + comm.all_reduce(d) for g, d in zip(grads, data_grads)]
        return prior_term.detach() + data_total, dict(zip(names, grads))

    # --- protocol -------------------------------------------------------------------

    def init(self, params: Params, generator: torch.Generator | None = None) -> HMCState:
        check_params(params, self.prior)
        self.masses(params)  # shape check
        return HMCState(
            position=copy_params(params),
            potential=None,
            gradient=None,
            step_size=float(self.initial_step_size),
            da_log_step_avg=0.0,
            da_h_bar=0.0,
            num_steps=0,
            num_accepted=0,
            samples=[],
        )

    def step(
        self, state: HMCState, batch: Batch, nll: NLL, generator: torch.Generator
    ) -> tuple[HMCState, dict[str, float]]:
        if state.warm_epochs_done < self.warm_start_epochs:
            return self._warm_start_epoch(state, batch, nll, generator)
        num_burnin = self.burnin
        burning_in = state.num_steps < num_burnin
        eps_now = likelihood_eps(nll)
        potential, gradient = state.potential, state.gradient
        if potential is None or gradient is None or state.potential_eps != eps_now or potential.dtype != torch.float64:
            # no cache yet, or it belongs to another likelihood (or, from a checkpoint written
            # before U was summed in float64, to a rounded one): H_old must use this one
            potential, gradient = self.potential_and_grad(state.position, batch, nll)
        jitter_u, accept_u = torch.rand(2, generator=generator, dtype=torch.float64, device=generator.device).tolist()
        eps = state.step_size * (1.0 + self.jitter * (2.0 * jitter_u - 1.0))
        masses = self.masses(state.position)
        momentum = {n: randn_like(w, generator) * masses[n] ** 0.5 for n, w in state.position.items()}
        w_new, p_new, u_new, g_new = self.leapfrog(state.position, momentum, gradient, eps, masses, batch, nll)
        h_diff = potential + self.kinetic(momentum, masses) - u_new - self.kinetic(p_new, masses)
        log_priors = [self.prior.log_prob(state.position).detach(), self.prior.log_prob(w_new).detach()]
        log_ratio, u_old_value, u_new_value, lp_old, lp_new = torch.stack(
            [h_diff, potential, u_new, *log_priors]
        ).tolist()  # one sync
        accept_prob = math.exp(min(0.0, log_ratio)) if math.isfinite(log_ratio) else 0.0
        accepted = accept_u < accept_prob
        position = w_new if accepted else state.position
        if accepted:
            potential, gradient = u_new, g_new
        new = HMCState(
            position=position,
            potential=potential,
            gradient=gradient,
            step_size=state.step_size,
            da_log_step_avg=state.da_log_step_avg,
            da_h_bar=state.da_h_bar,
            num_steps=state.num_steps + 1,
            num_accepted=state.num_accepted + int(accepted),
            samples=state.samples,
            potential_eps=eps_now,
            sample_eps=state.sample_eps,
            warm_epochs_done=state.warm_epochs_done,
        )
        phase_steps = new.num_steps if burning_in else new.num_steps - num_burnin
        rate = new.num_accepted / phase_steps
        if burning_in and self.adapt_step_size and num_burnin >= MIN_ADAPT_BURNIN:
            self._adapt(new, accept_prob)
        if burning_in and new.num_steps == num_burnin:
            new.num_accepted = 0  # the sampling phase counts its own acceptance rate
        elif not burning_in and (new.num_steps - num_burnin) % self.thin == 0:
            new.samples, new.sample_eps = store_sample(
                state.samples, state.sample_eps, position, eps_now, self.max_samples
            )
        u_value, lp_value = (u_new_value, lp_new) if accepted else (u_old_value, lp_old)
        info = {
            "potential": u_value,
            "accept_prob": accept_prob,
            "accepted": float(accepted),
            "step_size": eps,
            "accept_rate": rate,
            "num_samples": float(len(new.samples)),
        }
        if self.num_data > 0:  # the mean NLL at the chain's position: (T / N) (U + log p(w))
            info["nll"] = self.temperature / self.num_data * (u_value + lp_value)
        return new, info

    def _adapt(self, state: HMCState, accept_prob: float) -> None:
        """Dual averaging update (Hoffman & Gelman 2014, Alg. 5) of ``state`` in place."""
        m = state.num_steps
        mu = math.log(10.0 * self.initial_step_size)
        weight = 1.0 / (m + _DA_T0)
        state.da_h_bar = (1.0 - weight) * state.da_h_bar + weight * (self.target_accept - accept_prob)
        log_step = min(max(mu - math.sqrt(m) / _DA_GAMMA * state.da_h_bar, -300.0), 300.0)  # no overflow
        avg = m**-_DA_KAPPA
        state.da_log_step_avg = avg * log_step + (1.0 - avg) * state.da_log_step_avg
        last = m == self.burnin
        state.step_size = math.exp(state.da_log_step_avg if last else log_step)

    def _warm_start_epoch(
        self, state: HMCState, batch: Batch, nll: NLL, generator: torch.Generator
    ) -> tuple[HMCState, dict[str, float]]:
        """One epoch of minibatch SGD with momentum on (T / N) U (module docstring); not a proposal."""
        x, y = batch
        count = x.shape[0]
        comm = getattr(nll, "comm", None)
        if comm:  # the same number of local batches on every rank (shares differ by at most one)
            total = int(comm.all_reduce(torch.tensor(float(count), dtype=torch.float64)).item())
            count_all = total // comm.world_size
        else:
            count_all = count
        size = min(self.warm_start_batch_size, count_all)
        order = torch.randperm(count, generator=generator, device=generator.device).to(x.device)
        position = state.position
        velocity = {n: torch.zeros_like(w) for n, w in position.items()}
        nll_sum, batches = 0.0, count_all // size if size else 0
        for b in range(batches):
            index = order[b * size : (b + 1) * size]
            grads, info = map_gradient(
                position, (x[index], y[index]), nll, self.prior, self.temperature, max(self.num_data, 1)
            )
            position, velocity = sgd_update(position, grads, velocity, self.warm_start_lr, 0.9, 0.0)
            nll_sum += info["nll"]
        new = dataclasses.replace(
            state,
            position={n: w.detach() for n, w in position.items()},
            potential=None,
            gradient=None,
            potential_eps=None,
            warm_epochs_done=state.warm_epochs_done + 1,
        )
        return new, {"nll": nll_sum / max(batches, 1), "warm_start": 1.0, "num_samples": 0.0}

    def end_epoch(self, state: HMCState, epoch: int) -> HMCState:
        return state

    def posterior(self, state: HMCState) -> SamplePosterior:
        return samples_posterior(state.samples, "hmc")
