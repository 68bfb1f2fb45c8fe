"""Flotilla's default rule: constraint violations first, then the calibrated learned risk (or the
uncertainty, or a combined score of both: ``signal``) with hysteresis."""

from __future__ import annotations

import math
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

# Weight of (uncertainty, risk) in the score for each choice of signal; None: the config's risk_weight.
SIGNAL_WEIGHTS = {"combined": None, "risk": 1.0, "uncertainty": 0.0}


@dataclass(frozen=True)
class FlotillaConfig:
    """``allocation.flotilla``."""

    # What ranks robots after constraint violations: "uncertainty", the sampling spread; "risk", the learned
    # failure classifier of the policy's safety models; "combined", both by risk_weight. The default is
    # what the fleet benchmark supports (benchmarks/README.md, fleet, run (b), push, 5 seeds): ranking by
    # uncertainty gave 3x the ROHE of risk or combined (0.051 vs 0.017 / 0.018) with the same or better
    # held-out success, although risk predicts episode failure better (signals: AUROC 0.97 vs 0.73) -- a
    # risk model fitted on a few dozen mostly failed episodes flags early and often.
    signal: str = "uncertainty"
    hysteresis: float = 0.25  # how far below the threshold (in exceedance units) a robot must fall to leave
    risk_weight: float = 0.5  # weight of risk against uncertainty in the combined score

    def __post_init__(self) -> None:
        if self.signal not in SIGNAL_WEIGHTS:
            raise ValueError(
                f"allocation.flotilla.signal must be one of {', '.join(SIGNAL_WEIGHTS)}, got {self.signal!r}"
            )
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
    2. Then (level 1) the ``signal``'s exceedance over its threshold, in units of the threshold's distance
       from the typical value: ``signal="risk"``, the learned risk (the policy's safety models,
       policies/safety/), the best failure signal the fleet receives (the signals benchmark), or
       "uncertainty" (the default); with "combined" the score is (1 - risk_weight) * max(z_u, 0) + risk_weight * max(z_r, 0):
       unlike C.U.R.'s strict order, a robot far past the risk threshold is not starved by robots barely
       past the uncertainty threshold, and a robot past both outranks one past either.
    3. Hysteresis: a robot enters the queue when a signal it ranks by reaches its threshold (z >= 0), but
       leaves it, and its human, only once every such signal has fallen ``hysteresis`` units below
       (z < -hysteresis). Signals hovering at the threshold therefore do not make the robot flap in and
       out of the queue or bounce between a human and its policy.
    4. Ties (equal scores, e.g. among constraint violations) go to the robot that has waited longest.

    The thresholds it measures against are the deployed policy's: `flotilla demo` (and the fleet
    benchmark) fixes them for each round from the policy's held-out calibration rollouts
    (sim/round_thresholds.py, ``Allocator.fix_thresholds``), so a better policy asks for less help.
    Left to the allocator's rate calibration it would ask at the rate alpha whatever the policy. A policy
    without safety models reports risk 0: "risk" alone would then ask for nothing.
    """

    def __init__(self, config: FlotillaConfig, rng: np.random.Generator):
        self.hysteresis = config.hysteresis
        weight = SIGNAL_WEIGHTS[config.signal]
        self.risk_weight = config.risk_weight if weight is None else weight

    def __call__(self, robot: RobotSlot, thresholds: Thresholds) -> Priority:
        signals = robot.signals
        if signals.constraint_violation:
            return Priority(CONSTRAINT, level=2, score=0.0)
        # A signal with weight 0 takes no part, in the score or in the need for help.
        z_u = thresholds.uncertainty.exceedance(signals.uncertainty) if self.risk_weight < 1 else -math.inf
        z_r = thresholds.risk.exceedance(signals.risk) if self.risk_weight > 0 else -math.inf
        bar = -self.hysteresis if robot.flagged else 0.0
        if max(z_u, z_r) < bar:
            return NO_NEED
        part_u = (1.0 - self.risk_weight) * max(z_u, 0.0)
        part_r = self.risk_weight * max(z_r, 0.0)
        reason = RISK if (part_r, z_r) > (part_u, z_u) else UNCERTAINTY
        return Priority(reason, level=1, score=part_u + part_r)
