"""What the fleet server does for the console, with real gRPC clients (no browser): the teleop watchdog,
action round trips and frame seqs per intervention, discard and notes on open and committed episodes
(and the trainer leaving discarded steps out), picking from the queue, tallies and rounds, the console
job's config errors."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import subprocess
import sys
import threading
import time
import urllib.parse

import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from fleet import allocation
from fleet.client import OperatorClient
from fleet.labels import ControlLabel
from fleet.proto import flotilla_pb2 as pb
from fleet.server.app import AdminService
from tests.console_harness import console_process
from tests.fleet_harness import has_ipv6_loopback
from tests.test_fleet_server import (
    NEEDS_OPENSSL,
    committed,
    obs,
    operator_client,
    robot_client,
    self_signed_certificate,
    send,
    take_over,
    wait_until,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INTERVENTION = ControlLabel.INTERVENTION


def status(server) -> pb.FleetStatus:
    return server.run(AdminService(server.server.fleet).Status(pb.StatusRequest(), None))


def test_watchdog_holds_the_robot_when_the_operators_input_stops(make_server, clients):
    server = make_server(t_T=10_000, teleop_watchdog_s=0.1)
    commands = []
    operator = clients(operator_client(server, "alice"))
    robot = clients(
        robot_client(server, on_command=lambda command, state: commands.append((time.monotonic(), command)))
    )
    take_over(robot, operator)
    for t in range(6, 11):  # a driving operator and a 25 Hz robot applying each action
        operator.act("r1", [0.5, 0.0], seq=t)
        last_sent = time.monotonic()
        time.sleep(0.04)
        robot.step(1, t, obs(t), [0.5, 0.0], INTERVENTION, operator_id="alice", operator_action_seq=t)
    # (On a loaded machine a 40 ms sleep can outlast the watchdog: such an early hold is right too.)
    wait_until(lambda: any(c.input_stopped and t > last_sent for t, c in commands), 2, "the watchdog")
    stopped_at = next(t for t, c in commands if c.input_stopped and t > last_sent)
    # The watchdog's time after the last action (and not much more, on a loaded machine).
    assert 0.1 - 0.02 <= stopped_at - last_sent <= 0.1 + 0.4
    assert robot.state.mode == pb.MODE_TELEOP and robot.state.action is None  # hold, never repeat it
    operator.act("r1", [0.0, 0.5], seq=11)  # input again: driving resumes
    wait_until(lambda: robot.state.action is not None and robot.state.action_seq == 11, 2, "the new action")
    assert server.server.metrics.counters["teleop_input_stopped"] >= 1


def test_watchdog_waits_for_a_slow_robot_to_apply_the_latest_action(make_server, clients):
    # A robot whose ticks are slower than the watchdog (a lockstep simulation on a busy machine): the
    # operator's latest action is not stale until the robot has stepped with it.
    server = make_server(t_T=10_000, teleop_watchdog_s=0.05)
    operator = clients(operator_client(server, "alice"))
    robot = clients(robot_client(server))
    take_over(robot, operator)
    operator.act("r1", [0.5, 0.0], seq=1)
    wait_until(lambda: robot.state.action_seq == 1, 2, "the action")
    time.sleep(0.3)  # six watchdog periods without a robot step
    assert robot.state.action is not None and robot.state.action_seq == 1
    robot.step(1, 6, obs(6), [0.5, 0.0], INTERVENTION, operator_id="alice", operator_action_seq=1)
    wait_until(lambda: robot.state.action is None, 2, "the hold once the robot has applied it")
    assert robot.state.mode == pb.MODE_TELEOP


def test_round_trips_frame_seqs_discard_and_note_reach_the_episode_metadata(make_server, clients):
    # A frame for every step; a watchdog that a slow (loaded) test step never trips: it is not under test here.
    server = make_server(frame_hz=1000.0, teleop_watchdog_s=10.0)
    operator = clients(operator_client(server, "alice"))
    robot = clients(robot_client(server))
    take_over(robot, operator)  # steps t = 0..5 (seqs 2..7) logged before the takeover
    robot.step(1, 6, obs(6), [0.0, 0.0], INTERVENTION, operator_id="alice")  # holds: no action yet
    for t in range(7, 13):  # the action answering step t-1's frame is applied at step t
        frame = operator.next_update(15, kind="frame").frame
        operator.act("r1", [0.1 * t, 0.0], seq=t, frame_seq=frame.seq, frame_age_ms=12.5)
        wait_until(lambda: robot.state.action_seq == t, 15, f"action {t}")  # noqa: B023
        robot.step(1, t, obs(t), robot.state.action, INTERVENTION, operator_id="alice", operator_action_seq=t)
    operator.release("r1")
    operator.next_update(15, kind="released")
    operator.discard("r1")
    notice = operator.next_update(15, kind="notice").notice
    assert notice.request == "discard" and "7 steps" in notice.message
    robot.end_episode(1, success=False)
    store = committed(server, 1)
    extra = store.episode_meta(0).extra
    (intervention,) = extra["interventions"]
    assert (intervention["operator_id"], intervention["start"], intervention["end"]) == ("alice", 6, 13)
    # Each action answered the frame of the step before it: that frame's seq and its step in the episode
    # (seq 1 is the episode start, step t has seq t + 2); the first step held, answering nothing.
    assert intervention["frame_seqs"] == [0] + [t + 1 for t in range(7, 13)]
    assert intervention["frame_steps"] == [-1] + list(range(6, 12))
    assert intervention["frame_age_ms"] == {"p50": 12.5, "max": 12.5, "n": 6}
    assert intervention["round_trip_ms"]["n"] == 6 and intervention["round_trip_ms"]["max"] < 5000
    assert extra["discarded"] == [{"operator_id": "alice", "start": 6, "end": 13}]

    # A note after the episode was committed: written into the committed episode's metadata.
    operator.note("r1", "knocked the cube, sorry")
    assert operator.next_update(15, kind="notice").notice.request == "note"
    wait_until(lambda: "notes" in store.episode_meta(0).extra, 15, "the note in the store")
    assert store.episode_meta(0).extra["notes"][0]["text"] == "knocked the cube, sorry"
    operator.note("r2", "no such robot")
    assert "no intervention" in operator.next_update(15, kind="error").error.message

    fleet = status(server)
    (tally,) = fleet.tallies
    assert (tally.operator_id, tally.interventions, tally.intervention_steps, tally.discarded) == (
        "alice",
        1,
        7,
        1,
    )
    (round_,) = fleet.rounds
    assert (round_.episodes, round_.steps, round_.human_steps, round_.successes) == (1, 13, 7, 0)


def test_the_trainer_leaves_discarded_corrections_out(server, clients):
    from policies.data.windows import load_episodes

    operator = clients(operator_client(server, "alice"))
    robot = clients(robot_client(server))
    take_over(robot, operator)
    send(robot, 1, range(6, 10), label=INTERVENTION, operator_id="alice")
    robot.wait_acked()
    operator.release("r1")
    operator.next_update(15, kind="released")
    robot.end_episode(1, success=True)
    committed(server, 1)
    operator.discard("r1")  # after the commit: the committed episode's metadata is updated
    assert operator.next_update(15, kind="notice").notice.request == "discard"
    wait_until(
        lambda: committed(server, 1).episode_meta(0).extra.get("discarded"), 5, "the discard in the store"
    )
    data = load_episodes([server.config.store], ["state"])
    discarded = np.flatnonzero(data.holds)
    assert discarded.tolist() == [6, 7, 8, 9] and data.summary()["discarded_steps"] == 4
    assert data.steps["label"][6:10].tolist() == [INTERVENTION] * 4  # kept in the store, labels intact


def test_the_fleet_view_carries_the_safety_signals_and_the_filter_decision():
    from teleop.app import fleet_message

    status = pb.FleetStatus()
    robot = status.robots.add(robot_id="r1", connected=True)
    robot.signals.CopyFrom(
        pb.Signals(risk=1.0, ldm=3.25, agree=0.5, safety_filter=pb.SAFETY_FILTER_DECISION_HOLD)
    )
    status.robots.add(robot_id="r2", connected=True)  # a policy without safety models
    first, second = fleet_message(status)["robots"]
    assert first["signals"] == {
        "uncertainty": 0.0,
        "risk": 1.0,
        "density": 0.0,
        "novelty": 0.0,
        "rnd": 0.0,
        "ldm": 3.25,
        "agree": 0.5,
        "constraint_violation": False,
        "safety_filter": "hold",
    }
    assert second["signals"]["safety_filter"] == ""


def test_operators_pick_from_the_queue_where_the_rule_allows_it():
    allocator = allocation.make_allocator("cur", t_T=5, uncertainty_threshold=0.5, risk_threshold=0.5)
    robots = [allocation.RobotSlot(f"r{i}") for i in range(3)]
    for robot, uncertainty in zip(robots, (0.9, 0.7, 0.1), strict=True):
        robot.signals.uncertainty = uncertainty
    allocator.tick(robots, [])  # nobody on duty: r0 then r1 wait
    assignment = allocator.pick(robots[1], "alice", robots)  # alice takes the second in line
    assert (assignment.robot_id, assignment.operator_id, assignment.reason) == ("r1", "alice", "uncertainty")
    assert robots[1].controller == "alice"
    with pytest.raises(ValueError, match="already controls"):
        allocator.pick(robots[0], "alice", robots)
    with pytest.raises(ValueError, match="not waiting"):
        allocator.pick(robots[2], "bob", robots)
    randomized = allocation.make_allocator("random", uncertainty_threshold=0.5, risk_threshold=0.5)
    randomized.tick(robots[:1], [])
    with pytest.raises(ValueError, match="does not let operators pick"):
        randomized.pick(robots[0], "bob", robots[:1])


def test_a_pick_over_the_protocol(make_server, clients):
    server = make_server(allocation={"rule": "cur", "tick_hz": 20, "t_T": 3, "uncertainty_threshold": 0.5})
    first, second = clients(robot_client(server, "r1")), clients(robot_client(server, "r2"))
    for robot in (first, second):
        robot.start_episode(1)
        send(robot, 1, [0], uncertainty=0.9)
    wait_until(lambda: len(status(server).robots) == 2, 15, "two robots")
    wait_until(lambda: len(server.server.fleet.allocator.queue()) == 2, 15, "two robots in the queue")
    bob = clients(operator_client(server, "bob"))
    bob.pick("r2")  # races the next tick's assignment: either way bob ends up with a robot
    update = bob.next_update(15, kind="assignment")
    assert update is not None and update.assignment.robot_id in ("r1", "r2")
    bob.pick("r1" if update.assignment.robot_id == "r2" else "r2")
    error = bob.next_update(15, kind="error").error
    assert error.request == "pick" and "already controls" in error.message


def test_console_job_refuses_bad_settings_in_one_line():
    env = {**os.environ, "PYTHONPATH": ROOT}
    for override, expected in (
        ("host=0.0.0.0", "flotilla console: host: 0.0.0.0 is beyond loopback"),
        ("port=70000", "flotilla console: port: must be 0-65535"),
        ("server=nohost", "flotilla console: server: must be HOST:PORT"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "flotilla.cli", "console", override],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert result.returncode == 2 and result.stderr.strip().startswith(expected), result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("stop_signal", ["SIGINT", "SIGTERM"])
def test_console_job_stops_gracefully_on_ctrl_c_and_a_service_managers_sigterm(server, stop_signal):
    """`flotilla console` under systemd gets SIGTERM: the same graceful stop as Ctrl-C, exit 0 (it was
    killed by the signal, -15, without closing its operators' sessions)."""
    import signal

    console, lines = console_process(f"server={server.address}", "port=0")
    try:
        assert console.poll() is None, "".join(lines)
        console.send_signal(getattr(signal, stop_signal))
        out = console.communicate(timeout=30)[0]
        assert console.returncode == 0, "".join(lines) + out
    finally:
        console.kill()
        console.wait()


def test_console_serves_sign_in_with_strict_headers(make_server):
    import urllib.error
    import urllib.request

    from teleop.app import ConsoleThread
    from teleop.config import ConsoleConfig

    server = make_server()
    with ConsoleThread(ConsoleConfig(server=server.address, port=0)) as console:
        with urllib.request.urlopen(console.url + "/", timeout=5) as response:
            page = response.read().decode()
            assert 'action="/signin"' in page and response.headers["X-Content-Type-Options"] == "nosniff"
        # A sign-in posted from another site's page (login CSRF) is refused.
        forged = urllib.request.Request(
            console.url + "/signin",
            data=b"operator=alice&token=operator-token",
            headers={"Origin": "http://evil.example"},
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(forged, timeout=5)
        assert refused.value.code == 403
        with urllib.request.urlopen(console.url + "/static/console.js", timeout=5) as response:
            assert b"flotillaStats" in response.read()
            assert (
                response.headers["X-Frame-Options"] == "DENY"
                and response.headers["Cache-Control"] == "no-store"
            )
            assert "Strict-Transport-Security" not in response.headers  # plain HTTP (loopback)
        for path in (
            "/static/../app.py",
            "/static/..%2fapp.py",
            "/static/%2e%2e/config.py",
            "/static/..%5capp.py",
        ):
            status, _, body = request(console, "GET", path)
            assert status == 404 and b"import" not in body, path
        status, _, page = request(  # the form only: JSON is refused, saying so
            console,
            "POST",
            "/signin",
            json.dumps({"operator": "alice", "token": "operator-token"}).encode(),
            {"Content-Type": "application/json"},
        )
        assert status == 415 and b"form" in page


def test_the_demo_serves_the_console_and_prints_its_url(make_server, capsys):
    import urllib.request

    from sim.demo import start_console

    server = make_server()
    console = start_console(server.address, "operator-token", 0)
    try:
        line = capsys.readouterr().out
        url = line.split("operator console: ")[1].split()[0]
        assert "operator-token" in line and url == console.url
        with urllib.request.urlopen(url, timeout=5) as response:
            assert b"Operator token" in response.read()
    finally:
        console.stop()


# ------------------------------------------------------------------ the console's surface, raw clients


FORM = "application/x-www-form-urlencoded"  # what the sign-in page posts


@contextlib.contextmanager
def console_of(server, **config):
    from teleop.app import ConsoleThread
    from teleop.config import ConsoleConfig

    with ConsoleThread(ConsoleConfig(server=server.address, port=0, **config)) as console:
        yield console


def request(console, method: str, path: str, body: bytes = b"", headers: dict | None = None):
    """(status, headers, body) of one request with the console's own Origin (a browser's form post)."""
    connection = http.client.HTTPConnection(console.url.split("//")[1], timeout=10)
    connection.request(method, path, body=body, headers={"Origin": console.url, **(headers or {})})
    response = connection.getresponse()
    return response.status, response.headers, response.read()


def sign_in(console, operator: str, token: str = "operator-token") -> str:
    """The session cookie ("name=value") of a sign-in through the form."""
    status, headers, _ = request(
        console,
        "POST",
        "/signin",
        f"operator={operator}&token={token}".encode(),
        {"Content-Type": FORM},
    )
    assert status == 303, status
    return headers["set-cookie"].split(";")[0]


def page_socket(console, cookie: str):
    from websockets.sync.client import connect

    url = console.url.replace("http", "ws") + "/ws"
    return connect(url, origin=console.url, additional_headers={"Cookie": cookie}, open_timeout=20)


def next_message(ws, kind: str, timeout: float = 15.0, containing: str = "") -> dict:
    """The next JSON message of `kind` (with `containing` in its text) on a page socket; others are skipped."""
    deadline = time.monotonic() + timeout
    while True:
        data = ws.recv(max(0.0, deadline - time.monotonic()))
        if isinstance(data, str) and (message := json.loads(data))["t"] == kind and containing in data:
            return message


def next_frame(ws, timeout: float = 5.0) -> dict:
    """The JSON header of the next camera frame on a page socket (a 4-byte length, the header, the image)."""
    deadline = time.monotonic() + timeout
    while not isinstance(data := ws.recv(max(0.0, deadline - time.monotonic())), bytes):
        pass
    length = int.from_bytes(data[:4], "big")
    return json.loads(data[4 : 4 + length])


def closed_with(ws, timeout: float = 5.0):
    """The close frame the console sent once the socket is closed (messages before it are skipped)."""
    deadline = time.monotonic() + timeout
    with pytest.raises(ConnectionClosed) as closed:
        while time.monotonic() < deadline:
            ws.recv(max(0.01, deadline - time.monotonic()))
    return closed.value.rcvd


def test_console_socket_answers_malformed_messages_and_floods_without_moving_a_robot(make_server, clients):
    server = make_server(t_T=10_000, teleop_watchdog_s=10.0)
    robot = clients(robot_client(server))
    with (
        console_of(server) as console,
        page_socket(console, sign_in(console, "alice")) as alice,
        page_socket(console, sign_in(console, "bob")) as bob,
    ):
        robot.start_episode(1)
        send(robot, 1, range(5), uncertainty=0.1)
        send(robot, 1, [5], uncertainty=0.9)
        assert next_message(alice, "assignment", 10)["robot"] == "r1"
        robot.step(1, 6, obs(6), [0.0, 0.0], INTERVENTION, operator_id="alice")
        assert next_frame(alice)["robot"] == "r1"  # the camera frame of the step alice answers
        hostile = bob  # not assigned r1: nothing it sends may move the robot
        for sent, expected in (
            (b"\x00\x01binary", "binary messages are not accepted"),
            ("{{{", "not JSON"),
            ("[" * 5000 + "]" * 5000, "at most 4096"),
            ("[" * 2000 + "]" * 2000, "not JSON"),  # nested too deep for the parser
            ("[1, 2]", "a JSON object"),
            ('{"t": "act", "robot": "r1", "a": [NaN]}', "finite numbers"),
            ('{"t": "act", "robot": "r1", "a": [Infinity]}', "finite numbers"),
            ('{"t": "act", "robot": "r1", "a": [1e999]}', "finite numbers"),
            ('{"t": "act", "robot": "r1", "a": [' + "9" * 400 + "]}", "finite numbers"),
            ('{"t": "act", "robot": "r1", "a": [true, false]}', "finite numbers"),
            ('{"t": "act", "robot": "r1", "a": "up"}', "finite numbers"),
            (
                '{"t": "act", "robot": "r1", "a": [0.5, 0.5], "frame_age_ms": ' + "9" * 400 + "}",
                "frame_age_ms",
            ),
            ('{"t": "act", "robot": "r1", "a": [0.5, 0.5], "seq": -1}', "seq must be"),
            ('{"t": "act", "robot": ["r1"], "a": [0.5, 0.5]}', "robot must be a robot id"),
            ('{"t": "estop", "robot": "r1", "engage": "no"}', "engage must be true or false"),
            ('{"t": "note", "robot": "r1", "text": 5}', "text must be a string"),
            ('{"t": "note", "robot": "r1", "text": "\\ud800"}', "text must be a string"),  # a lone surrogate
            ('{"t": "discard", "robot": "\\udfff"}', "robot must be a robot id"),
            ('{"t": "launch"}', "unknown request 'launch'"),
            ('{"t": "act", "robot": "r9", "a": [0.5, 0.5]}', "unknown robot 'r9'"),
            ('{"t": "act", "robot": "r1", "a": [0.5, 0.5]}', "not assigned to operator 'bob'"),
            ('{"t": "reset", "robot": "r1"}', "not assigned to operator 'bob'"),
            ('{"t": "release", "robot": "r1"}', "not assigned to operator 'bob'"),
        ):
            hostile.send(sent)
            assert expected in next_message(hostile, "error")["message"], sent[:60]
        assert robot.state.action is None and robot.state.mode == pb.MODE_TELEOP
        assert robot.state.operator_id == "alice"

        # A flood: the excess over the page's rate is dropped (and said so), a stop in it still goes
        # through, and the other operator keeps driving.
        flood = json.dumps({"t": "note", "robot": "r2", "text": "x"})
        for _ in range(2000):
            hostile.send(flood)
        next_message(hostile, "error", 10, containing="messages a second: the excess is dropped")
        alice.send(json.dumps({"t": "act", "robot": "r1", "a": [0.25, 0.5], "seq": 7}))
        wait_until(lambda: robot.state.action_seq == 7, 15, "alice's action through the flood")
        for _ in range(1000):  # refused messages count too: a binary flood gets a bounded answer
            hostile.send(b"\x00")
        hostile.send(json.dumps({"t": "estop", "robot": "r1"}))  # any operator may stop any robot
        wait_until(lambda: robot.state.estop and robot.state.mode == pb.MODE_HOLD, 15, "the stop in a flood")
        alice.send(json.dumps({"t": "act", "robot": "r1", "a": [0.5, 0.5], "seq": 8}))
        assert "stopped" in next_message(alice, "error")["message"]  # the stop wins over driving
        time.sleep(0.1)  # its allowance refills
        hostile.send(json.dumps({"t": "launch"}))  # answered once the flood's answers are through
        answers = []
        while "launch" not in (answer := next_message(hostile, "error")["message"]):
            answers.append(answer)
        assert 0 < sum("binary" in answer for answer in answers) < 600  # ~100 and the refill while it lasts
        # A 10 MB message closes that socket (too big), not the console or anyone else's session.
        with contextlib.suppress(
            OSError, ConnectionClosed
        ):  # the console may close it while the frame is still going out
            hostile.send("x" * (10 << 20))
        assert closed_with(hostile).code == 1009
        alice.send(json.dumps({"t": "note", "robot": "r9", "text": "still here"}))
        assert "no intervention" in next_message(alice, "error")["message"]
        with page_socket(console, sign_in(console, "carol")) as carol:  # the console still signs people in
            assert next_message(carol, "session")["operator"] == "carol"


def test_console_sessions_end_at_sign_out_and_expiry_and_their_sockets_close(make_server, clients):
    from teleop.app import MAX_TABS

    server = make_server(t_T=10_000, teleop_watchdog_s=10.0)
    robot = clients(robot_client(server))
    with console_of(server, session_ttl_s=2.0) as console:
        cookie = sign_in(console, "alice")
        with page_socket(console, cookie) as alice:
            robot.start_episode(1)
            send(robot, 1, range(5), uncertainty=0.1)
            send(robot, 1, [5], uncertainty=0.9)
            assert next_message(alice, "assignment", 10)["robot"] == "r1"
            # The session expires while its page is open: told why, closed, and what it sends goes nowhere.
            ended = next_message(alice, "session", 10)
            assert ended["state"] == "ended" and "expired" in ended["reason"]
            with contextlib.suppress(OSError, ConnectionClosed):
                alice.send(json.dumps({"t": "act", "robot": "r1", "a": [0.5, 0.5], "seq": 3}))
            assert closed_with(alice).code == 1008
        assert robot.state.action is None
        status, _, page = request(console, "GET", "/", headers={"Cookie": cookie})
        assert status == 200 and b'action="/signin"' in page  # the cookie is no good any more

    with console_of(server) as console:
        cookie = sign_in(console, "bob")
        with contextlib.ExitStack() as tabs:
            pages = [tabs.enter_context(page_socket(console, cookie)) for _ in range(MAX_TABS)]
            with pytest.raises(InvalidStatus):  # one session cannot open sockets without end
                page_socket(console, cookie)
            for page in pages:
                assert next_message(page, "session")["state"] == "open"
        sessions = console.console.sessions.values()
        wait_until(lambda: not any(session.tabs for session in sessions), 15, "the pages closed")
        with page_socket(console, cookie) as bob:  # the closed ones made room
            assert next_message(bob, "session")["state"] == "open"
            status, headers, _ = request(
                console, "POST", "/signout", headers={"Cookie": cookie, "Origin": ""}
            )
            assert status == 403  # a sign-out from no page (or another site's) is refused
            status, headers, _ = request(console, "POST", "/signout", headers={"Cookie": cookie})
            assert status == 303 and "Max-Age=0" in headers["set-cookie"]
            assert "HttpOnly" in headers["set-cookie"] and "SameSite=strict" in headers["set-cookie"]
            assert next_message(bob, "session")["reason"] == "signed out"
            assert closed_with(bob).code == 1008
        # The same cookie replayed after the sign-out: no page, no socket.
        status, _, page = request(console, "GET", "/", headers={"Cookie": cookie})
        assert b'action="/signin"' in page
        with pytest.raises(InvalidStatus):
            page_socket(console, cookie)
        with page_socket(console, sign_in(console, "carol")) as carol:
            assert next_message(carol, "session")["state"] == "open"
            again = sign_in(console, "carol")  # the same operator and token again: the older session ends
            assert "signed in again" in next_message(carol, "session")["reason"]
            assert closed_with(carol).code == 1008
        with page_socket(console, again) as carol:
            assert next_message(carol, "session")["operator"] == "carol"


def test_console_sign_in_refuses_an_oversized_body_without_waiting_for_it(make_server):
    server = make_server()
    with console_of(server) as console:
        connection = http.client.HTTPConnection(console.url.split("//")[1], timeout=5)
        connection.putrequest("POST", "/signin")
        for header, value in (
            ("Origin", console.url),
            ("Content-Type", FORM),
            ("Content-Length", str(1 << 30)),
        ):
            connection.putheader(header, value)
        connection.endheaders(b"operator=alice&token=")  # a gigabyte announced, a few bytes sent
        assert connection.getresponse().status == 413
        form = {"Content-Type": FORM}
        status, _, page = request(console, "POST", "/signin", b"operator=a&token=" + b"x" * 10_000, form)
        assert status == 413 and b"too large" in page
        status, _, page = request(console, "POST", "/signin", b"&".join([b"operator=a"] * 9), form)
        assert status == 400 and b"not the sign-in form" in page  # (it was a 500)


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback here")
def test_console_on_ipv6_loopback_prints_a_url_that_works(make_server):
    server = make_server()
    with console_of(server, host="::1") as console:
        assert console.url.startswith("http://[::1]:")
        with page_socket(console, sign_in(console, "alice")) as alice:  # its own origin: [::1]:port
            assert next_message(alice, "session")["operator"] == "alice"


def test_console_answers_a_burst_of_wrong_sign_ins_and_still_signs_in_operators(make_server):
    server = make_server()
    # Wrong tokens, and tokens no gRPC metadata can carry (refused at the console, not timed out).
    tokens = [f"guess-{index}" for index in range(26)] + ["t\u00e9t\u00e9", "a\nb", "a\x00b", "a b"]
    with console_of(server) as console:
        answers = {}

        def wrong(token: str) -> None:
            body = urllib.parse.urlencode({"operator": f"mallory{len(answers)}", "token": token}).encode()
            answers[token] = request(console, "POST", "/signin", body, {"Content-Type": FORM})

        guesses = [threading.Thread(target=wrong, args=(token,)) for token in tokens]
        for guess in guesses:
            guess.start()
        for guess in guesses:
            guess.join(30)
        assert [answers[token][0] for token in tokens] == [401] * len(tokens)
        assert all(b"printable ASCII" in answers[token][2] for token in tokens[26:])
        assert not console.console.sessions
        with page_socket(console, sign_in(console, "alice")) as alice:
            assert next_message(alice, "session")["operator"] == "alice"


def test_console_shows_a_lost_fleet_link_and_ends_a_session_whose_token_was_revoked(tmp_path):
    from fleet.server import ServerThread
    from tests.fleet_harness import TOKENS, free_port
    from tests.test_fleet_server import make_config

    port = free_port()
    server = ServerThread(make_config(tmp_path, port=port, t_T=10_000)).start()
    robot = robot_client(server).start()
    try:
        with console_of(server) as console, page_socket(console, sign_in(console, "alice")) as alice:
            robot.start_episode(1)
            send(robot, 1, range(5), uncertainty=0.1)
            send(robot, 1, [5], uncertainty=0.9)
            assert next_message(alice, "assignment", 10)["robot"] == "r1"
            server.stop()  # the fleet server goes away: the page is told, lets the robot go, cannot drive
            assert next_message(alice, "link", 10)["fleet"] == "down"
            assert next_message(alice, "released")["robot"] == "r1"
            alice.send(json.dumps({"t": "act", "robot": "r1", "a": [0.5, 0.5]}))
            assert "no link to the fleet server" in next_message(alice, "error")["message"]
            alice.send(
                json.dumps({"t": "estop", "robot": "r1"})
            )  # a stop that cannot reach the fleet: said so
            assert "estop: NOT in effect yet" in next_message(alice, "error")["message"]
            # It comes back without the operator's token (revoked): the console ends the session.
            revoked = {**TOKENS, "operator": ["another-operator-token"]}
            server = ServerThread(make_config(tmp_path, port=port, tokens=revoked)).start()
            ended = next_message(alice, "session", 15)
            assert ended["state"] == "ended" and "UNAUTHENTICATED" in ended["reason"]
            assert closed_with(alice).code == 1008
            assert not console.console.sessions
    finally:
        robot.close(1)
        server.stop()


def test_a_robot_stays_stopped_until_everyone_who_stopped_it_releases(make_server, clients):
    server = make_server(t_T=10_000)
    robot = clients(robot_client(server))
    robot.start_episode(1)
    send(robot, 1, [0], uncertainty=0.0)
    wait_until(lambda: robot.state.mode == pb.MODE_AUTONOMOUS, 15, "the robot")
    alice, bob = clients(operator_client(server, "alice")), clients(operator_client(server, "bob"))
    alice.estop("r1")
    bob.estop("r1")
    wait_until(lambda: server.server.fleet.robots["r1"].estop_by == {"alice", "bob"}, 15, "both stops")
    alice.estop("r1", engage=False)  # alice's stop is released, bob's still holds the robot
    error = alice.next_update(15, kind="error").error
    assert "stays stopped" in error.message and "bob" in error.message
    time.sleep(0.2)
    assert robot.state.estop and robot.state.mode == pb.MODE_HOLD
    bob.estop("r1", engage=False)
    wait_until(lambda: not robot.state.estop and robot.state.mode == pb.MODE_AUTONOMOUS, 15, "the release")
    alice.estop("r1")
    bob.estop("r1")
    admin = clients(OperatorClient(server.address, "admin-token", "root"))
    wait_until(lambda: server.server.fleet.robots["r1"].estop_by == {"alice", "bob"}, 15, "both stops")
    admin.estop("r1", engage=False)  # an admin releases them all
    wait_until(lambda: not robot.state.estop, 15, "the admin's release")


@NEEDS_OPENSSL
def test_console_over_tls_marks_its_cookie_secure_and_reaches_a_tls_fleet_server(make_server, tmp_path):
    import ssl

    from websockets.sync.client import connect

    cert, key = self_signed_certificate(tmp_path)
    server = make_server(tls_cert=str(cert), tls_key=str(key))
    tls = dict(tls_cert=str(cert), tls_key=str(key), root_certificates=str(cert))
    with console_of(server, **tls) as console:
        assert console.url.startswith("https://")
        trusted = ssl.create_default_context(cafile=str(cert))
        connection = http.client.HTTPSConnection(console.url.split("//")[1], timeout=10, context=trusted)
        connection.request(
            "POST",
            "/signin",
            body=b"operator=alice&token=operator-token",
            headers={"Origin": console.url, "Content-Type": FORM},
        )
        response = connection.getresponse()
        assert response.status == 303  # the console's own session with the fleet server is over TLS too
        cookie = response.headers["set-cookie"]
        assert response.headers["Strict-Transport-Security"].startswith("max-age=")
        connection.close()
        assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
        url = console.url.replace("https", "wss") + "/ws"
        headers = {"Cookie": cookie.split(";")[0]}
        with connect(url, origin=console.url, additional_headers=headers, ssl=trusted, open_timeout=20) as ws:
            assert next_message(ws, "session")["operator"] == "alice"
        with pytest.raises(InvalidStatus):  # the plain-http origin of the same host is another origin
            connect(url, origin=console.url.replace("https", "http"), additional_headers=headers, ssl=trusted)


def test_an_operator_cannot_sign_in_as_another_or_end_their_session(make_server):
    from tests.fleet_harness import TOKENS

    bound = [
        {"token": "alice-operator-token", "ids": ["alice"]},
        {"token": "mallory-token", "ids": ["mallory"]},
    ]
    server = make_server(tokens={**TOKENS, "operator": bound})
    with (
        console_of(server) as console,
        page_socket(console, sign_in(console, "alice", "alice-operator-token")) as alice,
    ):
        assert next_message(alice, "session")["operator"] == "alice"
        body = b"operator=alice&token=mallory-token"
        status, _, page = request(console, "POST", "/signin", body, {"Content-Type": FORM})
        assert status == 401 and b"may not speak for operator" in page
        alice.send(json.dumps({"t": "note", "robot": "r9", "text": "still mine"}))
        assert "operator 'alice' has no intervention" in next_message(alice, "error")["message"]
        assert [s.operator_id for s in console.console.sessions.values()] == ["alice"]


def fuzzed_value(rng: random.Random, depth: int = 0):
    """A random JSON value of the kinds a hostile page could send (seeded)."""
    atoms = [
        None,
        rng.random() < 0.5,
        rng.randint(-(2**70), 2**70),
        rng.uniform(-1e308, 1e308),
        rng.choice([float("nan"), float("inf"), -0.0, 1e-320, 10**400]),
        rng.choice(["", "r1", "r9", "alice", "\ud800", "a" * 100, "\x00", "estop", "act"]),
    ]
    if depth < 3:
        atoms.append([fuzzed_value(rng, depth + 1) for _ in range(rng.randrange(4))])
        atoms.append(
            {rng.choice(list(FIELDS)): fuzzed_value(rng, depth + 1) for _ in range(rng.randrange(5))}
        )
    return rng.choice(atoms)


def fuzzed_field(rng: random.Random, key: str):
    """Half the time a value near the field's type (so the checks past the first are reached too)."""
    if rng.random() < 0.5:
        return fuzzed_value(rng, 1)
    if key == "a":
        return [
            fuzzed_value(rng, 3) if rng.random() < 0.3 else rng.uniform(-2, 2)
            for _ in range(rng.randrange(6))
        ]
    return FIELDS[key](rng)


FIELDS = {
    "robot": lambda rng: rng.choice(["r1", "r9", "", "\ud800", "r1\x00", "a" * 65]),
    "a": None,  # fuzzed_field's own
    "seq": lambda rng: rng.choice([0, 7, -1, 2**62, 10**30, 1.5, True]),
    "frame_seq": lambda rng: rng.choice([0, 7, -1, 2**62, 10**30, 1.5, True]),
    "frame_age_ms": lambda rng: rng.choice([0, 12.5, -1, 1e308, 10**400, True]),
    "engage": lambda rng: rng.choice([True, False, 0, 1, "yes", None]),
    "text": lambda rng: rng.choice(["a note", "", "\ud800", "\udfff\ud800", "x" * 3000]),
}
KINDS = ["act", "estop", "release", "reset", "discard", "note", "pick", "other"]


def test_console_says_it_cannot_drive_a_robot_with_another_action_size(make_server, clients):
    """RobotStatus.action_dim reaches the page; an action of another size (the page's 4-D Cartesian delta
    for a robot taking 2 values) is refused by the console in one line naming both sizes, not sent."""
    server = make_server(t_T=10_000, teleop_watchdog_s=10.0)
    robot = clients(robot_client(server))
    with console_of(server) as console, page_socket(console, sign_in(console, "alice")) as alice:
        robot.start_episode(1)
        send(robot, 1, range(5), uncertainty=0.1)
        send(robot, 1, [5], uncertainty=0.9)
        assert next_message(alice, "assignment", 10)["robot"] == "r1"
        view = next_message(alice, "fleet", 10)
        assert [entry["action_dim"] for entry in view["robots"] if entry["robot"] == "r1"] == [2]
        alice.send(json.dumps({"t": "act", "robot": "r1", "a": [0.1, 0.0, 0.0, 1.0], "seq": 3}))
        error = next_message(alice, "error")["message"]
        assert "r1 takes 2-D actions and the console drives 4-D ones" in error
        alice.send(json.dumps({"t": "act", "robot": "r1", "a": [0.25, 0.5], "seq": 4}))
        wait_until(lambda: robot.state.action_seq == 4, 15, "an action of the robot's size")


def test_console_socket_survives_a_seeded_fuzz_of_page_messages(make_server, clients):
    server = make_server(t_T=10_000, teleop_watchdog_s=10.0)
    robot = clients(robot_client(server))
    robot.start_episode(1)
    send(robot, 1, [0], uncertainty=0.0)
    rng = random.Random(11)
    with console_of(server) as console, page_socket(console, sign_in(console, "alice")) as alice:
        for index in range(200):
            keys = rng.sample(list(FIELDS), rng.randrange(len(FIELDS) + 1))
            fields = {key: fuzzed_field(rng, key) for key in keys}
            alice.send(json.dumps({"t": rng.choice(KINDS), **fields}))
            if index % 80 == 79:
                time.sleep(0.8)  # within the page's allowance: every message is handled, none dropped
        time.sleep(0.8)
        alice.send(json.dumps({"t": "launch"}))
        answers = []
        while "launch" not in (answer := next_message(alice, "error", 10)["message"]):
            answers.append(answer)
        assert len(answers) > 100 and not any("could not handle" in answer for answer in answers)
