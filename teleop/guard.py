"""Connection-level limits for the console under uvicorn: what an ASGI app never sees.

uvicorn accepts every connection and waits for a request head as long as the client likes, so a client
that opens many sockets and sends its headers a byte at a time (slowloris), or just opens sockets, holds
the console's file descriptors and memory until operators cannot reach it to stop a robot. These protocol
classes (given to uvicorn.Config as `http` and `ws`) add, per ConsoleConfig:

- read_timeout_s: a request's head and body must have arrived this long after its first byte (or after the
  connection opened): a slower one is closed (408). Idle keep-alive connections are uvicorn's
  timeout_keep_alive (keep_alive_s).
- TLS handshakes must be done within read_timeout_s too (ConsoleLoop; asyncio's default is 60 s).
- max_connections / max_connections_per_client: at max_connections, the oldest connection with no request
  in progress (a slow one, or an idle keep-alive) is closed (503) to make room for a new one; with none
  such, or past the cap for one client address, a new one is answered 503 at once and closed. An upgraded
  WebSocket keeps its slot until it closes (a signed-in page's socket: how a protective stop reaches the
  console in a flood).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections import Counter
from collections.abc import Callable

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from fleet.open_files import raise_open_files_limit

log = logging.getLogger(__name__)

# A refused connection is read (and dropped) this long so that the client gets its 503 rather than a reset
# (closing a socket with unread data resets it); in a flood, past MAX_LINGERING such, they close at once:
# a descriptor each for a second would let a fast flood exhaust them.
REFUSED_LINGER_S = 1.0
MAX_LINGERING = 32
LOG_EVERY_S = 5.0  # a flood logs one line per this long, not one per connection


class ConnectionGuard:
    """The console's open connections by client address (shared by all its protocol objects, one loop)."""

    def __init__(self, read_timeout_s: float, max_connections: int, max_connections_per_client: int):
        self.read_timeout_s = read_timeout_s
        self.max_connections = max_connections
        self.max_per_client = max_connections_per_client
        self.open: dict[asyncio.BaseTransport, str] = {}  # transport -> client address
        self.per_client: Counter[str] = Counter()
        self.refused = Counter()  # why -> how many (read by tests and the benchmark)
        # Connections with no request in progress (its head or body on the way, or an idle keep-alive),
        # oldest first, each with how to close it: at max_connections the oldest makes room for a new one,
        # so a flood of slow sockets cannot keep operators out; a request being served or a page's
        # WebSocket is never closed for that.
        self.waiting: dict[asyncio.BaseTransport, Callable[[], None]] = {}
        self.lingering = 0
        self._logged_at = 0.0

    def admit(self, transport: asyncio.BaseTransport, client: str) -> str | None:
        """None when the connection may stay (it is counted), else why it may not."""
        if self.per_client[client] >= self.max_per_client:
            return f"{client} has {self.per_client[client]} open connections, at most {self.max_per_client}"
        if len(self.open) >= self.max_connections and self.waiting:
            next(iter(self.waiting.values()))()  # the oldest waiting connection makes room
        if len(self.open) >= self.max_connections:
            return (
                f"the console has {len(self.open)} open connections, at most {self.max_connections}, all "
                "serving requests or pages"
            )
        self.open[transport] = client
        self.per_client[client] += 1
        return None

    def release(self, transport: asyncio.BaseTransport) -> None:
        self.waiting.pop(transport, None)
        client = self.open.pop(transport, None)
        if client is not None:
            self.per_client[client] -= 1
            if not self.per_client[client]:
                del self.per_client[client]

    def note(self, kind: str, detail: str) -> None:
        self.refused[kind] += 1
        now = time.monotonic()
        if now - self._logged_at >= LOG_EVERY_S:
            self._logged_at = now
            log.warning("console: %s (%s so far: %d)", detail, kind, self.refused[kind])


class ConsoleLoop(asyncio.SelectorEventLoop):
    """The console's event loop: its TLS listener gives a handshake `tls_handshake_timeout` (asyncio's
    default is 60 s, during which a socket that never starts TLS holds a descriptor uncounted)."""

    def __init__(self, tls_handshake_timeout: float):
        super().__init__()
        self.tls_handshake_timeout = tls_handshake_timeout

    async def create_server(self, *args, **kwargs):
        if kwargs.get("ssl") is not None and kwargs.get("ssl_handshake_timeout") is None:
            kwargs["ssl_handshake_timeout"] = self.tls_handshake_timeout
        return await super().create_server(*args, **kwargs)


def client_of(address: str) -> str:
    """Whom a connection counts against: its IPv4 address, or its IPv6 /64 (one host commonly holds a
    whole /64, so a per-address cap would not hold it back)."""
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return address
    if ip.version == 4:
        return str(ip)
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip) if ip.is_loopback else str(ipaddress.ip_network(f"{ip}/64", strict=False))


