"""Who gets a human: the fleet server's allocation of teleoperators to robots.

The rules follow the Fleet-DAgger family (Hoque et al., 2022):

- every robot gets a priority from its signals (uncertainty, risk, constraint violation);
- free operators go to the highest-priority robots that need help;
- an operator stays at least ``t_T`` steps with a robot (minimum intervention time), and after that the
  robot goes back to its policy once it no longer needs help (or once the operator asks to release it);
- a robot in constraint violation is blocked (it cannot act) until a human resets it, which takes ``t_R``
  steps of that operator's time;
- thresholds on uncertainty and risk can be calibrated to a target request rate ``alpha`` the way
  ThriftyDAgger does (Hoque et al., 2021): the threshold is the (1 - alpha) quantile of recent values.

The policies differ only in their priority function: ``"random"`` and ``"cur"`` (C.U.R.) are the
Fleet-DAgger baselines, ``"flotilla"`` is Flotilla's default (see :class:`FlotillaPriority`).

Everything here is synchronous and free of I/O: the server calls :meth:`Allocator.tick` once per
allocation tick with the robots' states and the operators on duty, applies the returned decisions (sends
assignments, teleop/hold/reset commands) and tells the allocator about disconnects and explicit releases.
Time is counted in ticks; the server ticks at the fleet's control rate, so one tick is one robot step.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

# Why a robot gets a human (Assignment.reason, QueueEntry.reason; the proto carries the same strings).
CONSTRAINT = "constraint_violation"
UNCERTAINTY = "uncertainty"
RISK = "risk"
RANDOM = "random"
_CATEGORY_REASON = {"c": CONSTRAINT, "u": UNCERTAINTY, "r": RISK}

# Why a robot leaves its human (Release.reason).
NO_LONGER_NEEDED = "no_longer_needed"
RESET_DONE = "reset_done"
OPERATOR_RELEASE = "operator_release"
OPERATOR_DISCONNECTED = "operator_disconnected"
ROBOT_DISCONNECTED = "robot_disconnected"

RANDOM_SCOPES = ("need", "all")
_MIN_SPREAD = 1e-9  # keeps exceedances finite when a signal's window is constant


# ------------------------------------------------------------------------------------------ state


@dataclass
class Signals:
    """A robot's latest signals (proto ``Signals``)."""

    uncertainty: float = 0.0
    risk: float = 0.0
    density: float = 0.0  # the safety model's value; carried for the console, not used to allocate
    constraint_violation: bool = False


@dataclass
class RobotState:
    """One robot as the allocator sees it; the server keeps one per robot and passes them to every tick.

    The server writes ``signals``, ``connected`` and ``idle``; the allocator writes everything below them
    (the server reads ``controller`` to route teleop actions and ``blocked`` to hold the robot).
    """

    robot_id: str
    signals: Signals = field(default_factory=Signals)
    connected: bool = True
    idle: bool = False  # not running an episode (between episodes, e-stopped, swapping policy): no help

    # --- written by the Allocator -------------------------------------------------------------
    controller: str | None = None  # operator in control, None while autonomous or waiting
    reason: str | None = None  # why the current operator has it
    human_steps: int = 0  # ticks under the current operator
    resetting: bool = False  # the operator is doing the hard reset of a blocked robot
    reset_steps_left: int = 0  # ticks until that reset is done
    release_requested: bool = False  # the operator asked to hand back; honoured once t_T is served
    # Allocation memory: queue membership for hysteresis, time waited (tie-break), and whether the
    # robot lost its operator to a disconnect (it is then served before everyone else).
    flagged: bool = False
    waited_ticks: int = 0
    displaced: bool = False

    @property
    def blocked(self) -> bool:
        """A robot in constraint violation cannot act until a human reset is done."""
        return self.signals.constraint_violation


# --------------------------------------------------------------------------------------- decisions


@dataclass(frozen=True)
class Assignment:
    """An operator takes a robot (maps to the proto ``Assignment``)."""

    operator_id: str
    robot_id: str
    reason: str
    needs_reset: bool  # the robot is blocked: the operator resets it, then it goes back to its policy
    min_steps: int  # ticks the operator is committed: t_T for teleop, t_R for a reset
    reset_steps: int  # t_R when needs_reset, else 0


