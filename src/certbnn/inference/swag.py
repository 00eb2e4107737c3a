"""SWAG: stochastic weight averaging Gaussian (Maddox et al. 2019).

The trajectory is SGD with momentum (``optimizer="sgd"``) or Adam (``"adam"``) on the
same objective as the point estimates, ``mean_batch nll - prior_weight log p(w) / N``
(see :mod:`certbnn.inference.sgd`); use a constant, fairly large learning rate so
the iterates sample around the mode (Mandt et al. 2017).

Snapshots: burn-in lasts until ``burnin_epochs`` epochs (counted by ``end_epoch``
calls) AND ``burnin_steps`` steps are done. After it, a snapshot w_i is taken at
every ``end_epoch`` (``snapshot_every="epoch"``) or after every k-th step
(``snapshot_every=k``; the first after step ``burnin + k``). Snapshot n+1 updates

    mean    <- (n mean + w) / (n + 1)
    sq_mean <- (n sq_mean + w^2) / (n + 1)
    D[n mod rank] <- w - mean           (with the updated mean, as Maddox et al.'s code)

so D holds the last ``rank`` deviations (a ring buffer, leading dim ``rank``).
Each snapshot records the eps of the last step before it (``state.snapshot_eps``).

``burnin_steps=None`` (the default) means "burn in while eps ramps": ``certbnn train``
sets it (:meth:`SWAG.for_schedule`) so that the first snapshot follows the first step
at the target eps, and refuses, before training, explicit settings that would take a
snapshot earlier or none at all; used directly (no schedule), None is 0.

Posterior:

* ``rank=0``: ``GaussianPosterior(mean, sqrt(max(sq_mean - mean^2, var_clamp)))``.
* ``rank>0``: the low-rank + diagonal Gaussian with K = min(n, rank) columns,
  ``w = mean + diag^{1/2} z1 / sqrt 2 + D z2 / sqrt(2 (K - 1))``, z1, z2 standard
  normal. certbnn has no low-rank posterior type, so this returns a
  :class:`~certbnn.posterior.SamplePosterior` of ``num_posterior_samples`` draws made
  with a CPU generator seeded with ``posterior_seed`` (deterministic: the same state
  gives the same samples). With K < 2 (one snapshot) the low-rank term is undefined
  and the draws come from the diagonal Gaussian alone.

Moments are accumulated in the parameters' dtype (``sq_mean - mean^2`` cancels in
low precision when the spread is tiny relative to the weights; ``var_clamp`` keeps
the std positive).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from certbnn.errors import ConfigError
from certbnn.inference.base import NLL, Batch, Params, register_method
from certbnn.inference.flat import FlatLayout
from certbnn.inference.hmc import check_sample_window, likelihood_eps
from certbnn.inference.sgd import (
    adam_update_flat,
    check_betas,
    check_common,
    check_number,
    detached_copy,
    map_gradient_flat,
    sgd_update_flat,
    zeros_like,
)
from certbnn.posterior import GaussianPosterior, SamplePosterior
from certbnn.priors import GaussianPrior

__all__ = ["SWAG", "SWAGState"]

_OPTIMIZERS = ("sgd", "adam")


@dataclass
class SWAGState:
    params: Params
    optimizer_moments: list[Params]  # sgd: [velocity]; adam: [exp_avg, exp_avg_sq]
    mean: Params
    sq_mean: Params
    deviations: Params  # name -> (rank, *shape); {} when rank = 0
    num_snapshots: int = 0
    num_steps: int = 0
    num_epochs: int = 0
    steps_since_snapshot: int = 0  # steps after burn-in since the last snapshot (step schedule)
    last_eps: float | None = None  # the radius of the latest step
    snapshot_eps: list[float | None] = dataclasses.field(default_factory=list)  # radius of each snapshot


@register_method
@dataclass(frozen=True)
class SWAG:
    """SWAG-diagonal (``rank=0``) or low-rank + diagonal SWAG (see module doc)."""

    name: ClassVar[str] = "swag"
    full_batch: ClassVar[bool] = False

    prior: GaussianPrior
    num_data: int
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    prior_weight: float = 0.01
    burnin_epochs: int = 0
    burnin_steps: int | None = None
    snapshot_every: str | int = "epoch"
    rank: int = 20
    var_clamp: float = 1e-30
    num_posterior_samples: int = 100
    posterior_seed: int = 0

    def __post_init__(self) -> None:
        check_common(self)
        if self.optimizer not in _OPTIMIZERS:
            raise ConfigError(f"swag: option optimizer must be one of {', '.join(_OPTIMIZERS)}, got {self.optimizer!r}")
        check_number(self, "momentum", self.momentum, low=0.0, high=1.0, high_open=True)
        check_betas(self)
        for option, low in (
            ("burnin_epochs", 0),
            ("burnin_steps", 0),
            ("rank", 0),
            ("num_posterior_samples", 1),
            ("posterior_seed", 0),
        ):
            value = getattr(self, option)
            if option == "burnin_steps" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"swag: option {option} must be an int >= {low}, got {value!r}")
        every = self.snapshot_every
        if every != "epoch" and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise ConfigError(f"swag: option snapshot_every must be 'epoch' or a positive int, got {every!r}")
        check_number(self, "var_clamp", self.var_clamp, low=0.0, low_open=True)

    # --- training ---------------------------------------------------------------------

    def init(self, params: Params, generator: torch.Generator | None = None) -> SWAGState:
        start = detached_copy(params)
        moments = [zeros_like(start)] if self.optimizer == "sgd" else [zeros_like(start), zeros_like(start)]
        deviations = {n: p.new_zeros((self.rank, *p.shape)) for n, p in start.items()} if self.rank else {}
        return SWAGState(start, moments, zeros_like(start), zeros_like(start), deviations)

    def _burnin_done(self, num_epochs: int, num_steps: int) -> bool:
        return num_epochs >= self.burnin_epochs and num_steps >= (self.burnin_steps or 0)

    def first_snapshot_step(self, steps_per_epoch: int) -> int:
        """0-based index of the last training step before the first snapshot."""
        burnin_steps = self.burnin_steps or 0
        if self.snapshot_every == "epoch":  # end of epoch e >= burnin_epochs with (e + 1) * spe >= burnin_steps
            epoch = max(self.burnin_epochs, -(-burnin_steps // steps_per_epoch) - 1)
            return (epoch + 1) * steps_per_epoch - 1
        return max(burnin_steps, self.burnin_epochs * steps_per_epoch) + self.snapshot_every - 1

    def for_schedule(
        self, first_target_step: int, total_steps: int, steps_per_epoch: int = 1, context: str = ""
    ) -> SWAG:
        """This SWAG for a run of ``total_steps`` steps whose eps reaches its target at 0-based
        step ``first_target_step``: ``burnin_steps=None`` becomes ``first_target_step + 1`` (no
        snapshot before a step at the target); ConfigError for a snapshot before it or none."""
        method = (
            self
            if self.burnin_steps is not None
            else dataclasses.replace(self, burnin_steps=first_target_step + 1 if first_target_step else 0)
        )
        settings = (
            f"burnin_epochs={method.burnin_epochs}, burnin_steps={method.burnin_steps}, "
            f"snapshot_every={method.snapshot_every!r}"
        )
        check_sample_window(
            "swag", settings, method.first_snapshot_step(steps_per_epoch), first_target_step, total_steps, context
        )
        return method

    def sampling_metadata(self, state: SWAGState) -> dict[str, list[float | None]]:
        """``{"snapshot_eps": [...]}``: the radius of the last step before each snapshot."""
        return {"snapshot_eps": list(state.snapshot_eps)}

    def step(
        self, state: SWAGState, batch: Batch, nll: NLL, generator: torch.Generator | None = None
    ) -> tuple[SWAGState, dict[str, float]]:
        layout = FlatLayout(state.params)
        flat = layout.pack(state.params)
        grad, info = map_gradient_flat(layout, flat, batch, nll, self.prior, self.prior_weight, self.num_data)
        num_steps = state.num_steps + 1
        if self.optimizer == "sgd":
            flat, velocity = sgd_update_flat(
                flat, grad, layout.pack(state.optimizer_moments[0]), self.lr, self.momentum, self.weight_decay
            )
            moments = [layout.views(velocity)]
        else:
            flat, exp_avg, exp_avg_sq = adam_update_flat(
                flat,
                grad,
                *map(layout.pack, state.optimizer_moments),
                num_steps,
                self.lr,
                tuple(self.betas),
                self.eps,
                self.weight_decay,
            )
            moments = [layout.views(exp_avg), layout.views(exp_avg_sq)]
        params = layout.views(flat)
        new = SWAGState(
            params,
            moments,
            state.mean,
            state.sq_mean,
            state.deviations,
            state.num_snapshots,
            num_steps,
            state.num_epochs,
            state.steps_since_snapshot,
            likelihood_eps(nll),
            state.snapshot_eps,
        )
        if self.snapshot_every != "epoch" and self._burnin_done(state.num_epochs, state.num_steps):
            new.steps_since_snapshot += 1
            if new.steps_since_snapshot == self.snapshot_every:
                new = self._collect(new)
                new.steps_since_snapshot = 0
        info["snapshots"] = float(new.num_snapshots)
        return new, info

    def end_epoch(self, state: SWAGState, epoch: int) -> SWAGState:
        new = SWAGState(
            state.params,
            state.optimizer_moments,
            state.mean,
            state.sq_mean,
            state.deviations,
            state.num_snapshots,
            state.num_steps,
            state.num_epochs + 1,
            state.steps_since_snapshot,
            state.last_eps,
            state.snapshot_eps,
        )
        if self.snapshot_every == "epoch" and self._burnin_done(state.num_epochs, state.num_steps):
            new = self._collect(new)
        return new

    def _collect(self, state: SWAGState) -> SWAGState:
        """The state with the current params added as snapshot number n + 1 (out of place)."""
        n = state.num_snapshots
        mean, sq_mean, deviations = {}, {}, {}
        for name, w in state.params.items():
            mean[name] = (n * state.mean[name] + w) / (n + 1)
            sq_mean[name] = (n * state.sq_mean[name] + w * w) / (n + 1)
            if self.rank:
                buffer = state.deviations[name].clone()
                buffer[n % self.rank] = w - mean[name]
                deviations[name] = buffer
        return SWAGState(
            state.params,
            state.optimizer_moments,
            mean,
            sq_mean,
            deviations,
            n + 1,
            state.num_steps,
            state.num_epochs,
            state.steps_since_snapshot,
            state.last_eps,
            state.snapshot_eps + [state.last_eps],
        )

    # --- posterior --------------------------------------------------------------------

    def diagonal_variance(self, state: SWAGState) -> Params:
        """max(sq_mean - mean^2, var_clamp) per coordinate."""
        return {n: (state.sq_mean[n] - m * m).clamp(min=self.var_clamp) for n, m in state.mean.items()}

    def posterior(self, state: SWAGState) -> GaussianPosterior | SamplePosterior:
        if state.num_snapshots == 0:
            raise ConfigError(
                f"swag: posterior requested before any snapshot was collected "
                f"(snapshot_every={self.snapshot_every!r}, burnin_epochs={self.burnin_epochs}, "
                f"burnin_steps={self.burnin_steps}; train longer or shorten the burn-in)"
            )
        variance = self.diagonal_variance(state)
        mean = {n: m.clone() for n, m in state.mean.items()}
        if self.rank == 0:
            return GaussianPosterior(mean, {n: v.sqrt() for n, v in variance.items()})
        return SamplePosterior(self._low_rank_draws(state, mean, variance))

    def _low_rank_draws(self, state: SWAGState, mean: Params, variance: Params) -> Params:
        """``num_posterior_samples`` draws of the low-rank + diagonal Gaussian (module doc)."""
        generator = torch.Generator().manual_seed(self.posterior_seed)
        num, columns = self.num_posterior_samples, min(state.num_snapshots, self.rank)
        first = next(iter(mean.values()))
        diag_scale = 1.0 / math.sqrt(2.0) if columns >= 2 else 1.0
        z2 = None
        if columns >= 2:
            z2 = torch.randn(num, columns, generator=generator, dtype=first.dtype).to(first.device)
            z2 = z2 / math.sqrt(2.0 * (columns - 1))
        draws = {}
        for name, mu in mean.items():
            z1 = torch.randn((num, *mu.shape), generator=generator, dtype=mu.dtype).to(mu.device)
            draw = mu + diag_scale * variance[name].sqrt() * z1
            if z2 is not None:
                draw = draw + torch.tensordot(z2, state.deviations[name][:columns], dims=1)
            draws[name] = draw
        return draws
