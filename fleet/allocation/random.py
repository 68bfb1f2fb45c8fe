"""The random baseline: humans go to robots in uniformly random order."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fleet.allocation.core import (
    CATEGORY_REASON,
    NO_NEED,
    RANDOM,
    Priority,
    RobotSlot,
    Thresholds,
    first_category,
    register_rule,
)

SCOPES = ("need", "all")


@dataclass(frozen=True)
class RandomConfig:
    """``allocation.random``; the draws come from the allocator's Generator (``allocation.seed``)."""

    scope: str = "need"  # "need": among robots needing help by the C.U.R. criteria; "all": among all robots

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise ValueError(f"allocation.random.scope must be one of {list(SCOPES)}, got {self.scope!r}")


@register_rule("random", RandomConfig)
class RandomRule:
    """Every robot in scope gets a fresh uniform score each tick.

    scope "need": among robots that need help by the C.U.R. criteria (any category, order ignored).
    scope "all": among all robots, as Fleet-DAgger's random baseline; a robot's turn ends once t_T is
    served (it then stops needing help), so humans move on to a freshly drawn robot.
    """

    def __init__(self, config: RandomConfig, rng: np.random.Generator):
        self.rng = rng
        self.scope = config.scope

    def __call__(self, robot: RobotSlot, thresholds: Thresholds) -> Priority:
        index = first_category("cur", robot, thresholds)
        if self.scope == "all":
            if robot.controller is not None:
                return NO_NEED
            reason = RANDOM if index is None else CATEGORY_REASON["cur"[index]]
        elif index is None:
            return NO_NEED
        else:
            reason = CATEGORY_REASON["cur"[index]]
        return Priority(reason, level=0, score=float(self.rng.random()))
