"""The teleoperator web console: an ASGI app (Starlette, served by uvicorn) that is an operator client of
the fleet server and serves the page operators work in.

    app = ConsoleApp(ConsoleConfig(server="127.0.0.1:50051")).app   # any ASGI server can run it
    ConsoleThread(config).start()                                    # uvicorn in a thread (tests, demo)

(Under another ASGI server the connection limits of teleop/guard.py are that server's to set, and the
console's own origin is its configured host and port: port 0 names none, so list them in allowed_origins.)

Sign-in: the operator posts their operator id and token (a form, no script sees it); the console opens
that operator's session with the fleet server (fleet.client.OperatorClient) and keeps the token on its
side only. The browser gets a random session cookie (HttpOnly, SameSite=Strict). The page talks over one
WebSocket (/ws): the upgrade is refused unless the Origin is the console's own as configured (never the
Host header: a DNS-rebinding page sets that), or listed in allowed_origins, and the cookie names a live
session. Several operators at once, each in their own
browser (one fleet session per operator; their tabs share it).

Over the WebSocket the page gets JSON text messages (`{"t": "fleet" | "queue" | "assignment" |
"released" | "error" | "notice" | "session", ...}`) and camera frames as binary messages: a 4-byte
big-endian header length, a JSON header (robot, seq, timestamp, mode, action_seq, signals, observation)
and the JPEG. Frames are latest-only per tab: a tab that falls behind skips frames, never lags. The
page sends `{"t": "act" | "release" | "reset" | "estop" | "discard" | "note" | "pick", ...}`; every
request is checked here for shape and then again by the fleet server, which accepts actions only from
the robot's assigned operator and lets a protective stop win over everything.

Safety does not rest on the page: while the deadman is held the page sends actions at 25 Hz; when they
stop (deadman released, tab hidden or closed, network gone) the fleet server's teleop watchdog holds the
robot (ServerConfig.teleop_watchdog_s). When an operator's last tab closes, their fleet session ends
after session_grace_s and their robots go back to the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import html
import json
import logging
import math
import secrets
import struct
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket, WebSocketDisconnect

from fleet import codec, wire
from fleet.client import OperatorClient
from fleet.client._session import _credentials, _metadata
from fleet.proto import flotilla_pb2 as pb
from fleet.proto import flotilla_pb2_grpc as pb_grpc
from fleet.server.config import is_loopback
from fleet.stop_signals import StopSignals
from teleop.config import ConsoleConfig
from teleop.guard import ConnectionGuard, ConsoleLoop, ensure_descriptors, guarded_protocols

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
COOKIE = "flotilla_session"
FORM = "application/x-www-form-urlencoded"  # the sign-in page's form; nothing else signs in
FATAL_SIGNIN = {"UNAUTHENTICATED", "PERMISSION_DENIED", "INVALID_ARGUMENT", "ALREADY_EXISTS"}
MAX_ACTION_DIM = 64
MAX_MESSAGE_BYTES = 4096  # a page message is a small JSON object
# A page sends actions at 25 Hz; a tab sending faster than this (a script, a hostile client) has the excess
# dropped, all but protective stops, so it cannot crowd out other operators on the console's loop.
MAX_MESSAGES_PER_S = 100
MAX_TABS = 8  # open pages per signed-in operator (each costs the console a fleet view per status_hz)
MAX_QUEUED = 512  # messages waiting for a tab that does not read: past this it is closed (it reconnects)
LINK_CHECK_S = 0.1  # how often a session looks at its link to the fleet server (the page shows it)
SIGNIN_PENALTY_S = 1.0  # a refused sign-in answers after this long
# The listen backlog, which is also how many connections asyncio accepts in one go before any is refused
# (uvicorn's 2048 let a flood's burst take ~900 descriptors past max_connections).
ACCEPT_BATCH = 256
MODE_NAMES = {pb.MODE_UNSPECIFIED: "unknown", pb.MODE_AUTONOMOUS: "autonomous", pb.MODE_TELEOP: "teleop"}
MODE_NAMES[pb.MODE_HOLD] = "hold"
# No inline script or style, nothing from elsewhere: the page's own files, its socket and decoded frames.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' blob: data:; connect-src 'self'; script-src 'self'; "
        "style-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",  # frame-ancestors for browsers without CSP 2: no page that moves robots in a frame
    "Referrer-Policy": "same-origin",  # "no-referrer" makes Chromium send Origin: null on posts
    "Cache-Control": "no-store",
}
HSTS = {"Strict-Transport-Security": "max-age=31536000"}  # over HTTPS: browsers never try plain HTTP again


class BadRequest(ValueError):
    """A page message that is not what the console accepts (answered with an error, the socket stays)."""


# ------------------------------------------------------------------------------------------- sessions


@dataclass(eq=False)  # a tab is itself (hashable by identity)
class Tab:
    """One open page: control messages in order, camera frames latest-only. `end` closes it."""

    socket: WebSocket
    messages: asyncio.Queue = field(default_factory=asyncio.Queue)
    frame: bytes | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    closing: tuple[int, str] | None = None  # (close code, reason) once the tab is to be closed
    # Messages it may still send now, refilled over time: protective stops have a budget of their own.
    budgets: dict = field(default_factory=lambda: {"stop": MAX_MESSAGES_PER_S, "other": MAX_MESSAGES_PER_S})
    budgets_at: float = field(default_factory=time.monotonic)
    dropped_told_at: float = 0.0

    def send(self, message: dict) -> None:
        if self.closing is not None:
            return
        if self.messages.qsize() >= MAX_QUEUED:
            # Not reading: drop what waits and close it; the page reconnects and gets all afresh.
            self.end(1013, "the page fell behind; reconnect")
            return
        self.messages.put_nowait(json.dumps(message))
        self.wake.set()

    def end(self, code: int, reason: str) -> None:
        """Close the socket once what is queued is sent (a tab that fell behind: at once)."""
        if self.closing is None:
            self.closing = (code, reason)
            if self.messages.qsize() >= MAX_QUEUED:
                self.messages = asyncio.Queue()
            self.wake.set()

    def admit(self, text: str) -> bool:
        """Whether this message is within the tab's rate (a flood of others never holds back a stop)."""
        now = time.monotonic()
        refill, self.budgets_at = (now - self.budgets_at) * MAX_MESSAGES_PER_S, now
        for kind, budget in self.budgets.items():
            self.budgets[kind] = min(MAX_MESSAGES_PER_S, budget + refill)
        kind = "stop" if '"estop"' in text else "other"
        if self.budgets[kind] >= 1.0:
            self.budgets[kind] -= 1.0
            return True
        if now - self.dropped_told_at >= 1.0:
            self.dropped_told_at = now
            self.send(
                error_message(f"more than {MAX_MESSAGES_PER_S} messages a second: the excess is dropped")
            )
        return False

    def send_frame(self, frame: bytes) -> None:
        if self.closing is None:
            self.frame = frame  # a newer frame replaces one not sent yet
            self.wake.set()

    async def pump(self) -> None:
        try:
            while True:
                await self.wake.wait()
                self.wake.clear()
                while not self.messages.empty():
                    await self.socket.send_text(self.messages.get_nowait())
                if self.closing is not None:
                    await self.socket.close(*self.closing)
                    return
                if self.frame is not None:
                    frame, self.frame = self.frame, None
                    await self.socket.send_bytes(frame)
        except (WebSocketDisconnect, RuntimeError, OSError):
            return  # the tab went away; the socket's reader ends the session's use of it


