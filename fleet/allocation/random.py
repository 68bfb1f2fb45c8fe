"""The random baselines: humans go to robots in uniformly random order."""

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
    TickView,
    check_number,
    first_category,
    register_rule,
)

SCOPES = ("need", "all", "budget")


@dataclass(frozen=True)
class RandomConfig:
    """``allocation.random``; the draws come from the allocator's Generator (``allocation.seed``)."""

    # "need": among robots needing help by the C.U.R. criteria; "all": among all robots, every human busy;
    # "budget": Fleet-DAgger's random, a random number of busy humans around `budget` (below).
    scope: str = "need"
    # scope "budget": the share of robot-steps to give a human, e.g. C.U.R.'s human action steps over its
    # robot-steps in the same setting, so that random spends the same human budget (IFL's action_budget).
    budget: float = 0.0
    # scope "budget": the standard deviation of the busy humans drawn each tick, as a share of the
    # operators on duty (IFL's std_dev).
    budget_std: float = 0.1

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise ValueError(f"allocation.random.scope must be one of {list(SCOPES)}, got {self.scope!r}")
        for key in ("budget", "budget_std"):
            check_number(f"allocation.random.{key}", getattr(self, key))
        if not 0.0 <= self.budget <= 1.0:
            raise ValueError(f"allocation.random.budget must be in [0, 1], got {self.budget!r}")
        if self.budget_std < 0:
            raise ValueError(f"allocation.random.budget_std must be >= 0, got {self.budget_std!r}")


@register_rule("random", RandomConfig)
class RandomRule:
    """Every robot in scope gets a fresh uniform score each tick.

    scope "need": among robots that need help by the C.U.R. criteria (any category, order ignored).
    scope "all": among all robots; a robot's turn ends once t_T is served (it then stops needing help),
    so humans move on to a freshly drawn robot: every human is busy every tick.
    scope "budget" (IFL's ``RandomAllocation`` with ``free_humans``): each tick draws how many humans are
    busy, round(Normal(mean, budget_std * operators)) clipped to [0, operators]; robots whose human is
    committed (t_T not served, or resetting) count first, and a random draw of the other robots fills the
    rest. IFL's mean is budget * robots; here it also carries the budget not yet spent (or overspent) so
    far, because with few operators the rounding, the t_T commitments and humans waiting out a scene reset
    otherwise miss the budget by half or more (measured: 1.4-1.75x C.U.R.'s human steps on push, 2
    operators). Over a run the humans then spend ``budget`` of the robot-steps.
    """

    allows_pick = False  # a baseline of random order: an operator's own pick would bias it

    def __init__(self, config: RandomConfig, rng: np.random.Generator):
        self.rng = rng
        self.scope = config.scope
        self.budget, self.budget_std = config.budget, config.budget_std
        self._drawn: set[str] = set()  # scope budget: the robots drawn this tick
        self._owed = 0.0  # scope budget: robot-steps with a human owed to the budget so far (< 0: overspent)
        self._allotted = 0.0  # scope budget: this step's share, budget * robots

    def begin_tick(self, view: TickView) -> None:
        if self.scope != "budget":
            return
        # The last step's allotment less what it spent (the robots that have a human now), then this one's.
        self._owed += self._allotted - view.with_human
        self._allotted = self.budget * len(view.robots)
        mean = self._allotted + self._owed
        busy = int(np.clip(round(self.rng.normal(mean, self.budget_std * view.operators)), 0, view.operators))
        committed = {
            robot.robot_id
            for robot in view.robots
            if robot.controller is not None and (robot.resetting or robot.human_steps < view.t_T)
        }
        others = [robot.robot_id for robot in view.robots if robot.robot_id not in committed]
        order = self.rng.permutation(len(others))
        self._drawn = {others[i] for i in order[: max(busy - len(committed), 0)]}

    def __call__(self, robot: RobotSlot, thresholds: Thresholds) -> Priority:
        index = first_category("cur", robot, thresholds)
        reason = RANDOM if index is None else CATEGORY_REASON["cur"[index]]
        if self.scope == "budget":
            return (
                Priority(reason, level=0, score=float(self.rng.random()))
                if robot.robot_id in self._drawn
                else NO_NEED
            )
        if self.scope == "all":
            if robot.controller is not None:
                return NO_NEED
        elif index is None:
            return NO_NEED
        return Priority(reason, level=0, score=float(self.rng.random()))
