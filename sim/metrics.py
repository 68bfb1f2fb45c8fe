"""Interactive fleet learning benchmark metrics (the IFL benchmark of Fleet-DAgger, Hoque et al. 2022).

Per round, over the episodes the fleet finished:

- successes: episodes that ended in task success (whoever was in control);
- autonomous successes: successes whose last step was the robot's own (the policy finished the task;
  help a human gave earlier is charged below, as human action);
- interventions: human takeovers (a run of INTERVENTION steps is one);
- human action steps: teleoperated steps plus t_R per hard reset (a reset costs the human t_R steps);
- ROHE, return on human effort: (M / N) * autonomous successes / (1 + human action steps), with M
  operators and N robots;
- idle steps: robot-steps spent waiting for a human (blocked by a violation, or queued for help);
- hard resets: human resets of blocked robots; constraint violations: episodes that hit one.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from fleet.labels import ControlLabel


@dataclass
class EpisodeTally:
    """One finished episode as the fleet harness saw it."""

    robot_id: str
    episode_id: int
    policy_version: str
    outcome: str = ""
    success: bool = False
    steps: int = 0
    robot_steps: int = 0
    intervention_steps: int = 0
    interventions: int = 0
    idle_steps: int = 0
    violation: bool = False
    hard_reset: bool = False
    last_label: int = int(ControlLabel.ROBOT)

    def count(self, label: ControlLabel, idle: bool) -> None:
        """Add one step with `label`; a human takeover starts when INTERVENTION follows another label."""
        if label == ControlLabel.INTERVENTION:
            self.intervention_steps += 1
            if self.last_label != ControlLabel.INTERVENTION:
                self.interventions += 1
        else:
            self.robot_steps += 1
        self.steps += 1
        self.idle_steps += idle
        self.last_label = int(label)

    @property
    def autonomous_success(self) -> bool:
        return self.success and self.last_label == ControlLabel.ROBOT


@dataclass
class RoundMetrics:
    round: int
    policy_version: str
    robots: int
    operators: int
    episodes: int
    successes: int
    autonomous_successes: int
    autonomous_success_rate: float
    interventions: int
    intervention_steps: int
    human_action_steps: int
    rohe: float
    idle_steps: int
    hard_resets: int
    constraint_violations: int
    robot_steps: int
    wall_s: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def summarize(
    records: Sequence[EpisodeTally],
    round_index: int,
    robots: int,
    operators: int,
    reset_steps: int,
    wall_s: float = 0.0,
) -> RoundMetrics:
    """The round's metrics from its finished episodes; `reset_steps` is t_R (human steps per hard reset)."""
    successes = sum(r.success for r in records)
    autonomous = sum(r.autonomous_success for r in records)
    hard_resets = sum(r.hard_reset for r in records)
    intervention_steps = sum(r.intervention_steps for r in records)
    human = intervention_steps + reset_steps * hard_resets
    versions = collections.Counter(r.policy_version for r in records)
    return RoundMetrics(
        round=round_index,
        policy_version=versions.most_common(1)[0][0] if versions else "",
        robots=robots,
        operators=operators,
        episodes=len(records),
        successes=successes,
        autonomous_successes=autonomous,
        autonomous_success_rate=autonomous / len(records) if records else 0.0,
        interventions=sum(r.interventions for r in records),
        intervention_steps=intervention_steps,
        human_action_steps=human,
        rohe=rohe(robots, operators, autonomous, human),
        idle_steps=sum(r.idle_steps for r in records),
        hard_resets=hard_resets,
        constraint_violations=sum(r.violation for r in records),
        robot_steps=sum(r.steps for r in records),
        wall_s=wall_s,
    )


def rohe(robots: int, operators: int, autonomous_successes: int, human_action_steps: int) -> float:
    return (operators / max(robots, 1)) * autonomous_successes / (1 + human_action_steps)


# Counts that add up over rounds (the IFL benchmark's cumulative curves).
CUMULATIVE_KEYS = (
    "episodes",
    "successes",
    "autonomous_successes",
    "interventions",
    "human_action_steps",
    "idle_steps",
    "hard_resets",
    "constraint_violations",
    "robot_steps",
)


def cumulative(rounds: Sequence[dict]) -> dict:
    """Totals over rounds (RoundMetrics.to_dict() each), ROHE over all of them and the last round's
    autonomous success rate."""
    totals = {key: sum(r[key] for r in rounds) for key in CUMULATIVE_KEYS}
    robots, operators = (rounds[0]["robots"], rounds[0]["operators"]) if rounds else (0, 0)
    totals["rohe"] = rohe(robots, operators, totals["autonomous_successes"], totals["human_action_steps"])
    totals["final_autonomous_success_rate"] = rounds[-1]["autonomous_success_rate"] if rounds else 0.0
    return totals


def totals_line(totals: dict) -> str:
    return (
        f"over all rounds: {totals['autonomous_successes']} autonomous successes of {totals['episodes']} "
        f"episodes ({totals['successes']} with help), {totals['human_action_steps']} human action steps, "
        f"{totals['interventions']} interventions, ROHE {totals['rohe']:.4f}, {totals['idle_steps']} idle "
        f"robot-steps, {totals['hard_resets']} hard resets, {totals['constraint_violations']} constraint "
        f"violations"
    )


# (title, RoundMetrics field, format spec); the title sets the column width.
TABLE_COLUMNS = (
    ("round", "round", "d"),
    ("auto success", "autonomous_success_rate", ".0%"),
    ("interventions", "interventions", "d"),
    ("human steps", "human_action_steps", "d"),
    ("ROHE", "rohe", ".4f"),
    ("idle steps", "idle_steps", "d"),
    ("hard resets", "hard_resets", "d"),
    ("policy", "policy_version", "s"),
)
_WIDTH = {"policy": 16, "ROHE": 8}


def table_header() -> str:
    return "  ".join(f"{title:>{_WIDTH.get(title, len(title))}}" for title, _, _ in TABLE_COLUMNS)


def table_row(metrics: RoundMetrics) -> str:
    return "  ".join(
        f"{getattr(metrics, key):>{_WIDTH.get(title, len(title))}{spec}}"
        for title, key, spec in TABLE_COLUMNS
    )