class OperatorSession:
    """A signed-in operator: their fleet session (OperatorClient), their token (never sent to a page),
    the latest of what the fleet server said, and their open tabs."""

    def __init__(self, console: ConsoleApp, operator_id: str, token: str):
        self.console = console
        self.operator_id = operator_id
        self.token = token
        self.cookie = secrets.token_urlsafe(32)
        self.created = time.monotonic()
        self.loop = asyncio.get_running_loop()
        self.tabs: set[Tab] = set()
        self.assigned: dict[str, dict] = {}  # robot -> its assignment (JSON form)
        self.queue: dict = {"t": "queue", "entries": []}
        self.fleet: dict | None = None
        self.first_update = asyncio.Event()
        self.client: OperatorClient | None = None
        self.ended = False
        self.link = ""  # the fleet link as the tabs were last told: "up", "down" or "" (not yet)
        self._closer: asyncio.TimerHandle | None = None
        self._expiry: asyncio.TimerHandle | None = None
        self._poller: asyncio.Task | None = None
        self._watcher: asyncio.Task | None = None

    # -- the fleet session ----------------------------------------------------------------------------

    def connect(self) -> None:
        config = self.console.config
        self.client = OperatorClient(
            config.server,
            self.token,
            self.operator_id,
            root_certificates=config.root_certificates or None,
            on_update=self._from_client_thread,
            backoff=(0.1, 2.0),
        ).start()
        self._poller = self.loop.create_task(self._poll_status())
        self._watcher = self.loop.create_task(self._watch_link())

    def _from_client_thread(self, update: pb.OperatorUpdate) -> None:
        with contextlib.suppress(RuntimeError):  # the console's loop has closed (shutting down)
            self.loop.call_soon_threadsafe(self._update, update)

    def accepted(self) -> None:
        """Signed in: the session lives until signed out, expired (session_ttl_s) or refused by the fleet."""
        self._expiry = self.loop.call_later(
            self.console.config.session_ttl_s, self.console.end_session, self, "your session expired"
        )

    def refusal(self) -> str | None:
        """Why the fleet server refused this session (None while it has not)."""
        client = self.client
        errors = [client.error] if client.error else list(client.recent_errors)
        for error in errors:
            if error.code.name in FATAL_SIGNIN:
                return f"{error.code.name}: {error.details}"
        return None

    def close(self, reason: str = "signed out") -> threading.Thread | None:
        """End the session (its tabs are told why and closed); returns the thread closing the fleet
        session, if any."""
        self.ended = True
        for timer in (self._closer, self._expiry):
            if timer is not None:
                timer.cancel()
        for tab in list(self.tabs):
            tab.send({"t": "session", "state": "ended", "reason": reason})
            tab.end(1008, reason.encode()[:120].decode(errors="ignore"))  # a close reason: at most 123 bytes
        return self._end_fleet_session(force=True)

    async def _watch_link(self) -> None:
        """Tell the tabs when the link to the fleet server goes down or comes back (the page shows it and
        stops driving); a session the fleet server ended for good (token revoked, say) is ended here too."""
        started, self.link = time.monotonic(), ""
        while (client := self.client) is not None:
            if client.stopped and client.error is not None:
                if self._expiry is not None:  # signed in (a refused sign-in is the sign-in's to answer)
                    self.console.end_session(self, f"the fleet server ended your session: {client.error}")
                return
            link = "up" if client.connected else "down"
            # News: a change after the first connection, or no connection a second after (re)connecting.
            if link != self.link and (self.link or link == "up" or time.monotonic() - started > 1.0):
                if self.link or link == "down":
                    for tab in self.tabs:
                        tab.send(link_message(link, client))
                if link == "down":  # the robots hold; whichever are still ours come back as assignments
                    for robot in list(self.assigned):
                        lost = pb.Release(robot_id=robot, reason=pb.RELEASE_REASON_OPERATOR_DISCONNECTED)
                        self._update(pb.OperatorUpdate(released=lost))
                self.link = link
            await asyncio.sleep(LINK_CHECK_S)

    def _update(self, update: pb.OperatorUpdate) -> None:  # on the console's loop
        self.first_update.set()
        kind = update.WhichOneof("kind")
        if kind == "frame":
            data = frame_message(update.frame)
            for tab in self.tabs:
                tab.send_frame(data)
            return
        if kind == "assignment":
            a = update.assignment
            message = {
                "t": "assignment",
                "robot": a.robot_id,
                "reason": wire.assignment_reason_name(a.reason),
                "min_steps": a.min_steps,
                "needs_reset": a.needs_reset,
                "reset_steps": a.reset_steps,
            }
            self.assigned[a.robot_id] = message
        elif kind == "released":
            self.assigned.pop(update.released.robot_id, None)
            message = {
                "t": "released",
                "robot": update.released.robot_id,
                "reason": wire.release_reason_name(update.released.reason),
            }
        elif kind == "queue":
            message = self.queue = queue_message(update.queue)
        elif kind == "error":
            e = update.error
            message = {"t": "error", "request": e.request, "robot": e.robot_id, "message": e.message}
        elif kind == "notice":
            n = update.notice
            message = {"t": "notice", "request": n.request, "robot": n.robot_id, "message": n.message}
        else:
            return
        for tab in self.tabs:
            tab.send(message)

    async def _poll_status(self) -> None:
        """The fleet view: AdminService.Status with this operator's token, status_hz times a second."""
        config = self.console.config
        credentials = _credentials(config.root_certificates or None)
        channel = (
            grpc.aio.secure_channel(config.server, credentials)
            if credentials
            else grpc.aio.insecure_channel(config.server)
        )
        async with channel:
            stub = pb_grpc.AdminServiceStub(channel)
            while True:
                try:
                    status = await stub.Status(pb.StatusRequest(), metadata=_metadata(self.token), timeout=5)
                    self.fleet = fleet_message(status)
                except grpc.aio.AioRpcError as err:
                    self.fleet = {"t": "fleet", "error": f"{err.code().name}: {err.details()}"}
                for tab in self.tabs:
                    tab.send(self.fleet)
                await asyncio.sleep(1.0 / config.status_hz)

    # -- tabs -----------------------------------------------------------------------------------------

    def opened(self, tab: Tab) -> None:
        if self.ended:  # ended while its socket was being accepted: no fleet session for it again
            tab.send({"t": "session", "state": "ended", "reason": "signed out"})
            tab.end(1008, "signed out")
            return
        if self._closer is not None:
            self._closer.cancel()
            self._closer = None
        if self.client is None:  # the fleet session ended after the last tab closed: open it again
            self.connect()
        self.tabs.add(tab)
        tab.send({"t": "session", "state": "open", "operator": self.operator_id})
        if self.link == "down":
            tab.send(link_message("down", self.client))
        tab.send(self.queue)
        for message in self.assigned.values():
            tab.send(message)
        if self.fleet is not None:
            tab.send(self.fleet)

    def closed(self, tab: Tab) -> None:
        self.tabs.discard(tab)
        if not self.tabs and self.client is not None:
            self._closer = self.loop.call_later(self.console.config.session_grace_s, self._end_fleet_session)

    def _end_fleet_session(self, force: bool = False) -> threading.Thread | None:
        """Leave the fleet (the robots re-queue): when the last tab is gone (the cookie stays good for a
        reload, which opens a new fleet session) or the console session ends (`force`)."""
        self._closer = None
        if self.tabs and not force:
            return None
        for task in (self._poller, self._watcher):
            if task is not None:
                task.cancel()
        client, self.client = self.client, None
        self.assigned.clear()
        if client is None:
            return None
        log.info("operator %s: ending the fleet session", self.operator_id)
        closing = threading.Thread(target=client.close, args=(2.0,), daemon=True)
        closing.start()
        return closing

    # -- requests from the page -------------------------------------------------------------------------

    def action_dim(self, robot: str) -> int:
        """The size of `robot`'s actions in the latest fleet view (0: not known yet)."""
        for entry in (self.fleet or {}).get("robots", ()):
            if entry["robot"] == robot:
                return entry["action_dim"]
        return 0

    def request(self, message: dict) -> None:
        """A page message -> the fleet server (BadRequest when it is malformed)."""
        client = self.client
        if client is None:
            raise BadRequest("not connected to the fleet server")
        kind = message.get("t")
        robot = message.get("robot", "")
        if not _text(robot) or len(robot) > 64:
            raise BadRequest("robot must be a robot id")
        if kind == "act":
            action = message.get("a")
            if (
                not isinstance(action, list)
                or not 0 < len(action) <= MAX_ACTION_DIM
                or not all(map(_finite, action))
            ):
                raise BadRequest(f"act: a must be a list of at most {MAX_ACTION_DIM} finite numbers")
            if not client.connected:  # (it would be dropped at the reconnect: stale actions are not replayed)
                raise BadRequest("act: the console has no link to the fleet server now; actions are not sent")
            wanted = self.action_dim(robot)
            if wanted and wanted != len(action):  # a ROS arm taking joint positions, say: say so once here
                raise BadRequest(
                    f"act: {robot} takes {wanted}-D actions and the console drives {len(action)}-D ones "
                    "([dx, dy, dz, gripper]): it cannot drive this robot; hand it back or stop it"
                )
            client.act(
                robot,
                np.clip(np.asarray(action, np.float32), -1.0, 1.0),
                seq=_int(message, "seq"),
                frame_seq=_int(message, "frame_seq"),
                frame_age_ms=_number(message, "frame_age_ms"),
            )
        elif kind == "release":
            client.release(robot)
        elif kind == "reset":
            client.reset(robot)
        elif kind == "estop":
            engage = message.get("engage", True)
            if not isinstance(engage, bool):
                raise BadRequest("estop: engage must be true or false")
            client.estop(robot, engage)  # robot "": the whole fleet
        elif kind == "discard":
            client.discard(robot)
        elif kind == "note":
            text = message.get("text")
            if not _text(text):
                raise BadRequest("note: text must be a string (of Unicode characters)")
            client.note(robot, text)
        elif kind == "pick":
            client.pick(robot)
        else:
            raise BadRequest(f"unknown request {str(kind)[:32]!r}")
        if kind != "act" and not client.connected:  # kept by the client and sent at the reconnect
            raise BadRequest(
                f"{kind}: NOT in effect yet: the console has no link to the fleet server (it is sent when the "
                "link is back)"
            )


