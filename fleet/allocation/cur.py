"""C.U.R. (Fleet-DAgger's baseline): constraint violations, then uncertainty above its threshold, then
risk above its threshold, in a fixed order of categories, as the IFL benchmark's ``CURAllocation`` does:
any order of any of the three letters ("cur", "cru", "uc": Fleet-EnsembleDAgger, "c": a BC baseline that
only resets), IFL's ``warmup_penalty`` and its cap on the share of humans that go to violating robots
(``cv_thresh``). Run it with ``allocation.preempt`` on to re-rank humans after t_T as IFL does."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fleet.allocation.core import (
    CATEGORY_REASON,
    NO_NEED,
    Priority,
    RobotSlot,
    Thresholds,
    TickView,
    check_int,
    check_number,
    first_category,
    register_rule,
)


@dataclass(frozen=True)
class CURConfig:
    """``allocation.cur``."""

    # Category order: letters of c(onstraint) u(ncertainty) r(isk), each at most once, e.g. "cru" (risk
    # before uncertainty), "uc" (Fleet-EnsembleDAgger), "c" (only resets: behaviour cloning's baseline).
    order: str = "cur"
    # IFL's warmup_penalty: for this many allocator ticks from the start a violating robot ranks below
    # every other robot that needs help, and gets none for its violation.
    warmup_penalty: int = 0
    # IFL's cv_thresh: at most int(violation_share * operators on duty) violating robots rank as
    # violations; the others rank by their other signals. None: no cap.
    violation_share: float | None = None

    def __post_init__(self) -> None:
        order = self.order.lower() if isinstance(self.order, str) else None
        if not order or set(order) - set("cur") or len(set(order)) != len(order):
            raise ValueError(
                "allocation.cur.order must be a permutation of 'cur' or of some of its letters "
                f"(e.g. 'cur', 'cru', 'uc', 'c'), got {self.order!r}"
            )
        check_int("allocation.cur.warmup_penalty", self.warmup_penalty, minimum=0)
        if self.violation_share is not None:
            check_number("allocation.cur.violation_share", self.violation_share)
            if self.violation_share < 0:
                raise ValueError(
                    f"allocation.cur.violation_share must be >= 0 or null, got {self.violation_share!r}"
                )


@register_rule("cur", CURConfig)
class CURRule:
    """C.U.R.: the first category in ``order`` a robot falls in ranks it (earlier is higher). Within
    uncertainty or risk the larger value goes first; within constraint violations the longest wait (the
    allocator's tie-break). A violation ignored by the warmup or the cap ranks the robot by its other
    categories (below everyone during the warmup), as IFL's cv = -1 and cv = 0 do."""

    def __init__(self, config: CURConfig, rng: np.random.Generator):
        self.order = config.order.lower()
        self.warmup = config.warmup_penalty
        self.share = config.violation_share
        self._warming_up = False
        self._capped: set[str] = set()  # violating robots whose violation is not counted this tick

    def begin_tick(self, view: TickView) -> None:
        self._warming_up = view.tick <= self.warmup
        self._capped = set()
        if self.share is None:
            return
        violating = sorted(
            (robot for robot in view.robots if robot.signals.constraint_violation),
            key=lambda robot: (not robot.resetting, -robot.waited_ticks, robot.robot_id),
        )
        allowed = math.floor(self.share * view.operators + 1e-9)
        self._capped = {robot.robot_id for robot in violating[allowed:]}

    def __call__(self, robot: RobotSlot, thresholds: Thresholds) -> Priority:
        order, penalty = self.order, 0
        if robot.signals.constraint_violation and (self._warming_up or robot.robot_id in self._capped):
            order = order.replace("c", "")
            penalty = len(self.order) + 1 if self._warming_up else 0
        index = first_category(order, robot, thresholds) if order else None
        if index is None:
            return NO_NEED
        letter = order[index]
        value = {"c": 0.0, "u": robot.signals.uncertainty, "r": robot.signals.risk}[letter]
        level = len(self.order) - self.order.index(letter) - penalty
        return Priority(CATEGORY_REASON[letter], level=level, score=value)
