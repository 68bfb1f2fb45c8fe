"""rosbag2 import throughput (`flotilla import-bag`): steps/s, MB/s of bag and messages/s.

    python -m benchmarks.data_io_rosbag [--bags 4] [--seconds 30] [--frame 480x640] [--size 96]

Each bag is a teleoperated 6-DoF arm as tests/test_io_rosbag.py writes it with rosbags' Writer: 500 Hz
joint states, a 15 Hz JPEG camera (a textured scene with a moving object and sensor noise, so JPEG sizes
are a camera's) with dropped frames and 35 ms late stamps, 50 Hz twist commands and a 10 Hz gripper,
resampled to 10 Hz with the frames resized to --size. Written once per storage plugin (mcap, sqlite3),
imported into a fresh store, best of --repeat runs.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine_line, print_table
from fleet.io.bag_mapping import mapping_from_dict
from fleet.io.rosbag import ImportBagConfig, import_bags
from tests.test_io_rosbag import ArmBag, arm_mapping, write_arm_bag


def bench(folder: Path, storage: str, bags: int, bag: ArmBag, size: int, repeat: int) -> list:
    paths = [write_arm_bag(folder / f"{storage}_{i}", bag, storage) for i in range(bags)]
    mapping = arm_mapping(max_gap_s=2.0)
    mapping["observation"]["wrist_rgb"]["size"] = [size, size]
    mapping = mapping_from_dict(mapping)
    best = None
    for run in range(repeat):
        out = folder / f"{storage}_{run}.zarr"
        config = ImportBagConfig(paths=[str(p) for p in paths], mapping="-", out=str(out), progress=False)
        start = time.perf_counter()
        result = import_bags(paths, mapping, out, config)
        seconds = time.perf_counter() - start
        if best is None or seconds < best[0]:
            best = (seconds, result)
    seconds, result = best
    megabytes = result.bytes / 1e6
    return [
        storage,
        bags,
        f"{megabytes:.1f}",
        result.messages,
        result.episodes,
        result.steps,
        f"{seconds:.2f}",
        result.steps / seconds,
        megabytes / seconds,
        result.messages / seconds,
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bags", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--frame", default="480x640", help="camera frames, HEIGHTxWIDTH")
    parser.add_argument("--size", type=int, default=96, help="stored image size (square)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    height, width = (int(v) for v in args.frame.split("x"))
    bag = ArmBag(seconds=args.seconds, joint_hz=500.0, frame=(height, width), scene=True)
    print(machine_line(), f"load {os.getloadavg()[0]:.2f}")
    print(
        f"{args.bags} bags of {args.seconds:g} s: joints 500 Hz, {height}x{width} JPEG 15 Hz -> {args.size}x{args.size}, "
        f"twist 50 Hz, gripper 10 Hz; 10 Hz steps; best of {args.repeat}"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for storage in ("mcap", "sqlite3"):
            rows.append(bench(Path(tmp), storage, args.bags, bag, args.size, args.repeat))
    print_table(
        ["storage", "bags", "MB", "messages", "episodes", "steps", "s", "steps/s", "MB/s", "msgs/s"], rows
    )


if __name__ == "__main__":
    main()