def _text(value) -> bool:
    """A JSON string the fleet's protobuf strings can carry (JSON's escapes can make lone surrogates)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _finite(value) -> bool:
    """A JSON number that is a finite float (not a bool, not an integer too large for a float)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer of hundreds of digits
        return False


def _int(message: dict, key: str) -> int:
    value = message.get(key, 0)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**62:
        raise BadRequest(f"{key} must be a non-negative integer")
    return value


def _number(message: dict, key: str) -> float:
    value = message.get(key, 0.0)
    if not _finite(value) or value < 0:
        raise BadRequest(f"{key} must be a non-negative number")
    return float(value)


def link_message(link: str, client: OperatorClient) -> dict:
    """The console's link to the fleet server for the page: "up", or "down" with the latest error."""
    return {"t": "link", "fleet": link, "message": str(client.last_error or "") if link == "down" else ""}


def error_message(text: str) -> dict:
    """What the page gets for a message the console refused (the socket stays open)."""
    return {"t": "error", "request": "page", "robot": "", "message": text}


# ------------------------------------------------------------------------------------- wire -> JSON


def _signals(signals: pb.Signals) -> dict:
    """Every Signals field: numbers rounded, the filter's decision by name ("" without safety models)."""
    shown = {}
    for descriptor in signals.DESCRIPTOR.fields:
        value = getattr(signals, descriptor.name)
        shown[descriptor.name] = round(value, 4) if descriptor.type == descriptor.TYPE_FLOAT else value
    shown["safety_filter"] = wire.safety_filter_name(signals.safety_filter)
    return shown


