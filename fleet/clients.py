"""Client SDKs of the fleet server: RobotClient (for the robot agent), OperatorClient (for the teleop
console and simulated operators), and registry/admin helpers (trainer, deployment scripts).

The streaming clients run their network side on a private asyncio loop in a daemon thread, so every
public method returns at once: a robot's control loop never waits on the network. They reconnect with
exponential backoff, and send a heartbeat when they have sent nothing for `heartbeat_s` (the server
ends sessions that go silent). A status that retrying cannot fix (UNAUTHENTICATED, PERMISSION_DENIED,
INVALID_ARGUMENT, FAILED_PRECONDITION, NOT_FOUND, ABORTED = replaced by a newer session of the same
client, ...) stops the client instead, with `error` saying why. ALREADY_EXISTS (another process holds
this id) is retried: it clears when that process's session ends or goes silent.

Robot, in a control loop:

    robot = RobotClient("127.0.0.1:50051", token, "arm-1", task="push", observation_spec={"state": ((7,), "float32")},
                        action_dim=7).start()
    robot.start_episode(1)
    for t in range(T):
        state = robot.state                    # the server's latest word: mode, estop, teleop action, ...
        if robot.take_reset(): ...             # a human reset was ordered
        robot.step(1, t, obs, action, label, signals={"uncertainty": u})
    robot.end_episode(1, success=True)
    robot.close()

Durability: every message (episode start, step, episode end) gets the next seq of one counter per
RobotClient (a robot process: `boot_id`). The client keeps every message until the server says it is
durable (Command.committed_seq: its episode is committed), not merely received (ack_seq), and after
any reconnect sends again everything after what the server reports it has (the first Command's
ack_seq). So a dropped connection, a refused step (writer queue full) or a server killed and
restarted on the same store loses nothing, and the server never logs a message twice. While holding,
keep stepping: the server counts steps for t_T and t_R.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from fleet import codec, wire
from fleet.labels import ControlLabel
from fleet.proto import flotilla_pb2 as pb
from fleet.proto import flotilla_pb2_grpc as pb_grpc
from fleet.registry_rules import check_filename, check_version  # the registry's own file rules

log = logging.getLogger(__name__)

FATAL_CODES = frozenset({
    grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ABORTED,
    grpc.StatusCode.UNIMPLEMENTED,
})
SIGNAL_NAMES = ("uncertainty", "risk", "density", "constraint_violation")
HEARTBEAT_S = 0.25  # well inside the server's default silence timeouts (1 s)
# HTTP/2 keepalive, within what the server permits (fleet/server/app.py KEEPALIVE_OPTIONS).
KEEPALIVE_OPTIONS = (("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_timeout_ms", 5_000),
                     ("grpc.keepalive_permit_without_calls", 1))


@dataclass(frozen=True)
class ClientError:
    code: grpc.StatusCode
    details: str

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}"


def _metadata(token: str) -> tuple:
    return (("authorization", f"Bearer {token}"),)


def _credentials(root_certificates: bytes | str | os.PathLike | None) -> grpc.ChannelCredentials | None:
    if root_certificates is None:
        return None
    if not isinstance(root_certificates, bytes):
        root_certificates = Path(root_certificates).read_bytes()
    return grpc.ssl_channel_credentials(root_certificates)


class _StreamClient:
    """A reconnecting bidirectional session on a private loop thread (shared by both SDKs).

    Subclasses say what to send first on each connection (`_opening`), how to react to a received
    message (`_received`), what to send next (`_next_to_send`) and how a heartbeat looks (`_heartbeat`).
    """

    def __init__(self, target: str, token: str, root_certificates=None, backoff: tuple[float, float] = (0.1, 5.0),
                 options: tuple = (), heartbeat_s: float = HEARTBEAT_S):
        self.target, self._token, self._backoff = target, token, backoff
        self._credentials = _credentials(root_certificates)
        self._options = [*KEEPALIVE_OPTIONS, *options]
        self._heartbeat_s = heartbeat_s
        self.boot_id = uuid.uuid4().hex  # this client instance: the server tells a reconnect from an impostor
        self.connected = False
        self.error: ClientError | None = None  # set when the client stopped for good
        self.last_error: ClientError | None = None  # the latest stream error, even one that was retried
        # Recent stream errors, oldest first. grpc.aio may report INTERNAL "Internal error from Core"
        # instead of the server's status when a write races the server ending the stream
        # (grpc/grpc#36066); INTERNAL is retried, so the real status shows up on a later attempt.
        self.recent_errors: collections.deque[ClientError] = collections.deque(maxlen=16)
        self._stopped = threading.Event()
        self._closing = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=type(self).__name__, daemon=True)
        self._wake = asyncio.Event()  # something new to send (binds to the client's loop on first wait)
        self._task: asyncio.Future | None = None

    def start(self):
        self._thread.start()
        self._task = asyncio.run_coroutine_threadsafe(self._run(), self._loop)
        return self

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    def wait_stopped(self, timeout: float | None = None) -> ClientError | None:
        """Wait until the client stops (closed, or a status retrying cannot fix); returns `error`."""
        self._stopped.wait(timeout)
        return self.error

    def close(self, timeout: float = 5.0) -> None:
        """Finish the session (subclasses flush first) and stop the thread."""
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._begin_close)
            self._stopped.wait(timeout)
            if self._task is not None:
                self._task.cancel()
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)

    def _begin_close(self) -> None:
        self._closing = True
        self._wake.set()

    def _call_in_loop(self, fn, *args) -> None:
        if not self._thread.is_alive():
            raise RuntimeError(f"{type(self).__name__} is not running: call start() first (or it was closed)")
        self._loop.call_soon_threadsafe(fn, *args)

    # -- subclass hooks (all run on the client's loop) -------------------------------------------------

    def _opening(self) -> list:
        raise NotImplementedError

    def _received(self, message) -> None:
        raise NotImplementedError

    def _next_to_send(self):
        """The next message to send on this connection, or None when there is nothing now."""
        raise NotImplementedError

    def _heartbeat(self):
        raise NotImplementedError

    def _flushed(self) -> bool:
        """Whether closing may finish now (nothing left the server still has to take)."""
        return True

    def _stream(self, channel):
        raise NotImplementedError

    # -- the connection loop --------------------------------------------------------------------------

    async def _run(self) -> None:
        delay = self._backoff[0]
        try:
            while not self._closing:
                got_reply = await self._session()
                if self.error is not None or self._closing:
                    break
                delay = self._backoff[0] if got_reply else min(delay * 2, self._backoff[1])
                await asyncio.sleep(delay)
        finally:
            self.connected = False
            self._stopped.set()

    async def _session(self) -> bool:
        """One connection; True when the server answered at least once."""
        got_reply = False
        if self._credentials is not None:
            channel = grpc.aio.secure_channel(self.target, self._credentials, options=self._options)
        else:
            channel = grpc.aio.insecure_channel(self.target, options=self._options)
        async with channel:
            call = self._stream(channel)(metadata=_metadata(self._token))
            sender = asyncio.ensure_future(self._send_all(call))
            try:
                async for message in call:
                    got_reply, self.connected = True, True
                    self._received(message)
            except grpc.aio.AioRpcError as err:
                self.last_error = ClientError(err.code(), err.details() or "")
                self.recent_errors.append(self.last_error)
                log.info("%s session ended: %s", type(self).__name__, self.last_error)
                if err.code() in FATAL_CODES:
                    self.error = self.last_error
            finally:
                self.connected = False
                sender.cancel()
        return got_reply

    async def _send_all(self, call) -> None:
        try:
            for message in self._opening():
                await call.write(message)
            while True:
                message = self._next_to_send()
                if message is not None:
                    await call.write(message)
                    continue
                if self._closing and self._flushed():
                    await call.done_writing()
                    return
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), self._heartbeat_s)
                except TimeoutError:  # quiet for a while: tell the server we are alive
                    await call.write(self._heartbeat())
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            return  # the call ended; the reader side reports why


@dataclass(frozen=True)
class RobotState:
    """What the server last told the robot (see Command in flotilla.proto)."""

    mode: int = pb.MODE_UNSPECIFIED  # pb.MODE_AUTONOMOUS / MODE_TELEOP / MODE_HOLD; unspecified until the server speaks
    estop: bool = False
    operator_id: str = ""
    action: np.ndarray | None = None  # the operator's latest action (TELEOP), and when it arrived:
    action_time: float = 0.0  # time.monotonic(); judge freshness with it, hold when it is stale
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

    def __init__(self, target: str, token: str, robot_id: str, task: str,
                 observation_spec: Mapping[str, tuple[tuple[int, ...], str]], action_dim: int, goal_dim: int = 0,
                 policy_version: str = "", *, root_certificates=None,
                 on_command: Callable[[pb.Command, RobotState], None] | None = None,
                 max_unacked: int = 100_000, backoff: tuple[float, float] = (0.1, 5.0),
                 heartbeat_s: float = HEARTBEAT_S):
        super().__init__(target, token, root_certificates, backoff, heartbeat_s=heartbeat_s)
        self.hello = pb.RobotHello(robot_id=robot_id, task=task, policy_version=policy_version,
                                   action_dim=action_dim, goal_dim=goal_dim, boot_id=self.boot_id)
        for key, (shape, dtype) in observation_spec.items():
            self.hello.observation_spec[key].CopyFrom(pb.TensorSpec(shape=list(shape), dtype=str(np.dtype(dtype))))
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

    def start_episode(self, episode_id: int, goal=None, policy_version: str | None = None,
                      timestamp: float | None = None) -> int:
        """Queue the start of an episode; returns its seq."""
        start = pb.EpisodeStart(episode_id=episode_id, policy_version=policy_version or self.policy_version,
                                timestamp=time.time() if timestamp is None else timestamp)
        if goal is not None:
            start.goal.CopyFrom(codec.to_tensor(np.asarray(goal, np.float32)))
        return self._queue("episode_start", start)

    def step(self, episode_id: int, t: int, observation: Mapping[str, np.ndarray], action,
             label: ControlLabel | str | int = ControlLabel.ROBOT, signals: Mapping[str, float] | None = None,
             goal=None, camera: np.ndarray | pb.Image | None = None, operator_id: str = "",
             timestamp: float | None = None) -> int:
        """Queue one step (the action applied at it) for the server; returns its sequence number."""
        step = pb.Step(episode_id=episode_id, t=t, timestamp=time.time() if timestamp is None else timestamp,
                       action=codec.to_tensor(action), label=wire.label_to_wire(label),
                       signals=pb.Signals(**dict(signals or {})), policy_version=self.policy_version,
                       operator_id=operator_id)
        for key, value in observation.items():
            step.observation[key].CopyFrom(codec.to_tensor(value))
        if goal is not None:
            step.goal.CopyFrom(codec.to_tensor(np.asarray(goal, np.float32)))
        if camera is not None:
            step.camera.CopyFrom(camera if isinstance(camera, pb.Image) else codec.encode_image(camera))
        return self._queue("step", step)

    def end_episode(self, episode_id: int, success: bool, outcome: str = "", timestamp: float | None = None) -> int:
        """Queue the end of an episode; returns its seq."""
        end = pb.EpisodeEnd(episode_id=episode_id, success=success, outcome=outcome,
                            timestamp=time.time() if timestamp is None else timestamp)
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
            log.warning("robot %s closed with %d message(s) the server never made durable", self.hello.robot_id,
                        len(self._kept))

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
        log.warning("robot %s: resend buffer full (%d); dropped the oldest step not yet durable (%d so far)",
                    self.hello.robot_id, self._max_unacked, self.dropped)

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
        action, action_time = self.state.action, self.state.action_time
        if command.HasField("action"):
            action, action_time = codec.from_tensor(command.action), time.monotonic()
        if command.mode != pb.MODE_TELEOP:
            action = None
        if command.reset:
            with self._seq_lock:
                self._resets += 1
        self.state = RobotState(mode=command.mode, estop=command.estop, operator_id=command.operator_id,
                                action=action, action_time=action_time, policy_version=command.policy_version,
                                message=command.message, acked_seq=max(self.state.acked_seq, command.ack_seq),
                                committed_seq=committed)
        self._wake.set()
        if self._on_command is not None:
            try:
                self._on_command(command, self.state)
            except Exception:  # the caller's bug must not end the session
                log.exception("on_command callback failed")


class OperatorClient(_StreamClient):
    """A teleoperator's session. Updates (assignments, releases, frames, queue, errors) arrive in order:
    read them with `next_update` / `updates`, or get them via `on_update(update)` on the client's thread.
    Actions are live: while disconnected they are not kept (a stale teleop action must not be replayed).
    """

    def __init__(self, target: str, token: str, operator_id: str, *, root_certificates=None,
                 on_update: Callable[[pb.OperatorUpdate], None] | None = None, max_updates: int = 10_000,
                 backoff: tuple[float, float] = (0.1, 5.0), heartbeat_s: float = HEARTBEAT_S):
        super().__init__(target, token, root_certificates, backoff, heartbeat_s=heartbeat_s)
        self.operator_id = operator_id
        self.assigned: set[str] = set()  # robots this operator controls now
        self._on_update = on_update
        self._updates: collections.deque[pb.OperatorUpdate] = collections.deque(maxlen=max_updates)
        self._updates_ready = threading.Condition()
        self._outgoing: collections.deque[pb.OperatorMessage] = collections.deque()
        self._was_connected = False

    def _stream(self, channel):
        return pb_grpc.OperatorServiceStub(channel).Session

    def act(self, robot_id: str, action, seq: int = 0, frame_seq: int = 0) -> None:
        """Send a teleop action; `frame_seq`: the RobotFrame.seq the operator was looking at."""
        self._send(pb.OperatorMessage(action=pb.OperatorAction(robot_id=robot_id, action=codec.to_tensor(action),
                                                               seq=seq, frame_seq=frame_seq)))

    def release(self, robot_id: str) -> None:
        self._send(pb.OperatorMessage(release=pb.Release(robot_id=robot_id)))

    def reset(self, robot_id: str) -> None:
        self._send(pb.OperatorMessage(reset=pb.ResetRobot(robot_id=robot_id)))

    def estop(self, robot_id: str = "", engage: bool = True) -> None:
        """Engage (or release, engage=False) a protective stop on one robot, or the whole fleet with robot_id ''."""
        self._send(pb.OperatorMessage(estop=pb.EStop(robot_id=robot_id, engage=engage)))

    def next_update(self, timeout: float | None = None, kind: str | None = None) -> pb.OperatorUpdate | None:
        """The next update (of `kind`: "assignment", "released", "frame", "queue", "error", skipping others)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._updates_ready:
            while True:
                while self._updates:
                    update = self._updates.popleft()
                    if kind is None or update.WhichOneof("kind") == kind:
                        return update
                remaining = None if deadline is None else deadline - time.monotonic()
                if (remaining is not None and remaining <= 0) or self.stopped:
                    return None
                self._updates_ready.wait(remaining if remaining is not None else 0.5)

    def updates(self, timeout: float | None = None) -> Iterator[pb.OperatorUpdate]:
        """Iterate over updates until none arrives within `timeout` (or the client stops)."""
        while (update := self.next_update(timeout)) is not None:
            yield update

    def _send(self, message: pb.OperatorMessage) -> None:
        self._call_in_loop(self._push, message)

    def _push(self, message: pb.OperatorMessage) -> None:
        self._outgoing.append(message)
        self._wake.set()

    def _opening(self) -> list:
        if self._was_connected:
            # Across a reconnect keep release/reset/e-stop, but never replay a stale teleop action.
            stale = sum(1 for m in self._outgoing if m.WhichOneof("kind") == "action")
            if stale:
                log.warning("operator %s: %d teleop action(s) sent while disconnected were dropped",
                            self.operator_id, stale)
            self._outgoing = collections.deque(m for m in self._outgoing if m.WhichOneof("kind") != "action")
            self.assigned.clear()  # the server re-sends assignments that still hold
        self._was_connected = True
        return [pb.OperatorMessage(hello=pb.OperatorHello(operator_id=self.operator_id, boot_id=self.boot_id))]

    def _heartbeat(self):
        return pb.OperatorMessage(heartbeat=pb.Heartbeat())

    def _next_to_send(self):
        return self._outgoing.popleft() if self._outgoing else None

    def _received(self, update: pb.OperatorUpdate) -> None:
        kind = update.WhichOneof("kind")
        if kind == "assignment":
            self.assigned.add(update.assignment.robot_id)
        elif kind == "released":
            self.assigned.discard(update.released.robot_id)
        if self._on_update is not None:
            try:
                self._on_update(update)
            except Exception:  # the caller's bug must not end the session
                log.exception("on_update callback failed")
            return
        with self._updates_ready:
            self._updates.append(update)
            self._updates_ready.notify_all()


