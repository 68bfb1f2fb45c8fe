"""The operator console's latency on loopback, in a real browser (Debian's Chromium under Playwright),
against a live fleet server with a pybullet robot at 10 Hz (96x96 front camera):

- frame age at render: the robot's step timestamp (camera frame taken) -> the page has drawn it;
- key event -> robot applies it: the browser's keydown timestamp -> the first control tick that applies
  that key's action (or a later one of the same key), on the robot (same clock: one machine);
- input stops -> robot holds: the deadman released (keyup), the tab hidden, the network gone (the
  page's socket cut), the tab closed -> the robot's first control tick that holds.

    python -m benchmarks.console_latency [--presses 30] [--seconds 20]

Goals (issue 11): frame age p95 <= 50 ms; key -> applied <= one control tick + 20 ms (120 ms);
input stops -> hold <= 250 ms (the fleet server's watchdog, not the page).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import machine_line, print_table
from fleet.server import ServerThread
from tests.console_harness import LiveRobots, chromium, sign_in, wait_for
from tests.test_fleet_server import make_config

WATCHDOG_S = 0.12


def percentiles(values) -> tuple[float, float, float]:
    values = np.asarray(values, np.float64)
    return float(np.percentile(values, 50)), float(np.percentile(values, 95)), float(values.max())


def first_tick_after(robot, t0: float, predicate) -> float | None:
    for tick in list(robot.ticks):
        if tick.at >= t0 and predicate(tick):
            return tick.at
    return None


def drive_session(fleet, robots, page, robot_index: int):
    robots[robot_index].policy.uncertainty = 0.9
    page.wait_for_function(f"window.flotillaStats.assigned === 'robot-{robot_index}'", timeout=15_000)
    page.wait_for_function("window.flotillaStats.frames > 5", timeout=15_000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presses", type=int, default=30, help="key presses timed")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds of frames timed")
    parser.add_argument("--stops", type=int, default=5, help="repetitions of each way input stops")
    args = parser.parse_args()
    from teleop.app import ConsoleThread
    from teleop.config import ConsoleConfig

    tmp = Path(tempfile.mkdtemp(prefix="console_latency_"))
    server = ServerThread(
        make_config(
            tmp,
            allocation={"rule": "cur", "tick_hz": 10, "t_T": 5, "uncertainty_threshold": 0.5},
            teleop_watchdog_s=WATCHDOG_S,
        )
    ).start()
    robots = LiveRobots(server.address, "robot-token", count=1, max_steps=100_000).start()
    console = ConsoleThread(ConsoleConfig(server=server.address, port=0)).start()
    robot = robots[0]
    rows, holds = [], {}
    try:
        with chromium() as browser:
            context = browser.new_context(viewport={"width": 1280, "height": 800}, bypass_csp=True)
            page = context.new_page()
            sign_in(page, console.url, "bench", "operator-token")
            drive_session(None, robots, page, 0)

            # Frame age while driving back and forth.
            page.evaluate("window.flotillaStats.frameAges = []")
            end = time.monotonic() + args.seconds
            direction = ["ArrowLeft", "ArrowRight"]
            while time.monotonic() < end:
                key = direction[0]
                page.keyboard.down(key)
                time.sleep(0.5)
                page.keyboard.up(key)
                direction.reverse()
            ages = page.evaluate("window.flotillaStats.frameAges")
            rows.append(["frame age at render", len(ages), *percentiles(ages)])

            # Key event -> the robot applies it; and deadman released -> the robot holds.
            page.evaluate("window.flotillaStats.keyEvents = []")
            released = []
            for index in range(args.presses):
                key = "ArrowLeft" if index % 2 else "ArrowRight"
                page.keyboard.down(key)
                time.sleep(0.3)
                page.keyboard.up(key)
                released.append(time.time())
                time.sleep(0.45)  # the robot holds before the next press
            events = page.evaluate("window.flotillaStats.keyEvents")
            delays = []
            for event in events:
                seq, at = event["seq"], event["t"] / 1000.0
                applied = first_tick_after(robot, at, lambda tick, seq=seq: tick.operator_action_seq >= seq)
                if applied is not None:
                    delays.append(1000.0 * (applied - at))
            rows.append(["key event -> robot applies", len(delays), *percentiles(delays)])
            holds["deadman released"] = [
                1000.0 * (first_tick_after(robot, t0, lambda tick: tick.control != "operator") - t0)
                for t0 in released
            ]

            # Tab hidden: another tab in front (the page stops sending; the watchdog holds).
            hidden = []
            for _ in range(args.stops):
                page.bring_to_front()
                page.keyboard.down("ArrowUp")
                time.sleep(0.4)
                other = context.new_page()
                t0 = time.time()
                other.bring_to_front()
                page.keyboard.up("ArrowUp")
                wait_for(
                    lambda t0=t0: first_tick_after(robot, t0, lambda t: t.control != "operator"), 5, "hold"
                )
                hidden.append(1000.0 * (first_tick_after(robot, t0, lambda t: t.control != "operator") - t0))
                other.close()
            holds["tab hidden"] = hidden

            # Network gone: the page's socket is cut mid-drive (the key still down).
            cut = []
            for _ in range(args.stops):
                page.keyboard.down("ArrowDown")
                time.sleep(0.4)
                t0 = time.time()
                context.set_offline(True)
                wait_for(
                    lambda t0=t0: first_tick_after(robot, t0, lambda t: t.control != "operator"), 5, "hold"
                )
                cut.append(1000.0 * (first_tick_after(robot, t0, lambda t: t.control != "operator") - t0))
                page.keyboard.up("ArrowDown")
                context.set_offline(False)
                page.wait_for_selector("#link.ok", timeout=15_000)
                page.wait_for_function("window.flotillaStats.assigned === 'robot-0'", timeout=15_000)
            holds["network gone"] = cut

            # Tab closed mid-drive (a new tab each time; the console session survives a reload).
            closed = []
            for _ in range(args.stops):
                tab = context.new_page()
                tab.goto(console.url)
                tab.wait_for_function("window.flotillaStats.assigned === 'robot-0'", timeout=15_000)
                tab.keyboard.down("ArrowUp")
                time.sleep(0.4)
                t0 = time.time()
                tab.close()
                wait_for(
                    lambda t0=t0: first_tick_after(robot, t0, lambda t: t.control != "operator"), 5, "hold"
                )
                closed.append(1000.0 * (first_tick_after(robot, t0, lambda t: t.control != "operator") - t0))
            holds["tab closed"] = closed
            context.close()
    finally:
        console.stop()
        robots.close()
        server.stop()
    for way, values in holds.items():
        rows.append([f"{way} -> robot holds", len(values), *percentiles(values)])
    print(machine_line(), f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}", sep="; ")
    print(f"loopback; robot 10 Hz reach with a 96x96 front camera; teleop_watchdog_s={WATCHDOG_S}")
    print_table(["measure", "n", "p50 ms", "p95 ms", "max ms"], rows)


if __name__ == "__main__":
    main()