@dataclass(frozen=True)
class Release:
    """A robot leaves its operator; with reason ``reset_done`` the server also sends the robot its reset."""

    robot_id: str
    operator_id: str
    reason: str


@dataclass
class Decisions:
    """What one tick decided; apply releases before assignments (a freed operator may be reassigned)."""

    releases: list[Release] = field(default_factory=list)
    assignments: list[Assignment] = field(default_factory=list)


@dataclass(frozen=True)
class QueueEntry:
    """A row of the console's queue (maps to the proto ``QueueEntry``; the list order is the priority)."""

    robot_id: str
    reason: str | None
    level: int
    score: float
    waited_ticks: int
    assigned_to: str | None


# ------------------------------------------------------------------------------------- thresholds


@dataclass(frozen=True)
class Threshold:
    """A signal's request threshold and the typical (median) value that gives it a scale."""

    value: float  # help is requested at or above this; inf: not calibrated yet (never requests)
    typical: float

    def exceeded(self, x: float) -> bool:
        return x >= self.value  # False for NaN, so a broken signal never requests help

    def exceedance(self, x: float) -> float:
        """How far ``x`` is past the threshold, in units of the threshold's distance above typical.

        0 is at the threshold, 1 is as far above it as the threshold is above typical, negative is below.
        The unit makes uncertainty and risk comparable without knowing their ranges.
        """
        if math.isnan(x) or math.isinf(self.value):
            return -math.inf
        return (x - self.value) / max(self.value - self.typical, _MIN_SPREAD)


@dataclass(frozen=True)
class Thresholds:
    uncertainty: Threshold
    risk: Threshold


class QuantileThreshold:
    """ThriftyDAgger's calibration: the threshold is the (1 - alpha) quantile of a sliding window.

    Values are the signals of autonomous robot-steps, so about a fraction ``alpha`` of such steps would
    request help. With ``fixed`` set the threshold stays put (the window still gives the typical value).
    Until ``min_samples`` values are in, a calibrated threshold is infinite: no requests on an unknown scale.
    """

    def __init__(self, alpha: float, window: int, min_samples: int, fixed: float | None = None):
        self.alpha = alpha
        self.min_samples = min_samples
        self.fixed = fixed
        self._values = np.empty(window, dtype=np.float64)  # ring buffer
        self._count = 0
        self._next = 0

    def observe(self, values: Iterable[float]) -> None:
        new = np.asarray(list(values), dtype=np.float64)
        new = new[np.isfinite(new)][-len(self._values):]
        if new.size == 0:
            return
        slots = (self._next + np.arange(new.size)) % len(self._values)
        self._values[slots] = new
        self._next = int(slots[-1] + 1) % len(self._values)
        self._count = min(self._count + new.size, len(self._values))

    @property
    def samples(self) -> int:
        return self._count

    def current(self) -> Threshold:
        if self._count < self.min_samples:
            value = math.inf if self.fixed is None else self.fixed
            return Threshold(value, 0.0)  # signals are >= 0 by convention, so 0 is a fair typical
        median, quantile = np.quantile(self._values[: self._count], [0.5, 1.0 - self.alpha])
        value = float(quantile) if self.fixed is None else self.fixed
        if self.fixed is None and quantile <= median:
            # Mostly one value (e.g. risk before a risk model exists): "at least the quantile" would
            # flag every robot. Flag only what stands above the typical value, if anything does.
            window = self._values[: self._count]
            above = window[window > median]
            value = float(above.min()) if above.size else math.inf
        return Threshold(value, float(median))


# -------------------------------------------------------------------------------------- priorities


@dataclass(frozen=True)
class Priority:
    """A robot's place in line: ``reason`` None means it needs no help; else higher level, then score."""

    reason: str | None = None
    level: int = 0  # coarse class (e.g. constraint violations above signals)
    score: float = 0.0  # order within a level

    @property
    def needs_help(self) -> bool:
        return self.reason is not None


NO_NEED = Priority()


