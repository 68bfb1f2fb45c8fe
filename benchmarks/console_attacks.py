"""The operator console under connection-level attacks, on loopback: a real fleet server with one robot,
`flotilla console` in its own process (with the file-descriptor limits a systemd service gets by default,
soft 1024, hard 524288), a signed-in operator (alice, 127.0.0.1) with her page's socket open, and raw-socket attackers from
127.0.0.2+ (tests/console_harness.Attackers). Per attack:

- the console's open file descriptors and RSS (peaks), the attack's sockets still open after `--hold`
  seconds, what the console answered them;
- at once (the attack's sockets open) and after the hold: whether another operator can still load the
  console (GET / from 127.0.0.1) and how long it took, and alice's protective stop: her page sends it ->
  the robot is stopped (latency), then she releases it.

    python -m benchmarks.console_attacks [--count 1500] [--hold 8] [--root DIR]

`--root` runs the console from another checkout (`git archive <commit> | tar -x -C DIR`) to measure an
older version against the same attacks.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine_line, print_table
from fleet.server import ServerThread
from tests.console_harness import SLOWLORIS_HEAD, UNSIGNED_UPGRADE, Attackers, wait_for
from tests.test_fleet_server import make_config, robot_client, send

ROOT = Path(__file__).resolve().parent.parent
ATTACKS = {  # name -> Attackers settings
    "slowloris (1 address)": dict(first=SLOWLORIS_HEAD, dribble=True),
    "idle sockets (1 address)": dict(),
    "unsigned WebSocket upgrades (1 address)": dict(first=UNSIGNED_UPGRADE),
    "slowloris (64 addresses)": dict(first=SLOWLORIS_HEAD, dribble=True, addresses=64),
    "sustained slowloris (64 addresses, reconnecting)": dict(
        first=SLOWLORIS_HEAD, dribble=True, addresses=64, sustained=True
    ),
}


def start_console(server_address: str, root: Path, nofile: int, log: Path) -> tuple[subprocess.Popen, str]:
    """`flotilla console` logging to `log` (a file: a pipe nobody reads would block its loop in a flood)."""
    console = subprocess.Popen(
        [sys.executable, "-m", "flotilla.cli", "console", f"server={server_address}", "port=0"],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    # systemd's default for a service: soft 1024, hard 524288 (no preexec_fn: the gRPC threads)
    hard = min(524288, resource.getrlimit(resource.RLIMIT_NOFILE)[1])  # (as far as this machine lets us)
    try:
        resource.prlimit(console.pid, resource.RLIMIT_NOFILE, (nofile, hard))
    except OSError:
        console.kill()  # (not left running without its limit)
        raise
    deadline = time.monotonic() + 60
    while console.poll() is None and time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            if line.startswith("flotilla console: http"):
                return console, line.split()[2]
        time.sleep(0.1)
    console.kill()
    raise RuntimeError("the console did not start:\n" + log.read_text()[-2000:])


def process_figures(pid: int) -> tuple[int, float]:
    """(open file descriptors, RSS MB) of a process."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    rss = next(
        line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("VmRSS")
    )
    return fds, int(rss.split()[1]) / 1024


def operator_loads_console(url: str) -> str:
    t0 = time.monotonic()
    try:
        connection = http.client.HTTPConnection(url.split("//")[1], timeout=10)
        connection.request("GET", "/")
        status = connection.getresponse().status
        connection.close()
    except OSError as err:
        return f"failed ({type(err).__name__}) after {time.monotonic() - t0:.1f} s"
    return f"{status} in {(time.monotonic() - t0) * 1000:.0f} ms"


def sign_in(url: str, operator: str) -> str:
    connection = http.client.HTTPConnection(url.split("//")[1], timeout=10)
    body = f"operator={operator}&token=operator-token".encode()
    headers = {"Origin": url, "Content-Type": "application/x-www-form-urlencoded"}
    connection.request("POST", "/signin", body=body, headers=headers)
    response = connection.getresponse()
    assert response.status == 303, response.status
    return response.headers["set-cookie"].split(";")[0]


