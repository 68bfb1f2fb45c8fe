"""Who gets a human: the allocator and what every allocation rule shares.

The allocator follows the Fleet-DAgger family (Hoque et al., 2022):

- every robot gets a priority from its signals (uncertainty, risk, constraint violation);
- free operators go to the highest-priority robots that need help;
- an operator stays at least ``t_T`` steps with a robot (minimum intervention time), and after that the
  robot goes back to its policy once it no longer needs help (or once the operator asks to release it);
- a robot in constraint violation is blocked (it cannot act) until a human resets it, which takes ``t_R``
  steps of that operator's time;
- thresholds on uncertainty and risk can be calibrated to a target request rate ``alpha`` the way
  ThriftyDAgger does (Hoque et al., 2021): the threshold is the (1 - alpha) quantile of recent values.

What differs between allocation *rules* is only the priority: a rule maps a robot and the current
thresholds to a :class:`Priority`. Each rule is a module of this package with its own settings dataclass,
registered by name with :func:`register_rule` (``random``, ``cur``, ``flotilla``); :class:`AllocatorConfig`
picks one (``rule``) and holds every rule's settings under the rule's name.

Everything here is synchronous and free of I/O: the server calls :meth:`Allocator.tick` once per
allocation tick with the robots' slots and the operators on duty, applies the returned decisions (sends
assignments, teleop/hold/reset commands) and tells the allocator about disconnects and explicit releases.
Time is counted in ticks; the server ticks at the fleet's control rate, so one tick is one robot step.

Against the IFL benchmark's own allocation code (github.com/BerkeleyAutomation/ifl_benchmark,
``assign_humans`` and ``CURAllocation``), what matches and what differs:

- Pre-emption after t_T (``preempt``, on for the C.U.R. baseline): IFL re-ranks every human whose t_T has
  passed each step, so a human leaves a robot that still asks for help when a robot ranked above it
  waits. Without it a robot in constraint violation can stay blocked until a helped robot stops
  needing help. Off by default here: an operator at a console is not moved mid-correction unless the
  deployment asks for it.
- C.U.R.'s ``warmup_penalty`` and its cap on the share of humans that go to violating robots
  (``cv_thresh``), and orders that are any permutation of any subset of C, U, R ("UC", "CU", "C"): the
  ``cur`` rule's settings, with IFL's meaning.
- The random baseline is IFL's budget-matched one with ``random.scope=budget`` (a number of busy humans
  drawn each tick around a share of robot-steps); ``scope=all`` keeps every human busy every tick.

Known differences kept by design:

- Reset hand-off: a human who finishes a reset (t_R) is free at once. IFL keeps them until t_T has
  passed since the assignment, on a robot that no longer needs anyone; here that time goes to the next
  robot in line, and a reset is never counted as part of a teleop t_T.
- Ties among violating robots (and any equal priorities) go to the robot that has waited longest, then
  to the robot id; IFL breaks them at random. Waiting order is fair, reproducible and what the console
  shows; the cap on violating robots counts the ones under a reset first, then by wait (IFL: by index).
- Time is the allocator's ticks since it started (IFL: the experiment's step), for the warmup.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

# Why a robot gets a human (Assignment.reason, QueueEntry.reason; the proto carries the same strings).
CONSTRAINT = "constraint_violation"
UNCERTAINTY = "uncertainty"
RISK = "risk"
RANDOM = "random"
CATEGORY_REASON = {"c": CONSTRAINT, "u": UNCERTAINTY, "r": RISK}

# Why a robot leaves its human (Release.reason).
NO_LONGER_NEEDED = "no_longer_needed"
RESET_DONE = "reset_done"
OPERATOR_RELEASE = "operator_release"
PREEMPTED = "preempted"  # moved to a robot ranked above, t_T served
OPERATOR_DISCONNECTED = "operator_disconnected"
ROBOT_DISCONNECTED = "robot_disconnected"

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
class RobotSlot:
    """A robot's slot in the allocator: what it knows of the robot and what it decided about it.

    The server keeps one per robot (``Robot.alloc``) and passes them all to every tick.

    The server writes ``signals``, ``connected`` and ``idle``; the allocator writes everything below them
    (the server reads ``controller`` to route teleop actions and ``blocked`` to hold the robot).
    """

    robot_id: str
    signals: Signals = field(default_factory=Signals)
    connected: bool = True
    idle: bool = False  # not running an episode (between episodes, e-stopped, swapping policy): no help
    step: int = 0  # the robot's step in its episode (for thresholds that vary over the episode)

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


THRESHOLD_SIGNALS = tuple(field.name for field in dataclasses.fields(Thresholds))  # what has a threshold


class ThresholdSchedule(Protocol):
    """A threshold that varies over the episode (policies/safety/calibration.py's ConformalThreshold)."""

    def threshold(self, t: int) -> float: ...


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
        self.schedule: ThresholdSchedule | None = None  # when set, it gives the fixed value at each step
        self._values = np.empty(window, dtype=np.float64)  # ring buffer
        self._count = 0
        self._next = 0

    def observe(self, values: Iterable[float]) -> None:
        new = np.asarray(list(values), dtype=np.float64)
        new = new[np.isfinite(new)][-len(self._values) :]
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
        """The threshold (with a schedule: at an episode's first step; see ``at``)."""
        fixed = self.fixed if self.schedule is None else float(self.schedule.threshold(0))
        if self._count < self.min_samples:
            value = math.inf if fixed is None else fixed
            return Threshold(value, 0.0)  # signals are >= 0 by convention, so 0 is a fair typical
        median, quantile = np.quantile(self._values[: self._count], [0.5, 1.0 - self.alpha])
        value = float(quantile) if fixed is None else fixed
        if fixed is None and quantile <= median:
            # Mostly one value (e.g. risk before a risk model exists): "at least the quantile" would
            # flag every robot. Flag only what stands above the typical value, if anything does.
            window = self._values[: self._count]
            above = window[window > median]
            value = float(above.min()) if above.size else math.inf
        return Threshold(value, float(median))

    def at(self, current: Threshold, step: int) -> Threshold:
        """``current`` (this tick's) for a robot at ``step`` of its episode: only a schedule moves it."""
        if self.schedule is None:
            return current
        return Threshold(float(self.schedule.threshold(step)), current.typical)


# ------------------------------------------------------------------------------------------- rules


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


class Rule(Protocol):
    """An allocation rule: maps a robot (connected, not idle) and the current thresholds to its priority.

    Called once per robot per tick, also for robots under a human (their need decides their release).
    A rule that needs the whole fleet's view (a cap on violating robots, a budget of busy humans) may
    also define ``begin_tick(view: TickView)``, called once per tick before the robots are ranked.
    """

    def __call__(self, robot: RobotSlot, thresholds: Thresholds) -> Priority: ...


@dataclass(frozen=True)
class TickView:
    """What a rule's optional ``begin_tick`` sees: the tick, the operators on duty, the robots the rule
    will rank this tick (connected, not idle), the allocator's t_T, and how many connected robots have a
    human now (idle ones included: a human waiting out a robot's scene reset is busy too)."""

    tick: int
    operators: int
    robots: list[RobotSlot]
    t_T: int
    with_human: int = 0


@dataclass(frozen=True)
class RuleSpec:
    """A registered rule: its settings dataclass (whose defaults are the rule's defaults and whose
    ``__post_init__`` checks them) and the rule class, built as ``rule(config, rng)``."""

    name: str
    config: type
    rule: Callable[[Any, np.random.Generator], Rule]


# The rules by name; the package registers every module in fleet/allocation/ on import.
RULES: dict[str, RuleSpec] = {}


def register_rule(name: str, config: type) -> Callable[[type], type]:
    """Class decorator registering an allocation rule under ``name`` with its settings dataclass::

        @register_rule("fifo", FifoConfig)
        class FifoRule:
            def __init__(self, config: FifoConfig, rng: np.random.Generator): ...
            def __call__(self, robot: RobotSlot, thresholds: Thresholds) -> Priority: ...

    The settings are the YAML block ``allocation.<name>``; ``rng`` is the allocator's seeded Generator.
    """
    common = {f.name for f in dataclasses.fields(AllocatorConfig)}
    if not name.isidentifier() or name in common:
        raise ValueError(
            f"allocation rule name {name!r} must be an identifier and not one of {sorted(common)}"
        )
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"allocation rule {name!r}: its config {config!r} must be a dataclass")

    def register(rule: type) -> type:
        if name in RULES and RULES[name].rule is not rule:
            raise ValueError(f"allocation rule {name!r} is registered twice ({RULES[name].rule} and {rule})")
        RULES[name] = RuleSpec(name, config, rule)
        return rule

    return register


