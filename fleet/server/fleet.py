"""The fleet's live state and every rule about who controls which robot.

All of it runs on the server's event loop (no locks): robot and operator sessions call in with what
they received, the allocation tick calls `tick`, and every change of a robot's situation is pushed to
it at once as a Command (`_push`), so a robot's control loop never polls or waits.

Who controls a robot is decided by the allocator (fleet/allocation.py): each robot has an
`allocation.RobotState` (`Robot.alloc`) that the allocator updates in place; the server writes its
signals, `connected` and `idle`, and applies the releases and assignments each tick returns.

A robot's mode follows from that state in one place, `mode_of`:
    e-stop (the robot's or the fleet's)           -> HOLD, estop=true: wins over everything, teleop included
    an operator controls it                       -> TELEOP (HOLD while that operator resets it)
    blocked (constraint violation), or displaced
    (its operator left, it waits for another)     -> HOLD until a human takes it
    otherwise                                     -> AUTONOMOUS
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, field

import grpc
import numpy as np

from fleet import allocation
from fleet.labels import ControlLabel
from fleet.proto import flotilla_pb2 as pb
from fleet.server.config import ServerConfig
from fleet.server.metrics import Metrics
from fleet.server.robots import RobotSpec, decode_vector, flatten_step, schema_difference
from fleet.server.streams import FleetError, Outbox
from fleet.server.writer import EpisodeWriter

log = logging.getLogger(__name__)

PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
DISCONNECTED_OUTCOME = "disconnected"


@dataclass
class Robot:
    robot_id: str
    spec: RobotSpec
    task: str
    policy_version: str
    alloc: allocation.RobotState  # signals and who controls it, shared with the allocator
    outbox: Outbox | None = None  # the connected session; None while disconnected
    last_seq: int = 0  # highest step seq queued for logging (acks and dedup of resent steps)
    episode_id: int | None = None  # the open episode (robot-local id) and its writer key
    episode_key: str | None = None
    episode_goal: np.ndarray | None = None
    last_closed_episode: int | None = None
    steps: int = 0
    episodes: int = 0
    signals: pb.Signals = field(default_factory=pb.Signals)
    estop: bool = False
    # After a human reset, steps of the episode it interrupted may still report the violation: ignore it
    # until the robot starts a new episode, so it is not blocked again by stale signals.
    violation_cleared: bool = False
    last_frame_at: float = 0.0
    disconnected_at: float | None = None

    @property
    def operator_id(self) -> str | None:
        return self.alloc.controller


@dataclass
class Operator:
    operator_id: str
    outbox: Outbox


class Fleet:
    def __init__(self, config: ServerConfig, writer: EpisodeWriter, metrics: Metrics,
                 allocator: allocation.Allocator, latest_policy: str = ""):
        self.config = config
        self.writer = writer
        self.metrics = metrics
        self.allocator = allocator
        self.latest_policy = latest_policy
        self.robots: dict[str, Robot] = {}
        self.operators: dict[str, Operator] = {}
        self.fleet_estop = False
        self.closing = False
        self._schema = writer.store.schema  # every robot's steps must fit the one store schema
        self._keys = itertools.count(1)
        self._queue = pb.Queue()
        self._tasks: set[asyncio.Task] = set()

    def spawn(self, coro) -> asyncio.Task:
        """A background task the fleet keeps a reference to (the event loop holds tasks only weakly)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- robots -----------------------------------------------------------------------------------

    def robot_hello(self, hello: pb.RobotHello, outbox: Outbox) -> Robot:
        if self.closing:
            raise FleetError(grpc.StatusCode.UNAVAILABLE, "the fleet server is shutting down")
        if not hello.robot_id:
            raise FleetError(grpc.StatusCode.INVALID_ARGUMENT, "hello: robot_id is empty")
        if self.config.robot_ids and hello.robot_id not in self.config.robot_ids:
            raise FleetError(grpc.StatusCode.PERMISSION_DENIED,
                             f"robot id {hello.robot_id!r} is not in this fleet's robot_ids")
        spec = RobotSpec.from_hello(hello)
        schema = spec.store_schema()
        if self._schema is not None and (diff := schema_difference(self._schema, schema)):
            raise FleetError(PRECONDITION, f"hello: robot {hello.robot_id!r} steps would not fit the episode "
                                           f"store at {self.config.store}: {diff}")
        self._schema = schema
        robot = self.robots.get(hello.robot_id)
        if robot is not None and robot.outbox is not None:
            robot.outbox.fail(grpc.StatusCode.ABORTED,
                              f"robot {hello.robot_id!r} connected again; this older session was replaced")
            self._robot_gone(robot)
        if robot is None or robot.spec != spec:
            old = robot
            robot = Robot(hello.robot_id, spec, hello.task, hello.policy_version, allocation.RobotState(hello.robot_id))
            if old is not None:  # the same robot with new sensors: a fresh record, but an e-stop stays
                self._close_episode(old, DISCONNECTED_OUTCOME)
                robot.estop = old.estop
            self.robots[hello.robot_id] = robot
        elif hello.last_acked_seq == 0 and robot.last_seq > 0:
            # A restarted robot process (it has seen no ack): what was open is over, and seqs start again.
            self._close_episode(robot, DISCONNECTED_OUTCOME)
            robot.last_seq = 0
        robot.task, robot.policy_version = hello.task, hello.policy_version
        robot.outbox, robot.disconnected_at, robot.alloc.connected = outbox, None, True
        log.info("robot %s connected (resume from seq %d)", robot.robot_id, robot.last_seq)
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
        self._check_session(robot, outbox)
        kind = message.WhichOneof("kind")
        if kind == "step":
            self.robot_step(robot, message.step, time.monotonic())
        elif kind == "episode_start":
            self.episode_start(robot, message.episode_start)
        elif kind == "episode_end":
            self.episode_end(robot, message.episode_end)
        else:
            raise FleetError(grpc.StatusCode.INVALID_ARGUMENT,
                             "empty RobotMessage (none of hello, episode_start, step, episode_end)")

    def episode_start(self, robot: Robot, start: pb.EpisodeStart) -> None:
        if robot.episode_id == start.episode_id:
            return  # resent after a reconnect: it is already open
        if robot.episode_id is not None:
            raise FleetError(PRECONDITION, f"episode_start {start.episode_id}: episode {robot.episode_id} is "
                                           "still open; end it first")
        goal = None
        if start.HasField("goal") and robot.spec.goal_dim:
            goal = decode_vector(start.goal, robot.spec.goal_dim, f"episode_start {start.episode_id}: goal")
        robot.episode_id, robot.episode_key, robot.episode_goal = start.episode_id, self._new_key(robot), goal
        robot.violation_cleared = False
        self.writer.begin(robot.episode_key, robot.robot_id, robot.task,
                          start.policy_version or robot.policy_version, start.timestamp or time.time(),
                          extra={"robot_episode_id": start.episode_id})

    def robot_step(self, robot: Robot, step: pb.Step, received_at: float) -> None:
        if self.closing:
            raise FleetError(grpc.StatusCode.UNAVAILABLE, "the fleet server is shutting down; resend later")
        if step.seq <= 0:
            raise FleetError(grpc.StatusCode.INVALID_ARGUMENT, f"step seq must be positive, got {step.seq}")
        if step.seq <= robot.last_seq:
            self._push(robot, received_at=received_at)  # resent after a reconnect: already queued
            return
        if robot.episode_id is None or step.episode_id != robot.episode_id:
            now_open = "no episode is open" if robot.episode_id is None else f"episode {robot.episode_id} is open"
            raise FleetError(PRECONDITION, f"step seq {step.seq} is for episode {step.episode_id}, but {now_open} "
                                           f"for robot {robot.robot_id!r}; send episode_start first")
        flat = flatten_step(step, robot.spec, robot.episode_goal, self.config.max_frame_bytes)
        if not self.writer.step(robot.episode_key, flat):
            self.metrics.inc("steps_refused")
            self.metrics.inc("steps_refused_queue_full")
            raise FleetError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                             f"the episode writer queue is full ({self.writer.max_pending_steps} steps waiting); "
                             f"step seq {step.seq} was NOT logged: back off, reconnect and resend it")
        self.metrics.inc("steps_received")
        robot.last_seq, robot.steps = step.seq, robot.steps + 1
        robot.signals.CopyFrom(step.signals)
        blocked_before = robot.alloc.blocked
        robot.alloc.signals = allocation.Signals(
            step.signals.uncertainty, step.signals.risk, step.signals.density,
            step.signals.constraint_violation and not robot.violation_cleared)
        if step.policy_version:
            robot.policy_version = step.policy_version
        blocked_now = robot.alloc.blocked and not blocked_before
        self._push(robot, "constraint violation: holding until a human resets the robot" if blocked_now else "",
                   received_at=received_at)
        self._forward_frame(robot, step)

    def episode_end(self, robot: Robot, end: pb.EpisodeEnd) -> None:
        if robot.episode_id is None or robot.episode_id != end.episode_id:
            if end.episode_id == robot.last_closed_episode:
                return  # resent after a reconnect: already ended
            raise FleetError(PRECONDITION, f"episode_end {end.episode_id}: that episode is not open "
                                           f"(open: {robot.episode_id})")
        self.writer.end(robot.episode_key, end.success, end.outcome)
        robot.last_closed_episode, robot.episode_id, robot.episode_key = robot.episode_id, None, None
        robot.episodes += 1

    def _close_episode(self, robot: Robot, outcome: str) -> None:
        if robot.episode_key is not None:
            self.writer.end(robot.episode_key, False, outcome)
            robot.last_closed_episode, robot.episode_id, robot.episode_key = robot.episode_id, None, None

    def _check_session(self, robot: Robot, outbox: Outbox) -> None:
        if robot.outbox is not outbox:
            raise FleetError(grpc.StatusCode.ABORTED, f"robot {robot.robot_id!r}: this session was replaced")

    def _new_key(self, robot: Robot) -> str:
        return f"{robot.robot_id}#{next(self._keys)}"

    def _forward_frame(self, robot: Robot, step: pb.Step) -> None:
        """Live view for the robot's operator: camera and low-dim observation, at most frame_hz per robot."""
        operator = self.operators.get(robot.operator_id or "")
        now = time.monotonic()
        if operator is None or now - robot.last_frame_at < 1.0 / self.config.frame_hz:
            return
        frame = pb.RobotFrame(robot_id=robot.robot_id, seq=step.seq, signals=step.signals, mode=self.mode_of(robot))
        if step.HasField("camera"):
            frame.camera.CopyFrom(step.camera)
        for key, tensor in step.observation.items():
            if not robot.spec.is_image(key):
                frame.observation[key].CopyFrom(tensor)
        if operator.outbox.send_droppable(pb.OperatorUpdate(frame=frame)):
            robot.last_frame_at = now

    # -- commands ---------------------------------------------------------------------------------

    def mode_of(self, robot: Robot) -> pb.Mode:
        alloc = robot.alloc
        if self.fleet_estop or robot.estop:
            return pb.HOLD
        if alloc.controller is not None:
            return pb.HOLD if alloc.resetting else pb.TELEOP
        if alloc.blocked or alloc.displaced:
            return pb.HOLD
        return pb.AUTONOMOUS

    def _push(self, robot: Robot, message: str = "", received_at: float | None = None, **fields) -> None:
        """Send the robot its full current state (mode, ack, e-stop, latest policy) plus `fields`."""
        if robot.outbox is None:
            return
        mode = self.mode_of(robot)
        command = pb.Command(ack_seq=robot.last_seq, mode=mode, estop=self.fleet_estop or robot.estop,
                             policy_version=self.latest_policy, message=message, **fields)
        if mode == pb.TELEOP:
            command.operator_id = robot.operator_id
        robot.outbox.send(command, received_at)

    # -- operators --------------------------------------------------------------------------------

    def operator_hello(self, hello: pb.OperatorHello, outbox: Outbox) -> Operator:
        if self.closing:
            raise FleetError(grpc.StatusCode.UNAVAILABLE, "the fleet server is shutting down")
        if not hello.operator_id:
            raise FleetError(grpc.StatusCode.INVALID_ARGUMENT, "hello: operator_id is empty")
        old = self.operators.get(hello.operator_id)
        operator = self.operators[hello.operator_id] = Operator(hello.operator_id, outbox)
        if old is not None:  # the same person reconnected (a reloaded console): keep their robots
            old.outbox.fail(grpc.StatusCode.ABORTED,
                            f"operator {hello.operator_id!r} connected again; this older session was replaced")
            for robot in self.robots.values():
                if robot.operator_id == operator.operator_id:
                    self._send_assignment(operator, robot)
        log.info("operator %s connected", hello.operator_id)
        outbox.send(pb.OperatorUpdate(queue=self._queue))
        return operator

    def operator_left(self, operator: Operator, outbox: Outbox) -> None:
        if operator.outbox is not outbox or self.operators.get(operator.operator_id) is not operator:
            return
        log.info("operator %s disconnected; its robots hold and go back to the queue", operator.operator_id)
        del self.operators[operator.operator_id]
        for release in self.allocator.operator_disconnected(operator.operator_id, self._allocs()):
            self._apply_release(release, f"operator {operator.operator_id} disconnected; holding for another operator")

    def operator_message(self, operator: Operator, outbox: Outbox, message: pb.OperatorMessage) -> None:
        if operator.outbox is not outbox:
            raise FleetError(grpc.StatusCode.ABORTED, f"operator {operator.operator_id!r}: this session was replaced")
        kind = message.WhichOneof("kind")
        if kind is None:
            raise FleetError(grpc.StatusCode.INVALID_ARGUMENT, "empty OperatorMessage")
        try:
            if kind == "estop":
                self.set_estop(message.estop.robot_id, message.estop.engage, operator.operator_id)
                return
            body = getattr(message, kind)
            robot = self._controlled_robot(operator, body.robot_id, kind)
            if kind == "action":
                self._teleop_action(operator, robot, message.action)
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
            outbox.send(pb.OperatorUpdate(error=err.message))

    def _controlled_robot(self, operator: Operator, robot_id: str, kind: str) -> Robot:
        robot = self.robots.get(robot_id)
        if robot is None:
            raise FleetError(grpc.StatusCode.NOT_FOUND, f"{kind}: unknown robot {robot_id!r}")
        if robot.operator_id != operator.operator_id:
            holder = f"it is controlled by {robot.operator_id}" if robot.operator_id else "nobody controls it"
            raise FleetError(grpc.StatusCode.PERMISSION_DENIED,
                             f"{kind}: robot {robot_id!r} is not assigned to operator {operator.operator_id!r} ({holder})")
        return robot

    def _teleop_action(self, operator: Operator, robot: Robot, action: pb.OperatorAction) -> None:
        if self.mode_of(robot) != pb.TELEOP:
            raise FleetError(PRECONDITION, f"action: robot {robot.robot_id!r} is in "
                                           f"{pb.Mode.Name(self.mode_of(robot))} (e-stop or reset), not TELEOP")
        value = decode_vector(action.action, robot.spec.action_dim, f"action for {robot.robot_id}")
        self.metrics.inc("teleop_actions")
        self._push(robot, action=pb.Tensor(shape=[value.size], dtype="float32", data=value.tobytes()))

    def set_estop(self, robot_id: str, engage: bool, by: str) -> None:
        """Engage or release an e-stop on one robot, or on the whole fleet when robot_id is empty."""
        if robot_id and robot_id not in self.robots:
            raise FleetError(grpc.StatusCode.NOT_FOUND, f"estop: unknown robot {robot_id!r}")
        targets = [self.robots[robot_id]] if robot_id else list(self.robots.values())
        if robot_id:
            self.robots[robot_id].estop = engage
        else:
            self.fleet_estop = engage
        what = "engaged" if engage else "released"
        log.warning("e-stop %s on %s by %s", what, robot_id or "the whole fleet", by)
        for robot in targets:
            self._push(robot, f"e-stop {what} by {by}" + ("" if robot_id else " (whole fleet)"))

    # -- allocation -------------------------------------------------------------------------------

    def _allocs(self) -> list[allocation.RobotState]:
        return [robot.alloc for robot in self.robots.values()]

    def tick(self) -> None:
        """One allocation round: expire abandoned episodes, ask the allocator, apply its decisions."""
        now = time.monotonic()
        for robot in self.robots.values():
            if robot.outbox is None and robot.disconnected_at is not None and robot.episode_key is not None \
                    and now - robot.disconnected_at > self.config.resume_grace_s:
                log.info("robot %s did not come back; committing its open episode as %r",
                         robot.robot_id, DISCONNECTED_OUTCOME)
                self._close_episode(robot, DISCONNECTED_OUTCOME)
            # Between episodes or e-stopped, a robot needs no human.
            robot.alloc.idle = robot.episode_id is None or self.fleet_estop or robot.estop
        before = {robot.robot_id: robot.operator_id for robot in self.robots.values()}
        decisions = self.allocator.tick(self._allocs(), list(self.operators))
        for release in decisions.releases:  # first: a freed operator may be reassigned below
            self._apply_release(release)
        for assignment in decisions.assignments:
            self._apply_assignment(assignment, is_takeover=before.get(assignment.robot_id) != assignment.operator_id)
        self._publish_queue()

    def _apply_assignment(self, assignment: allocation.Assignment, is_takeover: bool) -> None:
        robot, operator = self.robots[assignment.robot_id], self.operators.get(assignment.operator_id)
        if is_takeover:
            # Sirius: the robot's last steps before a human takes over become pre_intervention.
            if robot.episode_key is not None:
                self.writer.relabel(robot.episode_key, self.config.pre_intervention_steps, ControlLabel.PRE_INTERVENTION)
            self.metrics.inc("takeovers")
            log.info("operator %s takes over robot %s (%s)", assignment.operator_id, robot.robot_id, assignment.reason)
        self._push(robot, f"operator {assignment.operator_id} takes over ({assignment.reason})"
                   + (", reset needed" if assignment.needs_reset else ""))
        if operator is not None:
            self._send_assignment(operator, robot, assignment)

    def _send_assignment(self, operator: Operator, robot: Robot, assignment: allocation.Assignment | None = None) -> None:
        alloc = robot.alloc
        operator.outbox.send(pb.OperatorUpdate(assignment=pb.Assignment(
            robot_id=robot.robot_id, reason=assignment.reason if assignment else alloc.reason or "",
            min_steps=assignment.min_steps if assignment else self.config.allocation.t_T,
            needs_reset=alloc.resetting, reset_steps=self.config.allocation.t_R if alloc.resetting else 0)))

    def _apply_release(self, release: allocation.Release, message: str = "") -> None:
        """Tell the operator (if still here) and the robot; a finished human reset also orders the reset."""
        operator = self.operators.get(release.operator_id)
        if operator is not None:
            operator.outbox.send(pb.OperatorUpdate(released=pb.Release(robot_id=release.robot_id,
                                                                       reason=release.reason)))
        robot = self.robots.get(release.robot_id)
        if robot is not None:
            reset = release.reason == allocation.RESET_DONE
            robot.violation_cleared = robot.violation_cleared or reset
            self._push(robot, message or f"operator {release.operator_id} released the robot ({release.reason})",
                       reset=reset)

    def _publish_queue(self) -> None:
        """The console's queue, pushed to every operator when it changes. priority = level + score."""
        queue = pb.Queue(entries=[
            pb.QueueEntry(robot_id=entry.robot_id, priority=entry.level + entry.score, reason=entry.reason or "",
                          assigned_to=entry.assigned_to or "")
            for entry in self.allocator.queue()])
        if queue != self._queue:
            self._queue = queue
            for operator in self.operators.values():
                operator.outbox.send(pb.OperatorUpdate(queue=queue))

    # -- registry, writer, admin, shutdown --------------------------------------------------------

    def policy_published(self, version: str) -> None:
        self.latest_policy = version
        for robot in self.robots.values():
            self._push(robot, f"new policy version {version}")

    def writer_failed(self, key: str, message: str) -> None:
        for robot in self.robots.values():
            if robot.episode_key == key:
                robot.episode_id, robot.episode_key = None, None
                if robot.outbox is not None:
                    robot.outbox.fail(grpc.StatusCode.INTERNAL, message)

    def status(self) -> pb.FleetStatus:
        robots = [pb.RobotStatus(robot_id=r.robot_id, mode=self.mode_of(r), operator_id=r.operator_id or "",
                                 policy_version=r.policy_version, steps=r.steps, episodes=r.episodes,
                                 signals=r.signals, connected=r.outbox is not None)
                  for r in self.robots.values()]
        stats = self.writer.stats
        return pb.FleetStatus(robots=robots, operators=sorted(self.operators), episodes_committed=stats.episodes_committed,
                              steps_logged=stats.steps_logged, writer_queue_depth=self.writer.depth)

    def shutdown(self) -> None:
        """Refuse new work and finish every stream normally (open episodes are committed by the writer)."""
        self.closing = True
        for robot in self.robots.values():
            if robot.outbox is not None:
                robot.outbox.close()
        for operator in self.operators.values():
            operator.outbox.close()
