"""The robot node's control loop on ROS 2 topics (DDS, no ROS install): period jitter and sensor -> command latency.

    python -m benchmarks.ros_loop [--seconds 20] [--rates 10 50]

Per control rate: a pybullet Panda in its own process publishes JointState (100 Hz) and a 64x64 rgb8
Image (30 Hz) over cyclonedds on loopback; the node (fleet/ros2/runner.py: DdsRobotNode around the fleet's
RobotAgent, a scripted policy, a real fleet server on 127.0.0.1 logging every step with its image) ticks at
the rate and publishes Float64MultiArray commands that move the simulated robot.

- jitter: |actual period - nominal period| between consecutive tick starts (the timer's wake-ups);
- tick: the time one tick takes (observation assembly, agent step + fleet logging, limits, publish);
- latency: command published minus the stamp of the newest JointState the tick used (both on this
  machine's wall clock): DDS delivery + waiting for the tick + the tick. With 100 Hz joint states the
  wait alone is up to 10 ms (5 ms on average).
The scripted policy takes microseconds; `--checkpoint PATH` runs a trained reach policy instead (its
inference joins the tick). The last column is how far the simulated TCP ended from the goal.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import machine_line, print_table
from fleet.ros2 import dds
from fleet.ros2.node import config_from_params, default_agent
from fleet.ros2.runner import DdsRobotNode
from fleet.server import ServerConfig, ServerThread
from tests.fleet_harness import TOKENS, wait_until
from tests.ros_harness import ReachPolicy, panda_params, start_sim_robot, stop_sim_robot


def make_policy(checkpoint: str | None):
    """The scripted reach (microseconds per action), or a trained checkpoint's PolicyRunner (one torch thread)."""
    if not checkpoint:
        return ReachPolicy()
    import torch

    from policies.runner import PolicyRunner

    torch.set_num_threads(1)
    return PolicyRunner.from_checkpoint(checkpoint)


def measure(rate_hz: float, seconds: float, domain: int, folder: Path, checkpoint: str | None = None) -> dict:
    server = ServerThread(
        ServerConfig(
            port=0,
            metrics_port=0,
            tokens=TOKENS,
            store=str(folder / f"fleet_{rate_hz:g}.zarr"),
            registry_dir=str(folder / "registry"),
        )
    ).start()
    token = folder / "token"
    token.write_text(TOKENS["robot"][0])
    goal = [0.55, 0.1, 0.15]
    robot = start_sim_robot(domain, seconds + 600, goal)  # stopped below, once the node is done
    transport = dds.DdsTransport(domain, dds.LOOPBACK_CONFIG)
    try:
        params = panda_params(fleet=server.address, token_file=str(token), goal=goal, rate_hz=float(rate_hz))
        config = config_from_params({**params, "dry_run": False, "max_episode_steps": int(10 * rate_hz)})
        policy = make_policy(checkpoint)
        node = DdsRobotNode(config, transport, make_agent=lambda c: default_agent(c, policy)).start()
        wait_until(
            lambda: any(not np.isnan(t[2]) for t in node.timing), 20, "the first published command", 0.05
        )
        first = len(node.timing)
        time.sleep(seconds)
        node.close()
        result = stop_sim_robot(robot)
    finally:
        transport.close()
        robot.kill()
        robot.wait()
        server.stop()
    timing = np.array(node.timing[first:])
    periods = np.diff(timing[:, 0])
    jitter = np.abs(periods - 1.0 / rate_hz) * 1e3
    latency = timing[:, 2][~np.isnan(timing[:, 2])] * 1e3
    return {
        "rate": rate_hz,
        "ticks": len(timing),
        "achieved": (len(periods)) / (timing[-1, 0] - timing[0, 0]),
        "jitter": np.percentile(jitter, [50, 99]),
        "tick": np.percentile(timing[:, 1] * 1e3, [50, 99]),
        "latency": np.percentile(latency, [50, 99]),
        "distance_cm": 100 * float(np.linalg.norm(np.subtract(result["end_ee"], goal))),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rates", type=float, nargs="+", default=[10.0, 50.0])
    parser.add_argument(
        "--checkpoint", help="a trained reach checkpoint folder instead of the scripted policy"
    )
    args = parser.parse_args(argv)
    print(machine_line())
    print(f"load before: {os.getloadavg()[0]:.2f}")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for rate in args.rates:
            r = measure(rate, args.seconds, dds.free_domain_id(), Path(folder), args.checkpoint)
            rows.append(
                [f"{r['rate']:g} Hz", r["ticks"], round(r["achieved"], 2)]
                + [round(float(v), 2) for key in ("jitter", "tick", "latency") for v in r[key]]
                + [round(r["distance_cm"], 2)]
            )
    print_table(
        ["rate", "ticks", "achieved Hz"]
        + [f"{what} {p} (ms)" for what in ("jitter", "tick", "latency") for p in ("p50", "p99")]
        + ["TCP to goal at end (cm)"],
        rows,
    )
    print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