def first_category(order: str, robot: RobotSlot, thresholds: Thresholds) -> int | None:
    """Index in ``order`` ('c', 'u', 'r' letters) of the first C.U.R. category the robot falls in, or None."""
    signals = robot.signals
    applies = {
        "c": signals.constraint_violation,
        "u": thresholds.uncertainty.exceeded(signals.uncertainty),
        "r": thresholds.risk.exceeded(signals.risk),
    }
    return next((index for index, letter in enumerate(order) if applies[letter]), None)


# ------------------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class AllocatorConfig:
    """The allocator's settings: the rule, the times, the thresholds, and each rule's own settings.

    Every value is checked here; a bad one raises ValueError naming its key (``allocation.t_T``,
    ``allocation.flotilla.hysteresis``). The mapping form (:meth:`from_dict`, configs/serve.yaml's
    ``allocation`` block) puts each rule's settings beside these under the rule's name:
    ``{rule: cur, t_T: 5, cur: {order: cru}}``.
    """

    rule: str = "flotilla"  # the registered rule that ranks the robots (RULES: cur, flotilla, random)
    t_T: int = 20  # minimum ticks an operator keeps a robot it took over (minimum intervention time)
    t_R: int = 10  # ticks a human reset of a blocked robot takes (at least one tick even when 0)
    # Fixed thresholds; None calibrates the threshold to the target request rate alpha instead.
    uncertainty_threshold: float | None = None
    risk_threshold: float | None = None
    alpha: float = 0.05  # target fraction of autonomous robot-steps whose signal requests help
    window: int = 5000  # recent robot-steps the quantile is taken over
    min_samples: int = 100  # values needed before a calibrated threshold (or the typical value) is used
    seed: int | None = 0  # seeds the allocator's numpy Generator (the rules draw from it, e.g. random)
    # Pre-emption after t_T (IFL's assign_humans): a human who has served t_T on a robot (not resetting it)
    # moves to a waiting robot ranked above that robot. Off: a human stays while the robot needs help.
    preempt: bool = False
    # Rule name -> its settings (its config dataclass, or a mapping of its fields); a rule left out gets
    # its defaults. Once built this holds every registered rule's config.
    rule_configs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(
                f"allocation.rule: unknown rule {self.rule!r}; rules: {', '.join(sorted(RULES))}"
            )
        check_int("allocation.t_T", self.t_T, minimum=0)
        if not isinstance(self.preempt, bool):
            raise ValueError(f"allocation.preempt must be true or false, got {self.preempt!r}")
        check_int("allocation.t_R", self.t_R, minimum=0)
        check_int("allocation.window", self.window, minimum=1)
        check_int("allocation.min_samples", self.min_samples, minimum=1)
        if self.min_samples > self.window:
            raise ValueError(
                f"allocation.min_samples ({self.min_samples}) must not exceed window ({self.window})"
            )
        check_number("allocation.alpha", self.alpha)
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"allocation.alpha must be in (0, 1) (target request rate), got {self.alpha!r}")
        for name in ("uncertainty_threshold", "risk_threshold"):
            if getattr(self, name) is not None:
                check_number(f"allocation.{name}", getattr(self, name))
        if self.seed is not None:
            check_int("allocation.seed", self.seed, minimum=0)
        if not isinstance(self.rule_configs, Mapping):
            raise ValueError(
                f"allocation.rule_configs must map rule names to settings, got {self.rule_configs!r}"
            )
        unknown = sorted(set(self.rule_configs) - set(RULES))
        if unknown:
            raise ValueError(f"allocation: unknown rule(s) {unknown}; rules: {', '.join(sorted(RULES))}")
        configs = {
            name: _rule_config(spec, self.rule_configs.get(name)) for name, spec in sorted(RULES.items())
        }
        object.__setattr__(self, "rule_configs", configs)  # a dict, not a mappingproxy: configs are pickled

    @property
    def rule_config(self) -> Any:
        """The chosen rule's settings (an instance of its config dataclass)."""
        return self.rule_configs[self.rule]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]):
        """From the mapping form: the settings above plus one block per rule under its name (a block left
        out, or empty, means that rule's defaults); unknown keys are errors."""
        settings = {f.name for f in dataclasses.fields(cls)} - {"rule_configs"}
        unknown = sorted(set(values) - settings - set(RULES))
        if unknown:
            raise ValueError(
                f"allocation: unknown setting(s) {unknown}; settings: {sorted(settings)}; "
                f"rules: {sorted(RULES)}"
            )
        return cls(
            **{key: value for key, value in values.items() if key in settings},
            rule_configs={key: value for key, value in values.items() if key in RULES},
        )

    def to_dict(self) -> dict[str, Any]:
        """The mapping form, every rule's block included (``from_dict(to_dict())`` is equal)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "rule_configs"}
        values.update({name: dataclasses.asdict(config) for name, config in self.rule_configs.items()})
        return values


def _rule_config(spec: RuleSpec, value: Any) -> Any:
    if value is None:
        return spec.config()
    if isinstance(value, spec.config):
        return value
    if isinstance(value, Mapping):
        known = {f.name for f in dataclasses.fields(spec.config)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"allocation.{spec.name}: unknown setting(s) {unknown}; known: {sorted(known)}")
        return spec.config(**value)
    raise ValueError(
        f"allocation.{spec.name} must be a mapping of the {spec.name} rule's settings, got {value!r}"
    )


def check_int(key: str, value: object, minimum: int) -> None:
    """For settings checks: ValueError naming ``key`` unless ``value`` is an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{key} must be an integer >= {minimum}, got {value!r}")


