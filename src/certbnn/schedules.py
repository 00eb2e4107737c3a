"""Schedules of a training run: the radius eps, the clean-loss weight lambda, the CROWN-IBP
weight beta (all on one linear ramp) and the learning-rate factor.

The original code ramped eps to E/(E+1) * eps_train and never reached it. Here
the ramp is linear over whole steps and **reaches** ``target`` exactly at the
last ramp step; it then holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from certbnn.errors import ConfigError


@dataclass(frozen=True)
class LinearRamp:
    """``value(step)``: 0 for ``step < warmup``; then a linear ramp over ``ramp`` steps
    reaching ``target`` at step ``warmup + ramp - 1``; ``target`` afterwards.
    ``start`` is the value during warm-up and at the ramp's start (default 0)."""

    target: float
    warmup: int = 0
    ramp: int = 0
    start: float = 0.0

    def __post_init__(self) -> None:
        if self.warmup < 0 or self.ramp < 0:
            raise ConfigError(f"schedule lengths must be >= 0 (warmup={self.warmup}, ramp={self.ramp})")

    def value(self, step: int) -> float:
        if step < self.warmup:
            return self.start
        position = step - self.warmup + 1  # 1 at the first ramp step
        if position >= self.ramp:
            return self.target
        return self.start + position / self.ramp * (self.target - self.start)

    @property
    def first_target_step(self) -> int:
        """The first step whose value is ``target`` (0 when ``start == target``); every later
        step holds it. Samplers store samples only from this step on."""
        if self.start == self.target:
            return 0
        return self.warmup + max(self.ramp, 1) - 1


def epoch_ramp(
    target: float,
    epochs: int,
    steps_per_epoch: int,
    *,
    warmup_epochs: float = 0.0,
    ramp_fraction: float = 0.5,
    start: float = 0.0,
) -> LinearRamp:
    """A per-step ramp: ``warmup_epochs`` at ``start``, then a linear ramp over
    ``ramp_fraction`` of the remaining steps reaching ``target``, then a hold."""
    if not 0.0 <= ramp_fraction <= 1.0:
        raise ConfigError(f"ramp fraction must be in [0, 1], got {ramp_fraction}")
    total = epochs * steps_per_epoch
    warmup = int(round(warmup_epochs * steps_per_epoch))
    if warmup > total:
        raise ConfigError(f"warm-up of {warmup_epochs} epochs exceeds the {epochs} training epochs")
    ramp = int(round(ramp_fraction * (total - warmup)))
    return LinearRamp(target=target, warmup=warmup, ramp=ramp, start=start)


LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class LRFactor:
    """The learning rate's multiplier at each step: 1 for ``constant``; for ``cosine`` 1 until
    step ``start`` (the end of the eps ramp: the robust loss has reached its final form), then
    ``0.5 (1 + cos(pi (step - start) / (total - start)))``, which is > 0 at every step before
    ``total`` (so the last step still moves)."""

    kind: str = "constant"
    start: int = 0
    total: int = 0

    def __post_init__(self) -> None:
        if self.kind not in LR_SCHEDULES:
            raise ConfigError(f"lr schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.kind!r}")

    def value(self, step: int) -> float:
        if self.kind == "constant" or step < self.start or self.total <= self.start:
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * (step - self.start) / (self.total - self.start)))


def on_ramp(target: float, start: float | None, eps_ramp: LinearRamp) -> LinearRamp | None:
    """A schedule from ``start`` to ``target`` on the same steps as ``eps_ramp`` (None when
    ``start`` is None: the value is ``target`` throughout). Sharing the eps ramp's steps means
    the value changes exactly when eps does, so a cache keyed on eps (HMC's potential) stays valid."""
    if start is None:
        return None
    return LinearRamp(target=target, warmup=eps_ramp.warmup, ramp=eps_ramp.ramp, start=start)