def _vector(tensor: pb.Tensor) -> list[float]:
    try:
        return [round(float(v), 4) for v in codec.from_tensor(tensor).ravel()[:16]]
    except ValueError:
        return []


def frame_message(frame: pb.RobotFrame) -> bytes:
    header = {
        "robot": frame.robot_id,
        "seq": frame.seq,
        "timestamp": frame.timestamp,
        "mode": MODE_NAMES.get(frame.mode, "unknown"),
        "action_seq": frame.action_seq,
        "signals": _signals(frame.signals),
        "goal": _vector(frame.goal) if frame.HasField("goal") else [],
        "obs": {key: _vector(tensor) for key, tensor in frame.observation.items()},
        "encoding": frame.camera.encoding,
    }
    data = json.dumps(header).encode()
    return struct.pack(">I", len(data)) + data + frame.camera.data


def queue_message(queue: pb.Queue) -> dict:
    return {
        "t": "queue",
        "entries": [
            {
                "robot": e.robot_id,
                "reason": wire.assignment_reason_name(e.reason),
                "score": round(e.score, 3),
                "priority": round(e.priority, 3),
                "waited_s": e.waited_s,
                "assigned_to": e.assigned_to,
            }
            for e in queue.entries
        ],
    }


def fleet_message(status: pb.FleetStatus) -> dict:
    return {
        "t": "fleet",
        "time": time.time(),
        "fleet_estop": status.fleet_estop,
        "operators": list(status.operators),
        "writer_healthy": status.writer_healthy,
        "robots": [
            {
                "robot": r.robot_id,
                "mode": MODE_NAMES.get(r.mode, "unknown"),
                "operator": r.operator_id,
                "task": r.task,
                "goal": _vector(r.goal) if r.HasField("goal") else [],
                "policy": r.policy_version,
                "connected": r.connected,
                "estop": r.estop,
                "blocked": r.blocked,
                "steps": r.steps,
                "episodes": r.episodes,
                "signals": _signals(r.signals),
                "action_dim": r.action_dim,
            }
            for r in status.robots
        ],
        "tallies": [
            {
                "operator": t.operator_id,
                "interventions": t.interventions,
                "control_s": round(t.control_s, 1),
                "steps": t.intervention_steps,
                "discarded": t.discarded,
            }
            for t in status.tallies
        ],
        "rounds": [
            {
                "policy": r.policy_version,
                "episodes": r.episodes,
                "successes": r.successes,
                "autonomous_successes": r.autonomous_successes,
                "steps": r.steps,
                "human_steps": r.human_steps,
                "human_s": round(r.human_s, 1),
            }
            for r in status.rounds
        ],
    }


