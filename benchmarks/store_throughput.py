"""Episode store throughput: write (steps/s, MB/s) and random-window reads, low-dim and with images.

    python -m benchmarks.store_throughput [--episodes 20] [--length 100]

Images are synthetic but structured like a rendered scene (smooth background, a moving object,
a little sensor noise) so the compression ratio is meaningful; pure noise would not compress.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import machine_line, print_table
from fleet.store import EpisodeStore


def synthetic_episode(rng: np.random.Generator, length: int, image: bool) -> list[tuple[dict, np.ndarray]]:
    steps = []
    yy, xx = np.mgrid[0:96, 0:96]
    background = np.stack([xx * 1.5, yy * 1.2 + 40, np.full_like(xx, 120)], axis=-1).astype(np.float32)
    for t in range(length):
        obs = {
            "joint_pos": rng.normal(size=7).astype(np.float32),
            "ee_pos": rng.normal(size=3).astype(np.float32),
            "ee_quat": rng.normal(size=4).astype(np.float32),
            "gripper": rng.uniform(0, 0.08, size=1).astype(np.float32),
            "object_pos": rng.normal(size=3).astype(np.float32),
            "object_quat": rng.normal(size=4).astype(np.float32),
            "goal": rng.normal(size=2).astype(np.float32),
        }
        if image:
            frame = background.copy()
            cx, cy = 20 + (t % 50), 30 + (t % 30)
            frame[cy : cy + 12, cx : cx + 12] = (200, 40, 40)
            frame += rng.normal(scale=1.0, size=frame.shape)
            obs["front_rgb"] = np.clip(frame, 0, 255).astype(np.uint8)
        steps.append((obs, rng.uniform(-1, 1, size=4).astype(np.float32)))
    return steps


def bench(image: bool, batch: int, episodes: int, length: int, windows: int, window_len: int) -> list:
    rng = np.random.default_rng(0)
    data = [synthetic_episode(rng, length, image) for _ in range(episodes)]
    raw_bytes_per_step = sum(np.asarray(v).nbytes for v in data[0][0][0].values()) + 4 * 4 + 1 + 8
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.zarr"
        store = EpisodeStore.create(path)
        start = time.perf_counter()
        finished = []
        for steps in data:
            episode = store.begin_episode("bench", "push")
            for obs, action in steps:
                episode.append(obs, action, "robot")
            finished.append((episode, True, "success"))
            if len(finished) == batch:
                store.commit_many(finished)
                finished = []
        store.commit_many(finished)
        write_s = time.perf_counter() - start
        total_steps = episodes * length
        disk = store.size_on_disk()
        store.close()

        reader = EpisodeStore.open(path)
        start = time.perf_counter()
        reader.random_windows(windows, window_len, np.random.default_rng(1))
        read_s = time.perf_counter() - start
    raw_mb = total_steps * raw_bytes_per_step / 1e6
    return [
        "96x96x3 image + low-dim" if image else "low-dim",
        batch,
        total_steps / write_s,
        raw_mb / write_s,
        raw_mb * 1e6 / disk,
        windows / read_s,
        windows * window_len / read_s,
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--length", type=int, default=100)
    parser.add_argument("--windows", type=int, default=200)
    parser.add_argument("--window-length", type=int, default=16)
    args = parser.parse_args()
    print(machine_line())
    print(f"{args.episodes} episodes x {args.length} steps; random windows of {args.window_length} steps\n")
    rows = [
        bench(image, batch, args.episodes, args.length, args.windows, args.window_length)
        for image, batch in ((False, 1), (False, 10), (True, 1), (True, 10))
    ]
    print_table(
        [
            "config",
            "episodes/commit",
            "write steps/s",
            "write MB/s (raw)",
            "compression",
            "read windows/s",
            "read steps/s",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