# ------------------------------------------------------------------------- registry and admin (blocking)

def _channel(target: str, root_certificates=None) -> grpc.Channel:
    credentials = _credentials(root_certificates)
    return grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)


class CheckpointError(RuntimeError):
    """A fetched checkpoint failed its checks (a file's sha256 or size, a missing sha256): nothing was kept."""


def _file_chunks(path: Path, version: str, chunk_bytes: int) -> Iterator[pb.CheckpointChunk]:
    """One file's chunks; the last carries the file's SHA-256 (computed while reading)."""

    digest = hashlib.sha256()
    with open(path, "rb") as file:
        offset, data = 0, file.read(chunk_bytes)
        while True:
            following = file.read(chunk_bytes) if data else b""
            digest.update(data)
            last = not following
            yield pb.CheckpointChunk(version=version, filename=path.name, data=data, offset=offset, last=last,
                                     sha256=digest.hexdigest() if last else "")
            if last:
                break
            offset, data = offset + len(data), following


def publish_checkpoint(target: str, token: str, folder: str | os.PathLike, version: str,
                       chunk_bytes: int = 1024 * 1024, root_certificates=None) -> pb.PublishResult:
    """Upload a checkpoint folder (its .json/.yaml/.safetensors files) as `version` (trainer token).

    Each file's last chunk carries its SHA-256: the server refuses the publish (INVALID_ARGUMENT) when
    what it received hashes differently.
    """
    files = sorted(p for p in Path(folder).iterdir() if p.is_file())
    if not files:
        raise ValueError(f"{folder}: no files to publish")

    def chunks():
        for path in files:
            yield from _file_chunks(path, version, chunk_bytes)

    with _channel(target, root_certificates) as channel:
        return pb_grpc.RegistryServiceStub(channel).Publish(chunks(), metadata=_metadata(token))


