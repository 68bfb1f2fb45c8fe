"""What robot and operator sessions share: an outbox the server pushes into, and the error type.

A session's handler only drains its outbox; everything else (the request reader, the allocation tick,
other sessions) pushes into it without waiting, so no robot ever waits on another robot or operator.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc

log = logging.getLogger(__name__)


# A stream's unsent replies: a peer this far behind has stopped reading (a live one reads each at once).
MAX_PENDING = 4096
NOT_READING = "the server's replies on this stream were not read; reconnect and read them"


class FleetError(Exception):
    """Bad input or state on one stream: ends that stream with `code` and a message naming the problem."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class Undecodable:
    """What a request that is not a valid protobuf message arrives as (see fleet.server.auth): handlers of
    streamed requests check for it with `check_decoded`, so garbage is INVALID_ARGUMENT, not INTERNAL."""

    __slots__ = ("size", "error")

    def __init__(self, size: int, error: str):
        self.size, self.error = size, error


def check_decoded(message, method: str, context) -> None:
    """Raise INVALID_ARGUMENT for an Undecodable request (logged at most once per peer per interval)."""
    if isinstance(message, Undecodable):
        BAD_MESSAGES.warning(
            (peer_of(context), method),
            "undecodable %s message from %s: %s",
            method,
            peer_of(context),
            message.error,
        )
        raise FleetError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{method}: the request is not a valid protobuf message ({message.size} bytes)",
        )


@dataclass(frozen=True)
class _End:
    code: grpc.StatusCode | None = None  # None: finish the stream normally
    message: str = ""


class Outbox:
    """Messages for one stream, in order. `send` never blocks; `fail` ends the stream with a status.

    Bounded: a peer whose stream holds `max_pending` unsent messages is not reading them (gRPC's flow
    control has stopped the writes), and every message it sends would queue one more reply forever; its
    stream is ended with RESOURCE_EXHAUSTED and the queue dropped (see also write_replies)."""

    def __init__(self, max_droppable: int = 32, max_pending: int = MAX_PENDING):
        self._queue: asyncio.Queue = asyncio.Queue()
        self._max_droppable = max_droppable
        self._max_pending = max_pending
        self.ended = False

    def send(self, message, received_at: float | None = None) -> None:
        if self.ended:
            return
        if self._queue.qsize() >= self._max_pending:
            self.ended = True
            while not self._queue.empty():  # never sent, and never will be: free them now
                self._queue.get_nowait()
            self._queue.put_nowait((_End(grpc.StatusCode.RESOURCE_EXHAUSTED, NOT_READING), None))
            return
        self._queue.put_nowait((message, received_at))

    def send_droppable(self, message) -> bool:
        """Send unless the reader is behind (live camera frames: a late one is worth nothing)."""
        if self.ended or self._queue.qsize() >= self._max_droppable:
            return False
        self._queue.put_nowait((message, None))
        return True

    def fail(self, code: grpc.StatusCode, message: str) -> None:
        if not self.ended:
            self.ended = True
            self._queue.put_nowait((_End(code, message), None))

    def close(self) -> None:
        if not self.ended:
            self.ended = True
            self._queue.put_nowait((_End(), None))

    async def drain(
        self, context: grpc.aio.ServicerContext, on_sent: Callable[[float], None] | None = None
    ) -> AsyncIterator:
        """Yield messages for the handler to stream; abort the RPC with the status a `fail` gave."""
        while True:
            message, received_at = await self._queue.get()
            if isinstance(message, _End):
                if message.code is not None:
                    await context.abort(message.code, message.message)
                return
            yield message
            if received_at is not None and on_sent is not None:
                on_sent(time.monotonic() - received_at)


async def serve_session(
    requests: AsyncIterator,
    context: grpc.aio.ServicerContext,
    what: str,
    identity,
    *,
    hello: Callable,
    handle: Callable,
    left: Callable,
    spawn: Callable,
    hello_timeout_s: float,
    on_sent: Callable[[float], None] | None = None,
) -> AsyncIterator:
    """Run one bidirectional session (robot or operator); yields what the handler streams back.

    The first message must be a hello, within `hello_timeout_s` (a stream opened and left silent would
    hold its memory for as long as the connection lives: thousands of them, a lot of it):
    `hello(message.hello, outbox, identity)` returns the session's state; each later message goes to `handle(state, outbox, message)` after `state.last_heard` is set
    (the liveness check reads it); `left(state, outbox)` runs at the end, however the stream ends. A
    FleetError (or a bug) ends only this stream, with its status.
    """
    outbox = Outbox()
    state = None

    async def read() -> None:
        nonlocal state
        try:
            messages = aiter(requests)
            try:
                async with asyncio.timeout(hello_timeout_s):
                    first = await anext(messages, None)
            except TimeoutError:
                raise FleetError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"no hello within {hello_timeout_s:g} s of opening {what} session; send it first",
                ) from None
            if first is None:
                outbox.close()
                return
            check_decoded(first, "Session", context)
            if first.WhichOneof("kind") != "hello":
                raise FleetError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"the first message of {what} session must be hello, got {first.WhichOneof('kind')}",
                )
            state = hello(first.hello, outbox, identity)
            async for message in messages:
                if outbox.ended:
                    return
                state.last_heard = time.monotonic()
                check_decoded(message, "Session", context)
                if message.WhichOneof("kind") == "hello":
                    raise FleetError(
                        grpc.StatusCode.FAILED_PRECONDITION, "hello was already sent on this session"
                    )
                handle(state, outbox, message)
            outbox.close()  # the client finished sending: finish our side too
        except FleetError as err:
            outbox.fail(err.code, err.message)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # a bug must not take the server down; the caller sees INTERNAL
            if outbox.ended:
                return  # the stream was already ended (replaced, failed): reading it raises, nothing more
            SESSION_ERRORS.warning(
                (peer_of(context), type(err).__name__),
                "%s session failed: %s: %s",
                what,
                type(err).__name__,
                err,
                exc_info=True,
            )
            outbox.fail(grpc.StatusCode.INTERNAL, f"server error: {type(err).__name__}")

    reader = spawn(read())
    try:
        async for message in outbox.drain(context, on_sent):
            yield message
    finally:
        reader.cancel()
        if state is not None:
            left(state, outbox)


