"""What the console's browser tests and its latency benchmark share: pybullet robots with cameras driving
the real robot agent against a live fleet server, Debian's Chromium under Playwright, sign-in, and a
stubbed gamepad (the browser's Gamepad API, replaced by one the test moves)."""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from fleet.agent import OPERATOR, RobotAgent, observation_spec
from fleet.client import RobotClient
from sim.tasks import make_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
CONTROL_HZ = 10.0
GRIPPER = 3

# navigator.getGamepads() returns one pad the test sets through window.__pad (axes, pressed buttons).
FAKE_GAMEPAD = """
window.__pad = {axes: [0, 0, 0, 0], pressed: []};
navigator.getGamepads = () => [{
  id: "stub", index: 0, connected: true, mapping: "standard", timestamp: performance.now(),
  axes: window.__pad.axes.slice(),
  buttons: Array.from({length: 17}, (_, i) => ({pressed: window.__pad.pressed.includes(i),
                                                value: window.__pad.pressed.includes(i) ? 1 : 0})),
}];
"""


class StillPolicy:
    """A robot policy that stays still (the test decides when it needs help, through `uncertainty`)."""

    version = "console-test"

    def __init__(self):
        self.uncertainty = 0.0

    def reset(self) -> None:
        pass

    def act(self, obs, goal=None) -> np.ndarray:
        return np.array([0.0, 0.0, 0.0, -1.0], np.float32)


class ReachPolicy(StillPolicy):
    """Goes straight for the reach goal: a robot that succeeds on its own (the console's rounds fill)."""

    version = "console-reach"

    def act(self, obs, goal=None) -> np.ndarray:
        step = np.clip((np.asarray(goal, np.float32) - obs["ee_pos"]) / 0.03, -1.0, 1.0)
        return np.append(step, -1.0).astype(np.float32)


@dataclass
class Applied:
    """One control tick of a robot: when (time.time()), what controlled it, the operator action applied."""

    at: float  # after the simulation stepped
    control: str
    operator_action_seq: int
    ee_pos: np.ndarray
    decided: float = 0.0  # before the agent chose the control (a command heard later cannot count here)


@dataclass
class LiveRobot:
    robot_id: str
    env: object
    agent: RobotAgent
    policy: StillPolicy
    obs: dict | None = None
    info: dict = field(default_factory=dict)
    ticks: list[Applied] = field(default_factory=list)
    end_requested: bool = False
    estop_at: float | None = None  # time.time() the robot first heard of a protective stop


class LiveRobots:
    """`count` reach robots with a front camera at CONTROL_HZ in a background thread (the real agent)."""

    def __init__(
        self,
        address: str,
        token: str,
        count: int = 2,
        image_size: int = 96,
        max_steps: int = 3000,
        reachers: int = 0,
    ):
        """`reachers` more robots (after the `count`) run ReachPolicy in 40-step episodes."""
        self.robots: list[LiveRobot] = []
        for index in range(count + reachers):
            reacher = index >= count
            on_command = functools.partial(self._heard, index)
            steps = 40 if reacher else max_steps
            env = make_env("reach", cameras=["front"], image_size=image_size, max_steps=steps, seed=index)
            obs, _ = env.reset(seed=index)
            policy = ReachPolicy() if reacher else StillPolicy()
            client = RobotClient(
                address,
                token,
                f"robot-{index}",
                "reach",
                observation_spec(obs),
                action_dim=4,
                goal_dim=int(np.asarray(obs["goal"]).size),
                policy_version=policy.version,
                backoff=(0.05, 0.5),
                on_command=on_command,
            )
            agent = RobotAgent(
                client, policy, gripper_index=GRIPPER, camera_key="front_rgb", teleop_timeout_s=0.3
            )
            self.robots.append(LiveRobot(f"robot-{index}", env, agent, policy, obs))
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="live-robots", daemon=True)

    def _heard(self, index: int, command, state) -> None:  # on the robot client's thread
        robot = self.robots[index] if index < len(self.robots) else None
        if robot is not None and command.estop and robot.estop_at is None:
            robot.estop_at = time.time()

    def __getitem__(self, index: int) -> LiveRobot:
        return self.robots[index]

    def start(self) -> LiveRobots:
        for robot in self.robots:
            robot.agent.start()
            robot.agent.begin_episode(robot.obs["goal"])
        self._thread.start()
        return self

    def _run(self) -> None:
        period, next_tick = 1.0 / CONTROL_HZ, time.monotonic()
        while not self._stop.is_set():
            with self._lock:
                for robot in self.robots:
                    self._tick(robot)
            next_tick += period
            delay = next_tick - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                next_tick = time.monotonic()

    def _tick(self, robot: LiveRobot) -> None:
        if robot.end_requested:
            robot.end_requested = False
            robot.agent.end_episode(False, "test_end")
            robot.obs, robot.info = robot.env.reset()
            robot.agent.begin_episode(robot.obs["goal"])
        decided = time.time()
        result = robot.agent.step(robot.obs, robot.info)
        if result.reset:
            robot.obs, robot.info = robot.env.reset()
            robot.agent.begin_episode(robot.obs["goal"])
            return
        robot.obs, _, terminated, truncated, robot.info = robot.env.step(result.action)
        robot.ticks.append(
            Applied(
                time.time(),
                result.control,
                result.operator_action_seq if result.control == OPERATOR else 0,
                np.asarray(robot.obs["ee_pos"], np.float64).copy(),
                decided,
            )
        )
        if terminated or truncated:
            robot.agent.end_episode(
                bool(robot.info.get("success")), "success" if robot.info.get("success") else "timeout"
            )
            robot.obs, robot.info = robot.env.reset()
            robot.agent.begin_episode(robot.obs["goal"])

    def ee_pos(self, index: int) -> np.ndarray:
        with self._lock:
            return np.asarray(self.robots[index].obs["ee_pos"], np.float64).copy()

    def end_episode(self, index: int) -> None:
        """Have robot `index` end its episode at its next tick (so the store commits it)."""
        self.robots[index].end_requested = True

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for robot in self.robots:
            robot.agent.close(2)
            robot.env.close()


