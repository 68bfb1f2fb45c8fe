"""Flotilla's per-round thresholds (sim/round_thresholds.py, Allocator.fix_thresholds): fixed from the
deployed policy's held-out calibration, requests fall as the policy improves; a threshold recalibrated
to a constant request rate (the C.U.R. baseline's) keeps asking as much."""

import numpy as np
import pytest

from fleet.allocation import RobotSlot, Signals, make_allocator
from sim.round_thresholds import RoundThresholdsConfig, fit_round_thresholds

STEPS = 40  # steps per synthetic episode


def episode(rng, fails: bool) -> np.ndarray:
    """A synthetic policy's per-step uncertainty: nominal steps stay low; a failing episode strays into
    high values in its second half."""
    scores = rng.uniform(0.0, 0.3, STEPS)
    if fails:
        scores[STEPS // 2 :] = rng.uniform(0.4, 1.0, STEPS - STEPS // 2)
    return scores


def rollouts(rng, failure_rate: float, episodes: int) -> list[tuple[bool, np.ndarray]]:
    outcomes = rng.random(episodes) < failure_rate
    return [(not fails, episode(rng, fails)) for fails in outcomes]


def test_the_threshold_is_conformal_over_the_nominal_rollouts_only():
    rng = np.random.default_rng(0)
    calibration = rollouts(rng, failure_rate=0.5, episodes=200)
    fixed = fit_round_thresholds(calibration, target_false_alarm=0.1)
    nominal = [scores for success, scores in calibration if success]
    assert fixed.nominal_episodes == len(nominal) and fixed.episodes == 200
    assert fixed.uncertainty <= 0.3  # failing episodes' values (>= 0.4) do not raise it
    fresh = [scores for success, scores in rollouts(rng, 0.0, 400)]
    alarmed = np.mean([scores.max() > fixed.uncertainty for scores in fresh])
    assert alarmed == pytest.approx(0.1, abs=0.04)  # ~ the target share of nominal episodes alarms


def test_a_policy_that_never_succeeds_asks_everywhere():
    rng = np.random.default_rng(1)
    fixed = fit_round_thresholds(rollouts(rng, failure_rate=1.0, episodes=5), target_false_alarm=0.1)
    assert fixed.uncertainty == 0.0 and fixed.nominal_episodes == 0 and fixed.success_rate == 0.0


def requested_steps(allocator, rng, failure_rate: float, robots: int = 6, episodes: int = 20) -> int:
    """Robot-steps at or above the allocator's uncertainty threshold, each robot running `episodes`
    synthetic episodes (no operators: only whether robots ask is counted)."""
    fleet = [RobotSlot(f"r{i}") for i in range(robots)]
    traces = [
        np.concatenate([episode(rng, rng.random() < failure_rate) for _ in range(episodes)]) for _ in fleet
    ]
    asked = 0
    for t in range(episodes * STEPS):
        for robot, trace in zip(fleet, traces, strict=True):
            robot.signals = Signals(uncertainty=float(trace[t]))
        allocator.tick(fleet, [])
        asked += sum(entry.assigned_to is None for entry in allocator.queue())
    return asked


def test_fixed_round_thresholds_ask_less_as_the_policy_improves():
    rng = np.random.default_rng(2)
    config = RoundThresholdsConfig(episodes=30, target_false_alarm=0.1)
    fixed = make_allocator("flotilla", risk_threshold=1.0, window=1000, min_samples=50)
    rate = make_allocator("cur", risk_threshold=1.0, alpha=0.05, window=1000, min_samples=50)
    asked = {"fixed": [], "rate": []}
    for failure_rate in (0.6, 0.3, 0.05):  # the policy improves round over round
        calibration = rollouts(rng, failure_rate, config.episodes)
        fixed.fix_thresholds(fit_round_thresholds(calibration, config.target_false_alarm).uncertainty, None)
        asked["fixed"].append(requested_steps(fixed, rng, failure_rate))
        asked["rate"].append(requested_steps(rate, rng, failure_rate))
    assert asked["fixed"][0] > 2 * asked["fixed"][1] > 2 * asked["fixed"][2]
    # The rate-calibrated threshold asks on ~alpha of the steps whatever the policy does.
    assert max(asked["rate"]) < 1.5 * min(asked["rate"])


def test_fix_thresholds_checks_and_releases():
    allocator = make_allocator("flotilla", uncertainty_threshold=0.5, risk_threshold=None)
    allocator.fix_thresholds(0.2, 0.7)
    assert allocator.thresholds.uncertainty.value == 0.2 and allocator.thresholds.risk.value == 0.7
    allocator.fix_thresholds(None, None)  # back to the configured threshold, and to calibration
    assert allocator.thresholds.uncertainty.value == 0.5 and allocator.risk.fixed is None
    with pytest.raises(ValueError, match="uncertainty threshold must be a finite number"):
        allocator.fix_thresholds(float("nan"), None)


def test_a_threshold_schedule_follows_each_robots_step_in_its_episode():
    # A policy's calibration that varies over the episode (FAIL-Detect's band: policies/safety/calibration):
    # early steps are calm (0.2), later ones, at contact, spread more (0.6), in bins of 10 steps.
    from policies.safety.calibration import ConformalThreshold

    schedule = ConformalThreshold([0.2, 0.6], 0.05, "episode", 10, 30)
    allocator = make_allocator("flotilla", uncertainty_threshold=None, risk_threshold=None)
    allocator.fix_thresholds(schedule, None)
    early, late = RobotSlot("early", Signals(uncertainty=0.4)), RobotSlot("late", Signals(uncertainty=0.4))
    early.step, late.step = 3, 25
    allocator.tick([early, late], [])
    assert [entry.robot_id for entry in allocator.queue()] == ["early"]  # 0.4 is high at step 3, not at 25
    late.step = 5  # its next episode
    allocator.tick([early, late], [])
    assert sorted(entry.robot_id for entry in allocator.queue()) == ["early", "late"]
    with pytest.raises(ValueError, match="risk threshold must be a finite number"):
        allocator.fix_thresholds(schedule, "high")
    assert allocator.uncertainty.schedule is schedule  # a refused call changed nothing
    allocator.fix_thresholds(0.5, None)
    assert allocator.uncertainty.schedule is None and allocator.thresholds.uncertainty.value == 0.5
