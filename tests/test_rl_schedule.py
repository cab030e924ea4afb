import math

import pytest

from k2sys.rl.schedule import TemperatureSchedule


@pytest.mark.parametrize("kind", ["linear", "exponential", "cosine"])
def test_endpoints_monotone_and_clamped(kind):
    s = TemperatureSchedule(t_start=1.0, t_end=0.6, total_steps=10, kind=kind)
    vals = [s(i) for i in range(15)]
    assert vals[0] == pytest.approx(1.0) and vals[10] == pytest.approx(0.6)
    assert all(a >= b - 1e-12 for a, b in zip(vals, vals[1:]))
    assert vals[14] == pytest.approx(0.6)


def test_formulas_at_midpoint():
    mid = dict(t_start=1.0, t_end=0.25, total_steps=4)
    assert TemperatureSchedule(kind="linear", **mid)(2) == pytest.approx(0.625)
    assert TemperatureSchedule(kind="exponential", **mid)(2) == pytest.approx(0.5)  # geometric mean
    assert TemperatureSchedule(kind="cosine", **mid)(2) == pytest.approx(0.625)
    assert TemperatureSchedule(kind="cosine", **mid)(1) == pytest.approx(0.25 + 0.75 * 0.5 * (1 + math.cos(math.pi / 4)))


def test_rising_schedule_allowed():
    assert TemperatureSchedule(t_start=0.5, t_end=1.0, total_steps=2)(1) == pytest.approx(0.75)


@pytest.mark.parametrize("kw,needle", [(dict(t_start=0.0), "t_start"), (dict(t_end=-1.0), "t_end"),
                                       (dict(total_steps=0), "total_steps"), (dict(kind="step"), "kind")])
def test_validation(kw, needle):
    with pytest.raises(ValueError, match=needle):
        TemperatureSchedule(**kw)


def test_negative_step_raises():
    with pytest.raises(ValueError, match="step"):
        TemperatureSchedule()(-1)
