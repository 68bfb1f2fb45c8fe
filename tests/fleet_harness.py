"""Fault and attack harness for the fleet server, shared by tests/test_server_kill9.py,
tests/test_protocol_fuzz.py and benchmarks/reliability.py.

- `ServeProcess`: `flotilla serve` (python -m flotilla.cli serve key=value ...) as a subprocess, its
  output collected, started on a fixed port and killed with SIGKILL or stopped with SIGTERM.
- `EpisodeStreamer`: a thread driving a RobotClient through short episodes whose every value encodes
  (robot index, episode, t), so the store can be checked step by step against what was sent.
- `run_kill9`: robots stream while the server is SIGKILLed at random (seeded) moments and restarted on
  the same store; the store is then checked (exactly once, nothing acknowledged lost).
- `run_fuzz`: a bounded, seeded protocol fuzzer (raw bytes on every RPC) against a server while a good
  robot streams; every status code is counted and the good robot's episodes are checked.

Nothing here imports the server's internals beyond what a user would run (ServerConfig, ServerThread).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from fleet.client import RobotClient
from fleet.labels import ControlLabel
from fleet.proto import flotilla_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
# The tokens every fleet test's server accepts (role -> tokens, the ServerConfig shape); TOKEN is one per role.
TOKENS = {
    "robot": ["robot-token"],
    "operator": ["operator-token"],
    "trainer": ["trainer-token"],
    "admin": ["admin-token"],
}
TOKEN = {role: tokens[0] for role, tokens in TOKENS.items()}
# What the robots of these scenarios send: (robot index, episode, t) in float32, and a float64 vector.
SPEC = {"state": ((3,), "float32"), "joints": ((4,), "float64")}
ACTION_DIM = 2
BACKOFF = (0.05, 0.5)
ADDRESS_LINE = "flotilla serve: fleet server on "


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1 (bound, read and closed: reused for every restart)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def has_ipv6_loopback() -> bool:
    """Whether ::1 can be bound here (some containers have no IPv6 loopback)."""
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


# ------------------------------------------------------------------------------------- the server


def serve_overrides(store: Path, registry_dir: Path, port: int, *extra: str) -> list[str]:
    """`flotilla serve` overrides: loopback, a fixed port, no metrics, this store and the test tokens."""
    tokens = [f"tokens.{role}=[{values[0]}]" for role, values in TOKENS.items()]
    return [
        f"port={port}",
        "metrics_port=null",
        f"store={store}",
        f"registry_dir={registry_dir}",
        "shutdown_grace_s=0.5",
        *tokens,
        *extra,
    ]


class ServeProcess:
    """One life of `flotilla serve` as a subprocess; `start` returns once it printed its address."""

    def __init__(self, overrides: list[str], env: dict | None = None):
        self.overrides = overrides
        self.env = env
        self.lines: list[str] = []
        self.address = ""
        self.process: subprocess.Popen | None = None
        self.started_in_s = math.nan
        self._ready = threading.Event()
        self._reader: threading.Thread | None = None

    def start(self, timeout: float = 60.0) -> ServeProcess:
        began = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "flotilla.cli", "serve", *self.overrides],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=self.env,
            bufsize=1,
        )
        self._reader = threading.Thread(target=self._read, name="serve-output", daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.02):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self._reader.join(2)
                tail = "".join(self.lines[-30:])
                self.kill9()
                raise RuntimeError(f"flotilla serve did not start (exit {self.process.returncode}):\n{tail}")
        self.started_in_s = time.monotonic() - began
        return self

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)
            if ADDRESS_LINE in line and not self._ready.is_set():
                self.address = line.split(ADDRESS_LINE)[1].split(",")[0].strip()
                self._ready.set()

    @property
    def pid(self) -> int:
        return self.process.pid

    def kill9(self) -> None:
        """SIGKILL: no handler, no flush, no graceful anything."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        if self.process is not None:
            self.process.wait(30)
            if self._reader is not None:
                self._reader.join(5)

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM (a graceful stop); returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                self.kill9()
            self._reader.join(5)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def tracebacks(self) -> int:
        return self.output.count("Traceback (most recent call last)")


# ------------------------------------------------------------------------------------ the robots


def observation(robot: int, episode: int, t: int) -> dict[str, np.ndarray]:
    return {
        "state": np.array([robot, episode, t], np.float32),
        "joints": np.array(
            [robot + episode / 7.0, t / 3.0, -episode, robot * 1e6 + episode * 1e3 + t], np.float64
        ),
    }


def action(robot: int, episode: int, t: int) -> np.ndarray:
    return np.array([episode + t / 1000.0, -robot - t / 7.0], np.float32)


@dataclass
class SentEpisode:
    robot: int
    episode: int
    length: int
    success: bool
    outcome: str
    step_seqs: list[int]
    end_seq: int


class EpisodeStreamer:
    """Streams episodes of `steps` (min, max) steps at `hz` through `client` until `stop()`; every episode
    it starts it also ends. `records` lists the ended ones; `step_seqs` every step's seq, in order."""

    def __init__(
        self,
        client: RobotClient,
        index: int,
        seed: int,
        hz: float = 100.0,
        steps: tuple[int, int] = (5, 15),
        signals: dict | None = None,
    ):
        self.client, self.index, self.hz, self.steps = client, index, hz, steps
        self.signals = signals
        self.rng = np.random.default_rng(seed)
        self.records: list[SentEpisode] = []
        self.step_seqs: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"streamer-{index}", daemon=True)
        self.failure: BaseException | None = None

    def start(self) -> EpisodeStreamer:
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"streamer {self.index} did not stop"
        if self.failure is not None:
            raise self.failure

    def _run(self) -> None:
        try:
            period, next_at, episode = 1.0 / self.hz, time.monotonic(), 0
            while not self._stop.is_set():
                episode += 1
                length = int(self.rng.integers(self.steps[0], self.steps[1] + 1))
                self.client.start_episode(episode)
                seqs = []
                for t in range(length):
                    seq = self.client.step(
                        episode,
                        t,
                        observation(self.index, episode, t),
                        action(self.index, episode, t),
                        ControlLabel.ROBOT,
                        signals=self.signals,
                    )
                    seqs.append(seq)
                    self.step_seqs.append(seq)
                    next_at = max(
                        next_at + period, time.monotonic() - 5 * period
                    )  # catch up, but not in a burst
                    time.sleep(max(0.0, next_at - time.monotonic()))
                success = episode % 3 != 0
                outcome = "success" if success else "timeout"
                end_seq = self.client.end_episode(episode, success=success, outcome=outcome)
                self.records.append(SentEpisode(self.index, episode, length, success, outcome, seqs, end_seq))
        except BaseException as err:  # reported by stop()
            self.failure = err


def robot_client(address: str, index: int, **kwargs) -> RobotClient:
    return RobotClient(
        address,
        TOKENS["robot"][0],
        f"r{index}",
        "reliability",
        SPEC,
        action_dim=ACTION_DIM,
        backoff=BACKOFF,
        **kwargs,
    )


