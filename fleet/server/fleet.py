"""The fleet's live state and every rule about who controls which robot.

All of it runs on the server's event loop (no locks): robot and operator sessions call in with what
they received, the allocation tick calls `tick`, and every change of a robot's situation is pushed to
it at once as a Command (`_push`), so a robot's control loop never polls or waits.

Who controls a robot is decided by the allocator (fleet/allocation/): each robot has an
`allocation.RobotSlot` (`Robot.alloc`) that the allocator updates in place; the server writes its
signals, `connected` and `idle`, and applies the releases and assignments each tick returns.

A robot's mode follows from that state in one place, `mode_of`:
    protective stop (the robot's or the fleet's)  -> HOLD, estop=true: wins over everything, teleop included
    an operator controls it                       -> TELEOP (HOLD while that operator resets it)
    blocked (constraint violation), or displaced
    (its operator left, it waits for another)     -> HOLD until a human takes it
    otherwise                                     -> AUTONOMOUS

Durability ("acknowledged means kept"). Every robot message carries a seq from one counter per robot
process (boot_id). The server acks a message (`ack_seq`) once it is checked and queued, and says it is
durable (`committed_seq`) once its episode is committed. The robot keeps everything after
committed_seq and resends it after any reconnect, so a crash of the server between ack and commit
loses nothing: the restarted server receives the episode again from its start. Resends are told from
new data in two ways: on a live server by seq (`Robot.last_seq`, per boot), and across restarts by
the episodes already committed, whose (robot_id, boot_id, episode_id) the store's metadata records
(`Fleet._committed`). An episode is therefore committed exactly once. A robot's committed_seq is the
seq just before the start of its oldest episode not yet committed (or its last seq when none is).

Episodes the server ends itself (too long, the robot gone past resume_grace_s) are committed as far
as they got; the rest of such an episode is acknowledged but not logged (`Robot.episode_key` is None
while `Robot.episode_id` is set), and so is a resent episode that is already committed.

Labels are the server's decision: a step claiming a human intervention is logged as one only if that
operator controls the robot or released it less than `label_grace_s` ago (steps in flight); anything
else is logged as the robot's own step and counted (`labels_corrected`). After a server restart the
new server cannot vouch for interventions it did not see, so a resent open episode keeps its robot
steps but loses its intervention labels (see the closing note of the issue, and benchmarks/README.md).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from fleet import allocation, codec, wire
from fleet.labels import ControlLabel
from fleet.proto import flotilla_pb2 as pb
from fleet.server.auth import Identity, check_id
from fleet.server.config import ServerConfig
from fleet.server.ledger import Ledger
from fleet.server.metrics import Metrics
from fleet.server.robots import RobotSpec, decode_step, decode_vector, logged_signals, step_time
from fleet.server.streams import FleetError, Outbox, RateLimitedLog
from fleet.server.writer import EpisodeWriter
from fleet.store.episode_store import schema_difference
from fleet.text import clip

log = logging.getLogger(__name__)

INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
DISCONNECTED_OUTCOME = "disconnected"
TOO_LONG_OUTCOME = "too_long"
MAX_TEXT = 128  # task, policy version, outcome: short labels, not documents
ROBOT_LABEL, INTERVENTION_LABEL = np.uint8(ControlLabel.ROBOT), np.uint8(ControlLabel.INTERVENTION)
LABEL_WARNINGS = RateLimitedLog()
SEQ_GAPS = RateLimitedLog()


@dataclass
class Robot:
    robot_id: str
    boot_id: str
    spec: RobotSpec
    task: str
    policy_version: str
    alloc: allocation.RobotSlot  # signals and who controls it, shared with the allocator
    outbox: Outbox | None = None  # the connected session; None while disconnected
    last_seq: int = 0  # highest message seq of this boot taken (acks, and dedup of resent messages)
    # The robot's open episode (robot-local id). episode_key is its writer key, None while the rest of the
    # episode is not logged (already committed before a restart, or cut short by the server).
    episode_id: int | None = None
    episode_key: str | None = None
    episode_goal: np.ndarray | None = None
    episode_steps: int = 0
    episode_bytes: int = 0  # observation bytes the open episode holds in the writer's memory
    episode_start_seq: int = 0
    # Writer keys of this robot's episodes not yet committed -> the seq of their episode_start.
    uncommitted: dict[str, int] = field(default_factory=dict)
    steps: int = 0
    episodes: int = 0
    signals: pb.Signals = field(default_factory=pb.Signals)
    estop_by: set[str] = field(default_factory=set)  # who engaged its protective stop (empty: none)
    # After a human reset, steps of the episode it interrupted may still report the violation: ignore it
    # until the robot starts a new episode, so it is not blocked again by stale signals.
    violation_cleared: bool = False
    last_frame_at: float = 0.0
    last_heard: float = field(default_factory=time.monotonic)
    disconnected_at: float | None = None
    released_by: dict[str, float] = field(default_factory=dict)  # operator -> when they last let go
    # The teleop watchdog: no fresh action from the controlling operator within teleop_watchdog_s, and
    # the robot is told to hold (Command.input_stopped) until one comes; the page is never trusted for it.
    input_stopped: bool = False
    watchdog: asyncio.TimerHandle | None = None
    # The watchdog fired before the robot took a step after the operator's latest action: that action is
    # not stale yet (a robot whose ticks are slower than the watchdog, a lockstep simulation), so the
    # robot holds only once it has stepped (applied it) and still no newer action came.
    watchdog_due: bool = False
    steps_at_action: int = 0  # `steps` when the operator's latest action arrived

    @property
    def operator_id(self) -> str | None:
        return self.alloc.controller

    @property
    def estop(self) -> bool:
        return bool(self.estop_by)

    @property
    def committed_seq(self) -> int:
        """What the robot may forget: everything before its oldest episode not yet committed, and before
        its open episode even when that is not logged (so a resend always starts at an episode_start)."""
        oldest = min(self.uncommitted.values(), default=None)  # read for every step: no allocation
        if self.episode_id is not None and (oldest is None or self.episode_start_seq < oldest):
            oldest = self.episode_start_seq
        return self.last_seq if oldest is None else oldest - 1


@dataclass
class Operator:
    operator_id: str
    boot_id: str
    outbox: Outbox
    is_admin: bool
    last_heard: float = field(default_factory=time.monotonic)


class Fleet:
    def __init__(
        self,
        config: ServerConfig,
        writer: EpisodeWriter,
        metrics: Metrics,
        allocator: allocation.Allocator,
        latest_policy: str = "",
    ):
        self.config = config
        self.writer = writer
        self.metrics = metrics
        self.allocator = allocator
        self.latest_policy = latest_policy
        self.robots: dict[str, Robot] = {}
        self.operators: dict[str, Operator] = {}
        self.closing = False
        self._keys = itertools.count(1)
        # Writer key -> (robot_id, boot_id, robot episode id), for episodes not yet committed.
        self._key_episode: dict[str, tuple[str, str, int]] = {}
        # Robots whose open episode is being logged (writer key -> robot), and the observation bytes those
        # episodes hold in memory together: bounded by max_open_episode_bytes (see robot_step).
        self._logging: dict[str, Robot] = {}
        self.open_episode_bytes = 0
        self._committed = committed_episodes(writer.store)
        self._queue = pb.Queue()
        self._tasks: set[asyncio.Task] = set()
        self._estop_file = Path(config.estop_file or f"{config.store.rstrip('/')}.estop.json")
        self.fleet_estop, self._robot_estops = load_estops(self._estop_file)
        self._estops_dirty = False
        self._estop_saver: asyncio.Task | None = None
        # Saves from the loop and from the saver's thread: one at a time, never an older state last.
        self._estop_lock = threading.Lock()
        self._estop_version = self._estop_saved_version = 0
        self.ledger = Ledger(writer.annotate)  # interventions, discards, notes, tallies, rounds

    def spawn(self, coro) -> asyncio.Task:
        """A background task the fleet keeps a reference to (the event loop holds tasks only weakly)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- robots -----------------------------------------------------------------------------------

    def _claimed_id(self, claimed: str, field: str, who: str, identity: Identity | None) -> str:
        """The id a hello claims, once the fleet is open, the id is well formed and the caller's token
        may speak for that robot or operator (`who`)."""
        if self.closing:
            raise FleetError(grpc.StatusCode.UNAVAILABLE, "the fleet server is shutting down")
        checked = check_id(claimed, field)
        if identity is None or not identity.may_use(checked):
            raise FleetError(
                grpc.StatusCode.PERMISSION_DENIED, f"this token may not speak for {who} {checked!r}"
            )
        return checked

    def robot_hello(self, hello: pb.RobotHello, outbox: Outbox, identity: Identity | None) -> Robot:
        robot_id = self._claimed_id(hello.robot_id, "robot_id", "robot", identity)
        if self.config.robot_ids and robot_id not in self.config.robot_ids:
            raise FleetError(
                grpc.StatusCode.PERMISSION_DENIED, f"robot id {robot_id!r} is not in this fleet's robot_ids"
            )
        check_boot_id(hello.boot_id, "robot process")
        for name in ("task", "policy_version"):
            check_text(getattr(hello, name), f"hello: {name}")
        # The fleet's schema is what the store has committed; until the first commit any robot may log
        # (the first episode committed fixes it, see EpisodeWriter).
        committed = self.writer.store.schema
        spec = RobotSpec.from_hello(hello, self.config.max_step_bytes, logged_signals(committed))
        if committed is not None and (diff := schema_difference(committed, spec.store_schema())):
            raise FleetError(
                PRECONDITION,
                f"hello: robot {robot_id!r} steps would not fit the episode store "
                f"at {self.config.store}: {diff}",
            )
        robot = self.robots.get(robot_id)
        if robot is not None and robot.outbox is not None:
            if robot.boot_id != hello.boot_id:
                raise FleetError(
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"robot {robot_id!r} is connected from another process; a new one can connect "
                    f"once that session ends or goes silent ({self.config.robot_silence_s:g} s)",
                )
            robot.outbox.fail(
                grpc.StatusCode.ABORTED, f"robot {robot_id!r} reconnected; this older session was replaced"
            )
            self._robot_gone(robot)
        if robot is None or robot.spec != spec or robot.boot_id != hello.boot_id:
            old = robot
            if old is None and len(self.robots) >= self.config.max_robots and not self._forget_one():
                raise FleetError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the fleet has {len(self.robots)} robots (max_robots); try again later",
                )
            robot = Robot(
                robot_id,
                hello.boot_id,
                spec,
                hello.task,
                hello.policy_version,
                allocation.RobotSlot(robot_id),
            )
            if old is not None:  # a restarted process (or new sensors): a fresh record; a stop stays
                self._close_episode(old, DISCONNECTED_OUTCOME)
                robot.estop_by = old.estop_by
            robot.estop_by |= self._robot_estops.get(robot_id, set())
            self.robots[robot_id] = robot
        robot.task, robot.policy_version = hello.task, hello.policy_version
        robot.outbox, robot.disconnected_at, robot.alloc.connected = outbox, None, True
        robot.last_heard = time.monotonic()
        log.info(
            "robot %s connected (boot %s, resuming after seq %d)",
            robot_id,
            clip(hello.boot_id, 12),
            robot.last_seq,
        )
        self._push(robot, "hello")
        return robot

    def robot_left(self, robot: Robot, outbox: Outbox) -> None:
        if robot.outbox is outbox:
            log.info("robot %s disconnected", robot.robot_id)
            self._robot_gone(robot)

    def _robot_gone(self, robot: Robot) -> None:
        robot.outbox, robot.disconnected_at = None, time.monotonic()
        release = self.allocator.robot_disconnected(robot.alloc)
        if release is not None:
            self._apply_release(release)

    def robot_message(self, robot: Robot, outbox: Outbox, message: pb.RobotMessage) -> None:
        if robot.outbox is not outbox:
            raise FleetError(grpc.StatusCode.ABORTED, f"robot {robot.robot_id!r}: this session was replaced")
        kind = message.WhichOneof("kind")
        if kind == "heartbeat":
            return
        if kind not in ("step", "episode_start", "episode_end"):
            raise FleetError(
                INVALID, "empty RobotMessage (none of hello, episode_start, step, episode_end, heartbeat)"
            )
        body = getattr(message, kind)
        received_at = time.monotonic() if kind == "step" else None  # the latency histogram is step -> ack
        try:
            if body.seq <= 0:
                raise FleetError(INVALID, f"{kind}: seq must be positive, got {body.seq}")
            if body.seq <= robot.last_seq:  # resent after a reconnect: already taken
                self._push(robot, received_at=received_at)
                return
            if body.seq != robot.last_seq + 1 and robot.last_seq:
                # Seqs have no holes unless the robot dropped messages itself (its resend buffer was full):
                # count it, so a lost message never goes unnoticed.
                self.metrics.inc("seq_gaps")
                SEQ_GAPS.warning(
                    (robot.robot_id,),
                    "robot %s: seq %d follows %d (messages missing in between)",
                    robot.robot_id,
                    body.seq,
                    robot.last_seq,
                )
            if kind == "step":
                self.robot_step(robot, body)
            elif kind == "episode_start":
                self.episode_start(robot, body)
            else:
                self.episode_end(robot, body)
        except FleetError:
            if kind == "step":
                self.metrics.inc("steps_refused")
            raise
        robot.last_seq = body.seq
        self._push(robot, received_at=received_at)
        if kind == "step":
            self._forward_frame(robot, body)

    def episode_start(self, robot: Robot, start: pb.EpisodeStart) -> None:
        if robot.episode_id is not None:
            raise FleetError(
                PRECONDITION,
                f"episode_start {start.episode_id}: episode {robot.episode_id} is still open; end it first",
            )
        if not self.writer.store.writable:  # a damaged store, served read-only: the writer could not begin it
            raise self._unwritable(f"episode_start {start.episode_id}")
        check_text(start.policy_version, "episode_start: policy_version")
        start_time = float(step_time(start.timestamp, f"episode_start {start.episode_id}"))
        goal = None
        if start.HasField("goal") and robot.spec.goal_dim:
            goal = decode_vector(start.goal, robot.spec.goal_dim, f"episode_start {start.episode_id}: goal")
        robot.episode_id, robot.episode_goal, robot.episode_steps = start.episode_id, goal, 0
        robot.episode_bytes = 0
        robot.episode_start_seq = start.seq
        robot.violation_cleared = False
        if (robot.robot_id, robot.boot_id, start.episode_id) in self._committed:
            robot.episode_key = None  # resent after a restart, but committed before it: never twice
            log.info(
                "robot %s resent episode %d, which is already committed; not logging it again",
                robot.robot_id,
                start.episode_id,
            )
            return
        robot.episode_key = key = f"{robot.robot_id}#{next(self._keys)}"
        self._logging[key] = robot
        robot.uncommitted[key] = start.seq
        self._key_episode[key] = (robot.robot_id, robot.boot_id, start.episode_id)
        self.writer.begin(
            key,
            robot.robot_id,
            robot.task,
            start.policy_version or robot.policy_version,
            start_time,
            extra={"robot_episode_id": start.episode_id, "boot_id": robot.boot_id},
        )

    def robot_step(self, robot: Robot, step: pb.Step) -> None:
        if self.closing:
            raise FleetError(grpc.StatusCode.UNAVAILABLE, "the fleet server is shutting down; resend later")
        if robot.episode_id is None or step.episode_id != robot.episode_id:
            now_open = (
                "no episode is open" if robot.episode_id is None else f"episode {robot.episode_id} is open"
            )
            raise FleetError(
                PRECONDITION,
                f"step seq {step.seq} is for episode {step.episode_id}, but {now_open} "
                f"for robot {robot.robot_id!r}; send episode_start first",
            )
        if robot.episode_key is None:
            return  # the rest of an episode that is committed already, or that the server cut short
        if not self.writer.healthy:
            self.metrics.inc("steps_refused_store")
            raise self._unwritable(f"step seq {step.seq}")
        label = self._decide_label(robot, step)
        flat = decode_step(step, robot.spec, robot.episode_goal, self.config.max_frame_bytes, label)
        if not self.writer.step(robot.episode_key, flat):
            self.metrics.inc("steps_refused_queue_full")
            raise FleetError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the episode writer queue is full ({self.writer.max_pending_steps} steps waiting); "
                f"step seq {step.seq} was NOT logged: back off, reconnect and resend it",
            )
        self.metrics.inc("steps_received")
        self.ledger.step(
            robot.robot_id, robot.episode_key, robot.episode_steps, step, label, INTERVENTION_LABEL
        )
        robot.steps += 1
        robot.episode_steps += 1
        if robot.watchdog_due:  # it has now applied the operator's latest action, and none came since
            self._input_stopped(robot, robot.operator_id or "")
        robot.signals.CopyFrom(step.signals)
        blocked_before = robot.alloc.blocked
        robot.alloc.signals = allocation.Signals(
            step.signals.uncertainty,
            step.signals.risk,
            step.signals.density,
            step.signals.constraint_violation and not robot.violation_cleared,
        )
        robot.alloc.step = max(int(step.t), 0)
        if step.policy_version:
            robot.policy_version = check_text(step.policy_version, f"step seq {step.seq}: policy_version")
        if robot.alloc.blocked and not blocked_before:
            self._push(robot, "constraint violation: holding until a human resets the robot")
        # An open episode is held in memory until it ends: bounded in steps and in bytes (a hello may
        # declare 16 MB steps: 60 of them took flotilla serve to 1.2 GB, 10,000 would be 160 GB).
        step_bytes = sum(entry[4] for entry in robot.spec.wire_layout)
        robot.episode_bytes += step_bytes
        self.open_episode_bytes += step_bytes
        # ... and together: one token may use many robot ids, each with an episode of max_episode_bytes.
        while self.open_episode_bytes > self.config.max_open_episode_bytes and self._logging:
            self._cut(
                max(self._logging.values(), key=lambda other: other.episode_bytes),
                f"max_open_episode_bytes={self.config.max_open_episode_bytes}",
            )
        if robot.episode_key is None:
            return  # cut just now: the largest open episode was this robot's
        if robot.episode_steps >= self.config.max_episode_steps:
            limit = f"max_episode_steps={self.config.max_episode_steps}"
        elif robot.episode_bytes >= self.config.max_episode_bytes:
            limit = f"max_episode_bytes={self.config.max_episode_bytes}"
        else:
            return
        self._cut(robot, limit)

    def _cut(self, robot: Robot, limit: str) -> None:
        """Commit the robot's open episode as too_long (it reached `limit`); the rest is not logged."""
        log.warning(
            "robot %s: episode %d reached %s; committed as %r",
            robot.robot_id,
            robot.episode_id,
            limit,
            TOO_LONG_OUTCOME,
        )
        self._close_episode(robot, TOO_LONG_OUTCOME, keep_open=True)
        self._push(
            robot,
            f"episode {robot.episode_id} reached {limit}: committed as {TOO_LONG_OUTCOME!r}; the rest of "
            "it is not logged: end it and start a new one",
        )

    def _stop_logging(self, robot: Robot) -> None:
        """The robot's open episode is no longer logged (ended, cut, dropped): its bytes leave the count."""
        if robot.episode_key is not None:
            self._logging.pop(robot.episode_key, None)
            self.open_episode_bytes -= robot.episode_bytes
            robot.episode_key = None

    def _unwritable(self, what: str) -> FleetError:
        return FleetError(
            grpc.StatusCode.UNAVAILABLE,
            f"the episode store cannot be written ({self.writer.error}); {what} was NOT logged: keep it "
            "and resend later",
        )

    def _decide_label(self, robot: Robot, step: pb.Step) -> np.uint8:
        """The label the store gets (see the module docstring): the server's word, not the robot's."""
        try:
            claimed = wire.label_from_wire(step.label)
        except ValueError as err:
            raise FleetError(INVALID, f"step seq {step.seq}: {err}") from None
        if claimed == ControlLabel.ROBOT:
            return ROBOT_LABEL
        if claimed != ControlLabel.INTERVENTION:
            raise FleetError(
                INVALID,
                f"step seq {step.seq}: robots log robot or intervention steps, not "
                f"{claimed.label_name} (pre_intervention is set by the server at a takeover)",
            )
        operator = step.operator_id
        released = robot.released_by.get(operator)
        if operator and (
            operator == robot.operator_id
            or (released is not None and time.monotonic() - released <= self.config.label_grace_s)
        ):
            return INTERVENTION_LABEL
        self.metrics.inc("labels_corrected")
        LABEL_WARNINGS.warning(
            (robot.robot_id,),
            "robot %s claimed an intervention by %r that the server did not assign; logged as a robot step",
            robot.robot_id,
            clip(operator),
        )
        return ROBOT_LABEL

    def episode_end(self, robot: Robot, end: pb.EpisodeEnd) -> None:
        if robot.episode_id is None or robot.episode_id != end.episode_id:
            raise FleetError(
                PRECONDITION,
                f"episode_end {end.episode_id}: that episode is not open (open: {robot.episode_id})",
            )
        check_text(end.outcome, f"episode_end {end.episode_id}: outcome")
        step_time(end.timestamp, f"episode_end {end.episode_id}")
        if robot.episode_key is not None:
            self.ledger.episode_closed(robot.robot_id, robot.episode_key)
            self.writer.end(robot.episode_key, end.success, end.outcome)
        self.ledger.episode_ended(robot.robot_id, robot.policy_version, end.success, ROBOT_LABEL)
        self._stop_logging(robot)
        robot.episode_id = None
        robot.episodes += 1

    def _close_episode(self, robot: Robot, outcome: str, keep_open: bool = False) -> None:
        """End the robot's episode on the server's initiative (commit what it has). With keep_open the
        robot still considers it open: its remaining steps are acknowledged and not logged."""
        if robot.episode_key is not None:
            self.ledger.episode_closed(robot.robot_id, robot.episode_key)
            self.writer.end(robot.episode_key, False, outcome)
            self._stop_logging(robot)
        if not keep_open:
            robot.episode_id = None

    def episodes_committed(self, keys: list[str]) -> None:
        """The writer committed these episodes: their robots may forget them (committed_seq advances)."""
        for key in keys:
            episode = self._key_episode.pop(key, None)
            if episode is None:
                continue
            self._committed.add(episode)
            robot = self.robots.get(episode[0])
            if robot is not None and robot.uncommitted.pop(key, None) is not None:
                self._push(robot)

    def writer_failed(self, key: str, message: str) -> None:
        """The writer dropped this episode for good (it does not fit the store): tell its robot."""
        robot_id, _, _ = self._key_episode.pop(key, ("", "", 0))
        robot = self.robots.get(robot_id)
        if robot is None or robot.uncommitted.pop(key, None) is None:
            return
        if robot.episode_key == key:
            self._stop_logging(robot)
        if robot.outbox is not None:
            robot.outbox.fail(PRECONDITION, f"episode store refused this robot's episode: {message}")
            self._robot_gone(robot)

    def _forward_frame(self, robot: Robot, step: pb.Step) -> None:
        """Live view for the robot's operator: camera and low-dim observation, at most frame_hz per robot."""
        operator = self.operators.get(robot.operator_id or "")
        now = time.monotonic()
        if operator is None or now - robot.last_frame_at < 1.0 / self.config.frame_hz:
            return
        frame = pb.RobotFrame(
            robot_id=robot.robot_id,
            seq=step.seq,
            signals=step.signals,
            mode=self.mode_of(robot),
            timestamp=step.timestamp,
            action_seq=step.operator_action_seq,
        )
        if step.HasField("camera"):
            frame.camera.CopyFrom(step.camera)
        if step.HasField("goal"):
            frame.goal.CopyFrom(step.goal)
        elif robot.episode_goal is not None:
            frame.goal.CopyFrom(
                pb.Tensor(
                    shape=[robot.episode_goal.size],
                    dtype="float32",
                    data=robot.episode_goal.astype(np.float32).tobytes(),
                )
            )
        for key, tensor in step.observation.items():
            if not robot.spec.is_image(key):
                frame.observation[key].CopyFrom(tensor)
        if operator.outbox.send_droppable(pb.OperatorUpdate(frame=frame)):
            robot.last_frame_at = now

    # -- commands ---------------------------------------------------------------------------------

    def mode_of(self, robot: Robot) -> int:
        alloc = robot.alloc
        if self.fleet_estop or robot.estop:
            return pb.MODE_HOLD
        if alloc.controller is not None:
            return pb.MODE_HOLD if alloc.resetting else pb.MODE_TELEOP
        if alloc.blocked or alloc.displaced:
            return pb.MODE_HOLD
        return pb.MODE_AUTONOMOUS

    def _push(self, robot: Robot, message: str = "", received_at: float | None = None, **fields) -> None:
        """Send the robot its full current state (mode, acks, stop, latest policy) plus `fields`."""
        if robot.outbox is None:
            return
        mode = self.mode_of(robot)
        command = pb.Command(
            ack_seq=robot.last_seq,
            committed_seq=robot.committed_seq,
            mode=mode,
            estop=self.fleet_estop or robot.estop,
            policy_version=self.latest_policy,
            message=message,
            **fields,
        )
        if mode == pb.MODE_TELEOP:
            command.operator_id = robot.operator_id
            command.input_stopped = robot.input_stopped
        robot.outbox.send(command, received_at)

    # -- operators --------------------------------------------------------------------------------

    def operator_hello(self, hello: pb.OperatorHello, outbox: Outbox, identity: Identity | None) -> Operator:
        operator_id = self._claimed_id(hello.operator_id, "operator_id", "operator", identity)
        check_boot_id(hello.boot_id, "operator client")
        old = self.operators.get(operator_id)
        if old is not None and old.boot_id != hello.boot_id:
            raise FleetError(
                grpc.StatusCode.ALREADY_EXISTS,
                f"operator {operator_id!r} is signed in from another client; it can sign in here once "
                f"that session ends or goes silent ({self.config.operator_silence_s:g} s)",
            )
        operator = self.operators[operator_id] = Operator(
            operator_id, hello.boot_id, outbox, identity.is_admin
        )
        if old is not None:  # the same client reconnected: keep its robots
            old.outbox.fail(
                grpc.StatusCode.ABORTED,
                f"operator {operator_id!r} reconnected; this older session was replaced",
            )
            for robot in self.robots.values():
                if robot.operator_id == operator_id:
                    self._send_assignment(operator, robot)
        log.info("operator %s connected%s", operator_id, " (admin)" if identity.is_admin else "")
        outbox.send(pb.OperatorUpdate(queue=self._queue))
        return operator

    def operator_left(self, operator: Operator, outbox: Outbox) -> None:
        if operator.outbox is not outbox or self.operators.get(operator.operator_id) is not operator:
            return
        log.info("operator %s disconnected; its robots hold and go back to the queue", operator.operator_id)
        del self.operators[operator.operator_id]
        for release in self.allocator.operator_disconnected(operator.operator_id, self._allocs()):
            self._apply_release(
                release, f"operator {operator.operator_id} disconnected; holding for another operator"
            )

    def operator_message(self, operator: Operator, outbox: Outbox, message: pb.OperatorMessage) -> None:
        if operator.outbox is not outbox:
            raise FleetError(
                grpc.StatusCode.ABORTED, f"operator {operator.operator_id!r}: this session was replaced"
            )
        kind = message.WhichOneof("kind")
        if kind == "heartbeat":
            return
        if kind is None:
            raise FleetError(INVALID, "empty OperatorMessage")
        body = getattr(message, kind)
        try:
            if kind == "estop":
                self.set_estop(body.robot_id, body.engage, operator)
                return
            if kind in ("discard", "note", "pick"):
                done = self._console_request(operator, kind, body)
                outbox.send(
                    pb.OperatorUpdate(
                        notice=pb.OperatorNotice(request=kind, robot_id=body.robot_id, message=done)
                    )
                )
                return
            robot = self._controlled_robot(operator, body.robot_id, kind)
            if kind == "action":
                self._teleop_action(operator, robot, body)
            elif kind == "release":
                # Honoured by the allocator at the first tick at which t_T is served (Release then).
                self.allocator.operator_release(robot.alloc, operator.operator_id)
            elif kind == "reset" and not robot.alloc.resetting:
                # A human reset of a robot that is not blocked (stuck, say): order it now. A blocked robot's
                # reset is already under way: the allocator counts its t_R ticks, then the reset is sent.
                self._push(robot, f"human reset by operator {operator.operator_id}", reset=True)
        except FleetError as err:  # an operator's mistake is reported to it; its session goes on
            if kind == "action":
                self.metrics.inc("teleop_actions_refused")
            outbox.send(
                pb.OperatorUpdate(
                    error=pb.OperatorError(
                        code=wire.error_code_to_wire(err.code.name),
                        message=err.message,
                        robot_id=clip(body.robot_id, 64),
                        request=kind,
                    )
                )
            )

    def _controlled_robot(self, operator: Operator, robot_id: str, kind: str) -> Robot:
        robot = self.robots.get(robot_id)
        if robot is None:
            raise FleetError(grpc.StatusCode.NOT_FOUND, f"{kind}: unknown robot {clip(robot_id)!r}")
        if robot.operator_id != operator.operator_id:
            holder = f"it is controlled by {robot.operator_id}" if robot.operator_id else "nobody controls it"
            raise FleetError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{kind}: robot {robot_id!r} is not assigned to operator {operator.operator_id!r} ({holder})",
            )
        return robot

    def _teleop_action(self, operator: Operator, robot: Robot, action: pb.OperatorAction) -> None:
        if self.mode_of(robot) != pb.MODE_TELEOP:
            raise FleetError(
                PRECONDITION,
                f"action: robot {robot.robot_id!r} is in "
                f"{pb.Mode.Name(self.mode_of(robot))} (stopped or resetting), not TELEOP",
            )
        value = decode_vector(action.action, robot.spec.action_dim, f"action for {robot.robot_id}")
        self.metrics.inc("teleop_actions")
        self.ledger.action(robot.robot_id, action)
        robot.input_stopped, robot.watchdog_due, robot.steps_at_action = False, False, robot.steps
        if robot.watchdog is not None:
            robot.watchdog.cancel()
        robot.watchdog = asyncio.get_running_loop().call_later(
            self.config.teleop_watchdog_s, self._input_stopped, robot, operator.operator_id
        )
        self._push(
            robot,
            action=pb.Tensor(shape=[value.size], dtype="float32", data=value.tobytes()),
            action_seq=action.seq,
        )

    def _input_stopped(self, robot: Robot, operator_id: str) -> None:
        """The watchdog fired: the operator's input stopped (tab hidden or closed, network gone, deadman
        released). The robot holds now, whatever the operator's page believes."""
        robot.watchdog = None
        if robot.operator_id != operator_id or robot.input_stopped:
            return
        if robot.steps == robot.steps_at_action:
            robot.watchdog_due = True  # the robot has not stepped since: it holds after its next step
            return
        robot.input_stopped, robot.watchdog_due = True, False
        self.metrics.inc("teleop_input_stopped")
        self._push(robot, f"operator {operator_id}: input stopped, holding")

    def _stop_watchdog(self, robot: Robot) -> None:
        if robot.watchdog is not None:
            robot.watchdog.cancel()
        robot.watchdog, robot.input_stopped, robot.watchdog_due = None, False, False

    def _console_request(self, operator: Operator, kind: str, body) -> str:
        """discard, note, pick (see OperatorMessage): what was done, or FleetError saying why not."""
        robot_id = check_id(body.robot_id, f"{kind}: robot_id")
        robot = self.robots.get(robot_id)
        try:
            if kind == "discard":
                return self.ledger.discard(operator.operator_id, robot_id)
            if kind == "note":
                return self.ledger.note(operator.operator_id, robot_id, body.text)
            if robot is None:
                raise LookupError(f"pick: unknown robot {robot_id!r}")
            assignment = self.allocator.pick(robot.alloc, operator.operator_id, self._allocs())
        except LookupError as err:
            raise FleetError(grpc.StatusCode.NOT_FOUND, str(err).strip("'\"")) from None
        except ValueError as err:
            raise FleetError(PRECONDITION, f"{kind}: {err}") from None
        self._apply_assignment(assignment, is_takeover=True)
        self._publish_queue()
        return f"you took {robot_id} from the queue"

    def set_estop(self, robot_id: str, engage: bool, operator: Operator) -> None:
        """Engage or release a protective stop on one robot, or on the whole fleet when robot_id is empty.

        Anyone may engage one. A robot's stop is released by an operator who engaged it or an admin; the
        fleet's only by an admin. Stops are kept on disk, so a restarted server starts stopped too.
        """
        by = operator.operator_id
        robot = self.robots.get(robot_id) if robot_id else None
        if robot_id and robot is None:
            self._estop_absent(robot_id, engage, operator)
            return
        if robot is not None:
            new_by = self._stoppers_after(robot_id, robot.estop_by, engage, operator)
            if new_by == robot.estop_by:
                return  # nothing changes: no log line, no disk write (a flood of these costs nothing)
            robot.estop_by = new_by
            if new_by and not engage:
                self._save_estops()
                log.warning(
                    "protective stop on %s: %s released theirs; still held by %s",
                    robot_id,
                    by,
                    sorted(new_by),
                )
                raise FleetError(
                    PRECONDITION,
                    f"estop: your stop on robot {robot_id!r} is released, but it stays stopped: "
                    f"{sorted(new_by)} stopped it too (they or an admin release theirs)",
                )
            targets = [robot]
        else:
            if not engage and not operator.is_admin and self.fleet_estop:
                raise FleetError(
                    grpc.StatusCode.PERMISSION_DENIED, "estop: releasing the fleet-wide stop needs an admin"
                )
            if engage == self.fleet_estop:
                return
            self.fleet_estop = engage
            targets = list(self.robots.values())
        self._save_estops(now=engage)
        what = "engaged" if engage else "released"
        log.warning("protective stop %s on %s by %s", what, robot_id or "the whole fleet", by)
        for target in targets:
            self._push(target, f"protective stop {what} by {by}" + ("" if robot_id else " (whole fleet)"))

    def _estop_absent(self, robot_id: str, engage: bool, operator: Operator) -> None:
        """A stop for a robot the server has no record of (not back yet after a restart, say): latched for
        when it says hello, so a stop wins whenever it is asked for; released like any other."""
        check_id(robot_id, "estop: robot_id")
        if self.config.robot_ids and robot_id not in self.config.robot_ids:
            raise FleetError(grpc.StatusCode.NOT_FOUND, f"estop: robot {robot_id!r} is not in robot_ids")
        held = self._robot_estops.get(robot_id, set())
        if not engage and not held:
            raise FleetError(
                grpc.StatusCode.NOT_FOUND, f"estop: unknown robot {robot_id!r}, no stop to release"
            )
        if engage and not held and len(self._robot_estops) >= self.config.max_robots:
            raise FleetError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"estop: {len(self._robot_estops)} stops are latched already (max_robots)",
            )
        new_by = self._stoppers_after(robot_id, held, engage, operator)
        if new_by == held:
            return
        if new_by:
            self._robot_estops[robot_id] = new_by
        else:
            self._robot_estops.pop(robot_id, None)
        self._save_estops(now=engage)
        log.warning(
            "protective stop %s on %s (not connected) by %s",
            "engaged" if engage else "released",
            robot_id,
            operator.operator_id,
        )

    @staticmethod
    def _stoppers_after(robot_id: str, held: set[str], engage: bool, operator: Operator) -> set[str]:
        """Who holds a robot's stop after this request. Each engager's stop is their own: one released
        leaves another's latched; only they or an admin (who releases all) may release theirs."""
        by = operator.operator_id
        if engage:
            return held | {by}
        if not operator.is_admin and held and by not in held:
            raise FleetError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"estop: robot {robot_id!r} was stopped by {sorted(held)}; only they or an admin may release it",
            )
        return set() if operator.is_admin else held - {by}

    def _save_estops(self, now: bool = False) -> None:
        """Keep the latched stops on disk. An engaged stop is saved `now`, before anyone is told of it (~2 ms
        on the loop; engaging one already held writes nothing): a server killed the moment after a robot
        or an operator saw it stopped still starts with it stopped (saved in a thread, the push went out
        first and kill -9 then lost it every time). A release is saved off the loop (losing one fails
        safe): one writer at a time, always the latest state, a burst costs one or two writes."""
        self._robot_estops = {r.robot_id: set(r.estop_by) for r in self.robots.values() if r.estop} | {
            robot_id: by for robot_id, by in self._robot_estops.items() if robot_id not in self.robots
        }
        self._estop_version += 1
        if now:
            self._write_estop_state(self._estop_version, self._estop_state())
            return
        self._estops_dirty = True
        if self._estop_saver is None or self._estop_saver.done():
            self._estop_saver = self.spawn(self._write_estops())

    async def estops_saved(self) -> None:
        """Wait until the latest protective-stop state is on disk (a graceful stop waits for it)."""
        while self._estop_saver is not None and not self._estop_saver.done():
            await self._estop_saver

    async def _write_estops(self) -> None:
        while self._estops_dirty:
            self._estops_dirty = False
            await asyncio.to_thread(self._write_estop_state, self._estop_version, self._estop_state())

    def _estop_state(self) -> tuple[bool, dict[str, set[str]]]:
        return self.fleet_estop, {k: set(v) for k, v in self._robot_estops.items()}

    def _write_estop_state(self, version: int, state: tuple[bool, dict[str, set[str]]]) -> None:
        """Save `state` (the `version`th) unless a later one is on disk already (any thread)."""
        with self._estop_lock:
            if version <= self._estop_saved_version:
                return
            try:
                save_estops(self._estop_file, *state)
                self._estop_saved_version = version
            except OSError as err:  # still latched in memory; say loudly that a restart would forget it
                log.error("could not save protective stops to %s: %s", self._estop_file, err)

    # -- allocation -------------------------------------------------------------------------------

    def _allocs(self) -> list[allocation.RobotSlot]:
        return [robot.alloc for robot in self.robots.values()]

    def tick(self) -> None:
        """One allocation round: drop silent sessions, expire abandoned episodes, forget departed robots,
        ask the allocator, apply its decisions."""
        now = time.monotonic()
        self._drop_silent_operators(now)
        for robot in list(self.robots.values()):
            if robot.outbox is not None and now - robot.last_heard > self.config.robot_silence_s:
                self._drop_silent_robot(robot, now)
            if robot.outbox is None and robot.disconnected_at is not None:
                away = now - robot.disconnected_at
                if robot.episode_key is not None and away > self.config.resume_grace_s:
                    log.info(
                        "robot %s did not come back; committing its open episode as %r",
                        robot.robot_id,
                        DISCONNECTED_OUTCOME,
                    )
                    self._close_episode(robot, DISCONNECTED_OUTCOME, keep_open=True)
                if away > self.config.forget_robot_after_s and self._forgettable(robot):
                    del self.robots[robot.robot_id]
                    continue
            # Between episodes or stopped, a robot needs no human.
            robot.alloc.idle = robot.episode_key is None or self.fleet_estop or robot.estop
        before = {robot.robot_id: robot.operator_id for robot in self.robots.values()}
        decisions = self.allocator.tick(self._allocs(), list(self.operators))
        for release in decisions.releases:  # first: a freed operator may be reassigned below
            self._apply_release(release)
        for assignment in decisions.assignments:
            self._apply_assignment(
                assignment, is_takeover=before.get(assignment.robot_id) != assignment.operator_id
            )
        self._publish_queue()

    def _drop_silent_robot(self, robot: Robot, now: float) -> None:
        """End a robot session that went silent (a frozen or cut-off robot; see robot_silence_s)."""
        log.warning("robot %s silent for %.1f s: ending its session", robot.robot_id, now - robot.last_heard)
        robot.outbox.fail(
            grpc.StatusCode.UNAVAILABLE,
            f"silent for over {self.config.robot_silence_s:g} s; reconnect and resend",
        )
        self._robot_gone(robot)

    def _drop_silent_operators(self, now: float) -> None:
        """End operator sessions that went silent (see operator_silence_s): their robots hold and are re-queued."""
        for operator in list(self.operators.values()):
            if now - operator.last_heard > self.config.operator_silence_s:
                log.warning(
                    "operator %s silent for %.1f s: ending its session",
                    operator.operator_id,
                    now - operator.last_heard,
                )
                operator.outbox.fail(
                    grpc.StatusCode.UNAVAILABLE,
                    f"silent for over {self.config.operator_silence_s:g} s; reconnect",
                )
                self.operator_left(operator, operator.outbox)

    @staticmethod
    def _forgettable(robot: Robot) -> bool:
        """A departed robot's record can go: nothing open, nobody on it, no stop latched on it."""
        return (
            robot.outbox is None
            and robot.episode_key is None
            and not robot.uncommitted
            and robot.operator_id is None
            and not robot.estop
        )

    def _forget_one(self) -> bool:
        """Make room for a new robot by forgetting the longest-departed forgettable one."""
        departed = [r for r in self.robots.values() if self._forgettable(r) and r.disconnected_at is not None]
        if not departed:
            return False
        del self.robots[min(departed, key=lambda r: r.disconnected_at).robot_id]
        return True

    def _apply_assignment(self, assignment: allocation.Assignment, is_takeover: bool) -> None:
        robot, operator = self.robots[assignment.robot_id], self.operators.get(assignment.operator_id)
        if is_takeover:
            # Sirius: the robot's last steps before a human takes over become pre_intervention.
            if robot.episode_key is not None:
                self.writer.relabel(
                    robot.episode_key, self.config.pre_intervention_steps, ControlLabel.PRE_INTERVENTION
                )
            self.metrics.inc("takeovers")
            self._stop_watchdog(robot)
            self.ledger.begin(robot.robot_id, assignment.operator_id, assignment.needs_reset)
            log.info(
                "operator %s takes over robot %s (%s)",
                assignment.operator_id,
                robot.robot_id,
                assignment.reason,
            )
        self._push(
            robot,
            f"operator {assignment.operator_id} takes over ({assignment.reason})"
            + (", reset needed" if assignment.needs_reset else ""),
        )
        if operator is not None:
            self._send_assignment(operator, robot, assignment)

    def _send_assignment(
        self, operator: Operator, robot: Robot, assignment: allocation.Assignment | None = None
    ) -> None:
        alloc = robot.alloc
        operator.outbox.send(
            pb.OperatorUpdate(
                assignment=pb.Assignment(
                    robot_id=robot.robot_id,
                    reason=wire.assignment_reason_to_wire(assignment.reason if assignment else alloc.reason),
                    min_steps=assignment.min_steps if assignment else self.allocator.config.t_T,
                    needs_reset=alloc.resetting,
                    reset_steps=self.allocator.config.t_R if alloc.resetting else 0,
                )
            )
        )

    def _apply_release(self, release: allocation.Release, message: str = "") -> None:
        """Tell the operator (if still here) and the robot; a finished human reset also orders the reset."""
        operator = self.operators.get(release.operator_id)
        if operator is not None:
            operator.outbox.send(
                pb.OperatorUpdate(
                    released=pb.Release(
                        robot_id=release.robot_id, reason=wire.release_reason_to_wire(release.reason)
                    )
                )
            )
        robot = self.robots.get(release.robot_id)
        self.ledger.end(release.robot_id, robot.policy_version if robot is not None else "")
        if robot is not None:
            self._stop_watchdog(robot)
            robot.released_by[release.operator_id] = time.monotonic()
            reset = release.reason == allocation.RESET_DONE
            robot.violation_cleared = robot.violation_cleared or reset
            self._push(
                robot,
                message or f"operator {release.operator_id} released the robot ({release.reason})",
                reset=reset,
            )

    def _publish_queue(self) -> None:
        """The console's queue, pushed to every operator when it changes. priority = level + score."""
        period = 1.0 / self.config.allocation.tick_hz
        queue = pb.Queue(
            entries=[
                pb.QueueEntry(
                    robot_id=entry.robot_id,
                    priority=entry.level + entry.score,
                    score=entry.score,
                    reason=wire.assignment_reason_to_wire(entry.reason),
                    assigned_to=entry.assigned_to or "",
                    waited_s=round(entry.waited_ticks * period, 1),
                )
                for entry in self.allocator.queue()
            ]
        )
        if queue != self._queue:
            self._queue = queue
            for operator in self.operators.values():
                operator.outbox.send(pb.OperatorUpdate(queue=queue))

    # -- registry, admin, shutdown ----------------------------------------------------------------

    def policy_published(self, version: str, thresholds: Mapping | None = None) -> None:
        """A new latest version; `thresholds` (fleet/server/policy_thresholds.py): its calibrated request
        thresholds by signal ({}: it has none, back to the configured ones; None: leave them)."""
        self.latest_policy = version
        self.use_policy_thresholds(version, thresholds)
        for robot in self.robots.values():
            self._push(robot, f"new policy version {version}")

    def use_policy_thresholds(self, version: str, thresholds: Mapping | None) -> None:
        if thresholds is None:
            return
        self.allocator.fix_thresholds(thresholds.get("uncertainty"), thresholds.get("risk"))
        log.info(
            "request thresholds: %s",
            ", ".join(f"{name} from policy {version}" for name in sorted(thresholds))
            or "the configured ones",
        )

    def status(self) -> pb.FleetStatus:
        robots = [
            pb.RobotStatus(
                robot_id=r.robot_id,
                mode=self.mode_of(r),
                operator_id=r.operator_id or "",
                policy_version=r.policy_version,
                steps=r.steps,
                episodes=r.episodes,
                signals=r.signals,
                connected=r.outbox is not None,
                estop=r.estop,
                blocked=r.alloc.blocked,
                task=r.task,
                goal=codec.to_tensor(r.episode_goal) if r.episode_goal is not None else None,
                action_dim=r.spec.action_dim,
            )
            for r in self.robots.values()
        ]
        stats = self.writer.stats
        return pb.FleetStatus(
            robots=robots,
            operators=sorted(self.operators),
            episodes_committed=stats.episodes_committed,
            steps_logged=stats.steps_logged,
            writer_queue_depth=self.writer.depth,
            fleet_estop=self.fleet_estop,
            writer_healthy=self.writer.healthy,
            writer_error=self.writer.error,
            tallies=self.ledger.tallies_pb(),
            rounds=self.ledger.rounds_pb(),
        )

    def shutdown(self) -> None:
        """Refuse new work and finish every stream normally (open episodes are committed by the writer)."""
        self.closing = True
        for robot in self.robots.values():
            if robot.outbox is not None:
                robot.outbox.close()
        for operator in self.operators.values():
            operator.outbox.close()


