"""C.U.R. (Fleet-DAgger's baseline): constraint violations, then uncertainty above its threshold, then
risk above its threshold, in a fixed order of categories."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fleet.allocation.core import (
    CATEGORY_REASON,
    NO_NEED,
    Priority,
    RobotSlot,
    Thresholds,
    first_category,
    register_rule,
)


@dataclass(frozen=True)
class CURConfig:
    """``allocation.cur``."""

    order: str = (
        "cur"  # category order, a permutation of c(onstraint) u(ncertainty) r(isk); "cru": risk first
    )

    def __post_init__(self) -> None:
        if not isinstance(self.order, str) or sorted(self.order.lower()) != sorted("cur"):
            raise ValueError(
                f"allocation.cur.order must be a permutation of 'cur' (e.g. 'cur', 'cru', 'ucr'), got {self.order!r}"
            )


@register_rule("cur", CURConfig)
class CURRule:
    """C.U.R.: the first category in ``order`` a robot falls in ranks it (earlier is higher). Within
    uncertainty or risk the larger value goes first; within constraint violations the longest wait (the
    allocator's tie-break)."""

    def __init__(self, config: CURConfig, rng: np.random.Generator):
        self.order = config.order.lower()

    def __call__(self, robot: RobotSlot, thresholds: Thresholds) -> Priority:
        index = first_category(self.order, robot, thresholds)
        if index is None:
            return NO_NEED
        letter = self.order[index]
        value = {"c": 0.0, "u": robot.signals.uncertainty, "r": robot.signals.risk}[letter]
        return Priority(CATEGORY_REASON[letter], level=len(self.order) - index, score=value)