# ------------------------------------------------------------------------------- reading the store


@dataclass
class StoreCheck:
    """How the store's episodes compare with what the robots ended."""

    episodes_expected: int = 0
    episodes_found: int = 0  # matched episodes (robot, boot, episode), counting each once
    missing: list[tuple[int, int]] = field(
        default_factory=list
    )  # (robot, episode) ended but not in the store
    duplicates: list[tuple[int, int]] = field(default_factory=list)  # committed more than once
    unexpected: list[str] = field(default_factory=list)  # store episodes no robot ended
    wrong: list[str] = field(default_factory=list)  # present, but a value, label, length or outcome differs
    stored_steps: set = field(default_factory=set)  # (robot, episode, t) found with the right values

    @property
    def ok(self) -> bool:
        return not (self.missing or self.duplicates or self.unexpected or self.wrong)

    def summary(self) -> str:
        return (
            f"expected {self.episodes_expected} episodes, found {self.episodes_found}; missing {self.missing[:5]}, "
            f"duplicates {self.duplicates[:5]}, unexpected {self.unexpected[:5]}, wrong {self.wrong[:5]}"
        )


def _committed_table(store) -> list[tuple[str, str, int]]:
    """(robot_id, boot_id, robot_episode_id) of every committed episode, from the metadata columns."""
    keys = []
    for robot_id, extra in zip(store.meta_column("robot_id"), store.meta_column("extra"), strict=True):
        meta = json.loads(str(extra) or "{}")
        keys.append((str(robot_id), str(meta.get("boot_id", "")), int(meta.get("robot_episode_id", -1))))
    return keys


def store_keys(path: Path) -> list[tuple[str, str, int]]:
    """The committed episodes' keys (see _committed_table), opening the store read-only."""
    from fleet.store import EpisodeStore

    with EpisodeStore.open(path) as store:
        return _committed_table(store)


