"""Schedules for the training radius eps and the clean-loss weight lambda.

The original code ramped eps to E/(E+1) * eps_train and never reached it. Here
the ramp is linear over whole steps and **reaches** ``target`` exactly at the
last ramp step; it then holds.
"""

from __future__ import annotations

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
