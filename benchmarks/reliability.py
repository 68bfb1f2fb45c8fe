"""Fleet server reliability: kill -9 durability, liveness with frozen peers, and protocol fuzzing.

    python -m benchmarks.reliability [--kills 24] [--robots 3] [--trials 3] [--fuzz-sessions 1000] [--seed 0]

(a) kill -9: `flotilla serve` in a subprocess on a fixed port; `--robots` RobotClients stream short
    episodes (5-15 steps at 100 Hz each, every value encoding robot, episode and t) while the server is
    SIGKILLed `--kills` times at seeded random moments and restarted on the same store. Then streaming
    stops, the server restarts once more, every robot's committed_seq reaches its last seq, the server
    stops with SIGTERM and the store is compared with what was sent (tests/fleet_harness.py:run_kill9).
(b) liveness, against `flotilla serve` with C.U.R. allocation (uncertainty threshold 0.5; the robots
    report uncertainty 0.9, so they are handed to an operator at once) and the default silence timeouts
    (robot_silence_s = operator_silence_s = 1 s):
    - a robot process (a RobotClient streaming at 20 Hz) is frozen with SIGSTOP while an OperatorClient
      controls it: time until the operator gets `released` with RELEASE_REASON_ROBOT_DISCONNECTED;
    - an operator process (an OperatorClient sending teleop actions at 20 Hz) is frozen with SIGSTOP
      while it controls a robot: time until the robot's mode leaves TELEOP, and until a second, free
      operator gets the assignment.
    Times are from the SIGSTOP to the moment the message reached the client in this process.
(c) fuzz: a bounded seeded protocol fuzzer on every RPC while a good robot streams
    (tests/fleet_harness.py:run_fuzz): statuses seen, statuses outside the allowed client-error set,
    server log warnings and tracebacks, and whether the good robot's episodes read back exactly.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.common import machine_line, print_table
from fleet.client import OperatorClient, RobotClient
from fleet.proto import flotilla_pb2 as pb
from tests.fleet_harness import (
    ACTION_DIM,
    BACKOFF,
    SPEC,
    TOKENS,
    EpisodeStreamer,
    ServeProcess,
    free_port,
    run_fuzz,
    run_kill9,
    serve_overrides,
    wait_until,
)

ROOT = Path(__file__).resolve().parent.parent
ALLOCATION = [
    "allocation.rule=cur",
    "allocation.tick_hz=20",
    "allocation.t_T=3",
    "allocation.t_R=2",
    "allocation.uncertainty_threshold=0.5",
    "allocation.risk_threshold=0.5",
]
UNCERTAIN = {"uncertainty": 0.9}  # above the threshold: the robot needs a human
LIVENESS_HZ = 20.0


# --------------------------------------------------------------------------- the frozen processes


def robot_process(address: str, robot_id: str) -> None:
    """A robot that streams uncertain steps until killed (frozen with SIGSTOP by the benchmark)."""
    robot = RobotClient(
        address, TOKENS["robot"][0], robot_id, "reliability", SPEC, action_dim=ACTION_DIM, backoff=BACKOFF
    ).start()
    EpisodeStreamer(robot, 0, 0, LIVENESS_HZ, (400, 400), signals=UNCERTAIN).start()
    wait_until(lambda: robot.connected, 30, "the robot's session")
    print("connected", flush=True)
    threading.Event().wait()


def operator_process(address: str, operator_id: str) -> None:
    """An operator that teleoperates every robot it is given, at 20 Hz, until killed."""
    operator = OperatorClient(address, TOKENS["operator"][0], operator_id, backoff=BACKOFF).start()
    announced: set[str] = set()
    seq = 0
    while True:
        if operator.connected and "" not in announced:
            announced.add("")
            print("connected", flush=True)
        for robot_id in sorted(operator.assigned):
            if robot_id not in announced:
                announced.add(robot_id)
                print(f"assigned {robot_id}", flush=True)
            seq += 1
            operator.act(robot_id, np.zeros(ACTION_DIM, np.float32), seq=seq)
        while operator.next_update(0) is not None:  # keep the update queue short
            pass
        time.sleep(1.0 / LIVENESS_HZ)


class Child:
    """A `python -m benchmarks.reliability --<role>-process ...` subprocess whose output lines we wait on."""

    def __init__(self, *args: str):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.reliability", *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.strip())

    def wait_for(self, line: str, timeout: float = 30.0) -> None:
        wait_until(lambda: line in self.lines or self.process.poll() is not None, timeout, repr(line))
        if line not in self.lines:
            raise RuntimeError(f"child exited before printing {line!r}:\n" + "\n".join(self.lines[-20:]))

    def freeze(self) -> float:
        os.kill(self.process.pid, signal.SIGSTOP)
        return time.monotonic()

    def kill(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)
            self.process.kill()
        self.process.wait(10)


class Timeline:
    """Timestamped messages received by a client in this process (its on_update / on_command callback)."""

    def __init__(self):
        self.events: list[tuple[float, object]] = []

    def __call__(self, message, *rest) -> None:
        copy = type(message)()
        copy.CopyFrom(message)
        self.events.append((time.monotonic(), copy))

    def first_after(self, since: float, predicate, timeout: float = 15.0) -> float:
        """Seconds from `since` to the first message after it matching `predicate` (nan if none came)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for at, message in list(self.events):
                if at >= since and predicate(message):
                    return at - since
            time.sleep(0.005)
        return float("nan")


