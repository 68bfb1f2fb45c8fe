"""Export and import throughput (fleet/io): Diffusion Policy (zarr format 2) and LeRobot v3.0 (PNG in
parquet, or h264 mp4), on an episode store of image episodes.

    python -m benchmarks.data_io [--episodes 100] [--length 100] [--size 96]

steps/s and MB/s count the raw (uncompressed) step data moved: every key of a step, the image included;
"out MB" is the size on disk of what was written. Images are benchmarks.store_throughput's synthetic
scenes (a smooth background, a moving block, sensor noise), so compression ratios are meaningful.
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import machine_line, print_table
from benchmarks.store_throughput import synthetic_episode
from fleet.io.common import CONTROL_HZ_KEY, write_episodes
from fleet.io.diffusion_policy import export_diffusion_policy, read_diffusion_policy
from fleet.io.lerobot import export_lerobot, read_lerobot
from fleet.store import EpisodeStore


def build_store(path: Path, episodes: int, length: int, size: int) -> EpisodeStore:
    rng = np.random.default_rng(0)
    store = EpisodeStore.create(path)
    for index in range(episodes):
        episode = store.begin_episode("bench", "push", extra={CONTROL_HZ_KEY: 10})
        for t, (obs, action) in enumerate(synthetic_episode(rng, length, image=True)):
            if size != 96:
                obs["front_rgb"] = np.resize(obs["front_rgb"], (size, size, 3))
            episode.append(
                obs, action, "robot" if t < length // 2 else "intervention", timestamp=index + t / 10
            )
        episode.commit(True)
    return store


def import_into(read, dataset: Path, out: Path) -> None:
    count, episodes = read(dataset)
    write_episodes(out, episodes, overwrite=False, total=count, progress_bar=False).close()


def disk_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--length", type=int, default=100)
    parser.add_argument("--size", type=int, default=96, help="image side in pixels")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        store = build_store(tmp / "store.zarr", args.episodes, args.length, args.size)
        steps = store.num_steps
        raw_mb = (
            sum(np.asarray(v).nbytes for v in store.episode(0).values())
            / store.episode_bounds(0)[1]
            * steps
            / 2**20
        )
        rows = []

        def timed(name: str, run, out: Path) -> None:
            start = time.perf_counter()
            run()
            seconds = time.perf_counter() - start
            rows.append(
                [
                    name,
                    steps,
                    f"{seconds:.1f}",
                    f"{steps / seconds:,.0f}",
                    f"{raw_mb / seconds:.1f}",
                    f"{disk_mb(out):.1f}",
                ]
            )

        formats = {
            "diffusion_policy": (export_diffusion_policy, read_diffusion_policy, {}),
            "lerobot, PNG in parquet": (export_lerobot, read_lerobot, {"video": False}),
            "lerobot, mp4 (h264)": (export_lerobot, read_lerobot, {"video": True}),
        }
        for n, (name, (export, read, options)) in enumerate(formats.items()):
            out, back = tmp / f"dataset{n}", tmp / f"back{n}.zarr"
            out.mkdir()
            timed(f"export {name}", functools.partial(export, store, out, **options), out)
            timed(f"import {name}", functools.partial(import_into, read, out, back), back)
        store_mb = disk_mb(store.path)
        store.close()
    print(
        f"# data_io: {args.episodes} episodes x {args.length} steps, one {args.size}x{args.size} camera, "
        f"{raw_mb:.0f} MB raw, the episode store {store_mb:.0f} MB on disk"
    )
    print_table(["job", "steps", "s", "steps/s", "MB/s (raw)", "out MB"], rows)
    print(machine_line() + f", load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