# ----------------------------------------------------------------------------------------------- app


class ConsoleApp:
    def __init__(self, config: ConsoleConfig):
        self.config = config
        self.sessions: dict[str, OperatorSession] = {}  # cookie -> session
        self.origins = own_origins(config, config.port)  # (port 0: ConsoleThread sets them once it listens)
        self.app = Starlette(
            routes=[
                Route("/", self.index),
                Route("/signin", self.signin, methods=["POST"]),
                Route("/signout", self.signout, methods=["POST"]),
                WebSocketRoute("/ws", self.socket),
                Mount("/static", StaticFiles(directory=STATIC), name="static"),
            ],
            lifespan=self._lifespan,
        )
        self.app.add_middleware(_SecurityHeaders)

    def session_of(self, cookies) -> OperatorSession | None:
        session = self.sessions.get(cookies.get(COOKIE, ""))
        if session is not None and time.monotonic() - session.created > self.config.session_ttl_s:
            self.end_session(session, "your session expired")
            return None
        return session

    def end_session(self, session: OperatorSession, reason: str) -> threading.Thread | None:
        """Forget the session's cookie and end it (its open tabs are told why and closed)."""
        if self.sessions.get(session.cookie) is session:
            del self.sessions[session.cookie]
            log.info("console: operator %s: session ended (%s)", session.operator_id, reason)
        return None if session.ended else session.close(reason)

    def origin_ok(self, origin: str | None) -> bool:
        """A browser names the page's origin; it must be this console's own as configured (not the Host
        header the client sent, which a DNS-rebinding page controls) or one in allowed_origins."""
        return bool(origin) and (origin.lower() in self.origins or origin in self.config.allowed_origins)

    async def index(self, request: Request) -> Response:
        if self.session_of(request.cookies) is None:
            return signin_page()
        return FileResponse(STATIC / "console.html")

    async def signin(self, request: Request) -> Response:
        if not self.origin_ok(request.headers.get("origin")):
            return signin_page("This sign-in did not come from the console's own page.", 403)
        if request.headers.get("content-type", "").split(";")[0].strip() != FORM:
            return signin_page("Sign in with the console's form (application/x-www-form-urlencoded).", 415)
        try:
            body = await _bounded_body(request, MAX_MESSAGE_BYTES)
        except ClientDisconnect:  # gone, or too slow (teleop/guard.py closed it): nobody to answer
            return Response(status_code=408)
        if body is None:
            return signin_page("That sign-in form is too large.", 413)
        try:
            form = urllib.parse.parse_qs(body.decode("utf-8", "replace"), max_num_fields=8)
        except ValueError:  # more fields than the form has
            return signin_page("That is not the sign-in form (operator, token).", 400)
        operator_id = form.get("operator", [""])[0].strip()
        token = form.get("token", [""])[0].strip()  # as the fleet server reads it
        if not operator_id or not token:
            return signin_page("Give your operator id and your operator token.", 400)
        if not token.isascii() or not token.isprintable() or " " in token:
            # gRPC metadata cannot carry it: no fleet server would ever accept it (it would time out).
            await asyncio.sleep(SIGNIN_PENALTY_S)
            return signin_page("An operator token is printable ASCII without spaces.", 401)
        # Signing in again with the same token replaces the operator's older console session (the fleet
        # allows one session per operator). Anything else must not end it: the fleet server then refuses.
        for older in [
            s
            for s in self.sessions.values()
            if s.operator_id == operator_id and secrets.compare_digest(s.token.encode(), token.encode())
        ]:  # (a concurrent sign-in may have ended one already: end_session takes that)
            closing = self.end_session(older, "you signed in again elsewhere")
            if closing is not None:
                await asyncio.to_thread(closing.join, 5.0)
        session = OperatorSession(self, operator_id, token)
        session.connect()
        refused = await self._wait_accepted(session)
        if refused:
            session.close()
            log.warning("console: sign-in of operator %r refused: %s", operator_id, refused)
            await asyncio.sleep(SIGNIN_PENALTY_S)  # guessing tokens one after another is slow
            return signin_page(f"Sign-in refused by the fleet server: {refused}", 401)
        self.sessions[session.cookie] = session
        session.accepted()
        log.info("console: operator %s signed in", operator_id)
        response = RedirectResponse("/", status_code=303)
        lifetime = max(1, math.ceil(self.config.session_ttl_s))  # int() made a 0.5 s session a 0 s cookie
        response.set_cookie(
            COOKIE,
            session.cookie,
            max_age=lifetime,
            httponly=True,
            samesite="strict",
            secure=_secure(request),
            path="/",
        )
        return response

    async def _wait_accepted(self, session: OperatorSession) -> str | None:
        """None once the fleet server answered the session; else why it refused (or did not answer)."""
        deadline = time.monotonic() + self.config.signin_timeout_s
        while time.monotonic() < deadline:
            if session.first_update.is_set() and session.client.connected:
                return None
            refused = session.refusal()
            if refused:
                return refused
            await asyncio.sleep(0.02)
        return (
            f"the fleet server at {self.config.server} did not answer in {self.config.signin_timeout_s:g} s"
        )

    async def signout(self, request: Request) -> Response:
        if not self.origin_ok(request.headers.get("origin")):
            return Response("sign-out must come from the console's own page", 403)
        session = self.sessions.get(request.cookies.get(COOKIE, ""))
        if session is not None:
            self.end_session(session, "signed out")
        response = RedirectResponse("/", status_code=303)
        response.delete_cookie(COOKIE, path="/", secure=_secure(request), httponly=True, samesite="strict")
        return response

    async def socket(self, websocket: WebSocket) -> None:
        if not self.origin_ok(websocket.headers.get("origin")):
            await websocket.close(code=1008, reason="origin not allowed")
            return
        session = self.session_of(websocket.cookies)
        if session is None:
            await websocket.close(code=1008, reason="not signed in")
            return
        if len(session.tabs) >= MAX_TABS:
            await websocket.close(code=1008, reason=f"at most {MAX_TABS} open pages per operator")
            return
        await websocket.accept()
        tab = Tab(websocket)
        session.opened(tab)
        pump = asyncio.create_task(tab.pump())
        try:
            while True:
                received = await websocket.receive()
                if received["type"] == "websocket.disconnect":
                    break
                text = received.get("text")
                if not tab.admit(text or ""):
                    continue
                try:
                    if text is None:
                        raise BadRequest("binary messages are not accepted: send JSON text")
                    if len(text) > MAX_MESSAGE_BYTES:
                        raise BadRequest(f"message of {len(text)} characters, at most {MAX_MESSAGE_BYTES}")
                    try:
                        message = json.loads(text)
                    except (ValueError, RecursionError):
                        raise BadRequest("not JSON") from None
                    if not isinstance(message, dict):
                        raise BadRequest("a message is a JSON object")
                    session.request(message)
                except BadRequest as err:
                    tab.send(error_message(str(err)))
                except Exception:  # a message the checks above missed: its sender is told, the socket stays
                    log.exception("console: operator %s: a page message failed", session.operator_id)
                    tab.send(error_message("the console could not handle that message"))
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            pump.cancel()
            session.closed(tab)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app):
        yield
        for session in list(self.sessions.values()):
            session.close()
        self.sessions.clear()