def check_boot_id(boot_id: str, whose: str) -> None:
    if not 0 < len(boot_id) <= 64:
        raise FleetError(INVALID, f"hello: boot_id must be 1-64 characters (a random id per {whose})")


def check_text(value: str, what: str) -> str:
    if len(value) > MAX_TEXT:
        raise FleetError(INVALID, f"{what} is {len(value)} characters, at most {MAX_TEXT}")
    return value


def committed_episodes(store) -> set[tuple[str, str, int]]:
    """(robot_id, boot_id, robot episode id) of every committed fleet episode, from the store's metadata."""
    if store.num_episodes == 0:
        return set()
    committed = set()
    for robot_id, extra in zip(store.meta_column("robot_id"), store.meta_column("extra"), strict=True):
        try:
            meta = json.loads(str(extra) or "{}")
        except ValueError:
            continue
        if isinstance(meta, dict) and meta.get("boot_id") and isinstance(meta.get("robot_episode_id"), int):
            committed.add((str(robot_id), str(meta["boot_id"]), meta["robot_episode_id"]))
    return committed


def load_estops(path: Path) -> tuple[bool, dict[str, set[str]]]:
    """The protective stops latched when the server last ran (none if the file is missing)."""
    try:
        data = json.loads(path.read_text())
        return bool(data.get("fleet", False)), {
            str(k): set(map(str, v)) for k, v in data.get("robots", {}).items()
        }
    except FileNotFoundError:
        return False, {}
    except (OSError, ValueError, AttributeError, TypeError) as err:
        # Unreadable: stop everything rather than silently forget a latched stop.
        log.error(
            "protective stop file %s is unreadable (%s): starting with the whole fleet stopped", path, err
        )
        return True, {}


def save_estops(path: Path, fleet: bool, robots: dict[str, set[str]]) -> None:
    """Atomically (write, fsync, rename): a crash leaves the old or the new state, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}")
    with open(temp, "w") as file:
        json.dump({"fleet": fleet, "robots": {k: sorted(v) for k, v in robots.items()}}, file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temp, path)