class CallLimits:
    """Open calls (Session streams, Fetch calls) per token and per peer address.

    A call beyond `per_token` open calls of one token, or `per_peer` of one address, is refused with
    RESOURCE_EXHAUSTED naming the limit: a stalled stream stays open until its peer reads or its
    connection ends (its status waits behind the message it has not read), so without a cap one token
    holder could open them until the server runs out of memory or descriptors. A robot that reconnects
    while its old stream is being torn down holds two calls for that moment, well within the caps."""

    def __init__(self, per_token: int, per_peer: int):
        self.limits = {"token": (per_token, "max_calls_per_token"), "peer": (per_peer, "max_calls_per_peer")}
        self.open: dict[tuple, int] = {}

    @staticmethod
    def keys(identity, context) -> dict[str, tuple]:
        # Per token entry, not per role: tokens with equal role and ids are separate Identity objects.
        return {"token": ("token", id(identity)), "peer": ("peer", peer_of(context))}

    @contextlib.contextmanager
    def call(self, identity, context, what: str):
        """Hold one open call for the block; raise FleetError(RESOURCE_EXHAUSTED) when a cap is reached."""
        keys = self.keys(identity, context)
        for kind, key in keys.items():
            limit, name = self.limits[kind]
            if self.open.get(key, 0) >= limit:
                whose = "this token" if kind == "token" else f"address {key[1]}"
                raise FleetError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{what}: {whose} already has {limit} calls open ({name}); close one first",
                )
        for key in keys.values():
            self.open[key] = self.open.get(key, 0) + 1
        try:
            yield
        finally:
            for key in keys.values():
                self.open[key] -= 1
                if not self.open[key]:
                    del self.open[key]


class SessionService:
    """The Session handler of one kind of peer (a robot, an operator): names the caller from its
    metadata and runs serve_session with the fleet's callbacks for that kind. Put it before the
    generated servicer in the bases, so its Session is the one gRPC calls."""

    peer: str  # "a robot": how error messages name the peer

    def __init__(self, fleet, auth, limits: CallLimits | None = None):
        self.fleet = fleet
        self.auth = auth
        config = fleet.config
        self.limits = limits or CallLimits(config.max_calls_per_token, config.max_calls_per_peer)

    def callbacks(self) -> dict[str, Callable]:
        """serve_session's hello, handle and left (and optionally on_sent) for this kind of peer."""
        raise NotImplementedError

    async def Session(self, requests, context) -> None:  # noqa: N802 - the generated servicer's name
        identity = self.auth.identity_of(context.invocation_metadata())
        config = self.fleet.config
        replies = serve_session(
            requests,
            context,
            self.peer,
            identity,
            spawn=self.fleet.spawn,
            hello_timeout_s=config.hello_timeout_s,
            **self.callbacks(),
        )
        try:
            with self.limits.call(identity, context, "Session"):
                await write_replies(replies, context, config.stalled_reader_s)
        except FleetError as err:
            await context.abort(err.code, err.message)


async def write_replies(replies: AsyncIterator, context: grpc.aio.ServicerContext, stall_s: float) -> None:
    """Write a stream's replies; a write the peer has not taken within `stall_s` ends the stream with
    RESOURCE_EXHAUSTED. (A handler that yields its replies would wait in that write forever when the peer
    never reads: gRPC's flow control stops it, and the stream, its task and its outbox stay.)

    At a stall `replies` is closed first, so its own cleanup runs now (a session leaves the fleet, a
    fetch closes its file): the status itself waits behind the message the peer has not read, until it
    reads or its connection ends, holding only that message."""
    async with contextlib.aclosing(replies):
        async for reply in replies:
            try:
                async with asyncio.timeout(stall_s):
                    await context.write(reply)
            except TimeoutError:
                break
        else:
            return
    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, NOT_READING)


def peer_of(context) -> str:
    """The caller's address without its port ("ipv4:127.0.0.1"): one peer however many connections."""
    try:
        return context.peer().rsplit(":", 1)[0]
    except Exception:  # a finished call may not know its peer any more
        return "?"


class RateLimitedLog:
    """Log a kind of event at most once per `interval_s` per key (a peer), counting what it held back:
    whatever a client sends, it cannot flood the server's log."""

    def __init__(self, interval_s: float = 10.0, max_keys: int = 4096):
        self.interval_s = interval_s
        self.max_keys = max_keys
        self._last: dict[tuple, tuple[float, int]] = {}

    def warning(self, key: tuple, message: str, *args, exc_info: bool = False) -> None:
        now = time.monotonic()
        last, held = self._last.get(key, (-float("inf"), 0))
        if now - last < self.interval_s:
            self._last[key] = (last, held + 1)
            return
        if len(self._last) >= self.max_keys:  # bounded: forget everyone rather than grow without end
            self._last.clear()
        self._last[key] = (now, 0)
        suffix = f" ({held} more like it in the last {self.interval_s:.0f} s)" if held else ""
        log.warning(message + suffix, *args, exc_info=exc_info)


SESSION_ERRORS = RateLimitedLog()
BAD_MESSAGES = RateLimitedLog()