# ---------------------------------------------------------------------------------- the scenarios


def frozen_robot_trial(address: str, number: int) -> float:
    """Seconds from freezing a robot under teleop to its operator getting released(ROBOT_DISCONNECTED)."""
    robot_id = f"frozen-robot-{number}"
    timeline = Timeline()
    operator = OperatorClient(
        address, TOKENS["operator"][0], f"alice-{number}", backoff=BACKOFF, on_update=timeline
    ).start()
    child = Child("--robot-process", address, robot_id)
    try:
        child.wait_for("connected")
        wait_until(lambda: robot_id in operator.assigned, 15, f"{robot_id}'s assignment")
        time.sleep(0.3)  # a moment of teleoperation
        frozen_at = child.freeze()
        return timeline.first_after(
            frozen_at,
            lambda u: (
                u.WhichOneof("kind") == "released"
                and u.released.robot_id == robot_id
                and u.released.reason == pb.RELEASE_REASON_ROBOT_DISCONNECTED
            ),
        )
    finally:
        child.kill()
        operator.close(timeout=2)


def frozen_operator_trial(address: str, number: int) -> tuple[float, float]:
    """Seconds from freezing the operator in control to (the robot leaving TELEOP, a free operator's
    assignment)."""
    robot_id = f"teleop-robot-{number}"
    child = Child("--operator-process", address, f"frozen-operator-{number}")
    commands, updates = Timeline(), Timeline()
    robot = RobotClient(
        address,
        TOKENS["robot"][0],
        robot_id,
        "reliability",
        SPEC,
        action_dim=ACTION_DIM,
        backoff=BACKOFF,
        on_command=commands,
    )
    streamer = EpisodeStreamer(robot, number, number, LIVENESS_HZ, (400, 400), signals=UNCERTAIN)
    free = None
    try:
        child.wait_for("connected")
        robot.start()
        streamer.start()
        child.wait_for(f"assigned {robot_id}")
        wait_until(lambda: robot.state.mode == pb.MODE_TELEOP, 15, "TELEOP")
        free = OperatorClient(
            address, TOKENS["operator"][0], f"bob-{number}", backoff=BACKOFF, on_update=updates
        ).start()
        wait_until(lambda: free.connected, 15, "the free operator's session")
        time.sleep(0.3)
        frozen_at = child.freeze()
        left_teleop = commands.first_after(frozen_at, lambda c: c.mode != pb.MODE_TELEOP)
        reassigned = updates.first_after(
            frozen_at, lambda u: u.WhichOneof("kind") == "assignment" and u.assignment.robot_id == robot_id
        )
        return left_teleop, reassigned
    finally:
        child.kill()
        streamer.stop()
        robot.close(timeout=2)
        if free is not None:
            free.close(timeout=2)