def check_number(key: str, value: object) -> None:
    """For settings checks: ValueError naming ``key`` unless ``value`` is a finite number."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not math.isfinite(value):
        raise ValueError(f"{key} must be a finite number, got {value!r}")


# --------------------------------------------------------------------------------------- allocator


class Allocator:
    """Assigns operators to robots once per tick; see the module docstring for what every rule shares.

    ``config.rule`` names the rule that ranks the robots; ``rule`` replaces it with any :class:`Rule`.
    The server reads t_T and t_R from ``config``.
    """

    def __init__(self, config: AllocatorConfig | None = None, rule: Rule | None = None):
        self.config = config or AllocatorConfig()
        self.rng = np.random.default_rng(self.config.seed)
        self.rule = rule or RULES[self.config.rule].rule(self.config.rule_config, self.rng)
        calibration = (self.config.alpha, self.config.window, self.config.min_samples)
        self.uncertainty = QuantileThreshold(*calibration, fixed=self.config.uncertainty_threshold)
        self.risk = QuantileThreshold(*calibration, fixed=self.config.risk_threshold)
        self.ticks = 0
        self._queue: list[QueueEntry] = []

    @property
    def thresholds(self) -> Thresholds:
        return Thresholds(self.uncertainty.current(), self.risk.current())

    def fix_thresholds(
        self,
        uncertainty: float | ThresholdSchedule | None,
        risk: float | ThresholdSchedule | None,
    ) -> None:
        """Fix the request thresholds from now on: a number, a schedule over each robot's step in its
        episode, or None (back to the configured fixed value, or to the calibrated rate). Used once per
        deployed policy with that policy's held-out calibration, so that requests fall as the policy gets
        better (a rate-calibrated threshold asks for help at the same rate however good the policy is)."""
        settings = (
            (self.uncertainty, "uncertainty", uncertainty, self.config.uncertainty_threshold),
            (self.risk, "risk", risk, self.config.risk_threshold),
        )
        is_schedule = [callable(getattr(value, "threshold", None)) for _, _, value, _ in settings]
        for (_, key, value, _), schedule in zip(settings, is_schedule, strict=True):  # all checked first
            if value is not None and not schedule:
                check_number(f"{key} threshold", value)
        for (threshold, _, value, configured), schedule in zip(settings, is_schedule, strict=True):
            threshold.schedule = value if schedule else None
            threshold.fixed = None if schedule else configured if value is None else float(value)

    def tick(self, robots: Iterable[RobotSlot], operators: Iterable[str]) -> Decisions:
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
        begin_tick = getattr(self.rule, "begin_tick", None)
        if begin_tick is not None:
            ranked = [robot for robot in active if not robot.idle]
            with_human = sum(robot.controller is not None for robot in active)
            begin_tick(TickView(self.ticks, len(on_duty), ranked, self.config.t_T, with_human))
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

    def operator_disconnected(self, operator_id: str, robots: Iterable[RobotSlot]) -> list[Release]:
        """Free the robots of an operator who left; they go back to the queue ahead of everyone."""
        return [
            self._unpair(robot, OPERATOR_DISCONNECTED) for robot in robots if robot.controller == operator_id
        ]

    def robot_disconnected(self, robot: RobotSlot) -> Release | None:
        """Mark the robot disconnected and free its operator (the returned Release says whom to tell)."""
        release = self._unpair(robot, ROBOT_DISCONNECTED) if robot.controller is not None else None
        robot.connected = False
        _leave_queue(robot)
        return release

    def operator_release(self, robot: RobotSlot, operator_id: str) -> None:
        """The operator asks to hand the robot back to its policy.

        The release happens at the next tick at which the operator has served t_T and any reset is done;
        that tick's Decisions carry it. Raises ValueError if the operator does not control the robot.
        """
        if robot.controller != operator_id:
            raise ValueError(
                f"operator {operator_id!r} does not control robot {robot.robot_id!r} "
                f"(controller: {robot.controller!r})"
            )
        robot.release_requested = True

    def pick(self, robot: RobotSlot, operator_id: str, robots: Iterable[RobotSlot]) -> Assignment:
        """The operator takes a robot waiting in the queue themself (the console's pick) instead of the one
        the rule would give them, where the rule allows it (a rule whose class sets ``allows_pick = False``
        refuses). The robot must be waiting for help in the last tick's queue and the operator must hold no
        robot. Returns the assignment to apply; raises ValueError saying why not."""
        if not getattr(self.rule, "allows_pick", True):
            raise ValueError(f"the {self.config.rule!r} allocation rule does not let operators pick robots")
        if any(other.controller == operator_id for other in robots):
            raise ValueError(f"operator {operator_id!r} already controls a robot: hand it back first")
        if robot.controller is not None:
            raise ValueError(f"robot {robot.robot_id!r} is already taken by {robot.controller!r}")
        entry = next((e for e in self._queue if e.robot_id == robot.robot_id and e.assigned_to is None), None)
        if entry is None or not robot.connected or robot.idle:
            raise ValueError(f"robot {robot.robot_id!r} is not waiting for help")
        return self._pair(robot, operator_id, Priority(entry.reason, entry.level, entry.score))

    # ------------------------------------------------------------------------------------ internals

    def _advance_time(self, robots: list[RobotSlot], on_duty: set[str], decisions: Decisions) -> None:
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

    def _prioritize(self, active: list[RobotSlot]) -> dict[str, Priority]:
        thresholds = current = self.thresholds  # the window quantiles once per tick, not once per robot
        by_step = self.uncertainty.schedule is not None or self.risk.schedule is not None
        priorities = {}
        for robot in active:
            if by_step:
                thresholds = Thresholds(
                    self.uncertainty.at(current.uncertainty, robot.step),
                    self.risk.at(current.risk, robot.step),
                )
            priority = NO_NEED if robot.idle else self.rule(robot, thresholds)
            priorities[robot.robot_id] = priority
            robot.flagged = priority.needs_help
            if robot.controller is None and not robot.flagged:
                _leave_queue(robot)
        return priorities

    def _assign(
        self,
        candidates: list[RobotSlot],
        priorities: dict[str, Priority],
        free: set[str],
        decisions: Decisions,
    ) -> None:
        """Free operators (in id order, for determinism) take the best-ranked robots needing help.

        With ``preempt``, humans who have served t_T (and are not resetting) are free too, unless the
        robot they hold ranks among the best as many robots as there are such humans and free ones.
        """

        def rank(robot: RobotSlot) -> tuple:
            return _rank(robot, priorities[robot.robot_id])

        waiting = sorted(
            (
                robot
                for robot in candidates
                if robot.controller is None and priorities[robot.robot_id].needs_help
            ),
            key=rank,
        )
        free = set(free)
        if self.config.preempt and waiting:
            movable = [
                robot
                for robot in candidates
                if robot.controller is not None
                and not robot.resetting
                and robot.human_steps >= self.config.t_T
            ]
            # The waiting robots among the best are a prefix of `waiting`, as long as the humans freed.
            best = {
                robot.robot_id for robot in sorted(waiting + movable, key=rank)[: len(free) + len(movable)]
            }
            for robot in movable:
                if robot.robot_id not in best:
                    free.add(robot.controller)
                    decisions.releases.append(self._unpair(robot, PREEMPTED))
                    robot.flagged = True  # it still needs help: it keeps its place in the queue
        for operator_id, robot in zip(sorted(free), waiting, strict=False):
            decisions.assignments.append(self._pair(robot, operator_id, priorities[robot.robot_id]))
        for robot in waiting[len(free) :]:
            robot.waited_ticks += 1

    def _calibrate(self, active: list[RobotSlot]) -> None:
        # Only autonomous, acting robots: their steps are the ones that would request help.
        acting = [
            robot.signals
            for robot in active
            if robot.controller is None and not robot.idle and not robot.blocked
        ]
        self.uncertainty.observe(signals.uncertainty for signals in acting)
        self.risk.observe(signals.risk for signals in acting)

    def _review(self, robot: RobotSlot, priority: Priority, decisions: Decisions) -> None:
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

    def _pair(self, robot: RobotSlot, operator_id: str, priority: Priority) -> Assignment:
        robot.controller, robot.reason, robot.human_steps = operator_id, priority.reason, 0
        robot.resetting = robot.blocked
        robot.reset_steps_left = self.config.t_R if robot.blocked else 0
        robot.release_requested, robot.waited_ticks, robot.displaced = False, 0, False
        return self._assignment(robot)

    def _assignment(self, robot: RobotSlot) -> Assignment:
        assert robot.controller is not None and robot.reason is not None
        return Assignment(
            operator_id=robot.controller,
            robot_id=robot.robot_id,
            reason=robot.reason,
            needs_reset=robot.resetting,
            min_steps=self.config.t_R if robot.resetting else self.config.t_T,
            reset_steps=self.config.t_R if robot.resetting else 0,
        )

    def _unpair(self, robot: RobotSlot, reason: str) -> Release:
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

    def _snapshot(self, active: list[RobotSlot], priorities: dict[str, Priority]) -> list[QueueEntry]:
        def entry(robot: RobotSlot) -> QueueEntry:
            priority = priorities[robot.robot_id]
            reason = robot.reason if robot.controller is not None else priority.reason
            return QueueEntry(
                robot.robot_id, reason, priority.level, priority.score, robot.waited_ticks, robot.controller
            )

        def rank(robot: RobotSlot) -> tuple:
            return _rank(robot, priorities[robot.robot_id])

        waiting = [
            robot for robot in active if robot.controller is None and priorities[robot.robot_id].needs_help
        ]
        assigned = [robot for robot in active if robot.controller is not None]
        return [entry(robot) for group in (waiting, assigned) for robot in sorted(group, key=rank)]


def _leave_queue(robot: RobotSlot) -> None:
    robot.flagged, robot.waited_ticks, robot.displaced = False, 0, False


def _rank(robot: RobotSlot, priority: Priority) -> tuple:
    """Sort key, first served first: displaced robots, then level, score, time waited, and id for ties."""
    return (not robot.displaced, -priority.level, -priority.score, -robot.waited_ticks, robot.robot_id)


def _check_pairings(robots: list[RobotSlot]) -> None:
    seen: set[str] = set()
    controllers: dict[str, str] = {}
    for robot in robots:
        if robot.robot_id in seen:
            raise ValueError(f"robot {robot.robot_id!r} appears twice in one tick")
        seen.add(robot.robot_id)
        if robot.controller is not None:
            other = controllers.setdefault(robot.controller, robot.robot_id)
            if other != robot.robot_id:
                raise ValueError(
                    f"operator {robot.controller!r} controls both {other!r} and {robot.robot_id!r}"
                )


def make_allocator(rule: str = "flotilla", **settings: Any) -> Allocator:
    """An allocator from settings in the mapping form (:meth:`AllocatorConfig.from_dict`), e.g.
    ``make_allocator("cur", t_T=5, cur={"order": "cru"})``; unknown settings are refused."""
    return Allocator(AllocatorConfig.from_dict({"rule": rule, **settings}))
