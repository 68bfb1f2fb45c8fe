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
            episode.append(
                {"state": steps["state"][t], "front_rgb": steps["front_rgb"][t]},
                steps["action"][t],
                "robot",
                timestamp=float(t),
            )
        assert episode.commit(success=index % 2 == 0) == index
        print(f"committed {index}", flush=True)


if __name__ == "__main__":
    write_forever(sys.argv[1])


def race_episode(worker: int, k: int) -> dict[str, np.ndarray]:
    """Episode `k` of race worker `worker`: a pure function of both, so the test can check it."""
    rng = np.random.default_rng([worker, k])
    length = int(rng.integers(2, 6))
    return {
        "state": rng.normal(size=(length, 3)).astype(np.float32),
        "action": rng.normal(size=(length, 2)).astype(np.float32),
    }


def race_worker(worker: int, root: str, trials: int, how: str, barrier, results) -> None:
    """For each trial, at the same moment as the other worker: open (how="append") or create (how="create")
    the same new store and commit 3 episodes into it. Puts [(trial, commits that returned, error)] on
    `results`; a StoreError before the first commit (the other worker was first) is no error."""
    from fleet.store import StoreError

    outcome = []
    for trial in range(trials):
        barrier.wait(timeout=120)
        committed, error = 0, ""
        try:
            path = f"{root}/t{trial}"
            store = EpisodeStore.open(path, mode="a") if how == "append" else EpisodeStore.create(path)
        except StoreError:  # the other worker holds the writer lock, or (create) made the store first
            store = None
        except Exception as err:  # reported to the test, which fails on it
            store, error = None, repr(err)
        if store is not None:
            try:
                with store:
                    for k in range(3):
                        steps = race_episode(worker, k)
                        episode = store.begin_episode(f"w{worker}", "race", policy_version=str(k))
                        for t in range(len(steps["action"])):
                            episode.append(
                                {"state": steps["state"][t]}, steps["action"][t], "robot", timestamp=0.0
                            )
                        episode.commit(success=True)
                        committed += 1
            except Exception as err:
                error = repr(err)
        outcome.append((trial, committed, error))
    results.put((worker, outcome))
