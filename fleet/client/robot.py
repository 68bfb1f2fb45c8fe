"""RobotClient: a robot's session with the fleet server (see the package docstring for durability)."""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from fleet import codec, wire
from fleet.client._session import HEARTBEAT_S, _StreamClient
from fleet.labels import ControlLabel
from fleet.proto import flotilla_pb2 as pb
from fleet.proto import flotilla_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RobotState:
    """What the server last told the robot (see Command in flotilla.proto)."""

    mode: int = (
        pb.MODE_UNSPECIFIED
    )  # pb.MODE_AUTONOMOUS / MODE_TELEOP / MODE_HOLD; unspecified until the server speaks
    estop: bool = False
    operator_id: str = ""
    action: np.ndarray | None = None  # the operator's latest action (TELEOP), and when it arrived:
    action_time: float = 0.0  # time.monotonic(); judge freshness with it, hold when it is stale
    action_seq: int = 0  # that action's OperatorAction.seq (echo it in the step that applies it)
    policy_version: str = ""  # the registry's latest version: swap to it between episodes
    message: str = ""
    acked_seq: int = 0  # received and checked by the server
    committed_seq: int = 0  # durable in the episode store (what the client may forget)


class RobotClient(_StreamClient):
    """A robot's session. `observation_spec`: key -> (shape, dtype name). Thread-safe, never blocks.

    `on_command(command, state)` (optional) is called on the client's thread for every Command; keep it
    short. `max_unacked` bounds the messages kept for resending while the server cannot take them:
    beyond it the oldest steps are dropped (episode starts and ends are kept, so the episode stays whole
    in shape) and counted in `dropped` (logged), so a long outage cannot exhaust memory.
    """

    def __init__(
        self,
        target: str,
        token: str,
        robot_id: str,
        task: str,
        observation_spec: Mapping[str, tuple[tuple[int, ...], str]],
        action_dim: int,
        goal_dim: int = 0,
        policy_version: str = "",
        *,
        root_certificates=None,
        on_command: Callable[[pb.Command, RobotState], None] | None = None,
        max_unacked: int = 100_000,
        backoff: tuple[float, float] = (0.1, 5.0),
        heartbeat_s: float = HEARTBEAT_S,
    ):
        super().__init__(target, token, root_certificates, backoff, heartbeat_s=heartbeat_s)
        self.hello = pb.RobotHello(
            robot_id=robot_id,
            task=task,
            policy_version=policy_version,
            action_dim=action_dim,
            goal_dim=goal_dim,
            boot_id=self.boot_id,
        )
        for key, (shape, dtype) in observation_spec.items():
            self.hello.observation_spec[key].CopyFrom(
                pb.TensorSpec(shape=list(shape), dtype=str(np.dtype(dtype)))
            )
        self.policy_version = policy_version
        self._on_command = on_command
        self._max_unacked = max_unacked
        self._seq = 0
        self._seq_lock = threading.Lock()
        # (seq, kind, message) of everything not yet durable, in seq order; _sent of them went out on
        # this connection. None until the connection's first Command says where to resume.
        self._kept: collections.deque[tuple[int, str, pb.RobotMessage]] = collections.deque()
        self._sent: int | None = None
        self._resets = 0
        self.dropped = 0
        self.state = RobotState()

    def _stream(self, channel):
        return pb_grpc.RobotServiceStub(channel).Session

    # -- the robot's side (any thread) -----------------------------------------------------------------

    def start_episode(
        self, episode_id: int, goal=None, policy_version: str | None = None, timestamp: float | None = None
    ) -> int:
        """Queue the start of an episode; returns its seq."""
        start = pb.EpisodeStart(
            episode_id=episode_id,
            policy_version=policy_version or self.policy_version,
            timestamp=time.time() if timestamp is None else timestamp,
        )
        if goal is not None:
            start.goal.CopyFrom(codec.to_tensor(np.asarray(goal, np.float32)))
        return self._queue("episode_start", start)

    def step(
        self,
        episode_id: int,
        t: int,
        observation: Mapping[str, np.ndarray],
        action,
        label: ControlLabel | str | int = ControlLabel.ROBOT,
        signals: Mapping[str, float] | None = None,
        goal=None,
        camera: np.ndarray | pb.Image | None = None,
        operator_id: str = "",
        timestamp: float | None = None,
        operator_action_seq: int = 0,
    ) -> int:
        """Queue one step (the action applied at it) for the server; returns its sequence number.
        `operator_action_seq`: the operator action applied (RobotState.action_seq), with INTERVENTION."""
        step = pb.Step(
            episode_id=episode_id,
            t=t,
            timestamp=time.time() if timestamp is None else timestamp,
            action=codec.to_tensor(action),
            label=wire.label_to_wire(label),
            signals=pb.Signals(**dict(signals or {})),
            policy_version=self.policy_version,
            operator_id=operator_id,
            operator_action_seq=operator_action_seq,
        )
        for key, value in observation.items():
            step.observation[key].CopyFrom(codec.to_tensor(value))
        if goal is not None:
            step.goal.CopyFrom(codec.to_tensor(np.asarray(goal, np.float32)))
        if camera is not None:
            step.camera.CopyFrom(camera if isinstance(camera, pb.Image) else codec.encode_image(camera))
        return self._queue("step", step)

    def end_episode(
        self, episode_id: int, success: bool, outcome: str = "", timestamp: float | None = None
    ) -> int:
        """Queue the end of an episode; returns its seq."""
        end = pb.EpisodeEnd(
            episode_id=episode_id,
            success=success,
            outcome=outcome,
            timestamp=time.time() if timestamp is None else timestamp,
        )
        return self._queue("episode_end", end)

    def take_reset(self) -> bool:
        """True once per human reset the server ordered (end the episode, start a new one)."""
        with self._seq_lock:
            if self._resets:
                self._resets -= 1
                return True
        return False

    @property
    def unacked(self) -> int:
        """Messages kept because the server has not yet made them durable."""
        return len(self._kept)

    @property
    def last_seq(self) -> int:
        return self._seq

    def wait_acked(self, seq: int | None = None, timeout: float = 10.0) -> bool:
        """Wait until the server received and checked `seq` (default: every message sent so far)."""
        return self._wait_for("acked_seq", seq, timeout)

    def wait_committed(self, seq: int | None = None, timeout: float = 10.0) -> bool:
        """Wait until `seq` (default: every message so far) is durable in the episode store. An episode is
        committed when it ends, so wait for an episode_end's seq (or one after it)."""
        return self._wait_for("committed_seq", seq, timeout)

    def _wait_for(self, field: str, seq: int | None, timeout: float) -> bool:
        target = self._seq if seq is None else seq
        deadline = time.monotonic() + timeout
        while getattr(self.state, field) < target:
            if time.monotonic() > deadline or self.stopped:
                return False
            time.sleep(0.01)
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Send what is still unacked (up to `timeout`), then end the session."""
        super().close(timeout)
        if self._kept:
            log.warning(
                "robot %s closed with %d message(s) the server never made durable",
                self.hello.robot_id,
                len(self._kept),
            )

    # -- the client's loop -----------------------------------------------------------------------------

    def _queue(self, kind: str, body) -> int:
        with self._seq_lock:  # seqs in the order the robot's threads queue messages
            self._seq += 1
            body.seq = seq = self._seq
            self._call_in_loop(self._append, seq, kind, pb.RobotMessage(**{kind: body}))
        return seq

    def _append(self, seq: int, kind: str, message: pb.RobotMessage) -> None:
        self._kept.append((seq, kind, message))
        if len(self._kept) > self._max_unacked:
            self._drop_oldest_step()
        self._wake.set()

    def _drop_oldest_step(self) -> None:
        index = next((i for i, (_, kind, _) in enumerate(self._kept) if kind == "step"), None)
        if index is None:
            return
        del self._kept[index]
        if self._sent is not None and index < self._sent:
            self._sent -= 1
        self.dropped += 1
        log.warning(
            "robot %s: resend buffer full (%d); dropped the oldest step not yet durable (%d so far)",
            self.hello.robot_id,
            self._max_unacked,
            self.dropped,
        )

    def _opening(self) -> list:
        self._sent = None  # wait for the server's first Command: it says what it already has
        hello = pb.RobotHello()
        hello.CopyFrom(self.hello)
        hello.last_acked_seq = self.state.acked_seq
        return [pb.RobotMessage(hello=hello)]

    def _heartbeat(self):
        return pb.RobotMessage(heartbeat=pb.Heartbeat())

    def _next_to_send(self):
        if self._sent is None or self._sent >= len(self._kept):
            return None
        self._sent += 1
        return self._kept[self._sent - 1][2]

    def _flushed(self) -> bool:
        # Closing waits until the server has every message, and every ended episode is durable.
        if self.state.acked_seq < self._seq:
            return False
        return not any(kind == "episode_end" for _, kind, _ in self._kept)

    def _received(self, command: pb.Command) -> None:
        if self._sent is None:
            # The first Command of a connection: resume after what this server already has of this boot
            # (0 from a restarted server, which then gets every kept message again).
            self._sent = sum(1 for seq, _, _ in self._kept if seq <= command.ack_seq)
        committed = max(self.state.committed_seq, command.committed_seq)
        while self._kept and self._kept[0][0] <= committed:
            self._kept.popleft()
            self._sent = max(0, self._sent - 1)
        action, action_time, action_seq = self.state.action, self.state.action_time, self.state.action_seq
        if command.HasField("action"):
            action, action_time = codec.from_tensor(command.action), time.monotonic()
            action_seq = command.action_seq
        if command.mode != pb.MODE_TELEOP or command.input_stopped:
            action = None  # the operator's input stopped (server watchdog): hold, never repeat it
        if command.reset:
            with self._seq_lock:
                self._resets += 1
        self.state = RobotState(
            mode=command.mode,
            estop=command.estop,
            operator_id=command.operator_id,
            action=action,
            action_time=action_time,
            action_seq=action_seq if action is not None else 0,
            policy_version=command.policy_version,
            message=command.message,
            acked_seq=max(self.state.acked_seq, command.ack_seq),
            committed_seq=committed,
        )
        self._wake.set()
        if self._on_command is not None:
            try:
                self._on_command(command, self.state)
            except Exception:  # the caller's bug must not end the session
                log.exception("on_command callback failed")
