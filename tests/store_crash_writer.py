"""A writer process for the crash-safety test: appends deterministic episodes until it is killed.

Episode i's content is a pure function of i (see `expected_episode`), so the test can check every
committed episode byte for byte after any number of SIGKILLs. It prints "committed <i>" after each
commit returns, so the test knows a lower bound of what must be on disk.
"""

from __future__ import annotations

import sys

import numpy as np

from fleet.store import EpisodeStore


def expected_episode(index: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(index)
    length = int(rng.integers(3, 40))
    return {
        "state": rng.normal(size=(length, 5)).astype(np.float32),
        "front_rgb": rng.integers(0, 256, size=(length, 32, 32, 3), dtype=np.uint8),
        "action": rng.uniform(-1, 1, size=(length, 4)).astype(np.float32),
    }


def write_forever(path: str) -> None:
    store = EpisodeStore.open(path, mode="a")
    print("ready", flush=True)
    while True:
        index = store.num_episodes
        steps = expected_episode(index)
        episode = store.begin_episode(f"robot-{index % 3}", "crash", policy_version=str(index))
        for t in range(len(steps["action"])):
            episode.append({"state": steps["state"][t], "front_rgb": steps["front_rgb"][t]},
                           steps["action"][t], "robot", timestamp=float(t))
        assert episode.commit(success=index % 2 == 0) == index
        print(f"committed {index}", flush=True)


if __name__ == "__main__":
    write_forever(sys.argv[1])
