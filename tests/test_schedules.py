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
