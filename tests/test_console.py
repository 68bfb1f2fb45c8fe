"""The teleoperator console in a real browser (Debian's Chromium under Playwright) against a live fleet
server with pybullet robots: sign-in, the fleet and the queue, takeover and driving (keyboard, a stubbed
gamepad), hand-back, what the store records, discard, protective stops, a second operator, the watchdog
when the tab closes. One fleet, one console and one browser for the module; each test its own tabs."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from fleet.client import OperatorClient
from fleet.labels import ControlLabel
from fleet.server import ServerThread
from fleet.store import EpisodeStore, StoreCorruptError
from tests.console_harness import FAKE_GAMEPAD, LiveRobots, chromium, sign_in, wait_for
from tests.test_fleet_server import make_config

pytest.importorskip("playwright")
pytest.importorskip("starlette")
if not Path("/usr/bin/chromium").exists():
    pytest.skip("Debian's chromium is not installed (scripts/setup.sh installs it)", allow_module_level=True)

from teleop.app import ConsoleThread  # noqa: E402
from teleop.config import ConsoleConfig  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# The README's screenshot; refreshed only on request (FLOTILLA_SCREENSHOT=1), so a test run leaves the tree clean.
SCREENSHOT = ROOT / "docs" / "console.png"
WATCHDOG_S = 0.12
TICK_S = 0.1


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("console")
    server = ServerThread(
        make_config(
            tmp,
            t_T=5,
            allocation={
                "rule": "cur",
                "tick_hz": 10,
                "t_T": 5,
                "t_R": 3,
                "uncertainty_threshold": 0.5,
                "risk_threshold": 0.5,
            },
            teleop_watchdog_s=WATCHDOG_S,
        )
    ).start()
    robots = LiveRobots(server.address, "robot-token", count=2, reachers=1).start()  # robot-2 fills rounds
    console = ConsoleThread(ConsoleConfig(server=server.address, port=0, session_grace_s=0.5)).start()
    with chromium() as browser:
        yield {
            "server": server,
            "robots": robots,
            "console": console,
            "browser": browser,
            "store": tmp / "fleet.zarr",
        }
    console.stop()
    robots.close()
    server.stop()


@pytest.fixture(autouse=True)
def fresh_fleet(fleet):
    """Each test starts from a calm fleet: its tabs closed, no robot needing help, no stop latched."""
    fleet["contexts"] = []
    yield
    for context in fleet["contexts"]:
        context.close()
    for robot in fleet["robots"].robots:
        robot.policy.uncertainty = 0.0
    with OperatorClient(fleet["server"].address, "admin-token", "cleanup") as admin:
        for robot in fleet["robots"].robots:
            admin.estop(robot.robot_id, engage=False)
        admin.estop("", engage=False)
        time.sleep(0.3)
    time.sleep(1.0)  # the console ends closed tabs' fleet sessions; the allocator releases their robots


def open_console(fleet, operator="alice", gamepad=False, viewport=(1280, 800)):
    # bypass_csp: Playwright's wait_for_function evaluates strings, which the console's CSP forbids.
    context = fleet["browser"].new_context(
        viewport={"width": viewport[0], "height": viewport[1]}, bypass_csp=True
    )
    fleet["contexts"].append(context)
    if gamepad:
        context.add_init_script(FAKE_GAMEPAD)
    page = context.new_page()
    problems = []
    page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: problems.append(str(error)))
    response = sign_in(page, fleet["console"].url, operator, "operator-token")
    assert response.status == 200
    page.wait_for_selector("#link.ok")
    return context, page, problems


def stats(page, key):
    return page.evaluate(f"window.flotillaStats.{key}")


def assigned_to(page, robot):
    page.wait_for_function(f"window.flotillaStats.assigned === {json.dumps(robot)}", timeout=10_000)


def need_help(fleet, index, needed=True):
    fleet["robots"][index].policy.uncertainty = 0.9 if needed else 0.0


def take_over_and_drive(fleet, operator, index, key, seconds=0.5):
    """Robot `index` needs help, `operator` gets it and drives it with `key` held down (still held)."""
    context, page, _ = open_console(fleet, operator)
    need_help(fleet, index)
    assigned_to(page, f"robot-{index}")
    page.keyboard.down(key)
    wait_for(lambda: fleet["robots"][index].ticks[-1].control == "operator", 5, "the robot driven")
    time.sleep(seconds)
    return context, page


def first_tick(robot, since: float, control: str | None = None):
    """The robot's first control tick at or after `since` with `control` (None: any but the operator's)."""
    return next(
        t
        for t in robot.ticks
        if t.at >= since and (t.control == control if control else t.control != "operator")
    )


def test_sign_in_refuses_a_wrong_token_and_keeps_the_token_from_the_page(fleet):
    context = fleet["browser"].new_context()
    page = context.new_page()
    refused = sign_in(page, fleet["console"].url, "mallory", "not-a-token")
    assert refused.status == 401 and "UNAUTHENTICATED" in page.inner_text(".problem")
    assert not context.cookies()
    response = sign_in(page, fleet["console"].url, "carol", "operator-token")
    assert response.status == 200 and page.title() == "Flotilla console"
    (cookie,) = context.cookies()
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and "operator-token" not in cookie["value"]
    page.wait_for_selector("#link.ok")
    assert page.evaluate("document.cookie") == ""  # HttpOnly: no script can read the session
    assert "operator-token" not in page.content()
    csp = response.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    context.close()


def test_websocket_refuses_another_origin_and_no_session(fleet):
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    context, page, _ = open_console(fleet, "dave")
    cookie = context.cookies()[0]
    url = fleet["console"].url.replace("http", "ws") + "/ws"
    cookie_header = {"Cookie": f"{cookie['name']}={cookie['value']}"}
    with pytest.raises(InvalidStatus) as foreign:
        connect(url, origin="http://evil.example", additional_headers=cookie_header, open_timeout=5)
    assert foreign.value.response.status_code == 403
    with pytest.raises(InvalidStatus):
        connect(url, origin=fleet["console"].url, open_timeout=5)  # right origin, no session
    with connect(url, origin=fleet["console"].url, additional_headers=cookie_header, open_timeout=5) as ws:
        assert json.loads(ws.recv(5))["t"] == "session"
    context.close()


def test_take_over_drive_with_keyboard_and_gamepad_hand_back_and_discard(fleet):
    robots = fleet["robots"]
    context, page, problems = open_console(fleet, "alice", gamepad=True)
    need_help(fleet, 0)
    page.wait_for_selector("#queue tbody tr[data-robot=robot-0]")
    assert "uncertainty" in page.inner_text("#queue tbody tr[data-robot=robot-0]")
    assigned_to(page, "robot-0")
    page.wait_for_function("window.flotillaStats.frames > 3", timeout=10_000)  # the live camera

    # Keyboard: hold the up arrow for a second -> +x (1.0 = 3 cm per 0.1 s step).
    before = robots.ee_pos(0)
    page.keyboard.down("ArrowUp")
    time.sleep(1.0)
    page.keyboard.up("ArrowUp")
    time.sleep(0.4)
    moved = robots.ee_pos(0) - before
    assert moved[0] > 0.05 and abs(moved[1]) < 0.3 * moved[0], moved  # x, the way it was driven
    # Let go: nothing more is sent and the robot holds (the server's watchdog).
    still = robots.ee_pos(0)
    time.sleep(0.5)
    assert np.abs(robots.ee_pos(0) - still).max() < 0.005

    # The stubbed gamepad: deadman (A) held, left stick to the left -> +y.
    before = robots.ee_pos(0)
    page.evaluate("window.__pad.pressed = [0]; window.__pad.axes = [-1, 0, 0, 0]")
    time.sleep(1.0)
    page.evaluate("window.__pad.pressed = []; window.__pad.axes = [0, 0, 0, 0]")
    time.sleep(0.4)
    moved = robots.ee_pos(0) - before
    assert moved[1] > 0.05 and abs(moved[0]) < 0.3 * moved[1], moved

    # The screenshot for the README: a takeover in progress, at 1280x800.
    shot = page.screenshot(path=str(SCREENSHOT) if os.environ.get("FLOTILLA_SCREENSHOT") == "1" else None)
    assert shot[:8] == b"\x89PNG\r\n\x1a\n"

    page.click("#release")  # hand back (honoured at the next tick: t_T is served)
    need_help(fleet, 0, False)
    page.wait_for_function("window.flotillaStats.assigned === null", timeout=10_000)
    page.click("#discard")
    page.wait_for_function("window.flotillaStats.notices.some(n => n.request === 'discard')", timeout=5000)
    page.fill("#note", "drove around the goal marker")
    page.click("#note-form button")
    page.wait_for_function("window.flotillaStats.notices.some(n => n.request === 'note')", timeout=5000)
    assert not problems, problems

    # The store: intervention steps by alice, each with the frame she was looking at; discarded and noted.
    robots.end_episode(0)
    store_path = fleet["store"]

    def alice_episode():
        # Opening the store while the server commits (robot-2 ends an episode every second or so) can see
        # episode_ends grown past arrays it read a moment before: try again (the store's reader race).
        try:
            with EpisodeStore.open(store_path) as store:
                for index in range(store.num_episodes):
                    meta = store.episode_meta(index)
                    if meta.robot_id == "robot-0" and meta.extra.get("notes"):
                        return store.episode(index, ["label"])["label"], meta.extra
        except StoreCorruptError:
            return None
        return None

    labels, extra = wait_for(alice_episode, 15, "robot-0's episode with alice's intervention in the store")
    # One takeover; two on an overloaded machine, where the robot's session can go silent for longer than
    # robot_silence_s (it then comes back and is assigned to alice again).
    mine = [i for i in extra["interventions"] if i["operator_id"] == "alice"]
    assert 1 <= len(mine) <= 2, mine
    steps = labels[mine[0]["start"] : mine[-1]["end"]]
    assert np.count_nonzero(steps == ControlLabel.INTERVENTION) >= 15
    seqs = [s for intervention in mine for s in intervention["frame_seqs"] if s]
    assert len(seqs) >= 15 and seqs == sorted(seqs)  # frames the actions answered, in order
    for intervention in mine:
        assert all(0 <= step < intervention["end"] for step in intervention["frame_steps"] if step >= 0)
    assert (
        sum(i["frame_age_ms"]["n"] for i in mine) >= 15 and sum(i["round_trip_ms"]["n"] for i in mine) >= 10
    )
    (discarded,) = extra["discarded"]  # her last correction
    assert (discarded["operator_id"], discarded["start"], discarded["end"]) == (
        "alice",
        mine[-1]["start"],
        mine[-1]["end"],
    )
    assert extra["notes"][0]["text"] == "drove around the goal marker"
    context.close()


def test_protective_stop_holds_within_a_tick_and_a_second_operator_cannot_move_the_robot(fleet):
    robots = fleet["robots"]
    robots[1].estop_at = None
    alice, alice_page = take_over_and_drive(fleet, "alice", 1, "ArrowLeft", seconds=0.1)
    alice_page.keyboard.up("ArrowLeft")
    bob, bob_page, _ = open_console(fleet, "bob")
    bob_page.wait_for_selector("#fleet tbody tr[data-robot=robot-1]")
    # bob is not assigned robot-1: a forged action from his page is refused by the fleet server.
    before = robots.ee_pos(1)
    for seq in range(1, 11):
        bob_page.evaluate(
            "seq => window.flotillaSend({t: 'act', robot: 'robot-1', a: [1, 0, 0, -1], seq})", seq
        )
        time.sleep(0.05)
    bob_page.wait_for_function(
        "window.flotillaStats.errors.some(e => e.request === 'action' && e.message.includes('not assigned'))",
        timeout=5000,
    )
    assert np.abs(robots.ee_pos(1) - before).max() < 0.005

    # alice drives; her protective stop (the robot's) holds it within one control tick of reaching it.
    alice_page.keyboard.down("ArrowLeft")
    time.sleep(0.5)
    alice_page.click("#robot-stop")
    alice_page.keyboard.up("ArrowLeft")
    # The ticks whose control was chosen after the robot heard the stop (one under way then may still
    # finish after it, on a loaded machine).
    wait_for(lambda: robots[1].estop_at and robots[1].ticks[-1].decided > robots[1].estop_at, 5, "the stop")
    after = [t for t in robots[1].ticks if t.decided > robots[1].estop_at]
    assert (
        after[0].at - robots[1].estop_at <= TICK_S + 0.05
    )  # its next tick (a late tick on a loaded machine)
    assert all(t.control == "hold_estop" for t in after)
    # Stopped, the robot needs no human: it leaves alice. She releases her stop from the fleet table.
    need_help(fleet, 1, False)
    alice_page.wait_for_function("window.flotillaStats.assigned === null", timeout=10_000)
    alice_page.click("#fleet tbody tr[data-robot=robot-1] button.release-stop")
    wait_for(lambda: robots[1].ticks[-1].control == "policy", 5, "robot-1 back under its policy")
    alice.close()
    bob.close()


def test_closing_the_tab_mid_takeover_holds_the_robot_within_the_watchdog(fleet):
    robots = fleet["robots"]
    context, page = take_over_and_drive(fleet, "erin", 0, "ArrowDown")
    closed_at = time.time()
    context.close()  # mid-takeover, the key still down
    wait_for(lambda: robots[0].ticks[-1].control != "operator", 5, "the robot to hold")
    assert first_tick(robots[0], closed_at).at - closed_at <= WATCHDOG_S + TICK_S + 0.05
    need_help(fleet, 0, False)


def test_the_page_fits_a_tablet_and_works_from_the_keyboard(fleet):
    context = fleet["browser"].new_context(
        viewport={"width": 820, "height": 1180}, has_touch=True, is_mobile=True, bypass_csp=True
    )
    page = context.new_page()
    sign_in(page, fleet["console"].url, "frank", "operator-token")
    page.wait_for_selector("#link.ok")
    page.wait_for_selector("#fleet tbody tr")
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")  # no sideways scroll
    for selector in ("#camera", "#pad button[data-axis='0'][data-dir='1']", "#release", "#fleet-stop"):
        assert page.is_visible(selector), selector
    # Every control is a button or a form field: Tab reaches them in order, Enter presses them.
    focused = set()
    for _ in range(40):
        page.keyboard.press("Tab")
        focused.add(page.evaluate("document.activeElement.id || document.activeElement.textContent.trim()"))
    assert {"fleet-stop", "discard", "note"} <= focused, focused
    page.focus("#fleet-stop")
    page.keyboard.press("Enter")  # the whole fleet's protective stop, from the keyboard
    wait_for(lambda: fleet["server"].server.fleet.fleet_estop, 5, "the fleet-wide stop")
    assert page.evaluate("window.flotillaStats.errors.length") == 0
    admin = fleet["browser"].new_context(bypass_csp=True)
    admin_page = admin.new_page()
    sign_in(admin_page, fleet["console"].url, "root", "admin-token")  # only an admin releases it
    admin_page.wait_for_selector("#link.ok")
    page.click("#fleet-release")
    page.wait_for_function("window.flotillaStats.errors.some(e => e.message.includes('needs an admin'))")
    admin_page.click("#fleet-release")
    wait_for(lambda: not fleet["server"].server.fleet.fleet_estop, 5, "the release by an admin")
    admin.close()
    context.close()


def test_a_fleet_of_twenty_robots_without_cameras_and_one_going_offline_mid_takeover(fleet, tmp_path):
    from tests.test_fleet_server import INTERVENTION, obs, robot_client, send

    server = ServerThread(make_config(tmp_path, t_T=10_000, teleop_watchdog_s=10.0)).start()
    console = ConsoleThread(ConsoleConfig(server=server.address, port=0)).start()
    robots = [robot_client(server, f"r{index:02d}").start() for index in range(20)]  # no camera
    try:
        for robot in robots:
            robot.start_episode(1)
            send(robot, 1, [0], uncertainty=0.0)
        context = fleet["browser"].new_context(viewport={"width": 1280, "height": 800}, bypass_csp=True)
        fleet["contexts"].append(context)
        page = context.new_page()
        problems = []
        page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: problems.append(str(error)))
        sign_in(page, console.url, "alice", "operator-token")
        page.wait_for_function("document.querySelectorAll('#fleet tbody tr').length === 20", timeout=10_000)
        for robot in robots[:5]:
            send(robot, 1, [1], uncertainty=0.9)
        page.wait_for_function("window.flotillaStats.assigned !== null", timeout=10_000)
        page.wait_for_function("document.querySelectorAll('#queue tbody tr').length === 5", timeout=10_000)
        mine = page.evaluate("window.flotillaStats.assigned")
        robot = robots[int(mine[1:])]
        robot.step(1, 2, obs(2), [0.0, 0.0], INTERVENTION, operator_id="alice")  # a frame without an image
        page.wait_for_function("window.flotillaStats.frames > 0", timeout=10_000)
        robot.close()  # offline in the middle of the takeover: the page lets it go and shows it offline
        page.wait_for_function(f"window.flotillaStats.assigned !== {json.dumps(mine)}", timeout=10_000)
        row = f"#fleet tbody tr[data-robot={mine}]"
        page.wait_for_function(
            f"document.querySelector('{row}').textContent.includes('offline')", timeout=10_000
        )
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        assert not problems, problems
    finally:
        console.stop()
        for robot in robots:
            robot.close(1)
        server.stop()


def test_the_page_shows_a_lost_fleet_server_stops_driving_and_signs_out_when_the_token_is_revoked(
    fleet, tmp_path
):
    from tests.fleet_harness import TOKENS, free_port
    from tests.test_fleet_server import robot_client, send

    port = free_port()
    server = ServerThread(make_config(tmp_path, port=port, t_T=10_000, teleop_watchdog_s=10.0)).start()
    console = ConsoleThread(ConsoleConfig(server=server.address, port=0)).start()
    robot = robot_client(server).start()
    try:
        context = fleet["browser"].new_context(bypass_csp=True)
        fleet["contexts"].append(context)
        page = context.new_page()
        sign_in(page, console.url, "alice", "operator-token")
        page.wait_for_selector("#link.ok")
        robot.start_episode(1)
        send(robot, 1, range(5), uncertainty=0.1)
        send(robot, 1, [5], uncertainty=0.9)
        assigned_to(page, "r1")
        server.stop()
        page.wait_for_function(
            "document.getElementById('link').textContent.includes('fleet server unreachable')"
        )
        assert page.evaluate("document.getElementById('link').classList.contains('bad')")
        assert page.evaluate("window.flotillaStats.assigned") is None  # the robot left it: it holds
        sent = stats(page, "sent")
        page.keyboard.down("ArrowUp")  # nothing to drive, nothing sent
        time.sleep(0.3)
        page.keyboard.up("ArrowUp")
        assert stats(page, "sent") == sent
        revoked = {**TOKENS, "operator": ["another-operator-token"]}
        server = ServerThread(make_config(tmp_path, port=port, tokens=revoked)).start()
        page.wait_for_function("document.getElementById('link').textContent.includes('UNAUTHENTICATED')")
        page.wait_for_selector("form[action='/signin']", timeout=10_000)  # back at the sign-in page
    finally:
        console.stop()
        robot.close(1)
        server.stop()
