"""Conformal calibration: the achieved false-alarm rate on fresh nominal data is the target's."""

from __future__ import annotations

import json

import numpy as np
import pytest

from policies.safety.calibration import ConformalThreshold, conformal_quantile

TARGET = 0.05


def nominal_episodes(rng: np.random.Generator, count: int) -> list[np.ndarray]:
    """Scores that drift over the episode (high at 'contact', steps 20-40) with heavy-ish noise."""
    episodes = []
    for _ in range(count):
        length = int(rng.integers(40, 90))
        t = np.arange(length)
        phase = np.where((t >= 20) & (t < 40), 2.0, 0.0)
        episodes.append(phase + rng.standard_t(5, size=length) * (0.5 + 0.5 * (phase > 0)))
    return episodes


@pytest.mark.parametrize("unit", ["episode", "step"])
@pytest.mark.parametrize("time_varying", [False, True])
def test_fresh_false_alarm_rate_within_two_points(unit, time_varying):
    rng = np.random.default_rng(0)
    calibration, fresh = nominal_episodes(rng, 2000), nominal_episodes(rng, 4000)
    cal = ConformalThreshold.fit(calibration, TARGET, unit=unit, time_varying=time_varying, bin_steps=10)
    achieved = cal.false_alarm_rate(fresh)
    assert abs(achieved - TARGET) <= 0.02, (unit, time_varying, achieved)
    assert (len(cal.thresholds) > 1) == time_varying


def test_time_varying_threshold_follows_the_episode_phase_and_catches_more_failures():
    rng = np.random.default_rng(1)
    calibration = nominal_episodes(rng, 1000)
    constant = ConformalThreshold.fit(calibration, TARGET)
    varying = ConformalThreshold.fit(calibration, TARGET, time_varying=True, bin_steps=10)
    assert varying.threshold(5) < varying.threshold(25)  # the 'contact' phase is allowed more
    # A failure shows as a moderate rise in free motion (steps 50+), below the contact-phase peak.
    failures = [e + np.where(np.arange(e.size) >= 50, 2.5, 0.0) for e in nominal_episodes(rng, 1000)]
    caught_constant = np.mean([constant.first_alarm(e) is not None for e in failures])
    caught_varying = np.mean([varying.first_alarm(e) is not None for e in failures])
    assert caught_varying > caught_constant + 0.1, (caught_varying, caught_constant)


def test_json_round_trip_and_alarms():
    rng = np.random.default_rng(2)
    cal = ConformalThreshold.fit(nominal_episodes(rng, 200), TARGET, time_varying=True, bin_steps=10)
    again = ConformalThreshold.from_dict(json.loads(json.dumps(cal.to_dict())))
    assert again == cal
    assert again.alarm(cal.threshold(3) + 1e-3, 3) and not again.alarm(cal.threshold(3), 3)
    assert again.threshold(10_000) == cal.thresholds[-1]  # past the calibrated steps: the last bin


def test_conformal_quantile_rank_and_bad_input():
    values = np.arange(1, 20, dtype=float)  # n = 19: rank ceil(20 * 0.95) = 19 -> the largest
    assert conformal_quantile(values, 0.05) == 19.0
    assert conformal_quantile(np.arange(1, 101, dtype=float), 0.1) == 91.0  # ceil(101 * 0.9) = 91
    with pytest.raises(ValueError, match="target_false_alarm"):
        ConformalThreshold.fit([np.ones(3)], 1.5)
    with pytest.raises(ValueError, match="finite"):
        ConformalThreshold.fit([np.array([1.0, np.nan])], 0.05)
    with pytest.raises(ValueError, match="bad conformal threshold"):
        ConformalThreshold.from_dict({"thresholds": []})
