"""Who did what with the fleet's robots: interventions and their quality figures, discards, notes,
per-operator tallies and per-policy rounds (what the console shows, and what lands in the store).

An intervention runs from a takeover to its release. The steps logged as that operator's intervention
are tracked per episode (writer key -> [first, end) step indices within the episode), so that:

- when an episode closes (or the intervention ends), a summary of the part of the intervention in it
  goes into the episode's metadata (`extra["interventions"]`): operator, step range, steps, the frame
  age at the operator (the OperatorAction's own report) and the action round trip (the server received
  the action -> the robot's step that applied it came back, via Step.operator_action_seq), p50 and max;
- "discard my last correction" lists the operator's latest intervention's ranges in
  `extra["discarded"]` (the steps stay in the store; the trainer leaves them out, policies/data);
- a note goes into `extra["notes"]` of the episode the intervention last touched.

Metadata of an episode already committed is updated in place by the writer (EpisodeWriter.annotate).
Everything here runs on the server's event loop, like the rest of the fleet's state.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field

import numpy as np

from fleet.proto import flotilla_pb2 as pb

MAX_NOTE_CHARS = 500
# Notes on one intervention: each rewrites its episode's metadata with all of them, so a flood must end.
MAX_NOTES = 20
MAX_PENDING_ACTIONS = 64  # action seq -> receive time kept per robot, for round trips
MAX_SAMPLES = 10_000  # frame ages / round trips kept per intervention


@dataclass
class Intervention:
    operator_id: str
    robot_id: str
    started: float  # time.monotonic()
    reset: bool  # a human reset of a blocked robot rather than a teleop takeover
    ended: float | None = None
    steps: int = 0
    segments: dict[str, list[int]] = field(default_factory=dict)  # writer key -> [first, end)
    summarized: set[str] = field(default_factory=set)  # keys whose summary went to the store already
    # Per episode key, one entry per intervention step: the seq of the frame the operator was looking at
    # when they chose the action applied there (OperatorAction.frame_seq; 0: none, a hold), and that frame's
    # step index in the episode (-1: unknown), so a reader can pair each action with what the human saw.
    frame_seqs: dict[str, list[int]] = field(default_factory=dict)
    frame_steps: dict[str, list[int]] = field(default_factory=dict)
    frame_ages_ms: list[float] = field(default_factory=list)
    round_trips_ms: list[float] = field(default_factory=list)
    discarded: bool = False
    last_key: str | None = None  # the episode this intervention last touched
    notes: int = 0

    def seconds(self, now: float) -> float:
        return (self.ended if self.ended is not None else now) - self.started


@dataclass
class Tally:
    interventions: int = 0
    control_s: float = 0.0  # of finished interventions; the open one is added when reporting
    intervention_steps: int = 0
    discarded: int = 0


@dataclass
class Round:
    episodes: int = 0
    successes: int = 0
    autonomous_successes: int = 0
    steps: int = 0
    human_steps: int = 0
    human_s: float = 0.0


def _stats(values: list[float]) -> dict:
    if not values:
        return {}
    array = np.asarray(values, np.float64)
    return {"p50": round(float(np.median(array)), 2), "max": round(float(array.max()), 2), "n": array.size}


class Ledger:
    """See the module docstring. `annotate(key, field, item)` appends `item` to the list `extra[field]`
    of an episode (open or committed): the server passes EpisodeWriter.annotate."""

    def __init__(self, annotate):
        self._annotate = annotate
        self.current: dict[str, Intervention] = {}  # robot_id -> the open intervention
        self.last: dict[tuple[str, str], Intervention] = {}  # (operator, robot) -> their latest
        self.tallies: dict[str, Tally] = collections.defaultdict(Tally)
        self.rounds: dict[str, Round] = {}
        self._actions: dict[str, collections.OrderedDict[int, float]] = collections.defaultdict(
            collections.OrderedDict
        )
        self._last_label: dict[str, int] = {}  # robot -> label code of its latest logged step
        # robot -> {"key": its open episode's writer key, step seq: step index in that episode}
        self._step_index: dict[str, dict] = collections.defaultdict(dict)
        # robot -> [steps, intervention steps] logged in its open episode
        self._episode_counts: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])

    # -- interventions ------------------------------------------------------------------------------

    def begin(self, robot_id: str, operator_id: str, reset: bool) -> None:
        self.end(robot_id)
        intervention = Intervention(operator_id, robot_id, time.monotonic(), reset)
        self.current[robot_id] = intervention
        self.last[(operator_id, robot_id)] = intervention
        self.tallies[operator_id].interventions += 1

    def end(self, robot_id: str, policy_version: str = "") -> None:
        intervention = self.current.pop(robot_id, None)
        if intervention is None:
            return
        intervention.ended = time.monotonic()
        seconds = intervention.seconds(intervention.ended)
        self.tallies[intervention.operator_id].control_s += seconds
        self.rounds.setdefault(policy_version, Round()).human_s += seconds
        self._actions.pop(robot_id, None)
        for key in list(intervention.segments):
            self._summarize(intervention, key)

    def action(self, robot_id: str, action: pb.OperatorAction) -> None:
        """The controlling operator's action was accepted (pushed to the robot)."""
        intervention = self.current.get(robot_id)
        if intervention is None:
            return
        if action.frame_age_ms > 0 and len(intervention.frame_ages_ms) < MAX_SAMPLES:
            intervention.frame_ages_ms.append(float(action.frame_age_ms))
        if action.seq > 0:
            pending = self._actions[robot_id]
            pending[action.seq] = [time.monotonic(), action.frame_seq, False]  # received, frame, timed
            while len(pending) > MAX_PENDING_ACTIONS:
                pending.popitem(last=False)

    def step(self, robot_id: str, key: str, index: int, step: pb.Step, label: int, intervention_code: int):
        """A step was queued for the store at `index` of episode `key` with the server's `label`."""
        self._last_label[robot_id] = label
        indices = self._step_index[robot_id]
        if indices.get("key") != key:
            indices.clear()
            indices["key"] = key
        indices[step.seq] = index
        counts = self._episode_counts[robot_id]
        counts[0] += 1
        counts[1] += label == intervention_code
        intervention = self.current.get(robot_id)
        if intervention is None or label != intervention_code or step.operator_id != intervention.operator_id:
            return
        intervention.steps += 1
        self.tallies[intervention.operator_id].intervention_steps += 1
        segment = intervention.segments.setdefault(key, [index, index + 1])
        segment[1] = index + 1
        intervention.last_key = key
        sent = self._actions[robot_id].get(step.operator_action_seq) if step.operator_action_seq else None
        frame_seq = sent[1] if sent is not None else 0
        intervention.frame_seqs.setdefault(key, []).append(frame_seq)
        intervention.frame_steps.setdefault(key, []).append(indices.get(frame_seq, -1) if frame_seq else -1)
        if sent is not None and not sent[2] and len(intervention.round_trips_ms) < MAX_SAMPLES:
            sent[2] = True  # the first step that applied it: an action may be applied at more than one
            intervention.round_trips_ms.append(1000.0 * (time.monotonic() - sent[0]))

    def episode_closed(self, robot_id: str, key: str | None) -> None:
        """Episode `key` ends: summarize the interventions' parts in it while it can still take them."""
        if key is None:
            return
        for intervention in list(self.current.values()) + list(self.last.values()):
            if intervention.robot_id == robot_id and key in intervention.segments:
                self._summarize(intervention, key)

    def _summarize(self, intervention: Intervention, key: str) -> None:
        if key in intervention.summarized:
            return
        intervention.summarized.add(key)
        first, end = intervention.segments[key]
        self._annotate(
            key,
            "interventions",
            {
                "operator_id": intervention.operator_id,
                "start": first,
                "end": end,
                "reset": intervention.reset,
                "frame_seqs": intervention.frame_seqs.get(key, []),
                "frame_steps": intervention.frame_steps.get(key, []),
                "frame_age_ms": _stats(intervention.frame_ages_ms),
                "round_trip_ms": _stats(intervention.round_trips_ms),
            },
        )

    # -- the operator's requests --------------------------------------------------------------------

    def discard(self, operator_id: str, robot_id: str) -> str:
        """Flag the operator's latest intervention on the robot; returns what was done (for the notice)."""
        intervention = self.last.get((operator_id, robot_id))
        if intervention is None or not intervention.segments:
            raise LookupError(f"discard: operator {operator_id!r} has no correction of robot {robot_id!r}")
        if intervention.discarded:
            return f"your last correction of {robot_id} was already discarded"
        intervention.discarded = True
        self.tallies[operator_id].discarded += 1
        for key, (first, end) in intervention.segments.items():
            self._annotate(key, "discarded", {"operator_id": operator_id, "start": first, "end": end})
        return (
            f"discarded your last correction of {robot_id}: {intervention.steps} steps kept in the store, "
            "left out of training"
        )

    def note(self, operator_id: str, robot_id: str, text: str) -> str:
        intervention = self.current.get(robot_id)
        if intervention is None or intervention.operator_id != operator_id:
            intervention = self.last.get((operator_id, robot_id))
        if intervention is None or intervention.last_key is None:
            raise LookupError(f"note: operator {operator_id!r} has no intervention on robot {robot_id!r}")
        if not text.strip() or len(text) > MAX_NOTE_CHARS:
            raise ValueError(f"note: must be 1-{MAX_NOTE_CHARS} characters, got {len(text)}")
        if intervention.notes >= MAX_NOTES:
            raise ValueError(f"at most {MAX_NOTES} notes per intervention; this one on {robot_id} has them")
        intervention.notes += 1
        self._annotate(
            intervention.last_key,
            "notes",
            {"operator_id": operator_id, "time": time.time(), "text": text.strip()},
        )
        return f"note saved on the intervention on {robot_id}"

    # -- rounds -------------------------------------------------------------------------------------

    def episode_ended(self, robot_id: str, policy_version: str, success: bool, robot_code: int) -> None:
        """A robot ended an episode: count it for its policy version's round."""
        steps, human_steps = self._episode_counts.pop(robot_id, [0, 0])
        entry = self.rounds.setdefault(policy_version, Round())
        entry.episodes += 1
        entry.successes += bool(success)
        entry.autonomous_successes += bool(success) and self._last_label.get(robot_id) == robot_code
        entry.steps += steps
        entry.human_steps += human_steps

    # -- reporting ----------------------------------------------------------------------------------

    def tallies_pb(self) -> list[pb.OperatorTally]:
        now = time.monotonic()
        open_s = collections.Counter()
        for intervention in self.current.values():
            open_s[intervention.operator_id] += intervention.seconds(now)
        return [
            pb.OperatorTally(
                operator_id=operator_id,
                interventions=tally.interventions,
                control_s=round(tally.control_s + open_s[operator_id], 2),
                intervention_steps=tally.intervention_steps,
                discarded=tally.discarded,
            )
            for operator_id, tally in sorted(self.tallies.items())
        ]

    def rounds_pb(self) -> list[pb.PolicyRound]:
        return [
            pb.PolicyRound(policy_version=version, **vars(entry)) for version, entry in self.rounds.items()
        ]