class PriorityFunction(Protocol):
    """Maps a robot (connected, not idle) and the current thresholds to its priority.

    Called once per robot per tick, also for robots under a human (their need decides their release).
    """

    def __call__(self, robot: RobotState, thresholds: Thresholds) -> Priority: ...


def _first_category(order: str, robot: RobotState, thresholds: Thresholds) -> int | None:
    """Index in ``order`` ('c', 'u', 'r' letters) of the first category the robot falls in, or None."""
    signals = robot.signals
    applies = {
        "c": signals.constraint_violation,
        "u": thresholds.uncertainty.exceeded(signals.uncertainty),
        "r": thresholds.risk.exceeded(signals.risk),
    }
    return next((index for index, letter in enumerate(order) if applies[letter]), None)


class CURPriority:
    """C.U.R. (Fleet-DAgger): constraint violations, then uncertainty above threshold, then risk above.

    ``order`` permutes the categories ("cru": risk before uncertainty). Within uncertainty or risk the
    larger value goes first; within constraint violations the longest wait (the allocator's tie-break).
    """

    def __init__(self, order: str = "cur"):
        self.order = _check_order(order)

    def __call__(self, robot: RobotState, thresholds: Thresholds) -> Priority:
        index = _first_category(self.order, robot, thresholds)
        if index is None:
            return NO_NEED
        letter = self.order[index]
        value = {"c": 0.0, "u": robot.signals.uncertainty, "r": robot.signals.risk}[letter]
        return Priority(_CATEGORY_REASON[letter], level=len(self.order) - index, score=value)


class RandomPriority:
    """The random baseline: humans go to robots in uniformly random order.

    scope "need": among robots that need help by the C.U.R. criteria (any category, order ignored).
    scope "all": among all robots, as Fleet-DAgger's random baseline; a robot's turn ends once t_T is
    served (it then stops needing help), so humans move on to a freshly drawn robot.
    """

    def __init__(self, rng: np.random.Generator, scope: str = "need"):
        self.rng = rng
        self.scope = _check_scope(scope)

    def __call__(self, robot: RobotState, thresholds: Thresholds) -> Priority:
        index = _first_category("cur", robot, thresholds)
        if self.scope == "all":
            if robot.controller is not None:
                return NO_NEED
            reason = RANDOM if index is None else _CATEGORY_REASON["cur"[index]]
        elif index is None:
            return NO_NEED
        else:
            reason = _CATEGORY_REASON["cur"[index]]
        return Priority(reason, level=0, score=float(self.rng.random()))


