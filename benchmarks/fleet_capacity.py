"""Fleet server capacity: the largest fleet of robots streaming at 10 Hz that one server takes with
p99 step->command latency under 25 ms and no lost steps.

    python -m benchmarks.fleet_capacity [--sizes 50 100 200 400 700 1000] [--seconds 20] [--clients 2]

Per fleet size: a real fleet server (fleet/server, real gRPC on a free 127.0.0.1 port, a real episode
store on disk) in its own process, and lightweight robots (no physics, no torch) in `--clients` other
processes, many gRPC streams per channel, so neither side shares the other's GIL. Each robot speaks
the protocol the way RobotClient does for a RobotAgent: hello, episode_start, steps at 10 Hz (push-task
shaped low-dim observation, goal, a valid action, label ROBOT, signals), episode_end, then it finishes
its stream. Episodes are `--episode-steps` long; the first one of each robot is cut short by a
staggered amount so episode ends (and store commits) spread out over time, as in a real fleet.

Latency: the server answers every accepted step with a Command whose ack_seq is that step's seq
(fleet/server/fleet.py: Fleet.robot_step -> _push), so the latency is measured at the robot from
just before writing the step to receiving the first Command with ack_seq >= seq. It includes both
gRPC hops and the client's own event loop, so it is what a robot would see.

Lost steps are counted exactly: after the run the server stops gracefully (its writer commits what
it holds) and the store is read back; for every (robot, episode) the committed length is compared with
the steps the robot sent. A step refused by the server (its writer queue full) ends that robot's stream
here (RobotClient would reconnect and resend it) and counts as lost and as a stream error.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import multiprocessing
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.common import machine_line, print_table

TOKEN = "bench-robot-token"
PERIOD_S = 0.1  # 10 Hz, sim/conventions.py CONTROL_HZ
# The push task's low-dim observation (sim/conventions.py), its goal and action.
OBSERVATION_SPEC = {
    "joint_pos": ((7,), "float32"),
    "ee_pos": ((3,), "float32"),
    "ee_quat": ((4,), "float32"),
    "gripper": ((1,), "float32"),
    "object_pos": ((3,), "float32"),
    "object_quat": ((4,), "float32"),
}
GOAL_DIM, ACTION_DIM = 2, 4
P99_GOAL_MS = 25.0
MIN_RATE = 0.98  # a size whose robots could not keep 98% of 10 Hz was not really tested
FINISH_TIMEOUT_S = 120.0  # how long robots wait, after their last step, for the server to ack everything


@dataclass
class RobotLog:
    """What one synthetic robot sent and heard back."""

    robot_id: str
    sent: int = 0  # steps written (seq 1..sent)
    acked: int = 0  # steps acknowledged
    latencies_ms: list[float] = field(default_factory=list)  # one per acked step
    lag_ms: list[float] = field(default_factory=list)  # how late each step went out against its 10 Hz slot
    episodes: dict[int, list[float]] = field(default_factory=dict)  # episode id -> timestamps of its steps
    error: str = ""


@dataclass
class SizeResult:
    robots: int
    seconds: float
    sent: int
    acked: int
    committed: int
    lost: int  # sent but not in the store
    extra: int  # in the store but never sent (duplicates): must be 0 too
    latencies_ms: np.ndarray
    lag_ms: np.ndarray
    server_cpu: float  # percent of one core over the streaming window
    client_cpu: float
    others_cpu: (
        float | None
    )  # percent of one core used by everything else (the machine may be shared); None off Linux
    server_latency_ms: float  # the server's own mean receive->send time (its Prometheus histogram)
    errors: list[str]
    logs: list[RobotLog]
    store: str

    @property
    def rate(self) -> float:
        """Steps per second; robots that fell behind their 10 Hz slots stretch the time it took."""
        late_s = max((log.lag_ms[-1] for log in self.logs if log.lag_ms), default=0.0) / 1000
        return self.sent / (self.seconds + late_s)

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms.size else float("nan")

    @property
    def meets_goal(self) -> bool:
        return (
            self.lost == 0
            and self.extra == 0
            and not self.errors
            and self.percentile(99) < P99_GOAL_MS
            and self.rate >= MIN_RATE * self.robots / PERIOD_S
        )


# ------------------------------------------------------------------------------------ the server process


def server_config(folder: Path):
    from fleet.server import ServerConfig

    # Defaults of configs/serve.yaml (flotilla allocation at 10 Hz, writer queue, batching), no metrics port.
    return ServerConfig(
        port=0,
        metrics_port=None,
        tokens={"robot": [TOKEN]},
        store=str(folder / "fleet.zarr"),
        registry_dir=str(folder / "registry"),
        allocation={"alpha": 0.05},
    )


def _serve(config, conn, profile: str | None = None) -> None:
    """The server process: start, report the port, answer "cpu" and "stop" requests over `conn`."""
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.runcall(asyncio.run, _serve_async(config, conn))
        profiler.dump_stats(profile)
    else:
        asyncio.run(_serve_async(config, conn))


async def _serve_async(config, conn) -> None:
    from fleet.server import FleetServer

    server = FleetServer(config)
    await server.start()
    conn.send(server.port)
    loop = asyncio.get_running_loop()
    while True:
        request = await loop.run_in_executor(None, conn.recv)  # a thread, so the event loop keeps serving
        if request == "cpu":
            conn.send(time.process_time())
        elif request == "stop":
            await server.stop()  # graceful: the writer commits everything it was handed
            hist = server.metrics.step_latency
            conn.send(1000 * hist.total / max(hist.count, 1))  # its mean receive->send time, ms
            return


# ----------------------------------------------------------------------------------- the robot processes


def _hello(robot_id: str):
    from fleet.proto import flotilla_pb2 as pb

    hello = pb.RobotHello(
        robot_id=robot_id,
        task="push",
        policy_version="bench",
        action_dim=ACTION_DIM,
        goal_dim=GOAL_DIM,
        boot_id=f"{robot_id}-{os.getpid()}-{time.time_ns()}",
    )
    for key, (shape, dtype) in OBSERVATION_SPEC.items():
        hello.observation_spec[key].CopyFrom(pb.TensorSpec(shape=shape, dtype=dtype))
    return hello


def _spec():
    from fleet.server.robots import RobotSpec

    return RobotSpec.from_hello(_hello("any"), max_step_bytes=1 << 30)


class SyntheticRobot:
    """One robot's session: the messages RobotClient sends for a RobotAgent, built once with fleet.codec
    and updated in place per step (seq, t, timestamp, signals), so a client process can run hundreds."""

    def __init__(self, robot_id: str, index: int, fleet_size: int, episode_steps: int):
        from fleet import codec
        from fleet.proto import flotilla_pb2 as pb

        self.pb = pb
        self.log = RobotLog(robot_id)
        rng = np.random.default_rng(index)
        self.hello = pb.RobotMessage(hello=_hello(robot_id))
        self.goal = codec.to_tensor(rng.uniform(-0.2, 0.2, GOAL_DIM).astype(np.float32))
        step = pb.Step(
            action=codec.to_tensor(rng.uniform(-1, 1, ACTION_DIM).astype(np.float32)),
            goal=self.goal,
            label=pb.CONTROL_LABEL_ROBOT,
            policy_version="bench",
        )
        for key, (shape, dtype) in OBSERVATION_SPEC.items():
            step.observation[key].CopyFrom(codec.to_tensor(rng.normal(size=shape).astype(dtype)))
        self.step_message = pb.RobotMessage(step=step)
        self.uncertainty = rng.uniform(0.0, 0.3, 16).astype(np.float32).tolist()  # a signal that moves
        self.phase = PERIOD_S * index / fleet_size  # spread the fleet's steps evenly over a period
        self.episode_steps = episode_steps
        self.first_episode_steps = episode_steps - (index * episode_steps) // fleet_size  # stagger the ends
        self.pending: collections.deque[tuple[int, float]] = collections.deque()  # (step seq, sent at)
        self.seq = 0  # one counter for every message, as RobotClient numbers them
        self.connected = asyncio.Event()
        self.call = None
        self.reader: asyncio.Task | None = None

    async def connect(self, channel) -> None:
        from fleet.proto import flotilla_pb2_grpc as pb_grpc

        self.call = pb_grpc.RobotServiceStub(channel).Session(
            metadata=(("authorization", f"Bearer {TOKEN}"),)
        )
        self.reader = asyncio.ensure_future(self._read())
        await self.call.write(self.hello)
        await self.connected.wait()  # the server's first Command answers the hello

    async def _read(self) -> None:
        import grpc

        log, pending = self.log, self.pending
        try:
            async for command in self.call:
                now = time.perf_counter()
                self.connected.set()
                while pending and pending[0][0] <= command.ack_seq:
                    log.latencies_ms.append(1000 * (now - pending.popleft()[1]))
                    log.acked += 1
        except grpc.aio.AioRpcError as err:
            log.error = log.error or f"{err.code().name}: {err.details()}"
        finally:
            self.connected.set()

    async def stream(self, start: float, stop: float) -> None:
        """Steps at 10 Hz on slots start + phase + k * PERIOD_S until `stop`, in episodes; then finish."""
        import grpc

        pb, log, loop = self.pb, self.log, asyncio.get_running_loop()
        step = self.step_message.step
        episode, left, k = 0, 0, 0
        try:
            while (slot := start + self.phase + k * PERIOD_S) < stop and not log.error:
                delay = slot - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                log.lag_ms.append(1000 * max(0.0, loop.time() - slot))
                if left == 0:
                    episode += 1
                    left = self.first_episode_steps if episode == 1 else self.episode_steps
                    log.episodes[episode] = []
                    self.seq += 1
                    await self.call.write(
                        pb.RobotMessage(
                            episode_start=pb.EpisodeStart(
                                episode_id=episode,
                                goal=self.goal,
                                policy_version="bench",
                                timestamp=time.time(),
                                seq=self.seq,
                            )
                        )
                    )
                log.sent += 1
                self.seq += 1
                step.seq, step.episode_id, step.t = self.seq, episode, len(log.episodes[episode])
                step.timestamp = time.time()
                step.signals.uncertainty = self.uncertainty[k % len(self.uncertainty)]
                log.episodes[episode].append(step.timestamp)
                self.pending.append((self.seq, time.perf_counter()))
                await self.call.write(self.step_message)  # serialized before the await: reuse is safe
                left -= 1
                k += 1
                if left == 0:
                    await self._end(episode, True, "success")
            if left:
                await self._end(episode, False, "benchmark_end")
            await self.call.done_writing()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as err:
            log.error = log.error or f"write failed: {err}"

    async def _end(self, episode: int, success: bool, outcome: str) -> None:
        self.seq += 1
        await self.call.write(
            self.pb.RobotMessage(
                episode_end=self.pb.EpisodeEnd(
                    episode_id=episode, success=success, outcome=outcome, timestamp=time.time(), seq=self.seq
                )
            )
        )

    async def finish(self, timeout: float) -> None:
        """Wait for the server to finish the stream (every ack is in by then)."""
        try:
            await asyncio.wait_for(asyncio.shield(self.reader), timeout)
        except TimeoutError:
            self.log.error = self.log.error or f"the stream did not finish within {timeout} s"
            self.call.cancel()


def _robots(
    address: str, first: int, count: int, fleet_size: int, episode_steps: int, streams_per_channel: int, conn
) -> None:
    """A client process: `count` robots, indices first..first+count-1 of the fleet."""
    asyncio.run(_robots_async(address, first, count, fleet_size, episode_steps, streams_per_channel, conn))


async def _robots_async(address, first, count, fleet_size, episode_steps, streams_per_channel, conn) -> None:
    import grpc

    loop = asyncio.get_running_loop()
    # A local subchannel pool: each channel its own TCP connection (gRPC would otherwise share one).
    channels = [
        grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(-(-count // streams_per_channel))
    ]
    robots = [
        SyntheticRobot(f"robot-{index:04d}", index, fleet_size, episode_steps)
        for index in range(first, first + count)
    ]
    await asyncio.wait_for(
        asyncio.gather(
            *(robot.connect(channels[n // streams_per_channel]) for n, robot in enumerate(robots))
        ),
        60,
    )
    conn.send("ready")
    start_wall, seconds = await loop.run_in_executor(None, conn.recv)
    start = loop.time() + (start_wall - time.time())
    await asyncio.sleep(max(0.0, start - loop.time()))
    cpu = time.process_time()
    await asyncio.gather(*(robot.stream(start, start + seconds) for robot in robots))
    cpu = time.process_time() - cpu
    # An overloaded server may still be working through a backlog of seconds: give it time, so what a
    # size loses is what the server lost, not what the robots gave up on.
    await asyncio.gather(*(robot.finish(FINISH_TIMEOUT_S) for robot in robots))
    for channel in channels:
        await channel.close()
    conn.send((cpu, [robot.log for robot in robots]))


# -------------------------------------------------------------------------------------------- one size


def _machine_busy() -> tuple[int, int] | None:
    """(busy, total) jiffies of all cores from /proc/stat (Linux), None elsewhere."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return None
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def _receive(conn, timeout: float, what: str, *processes):
    """The next message on `conn`; RuntimeError if it does not come in time or a process died."""
    deadline = time.monotonic() + timeout
    while not conn.poll(0.2):
        dead = [p.name for p in processes if not p.is_alive()]
        if dead or time.monotonic() > deadline:
            raise RuntimeError(
                f"waiting for {what}: " + (f"{dead} exited" if dead else f"nothing within {timeout} s")
            )
    return conn.recv()


