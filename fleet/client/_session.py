"""The reconnecting streaming session both SDKs share (a private asyncio loop in a daemon thread,
backoff, heartbeats, keepalive) and the helpers every client uses (metadata, TLS credentials)."""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

FATAL_CODES = frozenset(
    {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)
HEARTBEAT_S = 0.25  # well inside the server's default silence timeouts (1 s)
# HTTP/2 keepalive, within what the server permits (fleet/server/app.py KEEPALIVE_OPTIONS).
KEEPALIVE_OPTIONS = (
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
)


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

    def __init__(
        self,
        target: str,
        token: str,
        root_certificates=None,
        backoff: tuple[float, float] = (0.1, 5.0),
        options: tuple = (),
        heartbeat_s: float = HEARTBEAT_S,
    ):
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
        self._generation = 0  # counts connections; each sender serves only its own

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
            self._generation += 1
            sender = asyncio.ensure_future(self._send_all(call, self._generation))
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
                self._generation += 1  # this connection's sender takes nothing more
                sender.cancel()
                # Wait until it is really gone: on Python 3.11 a cancel that races a wake-up inside
                # asyncio.wait_for is swallowed, and a sender left running would take messages meant
                # for the next connection (a step lost in a gap, found under load in the test suite).
                await asyncio.gather(sender, return_exceptions=True)
        return got_reply

    async def _send_all(self, call, generation: int) -> None:
        try:
            for message in self._opening():
                await call.write(message)
            while generation == self._generation:  # a sender of an old connection takes nothing more
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
