"""Flotilla's default rule: constraint violations first, then one combined score of uncertainty and risk
with hysteresis."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fleet.allocation.core import (
    CONSTRAINT,
    NO_NEED,
    RISK,
    UNCERTAINTY,
    Priority,
    RobotSlot,
    Thresholds,
    check_number,
    register_rule,
)


@dataclass(frozen=True)
class FlotillaConfig:
    """``allocation.flotilla``."""

    hysteresis: float = 0.25  # how far below the threshold (in exceedance units) a robot must fall to leave
    risk_weight: float = 0.5  # weight of risk against uncertainty in the combined score

    def __post_init__(self) -> None:
        check_number("allocation.flotilla.hysteresis", self.hysteresis)
        if self.hysteresis < 0:
            raise ValueError(f"allocation.flotilla.hysteresis must be >= 0, got {self.hysteresis!r}")
        check_number("allocation.flotilla.risk_weight", self.risk_weight)
        if not 0.0 <= self.risk_weight <= 1.0:
            raise ValueError(f"allocation.flotilla.risk_weight must be in [0, 1], got {self.risk_weight!r}")


@register_rule("flotilla", FlotillaConfig)
class FlotillaRule:
    """Flotilla's default rule.

    1. Constraint violations first (level 2). A blocked robot makes no progress and yields no data until
       it is reset, and every tick it waits is wasted fleet time; among them the longest wait goes first.
    2. Then one combined score (level 1) of uncertainty and risk, each measured as its exceedance over
       its threshold in units of the threshold's distance from the typical value, so the two signals are
       comparable whatever their ranges: score = (1 - risk_weight) * max(z_u, 0) + risk_weight * max(z_r, 0).
       Unlike C.U.R.'s strict order, a robot about to fail (far past the risk threshold) is not starved by
       robots barely past the uncertainty threshold, and a robot past both outranks one past either.
    3. Hysteresis: a robot enters the queue when a signal reaches its threshold (max z >= 0, the
       calibrated request rate), but leaves it, and its human, only once every signal has fallen
       ``hysteresis`` units below (max z < -hysteresis). Signals hovering at the threshold therefore do not
       make the robot flap in and out of the queue or bounce between a human and its policy.
    4. Ties (equal scores, e.g. among constraint violations) go to the robot that has waited longest.

    The thresholds it measures against are the deployed policy's: `flotilla demo` (and the fleet
    benchmark) fixes them for each round from the policy's held-out calibration rollouts
    (sim/round_thresholds.py, ``Allocator.fix_thresholds``), so a better policy asks for less help.
    Left to the allocator's rate calibration it would ask at the rate alpha whatever the policy.
    """

    def __init__(self, config: FlotillaConfig, rng: np.random.Generator):
        self.hysteresis = config.hysteresis
        self.risk_weight = config.risk_weight

    def __call__(self, robot: RobotSlot, thresholds: Thresholds) -> Priority:
        signals = robot.signals
        if signals.constraint_violation:
            return Priority(CONSTRAINT, level=2, score=0.0)
        z_u = thresholds.uncertainty.exceedance(signals.uncertainty)
        z_r = thresholds.risk.exceedance(signals.risk)
        bar = -self.hysteresis if robot.flagged else 0.0
        if max(z_u, z_r) < bar:
            return NO_NEED
        part_u = (1.0 - self.risk_weight) * max(z_u, 0.0)
        part_r = self.risk_weight * max(z_r, 0.0)
        reason = RISK if (part_r, z_r) > (part_u, z_u) else UNCERTAINTY
        return Priority(reason, level=1, score=part_u + part_r)