def run_fleet(
    robots: int,
    seconds: float,
    folder: Path,
    clients: int = 2,
    episode_steps: int = 100,
    streams_per_channel: int = 100,
    profile: str | None = None,
) -> SizeResult:
    """Serve `robots` synthetic robots for `seconds`, stop gracefully, read the store back."""
    from fleet.store import EpisodeStore

    context = multiprocessing.get_context("spawn")  # never fork a process that may have started gRPC
    config = server_config(folder)
    # A server normally runs on an existing store: create it with the fleet's schema up front, so the
    # one-off creation of every array does not stall the writer in the first second of the measurement.
    EpisodeStore.create(config.store, _spec().store_schema(), overwrite=True).close()
    server_conn, child_conn = context.Pipe()
    server = context.Process(
        target=_serve, args=(config, child_conn, profile), name="fleet-server", daemon=True
    )
    server.start()
    client_procs, conns = [], []
    try:
        address = f"127.0.0.1:{_receive(server_conn, 60, 'the fleet server to start', server)}"
        clients = max(1, min(clients, robots))
        bounds = np.linspace(0, robots, clients + 1).astype(int)
        for first, end in zip(bounds[:-1], bounds[1:], strict=True):
            parent, child = context.Pipe()
            process = context.Process(
                target=_robots,
                name="robots",
                daemon=True,
                args=(
                    address,
                    int(first),
                    int(end - first),
                    robots,
                    episode_steps,
                    streams_per_channel,
                    child,
                ),
            )
            process.start()
            client_procs.append(process)
            conns.append(parent)
        for conn, process in zip(conns, client_procs, strict=True):
            _receive(conn, 90, "the robots to connect", process, server)
        start = time.time() + 0.5
        for conn in conns:
            conn.send((start, seconds))
        time.sleep(max(0.0, start - time.time()))
        server_conn.send("cpu")
        cpu0, busy0 = _receive(server_conn, 30, "the server's CPU time", server), _machine_busy()
        time.sleep(max(0.0, start + seconds - time.time()))
        server_conn.send("cpu")
        cpu1, busy1 = _receive(server_conn, 30, "the server's CPU time", server), _machine_busy()
        client_cpu, logs = 0.0, []
        for conn, process in zip(conns, client_procs, strict=True):
            cpu, robot_logs = _receive(conn, FINISH_TIMEOUT_S + 60, "the robots to finish", process)
            client_cpu += cpu
            logs += robot_logs
        server_conn.send("stop")
        server_latency_ms = _receive(server_conn, 120, "the fleet server to stop", server)
        server.join(30)
    finally:
        for process in (*client_procs, server):
            if process.is_alive():
                process.terminate()

    # Lost steps, exactly: the store's committed episodes against what every robot sent.
    with EpisodeStore.open(config.store) as store:
        ends = store.episode_ends
        lengths = np.diff(ends, prepend=0)
        robot_ids = store.meta_column("robot_id") if len(ends) else []
        extras = store.meta_column("extra") if len(ends) else []

    committed_lengths = collections.Counter()
    for robot_id, extra, length in zip(robot_ids, extras, lengths, strict=True):
        committed_lengths[(str(robot_id), json.loads(str(extra))["robot_episode_id"])] += int(length)
    sent_lengths = {
        (log.robot_id, episode): len(stamps) for log in logs for episode, stamps in log.episodes.items()
    }
    lost = sum(max(0, n - committed_lengths.get(key, 0)) for key, n in sent_lengths.items())
    extra = sum(max(0, n - sent_lengths.get(key, 0)) for key, n in committed_lengths.items())
    server_cpu, client_cpu = 100.0 * (cpu1 - cpu0) / seconds, 100.0 * client_cpu / seconds
    others = None
    if busy0 is not None and busy1 is not None:
        machine = 100.0 * os.cpu_count() * (busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1])
        others = max(0.0, machine - server_cpu - client_cpu)
    return SizeResult(
        robots=robots,
        seconds=seconds,
        sent=sum(log.sent for log in logs),
        acked=sum(log.acked for log in logs),
        committed=int(lengths.sum()),
        lost=lost,
        extra=extra,
        latencies_ms=np.array([v for log in logs for v in log.latencies_ms]),
        lag_ms=np.array([v for log in logs for v in log.lag_ms]),
        server_cpu=server_cpu,
        client_cpu=client_cpu,
        others_cpu=others,
        server_latency_ms=server_latency_ms,
        errors=[f"{log.robot_id}: {log.error}" for log in logs if log.error],
        logs=logs,
        store=config.store,
    )