def stop_latency_ms(page, robot) -> float | str | None:
    """alice's page stops r1 -> the robot is stopped (ms), then releases it; None when it never landed."""
    if robot.state.estop:
        return "the robot was still stopped"
    t0 = time.monotonic()
    page.send(json.dumps({"t": "estop", "robot": "r1"}))
    try:
        wait_for(lambda: robot.state.estop, 20, "the stop", interval=0.001)
    except AssertionError:
        return None
    latency = (time.monotonic() - t0) * 1000
    page.send(json.dumps({"t": "estop", "robot": "r1", "engage": False}))
    wait_for(lambda: not robot.state.estop, 20, "the release")
    return latency


def operator_figures(url, page, robot) -> list:
    """[GET / by another operator, alice's stop -> robot (ms)] now."""
    loads = operator_loads_console(url)
    try:
        latency = stop_latency_ms(page, robot)
    except Exception as err:  # her page's socket itself was lost
        latency = f"page lost: {str(err)[:60]}"
    return [loads, latency]


def attack_row(name, settings, args, console, url, page, robot) -> list:
    settings = dict(settings or {})
    sustained = settings.pop("sustained", False)
    attack = Attackers(url, args.count if name != "none" else 0, **settings).open(timeout=3)
    fds, rss = process_figures(console.pid)
    attack.drip()
    early = operator_figures(url, page, robot)  # the attack's sockets are open (within read_timeout_s)
    t0 = time.monotonic()
    while name != "none" and time.monotonic() - t0 < args.hold:
        attack.drip()
        if sustained:
            attack.reconnect()
        fds, rss = max(fds, process_figures(console.pid)[0]), max(rss, process_figures(console.pid)[1])
        time.sleep(0.5)
    late = operator_figures(url, page, robot) if name != "none" else ["-", "-"]
    attack.drip()
    answered = ", ".join(f"{k or 'none'}: {v}" for k, v in sorted(attack.statuses().items()))
    opened = f"{len(attack.sockets)} ({attack.refused_connects} not connected)"
    attack.close()
    return [name, fds, f"{rss:.0f}", opened, f"{attack.still_open}; {answered}", *early, *late]


def main() -> None:
    from websockets.sync.client import connect

    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=1500, help="attacking sockets per attack")
    parser.add_argument("--hold", type=float, default=8.0, help="seconds each attack runs before measuring")
    parser.add_argument("--nofile", type=int, default=1024, help="the console's soft file-descriptor limit")
    parser.add_argument("--root", type=Path, default=ROOT, help="checkout the console runs from")
    args = parser.parse_args()
    print(machine_line(), "| load:", os.getloadavg())
    print(f"console from {args.root}, soft RLIMIT_NOFILE {args.nofile}, {args.count} sockets per attack")

    with tempfile.TemporaryDirectory() as tmp:
        server = ServerThread(make_config(Path(tmp), t_T=10_000)).start()
        robot = robot_client(server).start()
        robot.start_episode(1)
        send(robot, 1, [0], uncertainty=0.0)
        log = Path(tmp) / "console.log"
        console, url = start_console(server.address, args.root, args.nofile, log)
        ws_url = url.replace("http", "ws") + "/ws"
        rows = []
        try:
            cookie = {"Cookie": sign_in(url, "alice")}
            for name, settings in {"none": None, **ATTACKS}.items():
                # (max_queue None: her fleet view piles up unread while the attack runs)
                try:
                    page = connect(
                        ws_url, origin=url, additional_headers=cookie, max_queue=None, open_timeout=20
                    )
                except Exception as err:  # the console did not recover from the last attack
                    rows.append([name, *process_figures(console.pid), f"alice's page cannot connect: {err}"])
                    print_table(HEADERS[:4], [rows[-1]])
                    continue
                rows.append(attack_row(name, settings, args, console, url, page, robot))
                with contextlib.suppress(Exception):
                    page.close()
                print_table(HEADERS, rows[-1:])
                time.sleep(2.0)
        finally:
            console.terminate()
            console.wait(20)
            robot.close(timeout=2)
            server.stop()
        errors = log.read_text().count("Too many open files")
    print(f"\nthe console logged 'Too many open files' {errors} times")
    print(machine_line(), "| load:", os.getloadavg())
    print_table(HEADERS, [row + ["-"] * (len(HEADERS) - len(row)) for row in rows])


HEADERS = [
    "attack",
    "console fds (peak)",
    "RSS MB (peak)",
    "attack sockets",
    "still open after hold; answers",
    "GET / by an operator at once",
    "alice's stop -> robot (ms) at once",
    "GET / after hold",
    "stop after hold (ms)",
]

if __name__ == "__main__":
    main()