class _FetchedFile:
    def __init__(self, path: Path):

        self.name, self.file, self.digest, self.size = path.name, open(path, "wb"), hashlib.sha256(), 0

    def write(self, data: bytes) -> None:
        self.file.write(data)
        self.digest.update(data)
        self.size += len(data)


def fetch_checkpoint(target: str, token: str, dest: str | os.PathLike, version: str = "",
                     root_certificates=None) -> Path:
    """Download `version` (default: the latest) into `dest/<version>/`; returns that folder.

    File names are checked here too (plain names, allowed suffixes); every file must arrive whole, in
    order, with the SHA-256 the server sent on its last chunk (else CheckpointError; a server's refusal,
    e.g. DATA_LOSS for a damaged version, is a grpc.RpcError). The folder appears complete or not at all.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    partial = dest / f".partial-{os.getpid()}-{time.monotonic_ns()}"
    partial.mkdir()
    got, done, current = "", set(), None

    def fail(problem: str) -> CheckpointError:
        return CheckpointError(f"fetch of policy version {got or version or '(latest)'!r} from {target}: {problem}; "
                               "nothing was kept")

    try:
        with _channel(target, root_certificates) as channel:
            for chunk in pb_grpc.RegistryServiceStub(channel).Fetch(pb.FetchRequest(version=version),
                                                                    metadata=_metadata(token)):
                got = check_version(chunk.version or got)
                name = check_filename(chunk.filename)
                if current is None or current.name != name:
                    if current is not None:
                        raise fail(f"file {current.name!r} ended without its last chunk")
                    if name in done:
                        raise fail(f"file {name!r} was sent twice")
                    current = _FetchedFile(partial / name)
                if chunk.offset != current.size:
                    raise fail(f"file {name!r}: chunk at offset {chunk.offset}, expected {current.size}")
                current.write(chunk.data)
                if chunk.last:
                    current.file.close()
                    if not chunk.sha256:
                        raise fail(f"the server sent no sha256 for file {name!r} (a server older than protocol v1?)")
                    received = current.digest.hexdigest()
                    if chunk.sha256.lower() != received:
                        raise fail(f"file {name!r} does not match its sha256: {current.size} bytes received hash to "
                                   f"{received}, the server sent {chunk.sha256}")
                    done.add(name)
                    current = None
        if current is not None:
            raise fail(f"file {current.name!r} ended without its last chunk")
        if not done:
            raise fail("the server sent no files")
        final = dest / got
        if final.exists():
            shutil.rmtree(final)
        os.rename(partial, final)
        return final
    except BaseException:
        if current is not None:
            current.file.close()
        shutil.rmtree(partial, ignore_errors=True)
        raise


def list_policies(target: str, token: str, root_certificates=None) -> pb.PolicyVersions:
    with _channel(target, root_certificates) as channel:
        return pb_grpc.RegistryServiceStub(channel).List(pb.ListRequest(), metadata=_metadata(token))


def fleet_status(target: str, token: str, root_certificates=None) -> pb.FleetStatus:
    """AdminService.Status (admin token)."""
    with _channel(target, root_certificates) as channel:
        return pb_grpc.AdminServiceStub(channel).Status(pb.StatusRequest(), metadata=_metadata(token))