class FlotillaPriority:
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
    """

    def __init__(self, hysteresis: float = 0.25, risk_weight: float = 0.5):
        self.hysteresis = hysteresis
        self.risk_weight = risk_weight

    def __call__(self, robot: RobotState, thresholds: Thresholds) -> Priority:
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


# The policies by name: each builds its priority function from the config and the allocator's Generator.
POLICIES: dict[str, Callable[[AllocatorConfig, np.random.Generator], PriorityFunction]] = {
    "flotilla": lambda config, rng: FlotillaPriority(config.hysteresis, config.risk_weight),
    "cur": lambda config, rng: CURPriority(config.order),
    "random": lambda config, rng: RandomPriority(rng, config.random_scope),
}


# ------------------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class AllocatorConfig:
    """Allocation settings; every value is checked here, and a bad one raises ValueError naming it."""

    policy: str = "flotilla"  # "flotilla", "cur" or "random"
    t_T: int = 20  # minimum ticks an operator keeps a robot it took over (minimum intervention time)
    t_R: int = 10  # ticks a human reset of a blocked robot takes (at least one tick even when 0)
    # Fixed thresholds; None calibrates the threshold to the target request rate alpha instead.
    uncertainty_threshold: float | None = None
    risk_threshold: float | None = None
    alpha: float = 0.05  # target fraction of autonomous robot-steps whose signal requests help
    window: int = 5000  # recent robot-steps the quantile is taken over
    min_samples: int = 100  # values needed before a calibrated threshold (or the typical value) is used
    order: str = "cur"  # category order of the "cur" policy
    hysteresis: float = 0.25  # "flotilla": how far below the threshold a robot must fall to leave
    risk_weight: float = 0.5  # "flotilla": weight of risk against uncertainty in the combined score
    random_scope: str = "need"  # "random": among robots needing help ("need") or all robots ("all")
    seed: int | None = 0  # seeds the random policy's numpy Generator

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown allocation policy {self.policy!r}; known: {sorted(POLICIES)}")
        _check_int("t_T", self.t_T, minimum=0)
        _check_int("t_R", self.t_R, minimum=0)
        _check_int("window", self.window, minimum=1)
        _check_int("min_samples", self.min_samples, minimum=1)
        if self.min_samples > self.window:
            raise ValueError(f"min_samples ({self.min_samples}) must not exceed window ({self.window})")
        _check_number("alpha", self.alpha)
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1) (target request rate), got {self.alpha!r}")
        for name in ("uncertainty_threshold", "risk_threshold"):
            if getattr(self, name) is not None:
                _check_number(name, getattr(self, name))
        _check_number("hysteresis", self.hysteresis)
        if self.hysteresis < 0:
            raise ValueError(f"hysteresis must be >= 0, got {self.hysteresis!r}")
        _check_number("risk_weight", self.risk_weight)
        if not 0.0 <= self.risk_weight <= 1.0:
            raise ValueError(f"risk_weight must be in [0, 1], got {self.risk_weight!r}")
        _check_order(self.order)
        _check_scope(self.random_scope)
        if self.seed is not None:
            _check_int("seed", self.seed, minimum=0)


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_number(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def _check_order(order: object) -> str:
    if not isinstance(order, str) or sorted(order.lower()) != sorted("cur"):
        raise ValueError(f"order must be a permutation of 'cur' (e.g. 'cur', 'cru', 'ucr'), got {order!r}")
    return order.lower()


def _check_scope(scope: object) -> str:
    if scope not in RANDOM_SCOPES:
        raise ValueError(f"random_scope must be one of {list(RANDOM_SCOPES)}, got {scope!r}")
    return scope


# --------------------------------------------------------------------------------------- allocator


class Allocator:
    """Assigns operators to robots once per tick; see the module docstring for the rules.

    ``priority`` replaces the config's policy with any :class:`PriorityFunction`.
    """

    def __init__(self, config: AllocatorConfig | None = None, priority: PriorityFunction | None = None):
        self.config = config or AllocatorConfig()
        self.rng = np.random.default_rng(self.config.seed)
        self.priority = priority or POLICIES[self.config.policy](self.config, self.rng)
        calibration = (self.config.alpha, self.config.window, self.config.min_samples)
        self.uncertainty = QuantileThreshold(*calibration, fixed=self.config.uncertainty_threshold)
        self.risk = QuantileThreshold(*calibration, fixed=self.config.risk_threshold)
        self.ticks = 0
        self._queue: list[QueueEntry] = []

    @property
    def thresholds(self) -> Thresholds:
        return Thresholds(self.uncertainty.current(), self.risk.current())

    def tick(self, robots: Iterable[RobotState], operators: Iterable[str]) -> Decisions:
        """Advance one tick: count time, release robots that are done, give free operators robots.

        ``robots``: every robot the server knows (disconnected ones are ignored); their allocator fields
        are updated in place. ``operators``: the operators on duty, busy or not; a robot whose operator
        is missing from it is treated as if that operator had disconnected.
        """
        robots, on_duty = list(robots), set(operators)
        _check_pairings(robots)
        self.ticks += 1
        decisions = Decisions()
        self._advance_time(robots, on_duty, decisions)
        active = [robot for robot in robots if robot.connected]
        self._calibrate(active)
        priorities = self._prioritize(active)
        released_now = set()
        for robot in active:
            if robot.controller is not None:
                self._review(robot, priorities[robot.robot_id], decisions)
                if robot.controller is None:
                    released_now.add(robot.robot_id)
        # A robot released this tick gets at least one tick on its own before it can be taken again.
        waiting = [robot for robot in active if robot.robot_id not in released_now]
        self._assign(waiting, priorities, on_duty - {robot.controller for robot in robots}, decisions)
        self._queue = self._snapshot(active, priorities)
        return decisions

    def queue(self) -> list[QueueEntry]:
        """The last tick's queue: robots waiting for a human in the order they will be served, then the
        robots under a human (``assigned_to`` set)."""
        return list(self._queue)

    def operator_disconnected(self, operator_id: str, robots: Iterable[RobotState]) -> list[Release]:
        """Free the robots of an operator who left; they go back to the queue ahead of everyone."""
        return [self._unpair(robot, OPERATOR_DISCONNECTED) for robot in robots
                if robot.controller == operator_id]

    def robot_disconnected(self, robot: RobotState) -> Release | None:
        """Mark the robot disconnected and free its operator (the returned Release says whom to tell)."""
        release = self._unpair(robot, ROBOT_DISCONNECTED) if robot.controller is not None else None
        robot.connected = False
        _leave_queue(robot)
        return release

    def operator_release(self, robot: RobotState, operator_id: str) -> None:
        """The operator asks to hand the robot back to its policy.

        The release happens at the next tick at which the operator has served t_T and any reset is done;
        that tick's Decisions carry it. Raises ValueError if the operator does not control the robot.
        """
        if robot.controller != operator_id:
            raise ValueError(f"operator {operator_id!r} does not control robot {robot.robot_id!r} "
                             f"(controller: {robot.controller!r})")
        robot.release_requested = True

    # ------------------------------------------------------------------------------------ internals

    def _advance_time(self, robots: list[RobotState], on_duty: set[str], decisions: Decisions) -> None:
        """One tick passes for every human-robot pair; pairs whose robot or operator is gone break up."""
        for robot in robots:
            if not robot.connected:
                if robot.controller is not None:
                    decisions.releases.append(self._unpair(robot, ROBOT_DISCONNECTED))
                _leave_queue(robot)
            elif robot.controller is not None and robot.controller not in on_duty:
                decisions.releases.append(self._unpair(robot, OPERATOR_DISCONNECTED))
            elif robot.controller is not None:
                robot.human_steps += 1
                if robot.resetting:
                    robot.reset_steps_left = max(robot.reset_steps_left - 1, 0)

    def _prioritize(self, active: list[RobotState]) -> dict[str, Priority]:
        thresholds = self.thresholds
        priorities = {}
        for robot in active:
            priority = NO_NEED if robot.idle else self.priority(robot, thresholds)
            priorities[robot.robot_id] = priority
            robot.flagged = priority.needs_help
            if robot.controller is None and not robot.flagged:
                _leave_queue(robot)
        return priorities

    def _assign(self, candidates: list[RobotState], priorities: dict[str, Priority], free: set[str],
                decisions: Decisions) -> None:
        """Free operators (in id order, for determinism) take the best-ranked robots needing help."""
        waiting = sorted(
            (robot for robot in candidates
             if robot.controller is None and priorities[robot.robot_id].needs_help),
            key=lambda robot: _rank(robot, priorities[robot.robot_id]),
        )
        for operator_id, robot in zip(sorted(free), waiting, strict=False):
            decisions.assignments.append(self._pair(robot, operator_id, priorities[robot.robot_id]))
        for robot in waiting[len(free):]:
            robot.waited_ticks += 1

    def _calibrate(self, active: list[RobotState]) -> None:
        # Only autonomous, acting robots: their steps are the ones that would request help.
        acting = [robot.signals for robot in active
                  if robot.controller is None and not robot.idle and not robot.blocked]
        self.uncertainty.observe(signals.uncertainty for signals in acting)
        self.risk.observe(signals.risk for signals in acting)

    def _review(self, robot: RobotState, priority: Priority, decisions: Decisions) -> None:
        """Decide about a robot under a human: start a reset, keep it, or release it."""
        if robot.blocked and not robot.resetting:
            # It hit a constraint under the human's control: the same operator resets it.
            robot.resetting, robot.reset_steps_left, robot.human_steps = True, self.config.t_R, 0
            robot.reason = CONSTRAINT
            decisions.assignments.append(self._assignment(robot))
        elif robot.resetting:
            if robot.reset_steps_left == 0:
                # The reset ends the episode: the violation is gone until the robot reports otherwise.
                robot.signals = dataclasses.replace(robot.signals, constraint_violation=False)
                decisions.releases.append(self._unpair(robot, RESET_DONE))
        elif robot.human_steps >= self.config.t_T:
            if robot.release_requested:
                decisions.releases.append(self._unpair(robot, OPERATOR_RELEASE))
            elif not priority.needs_help:
                decisions.releases.append(self._unpair(robot, NO_LONGER_NEEDED))

    def _pair(self, robot: RobotState, operator_id: str, priority: Priority) -> Assignment:
        robot.controller, robot.reason, robot.human_steps = operator_id, priority.reason, 0
        robot.resetting = robot.blocked
        robot.reset_steps_left = self.config.t_R if robot.blocked else 0
        robot.release_requested, robot.waited_ticks, robot.displaced = False, 0, False
        return self._assignment(robot)

    def _assignment(self, robot: RobotState) -> Assignment:
        assert robot.controller is not None and robot.reason is not None
        return Assignment(
            operator_id=robot.controller, robot_id=robot.robot_id, reason=robot.reason,
            needs_reset=robot.resetting,
            min_steps=self.config.t_R if robot.resetting else self.config.t_T,
            reset_steps=self.config.t_R if robot.resetting else 0,
        )

    def _unpair(self, robot: RobotState, reason: str) -> Release:
        assert robot.controller is not None
        release = Release(robot.robot_id, robot.controller, reason)
        robot.controller, robot.reason, robot.human_steps = None, None, 0
        # An unfinished reset starts over with the next operator (the robot is still blocked).
        robot.resetting, robot.reset_steps_left, robot.release_requested = False, 0, False
        robot.waited_ticks = 0
        # A robot cut off from its operator keeps its place (flag) and goes first; otherwise the
        # human is done with it and it must request help afresh.
        robot.displaced = reason == OPERATOR_DISCONNECTED
        robot.flagged = robot.flagged and robot.displaced
        return release

    def _snapshot(self, active: list[RobotState], priorities: dict[str, Priority]) -> list[QueueEntry]:
        def entry(robot: RobotState) -> QueueEntry:
            priority = priorities[robot.robot_id]
            reason = robot.reason if robot.controller is not None else priority.reason
            return QueueEntry(robot.robot_id, reason, priority.level, priority.score, robot.waited_ticks,
                              robot.controller)

        def rank(robot: RobotState) -> tuple:
            return _rank(robot, priorities[robot.robot_id])

        waiting = [robot for robot in active if robot.controller is None and priorities[robot.robot_id].needs_help]
        assigned = [robot for robot in active if robot.controller is not None]
        return [entry(robot) for group in (waiting, assigned) for robot in sorted(group, key=rank)]


def _leave_queue(robot: RobotState) -> None:
    robot.flagged, robot.waited_ticks, robot.displaced = False, 0, False


def _rank(robot: RobotState, priority: Priority) -> tuple:
    """Sort key, first served first: displaced robots, then level, score, time waited, and id for ties."""
    return (not robot.displaced, -priority.level, -priority.score, -robot.waited_ticks, robot.robot_id)


def _check_pairings(robots: list[RobotState]) -> None:
    seen: set[str] = set()
    controllers: dict[str, str] = {}
    for robot in robots:
        if robot.robot_id in seen:
            raise ValueError(f"robot {robot.robot_id!r} appears twice in one tick")
        seen.add(robot.robot_id)
        if robot.controller is not None:
            other = controllers.setdefault(robot.controller, robot.robot_id)
            if other != robot.robot_id:
                raise ValueError(f"operator {robot.controller!r} controls both {other!r} and {robot.robot_id!r}")


def make_allocator(policy: str = "flotilla", **settings) -> Allocator:
    """An allocator from plain settings (the server's ``allocation`` config: policy, t_T, t_R, thresholds
    and the policy's options); unknown settings are refused with the list of known ones."""
    known = {f.name for f in dataclasses.fields(AllocatorConfig)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"unknown allocation setting(s) {unknown}; known: {sorted(known)}")
    return Allocator(AllocatorConfig(policy=policy, **settings))
