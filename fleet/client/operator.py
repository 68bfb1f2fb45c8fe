"""OperatorClient: a teleoperator's session (the web console, or a simulated operator)."""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Iterator

from fleet import codec
from fleet.client._session import HEARTBEAT_S, _StreamClient
from fleet.proto import flotilla_pb2 as pb
from fleet.proto import flotilla_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


class OperatorClient(_StreamClient):
    """A teleoperator's session. Updates (assignments, releases, frames, queue, errors) arrive in order:
    read them with `next_update` / `updates`, or get them via `on_update(update)` on the client's thread.
    Actions are live: while disconnected they are not kept (a stale teleop action must not be replayed).
    """

    def __init__(
        self,
        target: str,
        token: str,
        operator_id: str,
        *,
        root_certificates=None,
        on_update: Callable[[pb.OperatorUpdate], None] | None = None,
        max_updates: int = 10_000,
        backoff: tuple[float, float] = (0.1, 5.0),
        heartbeat_s: float = HEARTBEAT_S,
    ):
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

    def act(self, robot_id: str, action, seq: int = 0, frame_seq: int = 0, frame_age_ms: float = 0.0) -> None:
        """Send a teleop action; `frame_seq`: the RobotFrame.seq the operator was looking at, `frame_age_ms`:
        how old that frame was when the operator acted."""
        self._send(
            pb.OperatorMessage(
                action=pb.OperatorAction(
                    robot_id=robot_id,
                    action=codec.to_tensor(action),
                    seq=seq,
                    frame_seq=frame_seq,
                    frame_age_ms=frame_age_ms,
                )
            )
        )

    def discard(self, robot_id: str) -> None:
        """Discard this operator's last correction of the robot (kept in the store, left out of training)."""
        self._send(pb.OperatorMessage(discard=pb.DiscardCorrection(robot_id=robot_id)))

    def note(self, robot_id: str, text: str) -> None:
        """A note on this operator's current or last intervention on the robot."""
        self._send(pb.OperatorMessage(note=pb.InterventionNote(robot_id=robot_id, text=text)))

    def pick(self, robot_id: str) -> None:
        """Take a robot waiting in the queue (where the allocation rule allows it)."""
        self._send(pb.OperatorMessage(pick=pb.PickRobot(robot_id=robot_id)))

    def release(self, robot_id: str) -> None:
        self._send(pb.OperatorMessage(release=pb.Release(robot_id=robot_id)))

    def reset(self, robot_id: str) -> None:
        self._send(pb.OperatorMessage(reset=pb.ResetRobot(robot_id=robot_id)))

    def estop(self, robot_id: str = "", engage: bool = True) -> None:
        """Engage (or release, engage=False) a protective stop on one robot, or the whole fleet with robot_id ''."""
        self._send(pb.OperatorMessage(estop=pb.EStop(robot_id=robot_id, engage=engage)))

    def next_update(self, timeout: float | None = None, kind: str | None = None) -> pb.OperatorUpdate | None:
        """The next update (of `kind`: "assignment", "released", "frame", "queue", "error", "notice"; others skipped)."""
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
                log.warning(
                    "operator %s: %d teleop action(s) sent while disconnected were dropped",
                    self.operator_id,
                    stale,
                )
            self._outgoing = collections.deque(m for m in self._outgoing if m.WhichOneof("kind") != "action")
            self.assigned.clear()  # the server re-sends assignments that still hold
        self._was_connected = True
        return [
            pb.OperatorMessage(hello=pb.OperatorHello(operator_id=self.operator_id, boot_id=self.boot_id))
        ]

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
