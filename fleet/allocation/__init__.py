"""Who gets a human: the fleet server's allocation of teleoperators to robots (Fleet-DAgger style).

    core.py      the allocator (t_T, t_R, calibrated thresholds, queue), its config, the rule registry
    random.py    rule "random": the random baselines (among robots in need, all robots, or budget-matched)
    cur.py       rule "cur": C.U.R., constraint violations, then uncertainty, then risk (IFL's settings)
    flotilla.py  rule "flotilla": Flotilla's default, one calibrated signal (or a combined score) with hysteresis

A rule is one module here: a settings dataclass (the YAML block ``allocation.<name>``) and a class
registered with ``@register_rule(name, Config)``. Every module of this package is imported with it, so
adding the file registers the rule; README.md, "Adding an allocation rule", shows one.
"""

import importlib
import pkgutil

from fleet.allocation.core import (
    CONSTRAINT,
    NO_LONGER_NEEDED,
    NO_NEED,
    OPERATOR_DISCONNECTED,
    OPERATOR_RELEASE,
    PREEMPTED,
    RANDOM,
    RESET_DONE,
    RISK,
    ROBOT_DISCONNECTED,
    RULES,
    UNCERTAINTY,
    Allocator,
    AllocatorConfig,
    Assignment,
    Decisions,
    Priority,
    QuantileThreshold,
    QueueEntry,
    Release,
    RobotSlot,
    Rule,
    RuleSpec,
    Signals,
    Threshold,
    Thresholds,
    TickView,
    make_allocator,
    register_rule,
)
from fleet.allocation.cur import CURConfig, CURRule
from fleet.allocation.flotilla import FlotillaConfig, FlotillaRule
from fleet.allocation.random import RandomConfig, RandomRule

for _module in sorted(module.name for module in pkgutil.iter_modules(__path__)):
    if not _module.startswith("_"):
        importlib.import_module(f"{__name__}.{_module}")

__all__ = [
    "CONSTRAINT",
    "NO_LONGER_NEEDED",
    "NO_NEED",
    "OPERATOR_DISCONNECTED",
    "OPERATOR_RELEASE",
    "PREEMPTED",
    "RANDOM",
    "RESET_DONE",
    "RISK",
    "ROBOT_DISCONNECTED",
    "RULES",
    "UNCERTAINTY",
    "Allocator",
    "AllocatorConfig",
    "Assignment",
    "CURConfig",
    "CURRule",
    "Decisions",
    "FlotillaConfig",
    "FlotillaRule",
    "Priority",
    "QuantileThreshold",
    "QueueEntry",
    "RandomConfig",
    "RandomRule",
    "Release",
    "RobotSlot",
    "Rule",
    "RuleSpec",
    "Signals",
    "Threshold",
    "Thresholds",
    "TickView",
    "make_allocator",
    "register_rule",
]