def read_all(path: Path, keys: list[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Episode ends and whole data arrays, read in one go through the documented layout (data/<key>
    concatenated along time, cut at meta/episode_ends); only the committed steps."""
    import zarr

    from fleet.store import EpisodeStore

    with EpisodeStore.open(path) as store:
        ends, steps = store.episode_ends, store.num_steps
    group = zarr.open_group(str(path), mode="r")
    return ends, {key: group[f"data/{key}"][:steps] for key in keys}


def check_store(
    path: Path,
    clients: dict[int, RobotClient],
    records: list[SentEpisode],
    ignore_robot: Callable[[str], bool] = lambda robot_id: False,
) -> StoreCheck:
    """Read every committed episode and compare it, value by value, with the episodes the robots ended."""
    from fleet.store import EpisodeStore

    check = StoreCheck(episodes_expected=len(records))
    by_key = {(f"r{r.robot}", clients[r.robot].boot_id, r.episode): r for r in records}
    seen: collections.Counter = collections.Counter()
    with EpisodeStore.open(path) as store:
        table = _committed_table(store)
        outcomes, successes = store.meta_column("outcome"), store.meta_column("success")
    if not table:
        check.missing = [(r.robot, r.episode) for r in records]
        return check
    ends, data = read_all(path, ["state", "joints", "action", "label"])
    starts = np.r_[0, ends[:-1]]
    for index, key in enumerate(table):
        if ignore_robot(key[0]):
            continue
        length = int(ends[index] - starts[index])
        record = by_key.get(key)
        if record is None:
            check.unexpected.append(f"#{index} {key} ({length} steps, outcome {outcomes[index]!r})")
            continue
        seen[key] += 1
        if seen[key] > 1:
            check.duplicates.append((record.robot, record.episode))
            continue
        episode = {name: values[starts[index] : ends[index]] for name, values in data.items()}
        problems = _compare(record, length, bool(successes[index]), str(outcomes[index]), episode)
        if problems:
            check.wrong.append(f"robot {record.robot} episode {record.episode}: {problems}")
        for t in range(min(record.length, length)):
            sent = observation(record.robot, record.episode, t)
            if np.array_equal(episode["state"][t], sent["state"]) and np.array_equal(
                episode["joints"][t], sent["joints"]
            ):
                check.stored_steps.add((record.robot, record.episode, t))
    check.episodes_found = len(seen)
    check.missing = [(r.robot, r.episode) for key, r in by_key.items() if key not in seen]
    return check


def _compare(record: SentEpisode, length: int, success: bool, outcome: str, data: dict) -> str:
    t = np.arange(record.length)
    expected_state = np.stack([observation(record.robot, record.episode, i)["state"] for i in t])
    expected_joints = np.stack([observation(record.robot, record.episode, i)["joints"] for i in t])
    expected_action = np.stack([action(record.robot, record.episode, i) for i in t])
    problems = []
    if length != record.length:
        problems.append(f"{length} steps, sent {record.length}")
    elif not (
        np.array_equal(data["state"], expected_state)
        and np.array_equal(data["joints"], expected_joints)
        and np.array_equal(data["action"], expected_action)
    ):
        problems.append("values differ from what was sent (or are out of order)")
    if length and set(data["label"].tolist()) != {int(ControlLabel.ROBOT)}:
        problems.append(f"labels {sorted(set(data['label'].tolist()))}, sent only robot")
    if (success, outcome) != (record.success, record.outcome):
        problems.append(f"success/outcome {success}/{outcome!r}, sent {record.success}/{record.outcome!r}")
    return "; ".join(problems)


# --------------------------------------------------------------------------------------- kill -9


@dataclass
class Kill9Report:
    kills: int = 0
    robots: int = 0
    seconds: float = 0.0
    restart_s: list[float] = field(default_factory=list)  # spawn -> address printed, per life
    episodes_ended: int = 0
    episodes_committed: int = 0
    steps_sent: int = 0
    acked_steps: int = 0  # steps with seq <= the highest ack_seq the robot saw
    at_risk_steps: int = 0  # summed over kills: acked but not yet committed when the server was killed
    lost_acked_steps: int = 0
    duplicate_episodes: int = 0
    robots_stopped: int = 0  # clients that stopped with an error
    dropped_by_clients: int = 0  # steps a client dropped from its resend buffer (must be 0)
    store_open_failures: list[str] = field(
        default_factory=list
    )  # opening read-only while the server was down
    committed_regressions: list[str] = field(default_factory=list)  # an episode committed once, later missing
    server_tracebacks: int = 0
    final_exit_code: int | None = None
    final_drain_s: float = math.nan  # the last restart until every robot's committed_seq reached its last seq
    client_errors: list[str] = field(default_factory=list)
    check: StoreCheck = field(default_factory=StoreCheck)
    lives: list[ServeProcess] = field(default_factory=list, repr=False)  # every server life, with its output

    def figures(self) -> dict:
        return {
            "kills": self.kills,
            "robots": self.robots,
            "episodes ended": self.episodes_ended,
            "episodes committed": self.episodes_committed,
            "steps sent": self.steps_sent,
            "acked steps": self.acked_steps,
            "acked, uncommitted at a kill": self.at_risk_steps,
            "lost acked steps": self.lost_acked_steps,
            "duplicate episodes": self.duplicate_episodes,
            "robots stopped": self.robots_stopped,
            "store open failures": len(self.store_open_failures),
            "server tracebacks": self.server_tracebacks,
            "restart s (median)": float(np.median(self.restart_s)) if self.restart_s else math.nan,
            "seconds": round(self.seconds, 1),
        }

    def line(self) -> str:
        return ", ".join(
            f"{name} {value:.2f}" if isinstance(value, float) else f"{name} {value}"
            for name, value in self.figures().items()
        )


def kill_delays(
    rng: np.random.Generator,
    kills: int,
    short: tuple[float, float] = (0.02, 0.3),
    long: tuple[float, float] = (0.3, 2.0),
) -> list[float]:
    """How long each server life lasts: a quarter die young (during hellos and resends), the rest at
    uniformly random moments while episodes stream and commit."""
    return [float(rng.uniform(*short) if rng.random() < 0.25 else rng.uniform(*long)) for _ in range(kills)]


def run_kill9(
    workdir: Path,
    kills: int = 24,
    robots: int = 3,
    seed: int = 0,
    hz: float = 100.0,
    steps: tuple[int, int] = (5, 15),
    extra_overrides: tuple[str, ...] = (),
    log: Callable[[str], None] = lambda line: None,
) -> Kill9Report:
    """Stream episodes from `robots` RobotClients while `flotilla serve` is SIGKILLed `kills` times and
    restarted on the same store and port; then stop streaming, let everything commit, stop the server
    with SIGTERM and compare the store with what was sent. Figures in the returned report."""
    workdir = Path(workdir)
    rng = np.random.default_rng(seed)
    store, port = workdir / "fleet.zarr", free_port()
    overrides = serve_overrides(store, workdir / "registry", port, *extra_overrides)
    report = Kill9Report(robots=robots)
    began = time.monotonic()
    lives: list[ServeProcess] = []
    clients: dict[int, RobotClient] = {}
    streamers: list[EpisodeStreamer] = []
    committed_before: set = set()

    def start_server() -> ServeProcess:
        lives.append(ServeProcess(overrides).start())
        report.restart_s.append(lives[-1].started_in_s)
        return lives[-1]

    server = start_server()
    try:
        address = f"127.0.0.1:{port}"
        for index in range(robots):
            clients[index] = robot_client(address, index).start()
            streamers.append(EpisodeStreamer(clients[index], index, seed * 1000 + index, hz, steps).start())
        for number, delay in enumerate(kill_delays(rng, kills), start=1):
            time.sleep(delay)
            # Acknowledged, not yet durable: what a crash now puts at risk.
            for index, client in clients.items():
                acked, durable = client.state.acked_seq, client.state.committed_seq
                seqs = list(streamers[index].step_seqs)
                report.at_risk_steps += sum(1 for seq in seqs if durable < seq <= acked)
            server.kill9()
            report.kills += 1
            if number == kills:  # the last kill: stop streaming while the server is down
                for streamer in streamers:
                    streamer.stop()
            # The store opens (read-only) after every kill, and keeps everything committed before.
            try:
                keys = store_keys(store)
            except Exception as err:  # the finding, not a crash of the harness
                report.store_open_failures.append(f"kill {number}: {type(err).__name__}: {err}")
                keys = []
            duplicates = [key for key, count in collections.Counter(keys).items() if count > 1]
            if duplicates:
                report.committed_regressions.append(f"kill {number}: duplicates {duplicates[:3]}")
            vanished = committed_before - set(keys)
            if vanished and not report.store_open_failures:
                report.committed_regressions.append(
                    f"kill {number}: {len(vanished)} committed episode(s) vanished"
                )
            committed_before |= set(keys)
            log(
                f"kill {number}/{kills} after {delay:.2f} s: {len(committed_before)} episodes committed so far"
            )
            server = start_server()
        drain_began = time.monotonic()
        for client in clients.values():
            if not client.wait_committed(timeout=120):
                report.client_errors.append(
                    f"{client.hello.robot_id}: committed_seq {client.state.committed_seq} < last seq "
                    f"{client.last_seq} 120 s after the last restart"
                )
        report.final_drain_s = time.monotonic() - drain_began
        log(f"final restart: every ended episode committed after {report.final_drain_s:.1f} s")
        for client in clients.values():
            if client.error is not None:
                report.client_errors.append(f"{client.hello.robot_id}: {client.error}")
            client.close(timeout=10)
        report.final_exit_code = server.terminate()
    finally:
        for streamer in streamers:
            with contextlib.suppress(BaseException):
                streamer.stop(5)
        for client in clients.values():
            client.close(timeout=1)
        for life in lives:
            life.kill9()
    records = [record for streamer in streamers for record in streamer.records]
    check_began = time.monotonic()
    report.check = check = check_store(store, clients, records)
    log(f"store checked in {time.monotonic() - check_began:.1f} s")
    report.episodes_ended = len(records)
    report.episodes_committed = check.episodes_found
    report.duplicate_episodes = len(check.duplicates)
    report.steps_sent = sum(len(s.step_seqs) for s in streamers)
    for streamer in streamers:
        acked = clients[streamer.index].state.acked_seq
        for record in streamer.records:
            for t, seq in enumerate(record.step_seqs):
                if seq <= acked:
                    report.acked_steps += 1
                    if (record.robot, record.episode, t) not in check.stored_steps:
                        report.lost_acked_steps += 1
    report.robots_stopped = sum(1 for c in clients.values() if c.error is not None)
    report.dropped_by_clients = sum(c.dropped for c in clients.values())
    report.server_tracebacks = sum(life.tracebacks() for life in lives)
    report.seconds = time.monotonic() - began
    report.lives = lives
    return report


# ------------------------------------------------------------------------------------- log capture


class LogCapture(logging.Handler):
    """Collects log records (WARNING and up by default) from every logger while installed."""

    def __init__(self, level: int = logging.WARNING):
        super().__init__(level)
        self.records: list[logging.LogRecord] = []
        self._lock_records = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._lock_records:
            self.records.append(record)

    @contextlib.contextmanager
    def installed(self) -> Iterator[LogCapture]:
        root = logging.getLogger()
        old_level = root.level
        root.addHandler(self)
        root.setLevel(min(old_level or logging.WARNING, self.level))
        try:
            yield self
        finally:
            root.removeHandler(self)
            root.setLevel(old_level)


def _clip(text: str, limit: int) -> str:
    """Long fuzz strings (20 kB ids) shortened for reports."""
    return (
        text if len(text) <= limit else f"{text[: limit // 2]}...({len(text)} chars)...{text[-limit // 4 :]}"
    )


def grpc_code_name(code) -> str:
    return code.name if isinstance(code, grpc.StatusCode) else str(code)


# ------------------------------------------------------------------------------------------ fuzzer

# Every status a client's garbage may get (bad tokens: UNAUTHENTICATED). INTERNAL, UNKNOWN (a handler's
# bug), DEADLINE_EXCEEDED (a hang), UNIMPLEMENTED, DATA_LOSS ... are findings.
ALLOWED_CODES = frozenset(
    {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.UNAUTHENTICATED,
    }
)
METHODS = {  # name -> (path, cardinality)
    "robot": ("/flotilla.v1.RobotService/Session", "stream_stream"),
    "operator": ("/flotilla.v1.OperatorService/Session", "stream_stream"),
    "publish": ("/flotilla.v1.RegistryService/Publish", "stream_unary"),
    "fetch": ("/flotilla.v1.RegistryService/Fetch", "unary_stream"),
    "list": ("/flotilla.v1.RegistryService/List", "unary_unary"),
    "status": ("/flotilla.v1.AdminService/Status", "unary_unary"),
}
METHOD_TOKEN = {
    "robot": "robot",
    "operator": "operator",
    "publish": "trainer",
    "fetch": "robot",
    "list": "operator",
    "status": "admin",
}
CALL_TIMEOUT_S = 10.0  # a call that takes longer is reported as DEADLINE_EXCEEDED: the server hung on it

LONG = "x" * 20_000  # 20 kB
NAME_MAX = "n" * 300  # longer than a file name may be (255 bytes), short enough to travel in a status message
WEIRD_IDS = [
    "",
    "/",
    "a/b",
    "..",
    ".",
    "../../etc/passwd",
    "r0/../r0",
    LONG,
    NAME_MAX,
    "x" * 65,
    "\x00",
    "nul\x00id",
    "ü",
    "a b",
    "-dash",
    "r1\n",
    "%s%n",
    "${oc.env:HOME}",
    "CON",
    "r0",
    "*",
    "?",
]
WEIRD_TEXT = [*WEIRD_IDS, "y" * 129, "\udcff".encode("utf-8", "surrogatepass").decode("utf-8", "replace")]
BAD_INTS = [0, -1, -(2**63), 2**63 - 1, 2**31, -(2**31), 1 << 40]
BAD_INT32 = [0, -1, -(2**31), 2**31 - 1, 4097, 1 << 20]
BAD_FLOATS = [math.nan, math.inf, -math.inf, -0.0, 1e308, -1e308, 5e-324, -1.0, 3.4e39]
BAD_DTYPES = [
    "",
    "float128",
    "complex64",
    "object",
    "O",
    "<U4",
    "S8",
    "V8",
    "M8",
    "datetime64",
    "float",
    ">f4",
    "<f8",
    "bool",
    "int64",
    "uint8",
    "f2",
    LONG,
    "float32\x00",
    "(2,)f4",
    "float32,float32",
    "float33",
    "i0",
    "u16",
]
BAD_SHAPES = [
    [-1],
    [-1, -1],
    [2**62],
    [2**31, 2**31],
    [],
    [0],
    [3, 1],
    [1] * 9,
    [1] * 200,
    [2**63 - 1],
    [-(2**63)],
]
BAD_FILENAMES = [
    "../x.json",
    "a/b.json",
    "x.py",
    NAME_MAX + ".json",
    "",
    ".",
    "..",
    LONG + ".json",
    "c.json\x00.py",
    "CONFIG.JSON",
    ".json",
    "/etc/passwd",
    "model.safetensors/",
    "~/.bashrc",
    "LATEST",
    "config.json",
]


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _tag(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _tag(number, 2) + _varint(len(payload)) + payload


@dataclass
class FuzzReport:
    sessions: int = 0
    corpus_sessions: int = 0  # of which the deterministic dictionary pass (Fuzzer.corpus)
    messages: int = 0  # requests sent (stream messages and unary requests)
    statuses: collections.Counter = field(default_factory=collections.Counter)  # "method CODE" -> count
    oversized_details: collections.Counter = field(default_factory=collections.Counter)  # method -> count
    examples: dict[str, str] = field(default_factory=dict)  # "method CODE" -> the first details seen
    operator_errors: collections.Counter = field(default_factory=collections.Counter)  # in-session refusals
    strategies: collections.Counter = field(default_factory=collections.Counter)  # mutation -> count
    disallowed: list[str] = field(
        default_factory=list
    )  # "method CODE: details" for codes outside ALLOWED_CODES
    status_checks: int = 0
    status_failures: list[str] = field(default_factory=list)
    warnings: int = 0  # server log records at WARNING or above during the fuzzing
    tracebacks: int = 0  # of those, records carrying a traceback
    log_samples: list[str] = field(default_factory=list)
    traceback_samples: list[str] = field(default_factory=list)
    warning_kinds: collections.Counter = field(default_factory=collections.Counter)  # log template -> count
    good_episodes: int = 0
    good_check: StoreCheck = field(default_factory=StoreCheck)
    good_error: str = ""
    seconds: float = 0.0

    def codes(self) -> collections.Counter:
        counts: collections.Counter = collections.Counter()
        for key, count in self.statuses.items():
            counts[key.split()[-1]] += count
        return counts

    def line(self) -> str:
        codes = ", ".join(f"{code} {count}" for code, count in sorted(self.codes().items()))
        return (
            f"sessions {self.sessions}, messages {self.messages}, statuses: {codes}; disallowed "
            f"{len(self.disallowed)}; status messages too big for the client {sum(self.oversized_details.values())}; "
            f"status checks {self.status_checks} (failed {len(self.status_failures)}); "
            f"server warnings {self.warnings}, tracebacks {self.tracebacks}; good robot episodes "
            f"{self.good_episodes} ({'exact' if self.good_check.ok else 'NOT exact'}); {self.seconds:.1f} s"
        )


class Fuzzer:
    """Builds mutated requests for every RPC and sends them as raw bytes (identity serializers), so
    anything, valid or not, reaches the server. Seeded: the same seed sends the same bytes."""

    def __init__(self, address: str, seed: int, channels: int = 4):
        self.address = address
        self.rng = np.random.default_rng(seed)
        options = [
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        ]
        self.channels = [grpc.insecure_channel(address, options=options) for _ in range(channels)]
        self.report = FuzzReport()
        self.published = 0

    def close(self) -> None:
        for channel in self.channels:
            channel.close()

    # -- helpers -----------------------------------------------------------------------------------

    def pick(self, values):
        return values[int(self.rng.integers(len(values)))]

    def chance(self, p: float) -> bool:
        return bool(self.rng.random() < p)

    def hex_id(self) -> str:
        return self.rng.bytes(8).hex()

    def tensor(self, shape, dtype: str = "float32", values=None) -> pb.Tensor:
        array = np.asarray(values if values is not None else self.rng.normal(size=shape), dtype)
        return pb.Tensor(shape=list(array.shape), dtype=np.dtype(dtype).name, data=array.tobytes())

    def bad_tensor(self, shape=(ACTION_DIM,), dtype: str = "float32") -> pb.Tensor:
        tensor = self.tensor(shape, dtype)
        what = self.pick(["dtype", "shape", "data", "nan", "all", "empty"])
        if what in ("dtype", "all"):
            tensor.dtype = self.pick(BAD_DTYPES)
        if what in ("shape", "all"):
            tensor.shape[:] = self.pick(BAD_SHAPES)
        if what in ("data", "all"):
            tensor.data = self.rng.bytes(
                int(self.pick([0, 1, len(tensor.data) - 1, len(tensor.data) + 1, 20_000]))
            )
        if what == "nan":
            values = np.frombuffer(tensor.data, np.dtype(dtype)).copy()
            values[int(self.rng.integers(values.size))] = self.pick([math.nan, math.inf, -math.inf])
            tensor.data = values.tobytes()
        if what == "empty":
            tensor.Clear()
        return tensor

    def mutate_bytes(self, data: bytes) -> tuple[str, bytes]:
        """A byte-level mutation of a serialized message."""
        how = self.pick(["bitflip", "truncate", "random", "insert", "duplicate", "unknown_field"])
        raw = bytearray(data)
        if how == "bitflip" and raw:
            for _ in range(int(self.rng.integers(1, 9))):
                raw[int(self.rng.integers(len(raw)))] ^= 1 << int(self.rng.integers(8))
        elif how == "truncate" and raw:
            raw = raw[: int(self.rng.integers(len(raw)))]
        elif how == "random":
            raw = bytearray(self.rng.bytes(int(self.rng.integers(0, 256))))
        elif how == "insert":
            at = int(self.rng.integers(len(raw) + 1))
            raw[at:at] = self.rng.bytes(int(self.rng.integers(1, 32)))
        elif how == "duplicate" and raw:
            start = int(self.rng.integers(len(raw)))
            raw += raw[start : start + int(self.rng.integers(1, 64))]
        else:  # an unknown field (valid protobuf: must be ignored, or refused cleanly)
            raw += _length_delimited(int(self.rng.integers(20, 2**29 - 1)), self.rng.bytes(16))
        return how, bytes(raw)

    def wrong_type(self, oneof_numbers: list[int], inner_numbers: list[int]) -> bytes:
        """A oneof field, or a field inside one, encoded with the wrong wire type."""
        outer = self.pick(oneof_numbers)
        inner = self.pick(inner_numbers)
        wrong = self.pick(
            [
                _tag(inner, 0)
                + _varint(int(self.rng.integers(0, 2**63))),  # varint where bytes/message was expected
                _tag(inner, 1) + self.rng.bytes(8),  # fixed64
                _tag(inner, 5) + self.rng.bytes(4),  # fixed32
                _length_delimited(
                    inner, self.rng.bytes(int(self.rng.integers(0, 40)))
                ),  # bytes where a number was
                _tag(inner, 3),  # a start-group without its end
                _tag(inner, 2) + _varint(1 << 40),  # a length far beyond the message
            ]
        )
        if self.chance(0.3):
            return _tag(outer, 0) + _varint(7)  # the oneof message itself as a varint
        return _length_delimited(outer, wrong)

    def mutated(
        self,
        template,
        field_mutators: list[Callable],
        oneof_numbers: list[int],
        inner_numbers: list[int],
        kinds: list,
    ) -> bytes:
        """`template` (a valid message) mutated one way or another; the way is counted."""
        strategy = self.pick(["field", "field", "field", "bytes", "bytes", "wrong_type", "kind", "splice"])
        if strategy == "field":
            message = type(template)()
            message.CopyFrom(template)
            mutator = self.pick(field_mutators)
            mutator(message)
            self.report.strategies[f"field:{mutator.__name__}"] += 1
            return message.SerializeToString()
        if strategy == "bytes":
            how, data = self.mutate_bytes(template.SerializeToString())
            self.report.strategies[f"bytes:{how}"] += 1
            return data
        self.report.strategies[strategy] += 1
        if strategy == "wrong_type":
            return self.wrong_type(oneof_numbers, inner_numbers)
        if strategy == "kind":
            return self.pick(kinds)().SerializeToString()
        return template.SerializeToString() + self.pick(kinds)().SerializeToString()  # two oneof kinds merged

    # -- calls -------------------------------------------------------------------------------------

    def call(
        self, method: str, requests: list[bytes], token: str | None, header: str | None = None
    ) -> list[bytes]:
        path, cardinality = METHODS[method]
        channel = self.pick(self.channels)
        identity = lambda data: data  # noqa: E731 - raw bytes both ways
        stub = getattr(channel, cardinality)(
            path, request_serializer=identity, response_deserializer=identity
        )
        value = header if header is not None else (f"Bearer {token}" if token is not None else None)
        metadata = (("authorization", value),) if value is not None else ()
        self.report.messages += len(requests)
        responses: list[bytes] = []
        try:
            if cardinality == "stream_stream":
                responses = list(stub(iter(requests), metadata=metadata, timeout=CALL_TIMEOUT_S))
            elif cardinality == "stream_unary":
                responses = [stub(iter(requests), metadata=metadata, timeout=CALL_TIMEOUT_S)]
            elif cardinality == "unary_stream":
                responses = list(stub(requests[0], metadata=metadata, timeout=CALL_TIMEOUT_S))
            else:
                responses = [stub(requests[0], metadata=metadata, timeout=CALL_TIMEOUT_S)]
            code, details = grpc.StatusCode.OK, ""
        except grpc.RpcError as err:
            code, details = err.code(), err.details() or ""
        self.report.statuses[f"{method} {code.name}"] += 1
        self.report.examples.setdefault(f"{method} {code.name}", _clip(details, 300))
        if "metadata size exceeds" in details:
            # The server's status message was too big for the client to take (it echoed a long input):
            # the client got this transport error instead of the message naming the problem.
            self.report.oversized_details[method] += 1
        if code not in ALLOWED_CODES:
            self.report.disallowed.append(f"{method} {code.name}: {details[:300]}")
        return responses

    def session(self, number: int) -> None:
        """One fuzz session: a random RPC with mutated requests (and sometimes a bad token)."""
        method = self.pick(
            ["robot"] * 8 + ["operator"] * 4 + ["publish"] * 2 + ["fetch", "list", "status"] + ["tokens"] * 2
        )
        self.report.sessions += 1
        if method == "tokens":
            return self.bad_token_session()
        requests = getattr(self, f"{method}_requests")(number)
        responses = self.call(method, requests, TOKENS[METHOD_TOKEN[method]][0])
        if method == "operator":
            for data in responses:
                update = pb.OperatorUpdate.FromString(data)
                if update.WhichOneof("kind") == "error":
                    self.report.operator_errors[pb.ErrorCode.Name(update.error.code)] += 1

    def bad_token_session(self) -> None:
        method = self.pick(list(METHODS))
        right = METHOD_TOKEN[method]
        token_kind = self.pick(["missing", "wrong", "long", "scheme", "other_role"])
        token, header = None, None
        if token_kind == "wrong":
            token = self.pick(["nope", "robot-tokenx", "Robot-Token", "admin"])
        elif token_kind == "long":
            token = "t" * 4000
        elif token_kind == "scheme":
            header = self.pick(["Basic cm9ib3Q=", "", "bearer", f"Bearer  {TOKENS[right][0]}x", "Bearer"])
        elif token_kind == "other_role":
            token = TOKENS[self.pick([role for role in TOKENS if role != right])][0]
        self.report.strategies[f"token:{token_kind}"] += 1
        requests = getattr(self, f"{method}_requests")(self.report.sessions)
        self.call(method, requests, token, header)

    # -- robot sessions ----------------------------------------------------------------------------

    def hello(self, robot_id: str) -> pb.RobotMessage:
        hello = pb.RobotHello(
            robot_id=robot_id, task="reliability", action_dim=ACTION_DIM, boot_id=self.hex_id()
        )
        for key, (shape, dtype) in SPEC.items():
            hello.observation_spec[key].CopyFrom(pb.TensorSpec(shape=list(shape), dtype=dtype))
        return pb.RobotMessage(hello=hello)

    def step(self, seq: int, episode: int, t: int) -> pb.RobotMessage:
        step = pb.Step(
            seq=seq,
            episode_id=episode,
            t=t,
            timestamp=time.time(),
            label=pb.CONTROL_LABEL_ROBOT,
            action=self.tensor((ACTION_DIM,)),
            signals=pb.Signals(uncertainty=float(self.rng.random())),
        )
        for key, (shape, dtype) in SPEC.items():
            step.observation[key].CopyFrom(self.tensor(shape, dtype))
        return pb.RobotMessage(step=step)

    def robot_requests(self, number: int) -> list[bytes]:
        rng_id = f"fz{number}"
        hello = self.hello(rng_id)
        hello_mutators = self.hello_mutators()
        kinds = [
            lambda: pb.RobotMessage(),
            lambda: pb.RobotMessage(heartbeat=pb.Heartbeat()),
            lambda: pb.RobotMessage(step=pb.Step()),
            lambda: pb.RobotMessage(episode_start=pb.EpisodeStart()),
            lambda: pb.RobotMessage(episode_end=pb.EpisodeEnd()),
            lambda: self.hello(rng_id),
        ]
        if self.chance(0.25):
            return [self.mutated(hello, hello_mutators, [1], list(range(1, 9)), kinds)]
        requests, seq, episode = [hello.SerializeToString()], 1, int(self.rng.integers(1, 5))
        start = pb.RobotMessage(
            episode_start=pb.EpisodeStart(episode_id=episode, seq=seq, timestamp=time.time())
        )
        requests.append(start.SerializeToString())
        t = 0
        for _ in range(int(self.rng.integers(0, 4))):
            seq += 1
            requests.append(self.step(seq, episode, t).SerializeToString())
            t += 1
        for _ in range(int(self.rng.integers(1, 4))):
            seq += 1
            template = self.pick(["step", "step", "step", "start", "end"])
            if template == "step":
                message = self.step(seq, episode, t)
                mutators = self.step_mutators()
                t += 1
            elif template == "start":
                message = pb.RobotMessage(episode_start=pb.EpisodeStart(episode_id=episode + 1, seq=seq))
                mutators = self.start_mutators()
            else:
                message = pb.RobotMessage(
                    episode_end=pb.EpisodeEnd(episode_id=episode, seq=seq, outcome="success")
                )
                mutators = self.end_mutators()
            requests.append(self.mutated(message, mutators, [2, 3, 4, 5], list(range(1, 13)), kinds))
            if self.chance(0.5):  # and go on as if nothing happened
                seq += 1
                requests.append(self.step(seq, episode, t).SerializeToString())
        return requests

    def hello_mutators(self) -> list[Callable]:
        def robot_id(m):
            m.hello.robot_id = self.pick(WEIRD_IDS)

        def text(m):
            setattr(m.hello, self.pick(["task", "policy_version", "boot_id"]), self.pick(WEIRD_TEXT))

        def dims(m):
            setattr(m.hello, self.pick(["action_dim", "goal_dim"]), self.pick(BAD_INT32))

        def last_acked(m):
            m.hello.last_acked_seq = self.pick(BAD_INTS)

        def spec_key(m):
            m.hello.observation_spec[
                self.pick(
                    ["action", "label", "signal_x", "goal", "timestamp", LONG, "a/b", "..", "", "9x", "ü"]
                )
            ].CopyFrom(pb.TensorSpec(shape=[1], dtype="float32"))

        def spec_value(m):
            spec = m.hello.observation_spec[self.pick(list(SPEC))]
            if self.chance(0.5):
                spec.dtype = self.pick(BAD_DTYPES)
            else:
                spec.shape[:] = self.pick(BAD_SHAPES + [[100_000, 100_000], [4096, 4096, 3]])

        def many_keys(m):
            for i in range(int(self.pick([65, 1000]))):
                m.hello.observation_spec[f"k{i}"].CopyFrom(pb.TensorSpec(shape=[1], dtype="uint8"))

        return [robot_id, text, dims, last_acked, spec_key, spec_value, many_keys]

    def step_mutators(self) -> list[Callable]:
        def numbers(m):
            name = self.pick(["seq", "episode_id", "t"])
            setattr(m.step, name, self.pick(BAD_INT32 if name == "t" else BAD_INTS))

        def timestamp(m):
            m.step.timestamp = self.pick(BAD_FLOATS)

        def observation_tensor(m):
            key = self.pick(list(SPEC))
            shape, dtype = SPEC[key]
            m.step.observation[key].CopyFrom(self.bad_tensor(shape, dtype))

        def observation_keys(m):
            if self.chance(0.5):
                del m.step.observation[self.pick(list(SPEC))]
            else:
                m.step.observation[self.pick(WEIRD_IDS + ["action", "extra"])].CopyFrom(self.tensor((1,)))

        def action_tensor(m):
            m.step.action.CopyFrom(self.bad_tensor())

        def no_action(m):
            m.step.ClearField("action")

        def goal(m):
            m.step.goal.CopyFrom(self.bad_tensor((3,)) if self.chance(0.5) else self.tensor((3,)))

        def label(m):
            m.step.label = self.pick([-1, 0, 1, 3, 5, 99, 2**31 - 1])

        def signals(m):
            setattr(m.step.signals, self.pick(["uncertainty", "risk", "density"]), self.pick(BAD_FLOATS))

        def text(m):
            setattr(m.step, self.pick(["policy_version", "operator_id"]), self.pick(WEIRD_TEXT))
            if self.chance(0.5):
                m.step.label = pb.CONTROL_LABEL_INTERVENTION

        def camera(m):
            m.step.camera.CopyFrom(
                pb.Image(
                    encoding=self.pick(["jpeg", "png", "gif", "", LONG]),
                    data=self.rng.bytes(int(self.pick([0, 10, 5000]))),
                    width=self.pick(BAD_INT32),
                    height=self.pick(BAD_INT32),
                )
            )

        def big(m):
            key = self.pick(list(SPEC))
            shape, dtype = SPEC[key]
            m.step.observation[key].CopyFrom(
                pb.Tensor(shape=list(shape), dtype=dtype, data=self.rng.bytes(1 << 20))
            )

        return [
            numbers,
            timestamp,
            observation_tensor,
            observation_keys,
            action_tensor,
            no_action,
            goal,
            label,
            signals,
            text,
            camera,
            big,
        ]

    def start_mutators(self) -> list[Callable]:
        def numbers(m):
            setattr(m.episode_start, self.pick(["seq", "episode_id"]), self.pick(BAD_INTS))

        def timestamp(m):
            m.episode_start.timestamp = self.pick(BAD_FLOATS)

        def goal(m):
            m.episode_start.goal.CopyFrom(self.bad_tensor((3,)))

        def text(m):
            m.episode_start.policy_version = self.pick(WEIRD_TEXT)

        return [numbers, timestamp, goal, text]

    def end_mutators(self) -> list[Callable]:
        def numbers(m):
            setattr(m.episode_end, self.pick(["seq", "episode_id"]), self.pick(BAD_INTS))

        def timestamp(m):
            m.episode_end.timestamp = self.pick(BAD_FLOATS)

        def text(m):
            m.episode_end.outcome = self.pick(WEIRD_TEXT)

        return [numbers, timestamp, text]

    # -- operator sessions -------------------------------------------------------------------------

    def operator_requests(self, number: int) -> list[bytes]:
        hello = pb.OperatorMessage(hello=pb.OperatorHello(operator_id=f"fop{number}", boot_id=self.hex_id()))
        robots = ["r0", f"fz{max(0, number - 1)}", *WEIRD_IDS]
        kinds = [
            lambda: pb.OperatorMessage(),
            lambda: pb.OperatorMessage(heartbeat=pb.Heartbeat()),
            lambda: pb.OperatorMessage(action=pb.OperatorAction()),
            lambda: pb.OperatorMessage(release=pb.Release()),
            lambda: pb.OperatorMessage(estop=pb.EStop()),
            lambda: pb.OperatorMessage(reset=pb.ResetRobot()),
            lambda: pb.OperatorMessage(hello=pb.OperatorHello(operator_id=f"fop{number}", boot_id="b")),
        ]

        def hello_ids(m):
            setattr(m.hello, self.pick(["operator_id", "boot_id"]), self.pick(WEIRD_TEXT))

        def action_msg(m):
            m.action.CopyFrom(
                pb.OperatorAction(
                    robot_id=self.pick(robots),
                    seq=self.pick(BAD_INTS),
                    frame_seq=self.pick(BAD_INTS),
                    action=self.bad_tensor() if self.chance(0.7) else self.tensor((2,)),
                )
            )

        def release(m):
            m.release.CopyFrom(pb.Release(robot_id=self.pick(robots), reason=self.pick([0, 1, 5, 99, -1])))

        def estop(m):
            # Stops of fuzz robots only: a stop on the good robot would be legitimate (any operator may engage one).
            m.estop.CopyFrom(
                pb.EStop(
                    robot_id=self.pick([r for r in robots if r not in ("", "r0")]), engage=self.chance(0.5)
                )
            )

        def reset(m):
            m.reset.CopyFrom(pb.ResetRobot(robot_id=self.pick(robots)))

        if self.chance(0.2):
            return [self.mutated(hello, [hello_ids], [1], [1, 2], kinds)]
        requests = [hello.SerializeToString()]
        template = pb.OperatorMessage(heartbeat=pb.Heartbeat())
        for _ in range(int(self.rng.integers(1, 6))):
            requests.append(
                self.mutated(
                    template, [action_msg, release, estop, reset], [2, 3, 4, 5, 6], list(range(1, 5)), kinds
                )
            )
        return requests

    # -- registry and admin ------------------------------------------------------------------------

    def publish_requests(self, number: int) -> list[bytes]:
        version = f"fz-v{number}" if self.chance(0.7) else self.pick(WEIRD_TEXT)
        chunks = []
        for filename in self.pick(
            [["config.json"], ["config.json", "model.safetensors"], [self.pick(BAD_FILENAMES)]]
        ):
            data, offset = self.rng.bytes(int(self.rng.integers(0, 2048))), 0
            pieces = [data[: len(data) // 2], data[len(data) // 2 :]] if self.chance(0.5) else [data]
            for i, piece in enumerate(pieces):
                last = i == len(pieces) - 1
                chunk = pb.CheckpointChunk(
                    version=version,
                    filename=filename,
                    data=piece,
                    offset=offset,
                    last=last,
                    sha256=hashlib.sha256(data).hexdigest() if last else "",
                )
                offset += len(piece)
                chunks.append(chunk)

        def offsets(c):
            c.offset = self.pick(BAD_INTS + [1, 2**40])

        def names(c):
            c.filename = self.pick(BAD_FILENAMES)

        def versions(c):
            c.version = self.pick(WEIRD_TEXT)

        def digest(c):
            c.sha256 = self.pick(["", "zz", "0" * 64, LONG, self.rng.bytes(32).hex()])

        def last(c):
            c.last = not c.last

        requests = [chunk.SerializeToString() for chunk in chunks]
        for _ in range(int(self.rng.integers(0, 3))):
            at = int(self.rng.integers(len(chunks)))
            requests[at] = self.mutated(
                chunks[at],
                [offsets, names, versions, digest, last],
                [1, 2, 3, 4, 5, 6],
                [1],
                [pb.CheckpointChunk],
            )
        return requests

    def fetch_requests(self, number: int) -> list[bytes]:
        request = pb.FetchRequest(version=self.pick(["", f"fz-v{max(0, number - 1)}", *WEIRD_TEXT]))
        if self.chance(0.4):
            return [self.mutate_bytes(request.SerializeToString())[1]]
        return [request.SerializeToString()]

    def list_requests(self, number: int) -> list[bytes]:
        return [self.mutate_bytes(b"")[1] if self.chance(0.7) else b""]

    def status_requests(self, number: int) -> list[bytes]:
        return [self.mutate_bytes(b"")[1] if self.chance(0.7) else b""]

    # -- a dictionary pass -------------------------------------------------------------------------

    def corpus(self) -> list[Callable[[], None]]:
        """Deterministic sessions run before the random ones: every weird value once in every field that
        names something (robot, operator, version and file names) or declares a dtype or shape."""
        robot, operator, trainer = (TOKENS[role][0] for role in ("robot", "operator", "trainer"))
        calls: list[Callable[[], None]] = []

        def robot_hello(**fields) -> list[bytes]:
            message = self.hello("fz-corpus")
            for name, value in fields.items():
                setattr(message.hello, name, value)
            return [message.SerializeToString()]

        def robot_spec(dtype: str, shape: list[int]) -> list[bytes]:
            message = self.hello("fz-corpus")
            message.hello.observation_spec["state"].CopyFrom(pb.TensorSpec(shape=shape, dtype=dtype))
            return [message.SerializeToString()]

        def publish(version: str, filename: str) -> list[bytes]:
            data = b"{}"
            chunk = pb.CheckpointChunk(
                version=version,
                filename=filename,
                data=data,
                last=True,
                sha256=hashlib.sha256(data).hexdigest(),
            )
            return [chunk.SerializeToString()]

        def operator_hello(operator_id: str) -> list[bytes]:
            hello = pb.OperatorHello(operator_id=operator_id, boot_id=self.hex_id())
            return [pb.OperatorMessage(hello=hello).SerializeToString()]

        for value in WEIRD_TEXT:
            calls.append(lambda v=value: self.call("robot", robot_hello(robot_id=v), robot))
            calls.append(lambda v=value: self.call("robot", robot_hello(boot_id=v), robot))
            calls.append(lambda v=value: self.call("robot", robot_hello(task=v), robot))
            calls.append(lambda v=value: self.call("operator", operator_hello(v), operator))
            calls.append(lambda v=value: self.call("publish", publish(v, "config.json"), trainer))
            calls.append(
                lambda v=value: self.call("fetch", [pb.FetchRequest(version=v).SerializeToString()], robot)
            )
        for n, filename in enumerate(BAD_FILENAMES):
            calls.append(lambda n=n, f=filename: self.call("publish", publish(f"fz-file-{n}", f), trainer))
        for dtype in BAD_DTYPES:
            calls.append(lambda d=dtype: self.call("robot", robot_spec(d, [3]), robot))
        for shape in BAD_SHAPES:
            calls.append(lambda s=shape: self.call("robot", robot_spec("float32", s), robot))
        return calls

    # -- the server is still there -----------------------------------------------------------------

    def check_status(self) -> None:
        from fleet.proto import flotilla_pb2_grpc as pb_grpc

        self.report.status_checks += 1
        try:
            status = pb_grpc.AdminServiceStub(self.channels[0]).Status(
                pb.StatusRequest(), metadata=(("authorization", f"Bearer {TOKENS['admin'][0]}"),), timeout=5
            )
            if not status.writer_healthy:
                self.report.status_failures.append(f"writer not healthy: {status.writer_error}")
        except grpc.RpcError as err:
            self.report.status_failures.append(f"{err.code().name}: {err.details()}")


def run_fuzz(
    workdir: Path,
    sessions: int = 300,
    seed: int = 0,
    hz: float = 100.0,
    log: Callable[[str], None] = lambda line: None,
) -> FuzzReport:
    """A server (ServerThread, in this process: its log is captured) on a fresh store; a good robot streams
    episodes while `sessions` fuzz sessions run; then the good robot's episodes are read back."""
    from fleet.server import AllocationConfig, ServerConfig, ServerThread

    workdir = Path(workdir)
    # C.U.R. with fixed thresholds: the good robot's calm signals never get it a human (its labels stay robot).
    config = ServerConfig(
        port=0,
        metrics_port=None,
        tokens=TOKENS,
        store=str(workdir / "fleet.zarr"),
        registry_dir=str(workdir / "registry"),
        shutdown_grace_s=0.5,
        allocation=AllocationConfig(
            rule="cur", tick_hz=20, t_T=3, t_R=2, uncertainty_threshold=0.5, risk_threshold=0.5
        ),
    )
    capture = LogCapture()
    began = time.monotonic()
    with capture.installed():
        server = ServerThread(config).start()
        fuzzer = None
        good = robot_client(server.address, 0).start()
        streamer = EpisodeStreamer(good, 0, seed, hz, (5, 15), signals={"uncertainty": 0.0})
        try:
            streamer.start()
            # The first committed episode fixes the store's schema: no fuzz robot may fix another one.
            wait_until(
                lambda: streamer.records and good.state.committed_seq >= streamer.records[0].end_seq,
                30,
                "the good robot's first committed episode",
            )
            mark = len(capture.records)
            fuzzer = Fuzzer(server.address, seed)
            for number, call in enumerate(fuzzer.corpus()):
                fuzzer.report.sessions += 1
                fuzzer.report.corpus_sessions += 1
                call()
                if number % 25 == 0:
                    fuzzer.check_status()
            for number in range(sessions):
                fuzzer.session(number)
                if number % 25 == 0:
                    fuzzer.check_status()
            fuzzer.check_status()
            fuzz_records = capture.records[mark:]
            streamer.stop()
            if not good.wait_committed(timeout=60):
                log(f"good robot: committed_seq {good.state.committed_seq} < last seq {good.last_seq}")
            good.close(timeout=10)
        finally:
            with contextlib.suppress(BaseException):
                streamer.stop(5)
            good.close(timeout=1)
            if fuzzer is not None:
                fuzzer.close()
            server.stop()
    report = fuzzer.report
    server_records = [r for r in fuzz_records if not r.name.startswith(("fleet.client", "tests."))]
    report.warnings = len(server_records)
    report.warning_kinds = collections.Counter(f"{r.name}: {_clip(str(r.msg), 80)}" for r in server_records)
    report.tracebacks = sum(1 for r in server_records if r.exc_info or "Traceback" in r.getMessage())
    report.log_samples = [
        f"{r.levelname} {r.name}: {_clip(r.getMessage(), 300)}" for r in server_records[:20]
    ]
    distinct: dict[
        tuple, str
    ] = {}  # (exception type, where it was raised) -> the record and traceback, clipped
    for r in server_records:
        if r.exc_info:
            frames = traceback.extract_tb(r.exc_info[2])
            where = (r.exc_info[0].__name__, *((frames[-1].filename, frames[-1].lineno) if frames else ()))
            text = "".join(traceback.format_exception(*r.exc_info))
            distinct.setdefault(
                where, f"{r.levelname} {r.name}: {_clip(r.getMessage(), 300)}\n{_clip(text, 3000)}"
            )
    report.traceback_samples = list(distinct.values())
    report.good_error = str(good.error or "")
    report.good_check = check_store(
        workdir / "fleet.zarr", {0: good}, streamer.records, ignore_robot=lambda robot_id: robot_id != "r0"
    )
    report.good_episodes = report.good_check.episodes_found
    report.seconds = time.monotonic() - began
    return report