def ensure_descriptors(max_connections: int) -> None:
    """Raise the process's soft file-descriptor limit (up to the hard one) to room for max_connections and
    the connections accepted but not yet refused in a flood's burst (a service's soft limit is often 1024,
    where 512 connections and a burst ran it out: the console then logged accept errors in a busy loop)."""
    import resource

    want = 4 * max_connections + 256
    raised = raise_open_files_limit(want)
    if raised != resource.RLIM_INFINITY and raised < want:
        log.warning(
            "console: %d file descriptors (the hard limit) for max_connections=%d: a flood can run them "
            "out; raise the limit (LimitNOFILE) to %d or lower max_connections",
            raised,
            max_connections,
            want,
        )


def _plain_response(status: int, reason: str, text: str) -> bytes:
    body = (text + "\n").encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


def guarded_protocols(guard: ConnectionGuard) -> tuple[type, type]:
    """(http, ws) protocol classes for uvicorn.Config that enforce `guard`."""

    class GuardedHTTP(H11Protocol):
        _refused = False
        _linger: asyncio.TimerHandle | None = None
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            why = guard.admit(transport, client_of(str((transport.get_extra_info("peername") or ("?",))[0])))
            if why is not None:  # answered before anything is read: a flood costs one short-lived socket each
                self._refused = True
                self.transport = transport
                guard.note("over the connection limit", why)
                transport.write(_plain_response(503, "Service Unavailable", why))
                if guard.lingering >= MAX_LINGERING or not transport.can_write_eof():
                    transport.close()
                    return
                transport.write_eof()
                guard.lingering += 1
                self._linger = asyncio.get_running_loop().call_later(REFUSED_LINGER_S, transport.close)
                return
            super().connection_made(transport)
            self._arm()

        def _arm(self) -> None:
            guard.waiting.setdefault(self.transport, self._make_room)
            if self._deadline is None:
                self._deadline = self.loop.call_later(guard.read_timeout_s, self._too_slow)

        def _disarm(self) -> None:
            guard.waiting.pop(self.transport, None)
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _too_slow(self) -> None:
            self._deadline = None
            if self.transport.is_closing() or self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
                return
            detail = f"a request from {self.client} was not in after {guard.read_timeout_s:g} s"
            self._close("too slow", detail, 408, "Request Timeout", "the request came in too slowly")

        def _make_room(self) -> None:
            detail = (
                f"at {guard.max_connections} connections, the oldest waiting one ({self.client}) was closed"
            )
            text = "the console is at its connection limit and closed this waiting connection for a new one"
            self._close("closed to make room", detail, 503, "Service Unavailable", text)

        def _close(self, kind: str, detail: str, status: int, reason: str, text: str) -> None:
            guard.note(kind, detail)
            guard.release(self.transport)  # (at once: its slot is wanted now)
            if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):  # nothing of an answer sent yet
                self.transport.write(_plain_response(status, reason, text))
            self.transport.close()

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return  # the 503 is on its way; whatever the client sends is dropped
            if self.conn.their_state is h11.IDLE:  # a new request (keep-alive) starts: its deadline runs
                self._arm()
            super().data_received(data)
            if self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):  # all in (or upgraded, or an error)
                self._disarm()

        def handle_websocket_upgrade(self, event) -> None:
            self._disarm()  # the head is in; h11 still reads the request as unfinished (SEND_BODY)
            super().handle_websocket_upgrade(event)

        def on_response_complete(self) -> None:
            self._disarm()  # the keep-alive timer takes over until the next request's first byte
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                guard.waiting.setdefault(self.transport, self._make_room)  # idle: may make room

        def shutdown(self) -> None:
            """At a stop: an idle connection over TLS is dropped, not closed politely (that waits for the
            browser's close_notify, which an idle browser keeps the stop waiting for); others as uvicorn."""
            if self._refused:
                return
            idle = self.cycle is None or self.cycle.response_complete
            if idle and self.scheme == "https" and self.conn.their_state is h11.IDLE:
                self.transport.abort()
                return
            super().shutdown()

        def connection_lost(self, exc) -> None:
            if self._refused:
                if self._linger is not None:
                    self._linger.cancel()
                    guard.lingering -= 1
                return
            self._disarm()
            guard.release(self.transport)  # (after an upgrade the WebSocket protocol gets this instead)
            super().connection_lost(exc)

    class GuardedWebSocket(WebSocketsSansIOProtocol):
        """Keeps the upgraded connection's slot until the socket closes."""

        def connection_lost(self, exc) -> None:
            guard.release(self.transport)
            super().connection_lost(exc)

    return GuardedHTTP, GuardedWebSocket