def liveness(workdir: Path, trials: int) -> list[list]:
    port = free_port()
    server = ServeProcess(
        serve_overrides(workdir / "fleet.zarr", workdir / "registry", port, *ALLOCATION)
    ).start()
    try:
        robot_frozen = [frozen_robot_trial(server.address, n) for n in range(trials)]
        operator_frozen = [frozen_operator_trial(server.address, n) for n in range(trials)]
    finally:
        server.terminate()

    def row(what: str, times: list[float]) -> list:
        got = [t for t in times if t == t]
        return [
            what,
            f"{len(got)}/{len(times)}",
            statistics.median(got) if got else "-",
            max(got) if got else "-",
        ]

    return [
        row("robot frozen under teleop -> operator released (robot_disconnected)", robot_frozen),
        row("operator frozen in control -> robot leaves TELEOP", [t for t, _ in operator_frozen]),
        row("operator frozen in control -> free operator assigned", [t for _, t in operator_frozen]),
    ]


# ------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kills", type=int, default=24)
    parser.add_argument("--robots", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trials", type=int, default=3, help="liveness trials per scenario")
    parser.add_argument("--fuzz-sessions", type=int, default=1000)
    parser.add_argument(
        "--only",
        choices=["kill9", "liveness", "fuzz"],
        action="append",
        help="run only these parts (repeatable)",
    )
    parser.add_argument("--robot-process", nargs=2, metavar=("ADDRESS", "ROBOT_ID"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--operator-process", nargs=2, metavar=("ADDRESS", "OPERATOR_ID"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.robot_process:
        return robot_process(*args.robot_process)
    if args.operator_process:
        return operator_process(*args.operator_process)
    parts = args.only or ["kill9", "liveness", "fuzz"]
    print(machine_line())
    with tempfile.TemporaryDirectory(prefix="flotilla-reliability-") as tmp:
        tmp = Path(tmp)
        if "kill9" in parts:
            (tmp / "kill9").mkdir()
            report = run_kill9(tmp / "kill9", kills=args.kills, robots=args.robots, seed=args.seed)
            print(f"\n(a) kill -9 of `flotilla serve` while {args.robots} robots stream (seed {args.seed})")
            figures = report.figures()
            print_table(list(figures), [list(figures.values())])
            if not report.check.ok:
                print("store check:", report.check.summary())
            for problem in report.client_errors + report.store_open_failures + report.committed_regressions:
                print("problem:", problem)
        if "liveness" in parts:
            (tmp / "liveness").mkdir()
            rows = liveness(tmp / "liveness", args.trials)
            print("\n(b) liveness with a frozen (SIGSTOP) peer; robot_silence_s = operator_silence_s = 1 s")
            print_table(["scenario", "trials", "median s", "max s"], rows)
        if "fuzz" in parts:
            (tmp / "fuzz").mkdir()
            fuzz = run_fuzz(tmp / "fuzz", sessions=args.fuzz_sessions, seed=args.seed)
            print(
                f"\n(c) protocol fuzz (seed {args.seed}): {fuzz.corpus_sessions} dictionary + "
                f"{fuzz.sessions - fuzz.corpus_sessions} random sessions"
            )
            codes = fuzz.codes()
            print_table(
                [
                    "sessions",
                    "messages",
                    *sorted(codes),
                    "disallowed",
                    "status too big",
                    "Status checks failed",
                    "warnings",
                    "tracebacks",
                    "good robot",
                ],
                [
                    [
                        fuzz.sessions,
                        fuzz.messages,
                        *(codes[c] for c in sorted(codes)),
                        len(fuzz.disallowed),
                        sum(fuzz.oversized_details.values()),
                        f"{len(fuzz.status_failures)}/{fuzz.status_checks}",
                        fuzz.warnings,
                        fuzz.tracebacks,
                        f"{fuzz.good_episodes} episodes, {'exact' if fuzz.good_check.ok else 'NOT exact'}",
                    ]
                ],
            )
            for line in sorted(set(d[:200] for d in fuzz.disallowed)):
                print("disallowed:", line)
            if fuzz.oversized_details:
                print(
                    "status messages too big for the client (the server echoed a long input):",
                    dict(fuzz.oversized_details),
                )
            warnings = ", ".join(f"{count} x {kind}" for kind, count in fuzz.warning_kinds.most_common())
            print(f"server warnings: {warnings or 'none'}")
            for sample in fuzz.traceback_samples:
                print(
                    "traceback:",
                    sample.strip().splitlines()[0][:200],
                    "|",
                    sample.strip().splitlines()[-1][:200],
                )


if __name__ == "__main__":
    main()
