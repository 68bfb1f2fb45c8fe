"""Resource attacks on `flotilla serve` (a subprocess on 127.0.0.1): what a token holder's streams cost the
server, in resident memory (RSS, /proc) and file descriptors, and whether it stays responsive.

    python -m benchmarks.attacks [--streams 3000] [--fetches 400] [--resends 300000] [--held 4000]
                                 [--only held_streams starved_fetch ...] [--uncapped]

- silent: streams opened with a robot token that never send their hello (ended after hello_timeout_s);
- deaf robot: a robot that sends a resent message as fast as it can and never reads its Commands (its
  replies stall; ended after stalled_reader_s, its outbox bounded);
- deaf fetch: Fetch streams of a 16 MB checkpoint that never read (at most max_concurrent_fetches send;
  a stalled one is ended after stalled_reader_s).
- big steps: a robot whose hello declares a 16 MB float32 observation (max_step_bytes) streams one long
  episode of such steps (the episode is cut at max_episode_bytes, here 256 MiB; chunks hold <= 4 MiB).
- many ids: `--ids` robot ids of one token, each streaming 24 such steps at once (each episode is cut at
  256 MiB, all open ones together at max_open_episode_bytes, here 512 MiB);
- held streams: robot sessions of one token held open at once (hello_timeout_s 60 s here: they stay
  as stalled streams do); how many max_calls_per_token (2048) lets in;
- starved fetch: deaf fetches from 127.0.0.1 with the robot token, then a fetch by the trainer token from
  ::1: how long it waits for a turn (max_fetches_per_caller, 4 of 16, per token and per address).
`--uncapped` serves without the per-token/address caps, as before they existed.
Each row: RSS when the attack began, at its peak, and after the server's timeouts ran (freed memory stays
with the process: the silent streams come in two waves, the second after the first was ended, so a peak
that does not grow with the second wave is memory given back); open file descriptors; how long
AdminService.Status took at the end. The fixes and tests: tests/test_fleet_attacks.py.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np

from benchmarks.common import machine_line, print_table
from fleet import codec
from fleet.client import fetch_checkpoint, publish_checkpoint
from fleet.proto import flotilla_pb2 as pb
from fleet.proto import flotilla_pb2_grpc as pb_grpc
from tests.fleet_harness import TOKEN, ServeProcess, free_port, serve_overrides

# Shorter than the defaults (10 s, 1 GiB): a quicker run. Held streams: a hello timeout long enough that
# they stay open as stalled ones do; localhost: served on ::1 too (another address for starved fetch).
TIMEOUTS = (
    "hello_timeout_s=3",
    "stalled_reader_s=3",
    "max_episode_bytes=268435456",
    "max_open_episode_bytes=536870912",
    "host=localhost",
)
HELD_TIMEOUT = "hello_timeout_s=60"
# --uncapped: as before the per-token/address caps (max_concurrent_fetches is 16).
UNCAPPED = (
    "max_calls_per_token=1000000",
    "max_calls_per_peer=1000000",
    "max_fetches_per_caller=16",
    "max_open_episode_bytes=1000000000000000",
)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return float("nan")


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def metadata(role: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {TOKEN[role]}")]


def status_s(address: str) -> float:
    began = time.monotonic()
    with grpc.insecure_channel(address) as channel:
        pb_grpc.AdminServiceStub(channel).Status(pb.StatusRequest(), metadata=metadata("admin"), timeout=30)
    return time.monotonic() - began


def watch(server: ServeProcess, seconds: float) -> tuple[float, float]:
    """Peak RSS while waiting `seconds`; then the RSS."""
    peak, deadline = rss_mb(server.pid), time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.5)
        peak = max(peak, rss_mb(server.pid))
    return peak, rss_mb(server.pid)


def silent_streams(server: ServeProcess, count: int) -> list:
    never = threading.Event()

    def silence():
        never.wait(120)
        yield from ()

    channels = [grpc.insecure_channel(server.address) for _ in range(max(1, count // 300))]
    calls = []
    for wave in range(2):
        if wave:
            time.sleep(int(TIMEOUTS[0].split("=")[1]) + 1.0)  # the first wave ended by hello_timeout_s
        calls += [
            pb_grpc.RobotServiceStub(channels[n % len(channels)]).Session(
                silence(), metadata=metadata("robot")
            )
            for n in range(count // 2)
        ]
    return [calls, never, channels]


def deaf_robot(server: ServeProcess, resends: int) -> list:
    def requests():
        yield pb.RobotMessage(
            hello=pb.RobotHello(robot_id="deaf", task="attack", action_dim=2, boot_id="deaf-boot")
        )
        message = pb.RobotMessage(episode_start=pb.EpisodeStart(episode_id=1, seq=1))
        for _ in range(resends + 1):
            yield message

    channel = grpc.insecure_channel(server.address)
    return [[pb_grpc.RobotServiceStub(channel).Session(requests(), metadata=metadata("robot"))], channel]


def big_steps(server: ServeProcess, count: int, robot_id: str = "big") -> list:
    data = codec.to_tensor(np.zeros((2048, 2048), np.float32))

    def requests():
        hello = pb.RobotHello(robot_id=robot_id, task="attack", action_dim=2, boot_id=f"{robot_id}-boot")
        hello.observation_spec["x"].CopyFrom(pb.TensorSpec(shape=[2048, 2048], dtype="float32"))
        yield pb.RobotMessage(hello=hello)
        yield pb.RobotMessage(episode_start=pb.EpisodeStart(episode_id=1, seq=1))
        for t in range(count):
            step = pb.Step(seq=t + 2, episode_id=1, t=t, action=codec.to_tensor(np.zeros(2, np.float32)))
            step.label = pb.CONTROL_LABEL_ROBOT
            step.observation["x"].CopyFrom(data)
            yield pb.RobotMessage(step=step)

    channel = grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", 64 << 20)])
    call = pb_grpc.RobotServiceStub(channel).Session(requests(), metadata=metadata("robot"))
    threading.Thread(target=lambda: [None for _ in call], daemon=True).start()  # read its commands
    return [[call], channel]


def many_ids(server: ServeProcess, ids: int, steps: int) -> list:
    """big_steps from `ids` robot ids of one token at once, `steps` each."""
    held = [big_steps(server, steps, f"big-{n}") for n in range(ids)]
    return [[call for calls, _ in held for call in calls], [channel for _, channel in held]]


def deaf_fetches(server: ServeProcess, count: int, workdir: Path, address: str = "") -> list:
    folder = workdir / "checkpoint"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text('{"format": 1}')
    (folder / "model.safetensors").write_bytes(np.random.default_rng(0).bytes(16 * 1024 * 1024))
    publish_checkpoint(server.address, TOKEN["trainer"], folder, "v1")
    channels = [grpc.insecure_channel(address or server.address) for _ in range(max(1, count // 50))]
    calls = [
        pb_grpc.RegistryServiceStub(channels[n % len(channels)]).Fetch(
            pb.FetchRequest(), metadata=metadata("robot")
        )
        for n in range(count)
    ]
    return [calls, channels]


def held_streams(server: ServeProcess, count: int) -> list:
    """`count` robot sessions of one token held open at once (no hello; hello_timeout_s is long here, as a
    stalled stream stays until its peer reads or disconnects): how many the server takes."""
    never = threading.Event()

    def silence():
        never.wait(120)
        yield from ()

    channels = [grpc.insecure_channel(server.address) for _ in range(max(1, count // 300))]
    calls = [
        pb_grpc.RobotServiceStub(channels[n % len(channels)]).Session(silence(), metadata=metadata("robot"))
        for n in range(count)
    ]
    time.sleep(3.0)
    refused = sum(1 for call in calls if call.done() and call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED)
    print(f"held streams: {count - refused} of {count} open, {refused} refused (RESOURCE_EXHAUSTED)")
    return [calls, never, channels]


def starved_fetch(server: ServeProcess, count: int, workdir: Path) -> list:
    """deaf_fetches from 127.0.0.1 with the robot token, then a fetch by another token from another
    address (::1): how long it waits for a turn (capped at 30 s)."""
    port = server.address.rsplit(":", 1)[1]
    held = deaf_fetches(server, count, workdir, f"127.0.0.1:{port}")
    time.sleep(1.0)
    done: list[float] = []
    began = time.monotonic()

    def fetch() -> None:
        with contextlib.suppress(grpc.RpcError):  # still waiting when the server is killed: > 30 s
            fetch_checkpoint(f"[::1]:{port}", TOKEN["trainer"], workdir / "fetched")
            done.append(time.monotonic() - began)

    thread = threading.Thread(target=fetch, daemon=True)
    thread.start()
    thread.join(30)
    print(f"starved fetch: another caller's fetch took {done[0]:.2f} s" if done else "starved fetch: > 30 s")
    return held


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=3000, help="silent streams")
    parser.add_argument("--fetches", type=int, default=400, help="Fetch streams that never read")
    parser.add_argument("--resends", type=int, default=300_000, help="messages of the deaf robot")
    parser.add_argument("--big-steps", type=int, default=200, help="16 MB steps of the big robot")
    parser.add_argument("--ids", type=int, default=8, help="robot ids of one token sending 16 MB steps")
    parser.add_argument("--held", type=int, default=4000, help="robot sessions of one token held open")
    parser.add_argument("--wait", type=float, default=8.0, help="seconds to watch after each attack")
    parser.add_argument("--only", nargs="+", default=None, help="run only these attacks (their names)")
    parser.add_argument(
        "--uncapped", action="store_true", help="no per-token/address caps (as before they existed)"
    )
    args = parser.parse_args()
    merged = dict(item.split("=", 1) for item in (*TIMEOUTS, *(UNCAPPED if args.uncapped else ())))
    settings = tuple(f"{key}={value}" for key, value in merged.items())
    print(machine_line(), "| load:", " ".join(f"{x:.2f}" for x in os.getloadavg()), flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        attacks = [
            ("silent streams", args.streams, lambda s: silent_streams(s, args.streams), args.wait),
            ("deaf robot", args.resends, lambda s: deaf_robot(s, args.resends), args.wait),
            ("deaf fetches", args.fetches, lambda s: deaf_fetches(s, args.fetches, workdir), args.wait),
            ("big steps", args.big_steps, lambda s: big_steps(s, args.big_steps), 4 * args.wait),
            ("many ids", args.ids, lambda s: many_ids(s, args.ids, 24), 4 * args.wait),
            ("held streams", args.held, lambda s: held_streams(s, args.held), args.wait),
            ("starved fetch", args.fetches, lambda s: starved_fetch(s, args.fetches, workdir), args.wait),
        ]
        for name, size, attack, wait in attacks:
            if args.only and name.replace(" ", "_") not in args.only and name not in args.only:
                continue
            store = workdir / f"{name.replace(' ', '_')}.zarr"
            server = ServeProcess(
                serve_overrides(
                    store,
                    workdir / "registry",
                    free_port(),
                    *(
                        HELD_TIMEOUT if name == "held streams" and item == TIMEOUTS[0] else item
                        for item in settings
                    ),
                )
            ).start()
            try:
                before = rss_mb(server.pid)
                held = attack(server)
                peak, after = watch(server, wait)
                answered = status_s(server.address)
                rows.append([name, size, before, peak, after, fds(server.pid), answered, server.tracebacks()])
                print(f"{name}: done", flush=True)
                for call in held[0]:
                    call.cancel()
            finally:
                server.kill9()
    print_table(
        [
            "attack",
            "size",
            "RSS before MB",
            "RSS peak MB",
            "RSS after MB",
            "fds after",
            "Status s",
            "tracebacks",
        ],
        rows,
    )
    print("load after:", " ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