def own_origins(config: ConsoleConfig, port: int) -> set[str]:
    """The origins of the console's own pages as a browser names them: scheme://host:port as configured
    (the port left out where it is the scheme's default), and localhost too on a loopback address."""
    scheme = "https" if config.tls_cert else "http"
    hosts = {config.host.lower()} | ({"localhost"} if is_loopback(config.host) else set())
    default = port == (443 if scheme == "https" else 80)
    origins = set()
    for host in hosts:
        named = f"{scheme}://[{host}]" if ":" in host else f"{scheme}://{host}"
        origins |= {f"{named}:{port}"} | ({named} if default else set())
    return origins


def _secure(request) -> bool:
    return request.url.scheme in ("https", "wss")


async def _bounded_body(request: Request, limit: int) -> bytes | None:
    """The request's body, or None when it is longer than `limit` (read no further than that)."""
    with contextlib.suppress(ValueError):
        if int(request.headers.get("content-length", "0")) > limit:
            return None
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return body


class _SecurityHeaders:
    """The same strict headers on every HTTP response (ASGI middleware)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        strict = SECURITY_HEADERS | (HSTS if scope.get("scheme") == "https" else {})

        async def with_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(k.lower().encode(), v.encode()) for k, v in strict.items()]
                message = {**message, "headers": headers}
            await send(message)

        return await self.app(scope, receive, with_headers)


def signin_page(problem: str = "", status: int = 200) -> HTMLResponse:
    page = (STATIC / "signin.html").read_text()
    note = f'<p class="problem" role="alert">{html.escape(problem)}</p>' if problem else ""
    return HTMLResponse(page.replace("<!--problem-->", note), status_code=status)


# --------------------------------------------------------------------------------------------- running


class ConsoleThread:
    """The console under uvicorn in a daemon thread: `with ConsoleThread(config) as console: console.url`."""

    def __init__(self, config: ConsoleConfig):
        import uvicorn

        self.config = config
        self.console = ConsoleApp(config)
        kwargs = {"ssl_certfile": config.tls_cert, "ssl_keyfile": config.tls_key} if config.tls_cert else {}
        self.guard = ConnectionGuard(
            config.read_timeout_s, config.max_connections, config.max_connections_per_client
        )
        http, ws = guarded_protocols(self.guard)
        self.server = uvicorn.Server(
            uvicorn.Config(
                self.console.app,
                host=config.host,
                port=config.port,
                log_level="warning",
                http=http,
                ws=ws,
                ws_max_size=64 * 1024,
                timeout_keep_alive=config.keep_alive_s,
                # A browser's idle keep-alive (over TLS its close waits for the browser) must not hold a stop.
                timeout_graceful_shutdown=config.shutdown_grace_s,
                backlog=ACCEPT_BATCH,
                **kwargs,
            )
        )
        self._thread = threading.Thread(target=self._serve, name="console", daemon=True)

    def _serve(self) -> None:
        # TLS handshakes get read_timeout_s too: uvicorn leaves asyncio's 60 s, and a connection is only the
        # guard's to count once its handshake is done.
        loop = functools.partial(ConsoleLoop, tls_handshake_timeout=self.config.read_timeout_s)
        with asyncio.Runner(loop_factory=loop) as runner:
            runner.run(self.server.serve())

    @property
    def url(self) -> str:
        scheme = "https" if self.config.tls_cert else "http"
        socket = self.server.servers[0].sockets[0]
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host  # IPv6 in brackets
        return f"{scheme}://{host}:{socket.getsockname()[1]}"

    def start(self, timeout: float = 20.0) -> ConsoleThread:
        ensure_descriptors(self.config.max_connections)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"the console did not start on {self.config.host}:{self.config.port}")
            time.sleep(0.02)
        self.console.origins = own_origins(self.config, self.server.servers[0].sockets[0].getsockname()[1])
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)

    def __enter__(self) -> ConsoleThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def run(config: ConsoleConfig) -> None:
    """`flotilla console` (configs/console.yaml): serve the console until Ctrl-C."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    console = ConsoleThread(config).start()
    stop = StopSignals()  # before the URL is printed: a stop sent as soon as it is must be graceful too
    print(f"flotilla console: {console.url} (operators of the fleet server at {config.server}; Ctrl-C stops)")
    stop.wait(running=console._thread.is_alive)
    console.stop()
