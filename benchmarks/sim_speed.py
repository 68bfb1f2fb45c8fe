"""Simulation speed: control steps per second per pybullet task, with the scripted expert acting.

`python -m benchmarks.sim_speed [--steps N]` runs each task single-process with no cameras, with
the front camera and with front + wrist cameras (96x96, CPU tiny renderer), resetting at episode
ends, and prints a table.
"""

from __future__ import annotations

import argparse
import time

from benchmarks.common import machine_line, print_table
from sim.conventions import IMAGE_SIZE
from sim.experts import make_expert
from sim.tasks import make_env

TASKS = ("reach", "push", "pick_place", "lift")  # lift: the robosuite (MuJoCo) adapter
CAMERA_SETS = {"no cameras": (), "front": ("front",), "front+wrist": ("front", "wrist")}


def steps_per_second(task: str, cameras: tuple[str, ...], steps: int) -> float:
    env = make_env(task, seed=0, cameras=cameras, image_size=IMAGE_SIZE)
    expert = make_expert(task, seed=0)
    try:
        obs, _ = env.reset(seed=0)
        episode = 0
        start = time.perf_counter()
        for _ in range(steps):
            obs, _, terminated, truncated, info = env.step(expert.act(obs))
            if terminated or truncated or info["blocked"]:
                episode += 1
                obs, _ = env.reset(seed=episode)
                expert.reset(seed=episode)
        return steps / (time.perf_counter() - start)
    finally:
        env.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="control steps per measurement")
    args = parser.parse_args(argv)

    print(machine_line())
    print(f"control steps/s (expert acting, single process, images {IMAGE_SIZE}x{IMAGE_SIZE})")
    rows = [
        [task] + [steps_per_second(task, cams, args.steps) for cams in CAMERA_SETS.values()] for task in TASKS
    ]
    print_table(["task", *CAMERA_SETS], rows)


if __name__ == "__main__":
    main()
