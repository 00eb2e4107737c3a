"""The eps schedule reaches its target (the original stopped at E/(E+1) of it)."""

import pytest

from certbnn.errors import ConfigError
from certbnn.schedules import LinearRamp, epoch_ramp


def test_ramp_reaches_target_and_holds():
    r = LinearRamp(0.1, warmup=2, ramp=4)
    values = [r.value(i) for i in range(9)]
    assert values[:2] == [0.0, 0.0]
    assert values[2:6] == pytest.approx([0.025, 0.05, 0.075, 0.1])
    assert values[5:] == [0.1] * 4


@pytest.mark.parametrize("epochs,steps", [(1, 1), (3, 7), (20, 468)])
def test_epoch_ramp_reaches_target_before_the_end(epochs, steps):
    r = epoch_ramp(0.11, epochs, steps, warmup_epochs=0, ramp_fraction=1.0)
    assert r.value(epochs * steps - 1) == 0.11
    assert all(r.value(i) <= r.value(i + 1) for i in range(epochs * steps - 1))


def test_warmup_and_bad_values():
    r = epoch_ramp(0.1, 4, 10, warmup_epochs=1, ramp_fraction=0.5)
    assert r.value(9) == 0.0 and r.value(10) > 0 and r.value(24) == 0.1
    with pytest.raises(ConfigError, match="ramp fraction"):
        epoch_ramp(0.1, 4, 10, ramp_fraction=1.5)
    with pytest.raises(ConfigError, match="warm-up of 5 epochs exceeds"):
        epoch_ramp(0.1, 4, 10, warmup_epochs=5)


def test_cosine_lr_holds_during_the_ramp_then_decays_and_never_reaches_zero():
    from certbnn.schedules import LRFactor

    lr = LRFactor("cosine", start=10, total=30)
    values = [lr.value(i) for i in range(30)]
    assert values[:11] == [1.0] * 11
    assert all(a > b for a, b in zip(values[10:], values[11:]))
    assert values[20] == pytest.approx(0.5) and 0 < values[-1] < 0.01
    assert [LRFactor().value(i) for i in range(5)] == [1.0] * 5
    with pytest.raises(ConfigError, match="lr schedule must be one of constant, cosine"):
        LRFactor("step")


@pytest.mark.parametrize("warmup,ramp", [(0, 0), (0, 7), (3, 1), (5, 12)])
def test_ramped_settings_change_exactly_when_eps_does(warmup, ramp):
    """lambda / beta ride on the eps ramp, so HMC's potential cache (keyed on eps) stays valid."""
    from certbnn.schedules import on_ramp

    eps = LinearRamp(0.1, warmup=warmup, ramp=ramp)
    lam = on_ramp(0.5, 1.0, eps)
    assert on_ramp(0.5, None, eps) is None
    for step in range(warmup + ramp + 3):
        same_eps = eps.value(step) == eps.value(step + 1)
        assert same_eps == (lam.value(step) == lam.value(step + 1)), step
        assert lam.value(step) == pytest.approx(1.0 - 0.5 * eps.value(step) / 0.1)