def row(result: SizeResult) -> list:
    return [
        result.robots,
        result.rate,
        result.percentile(50),
        result.percentile(99),
        float(result.latencies_ms.max()) if result.latencies_ms.size else float("nan"),
        result.server_latency_ms,
        result.sent,
        result.acked,
        result.committed,
        result.lost,
        len(result.errors),
        float(np.percentile(result.lag_ms, 99)) if result.lag_ms.size else float("nan"),
        f"{result.server_cpu:.0f}%",
        f"{result.client_cpu:.0f}%",
        "-" if result.others_cpu is None else f"{result.others_cpu:.0f}%",
        "yes" if result.meets_goal else "no",
    ]


HEADERS = [
    "robots",
    "steps/s",
    "p50 ms",
    "p99 ms",
    "max ms",
    "server mean ms",
    "sent",
    "acked",
    "committed",
    "lost",
    "stream errors",
    "send lag p99 ms",
    "server CPU",
    "robots CPU",
    "others CPU",
    "goal met",
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 100, 200, 400, 700, 1000])
    parser.add_argument("--seconds", type=float, default=20.0, help="streaming time per fleet size")
    parser.add_argument("--clients", type=int, default=2, help="robot client processes")
    parser.add_argument("--streams-per-channel", type=int, default=100)
    parser.add_argument("--episode-steps", type=int, default=100)
    parser.add_argument(
        "--out", type=Path, default=None, help="keep the stores here (default: a temp folder)"
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="cProfile the server's event loop thread; writes PROFILE-<size>.prof per size",
    )
    args = parser.parse_args()
    print(machine_line(), f"(load average {os.getloadavg()[0]:.2f} at start)")
    print(
        f"{args.seconds:g} s per size at 10 Hz, {args.clients} robot process(es), episodes of "
        f"{args.episode_steps} steps; goal: p99 < {P99_GOAL_MS:g} ms and no lost steps\n"
    )
    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            folder = (args.out or Path(tmp)) / f"fleet-{size}"
            folder.mkdir(parents=True, exist_ok=True)
            profile = f"{args.profile}-{size}.prof" if args.profile else None
            result = run_fleet(
                size,
                args.seconds,
                folder,
                args.clients,
                args.episode_steps,
                args.streams_per_channel,
                profile,
            )
            results.append(result)
            rows.append(row(result))
            for error in result.errors[:3]:
                print(f"  {size} robots: {error}")
            print(f"  {size} robots done: p99 {result.percentile(99):.1f} ms, lost {result.lost}", flush=True)
    print()
    print_table(HEADERS, rows)
    passed = [r.robots for r in results if r.meets_goal]
    print(f"\nlargest fleet meeting the goal: {max(passed) if passed else 'none'} robots")


if __name__ == "__main__":
    main()