@contextlib.contextmanager
def chromium():
    """Playwright's Chromium API on Debian's Chromium (no browser download)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def sign_in(page, url: str, operator: str, token: str):
    """Sign in through the form; returns the response of the form post."""
    page.goto(url)
    page.fill("#operator", operator)
    page.fill("#token", token)
    with page.expect_navigation() as navigation:
        page.click("button[type=submit]")
    return navigation.value


def wait_for(predicate, timeout: float, what: str, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


# ---------------------------------------------------------------------- connection-level attackers


SLOWLORIS_HEAD = b"GET / HTTP/1.1\r\nHost: console\r\n"  # then a header byte now and then, never the end
UNSIGNED_UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: console\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


class Attackers:
    """Raw sockets against the console from loopback addresses other than 127.0.0.1 (Linux routes all of
    127/8 to lo), so an operator on 127.0.0.1 is another client: `first` is sent at once, then one byte of
    `dribble` per `drip()` (a slowloris). Counts what the console answered and which sockets it closed."""

    def __init__(self, url: str, count: int, first: bytes = b"", dribble: bool = False, addresses: int = 1):
        hostport = url.split("//")[1]
        self.target = (hostport.rsplit(":", 1)[0], int(hostport.rsplit(":", 1)[1]))
        self.count, self.first, self.dribble, self.addresses = count, first, dribble, addresses
        self.sockets: list[socket.socket] = []
        self.answers: dict[socket.socket, bytes] = {}
        self.closed: set[socket.socket] = set()
        self.refused_connects = 0
        self.timeout = 10.0

    def open(self, timeout: float = 10.0) -> Attackers:
        self.timeout = timeout
        for n in range(self.count):
            self._connect(n)
        return self

    def _connect(self, n: int) -> None:
        s = socket.socket()
        s.bind((f"127.0.0.{2 + n % self.addresses}", 0))
        s.settimeout(self.timeout)
        try:
            s.connect(self.target)
            if self.first:
                s.sendall(self.first)
        except OSError:  # the console's backlog is full (it cannot accept) or it reset us
            self.refused_connects += 1
            s.close()
            return
        s.setblocking(False)
        self.sockets.append(s)

    def reconnect(self) -> None:
        """A sustained attack: as many new sockets as the console closed (the total stays `count`)."""
        for n in range(self.count - self.still_open):
            self._connect(n)

    def drip(self) -> None:
        """Read what came back, note closed sockets, send the still-open ones one more header byte."""
        for s in self.sockets:
            if s in self.closed:
                continue
            try:
                while data := s.recv(65536):
                    self.answers[s] = self.answers.get(s, b"") + data
                self.closed.add(s)  # b"": the console closed it
                continue
            except BlockingIOError:
                pass
            except OSError:
                self.closed.add(s)
                continue
            if self.dribble:
                with contextlib.suppress(OSError):
                    s.send(b"x")

    def statuses(self) -> Counter:
        """HTTP status -> how many sockets got it ("" for none)."""
        return Counter(self.answers.get(s, b"")[9:12].decode() for s in self.sockets)

    @property
    def still_open(self) -> int:
        return len(self.sockets) - len(self.closed)

    def close(self) -> None:
        for s in self.sockets:
            s.close()


def console_process(*settings: str) -> tuple[subprocess.Popen, list[str]]:
    """`flotilla console SETTINGS...` in its own process, its output read up to the line with its URL
    (the lines so far are returned; the URL is the last line's third word)."""
    console = subprocess.Popen(
        [sys.executable, "-m", "flotilla.cli", "console", *settings],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    lines = []
    for line in console.stdout:
        lines.append(line)
        if line.startswith("flotilla console: http"):
            break
    return console, lines
