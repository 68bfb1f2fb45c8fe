"""Small episode stores for the data in/out tests: every kind of key a fleet store has (low-dim
observations, a camera or two, goal, labels of every kind, signals), with structured images so PNG and
video compress as real frames do."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fleet.labels import ControlLabel
from fleet.store import EpisodeStore

CONTROL_HZ = 10


def frame(t: int, size: int, rng: np.random.Generator, shift: int = 0) -> np.ndarray:
    """A smooth scene with a moving block and a little sensor noise (not pure noise: that does not compress)."""
    yy, xx = np.mgrid[0:size, 0:size]
    image = np.stack([xx * 2.0, yy * 1.5 + 40, np.full_like(xx, 120.0)], axis=-1)
    cx, cy = (5 + t + shift) % (size - 8), (10 + 2 * t) % (size - 8)
    image[cy : cy + 8, cx : cx + 8] = (220, 40, 40)
    image += rng.normal(scale=2.0, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def make_store(
    path: Path,
    episodes: int = 3,
    length: int = 12,
    cameras: tuple[str, ...] = ("front",),
    size: int = 32,
    seed: int = 0,
    control_hz: int | None = CONTROL_HZ,
) -> EpisodeStore:
    """A committed store; episode i has length `length + i`, and its labels go demo / robot ->
    pre_intervention -> intervention -> robot so every label is present."""
    rng = np.random.default_rng(seed)
    store = EpisodeStore.create(path)
    for index in range(episodes):
        extra = {"control_hz": control_hz} if control_hz else {}
        episode = store.begin_episode(
            f"robot-{index % 2}", "push", "v1", start_time=1000.0 * index, extra=extra
        )
        steps = length + index
        for t in range(steps):
            obs = {
                "ee_pos": rng.normal(size=3).astype(np.float32),
                "gripper": rng.uniform(0, 0.08, size=1).astype(np.float32),
                "object_to_goal": rng.normal(size=2).astype(np.float32),
            }
            for n, camera in enumerate(cameras):
                obs[f"{camera}_rgb"] = frame(t, size, rng, shift=7 * n + index)
            if index == 0:
                label = ControlLabel.DEMO
            else:
                label = [ControlLabel.ROBOT, ControlLabel.PRE_INTERVENTION, ControlLabel.INTERVENTION][
                    min(3 * t // steps, 2)
                ]
            episode.append(
                obs,
                rng.uniform(-1, 1, size=4).astype(np.float32),
                label,
                goal=rng.normal(size=2).astype(np.float32),
                signals={"uncertainty": float(rng.uniform())},
                timestamp=1000.0 * index + t / CONTROL_HZ,
            )
        episode.commit(success=index % 2 == 0, outcome="" if index % 2 == 0 else "timeout")
    return store


def all_steps(store: EpisodeStore) -> dict[str, np.ndarray]:
    return {key: np.concatenate([store.episode(i)[key] for i in range(len(store))]) for key in store.schema}


def assert_same_store(back: EpisodeStore, store: EpisodeStore, lossy_images: bool = False) -> None:
    """`back` holds `store`'s episodes: every key equal (images within video codec error with
    `lossy_images`: small on average, and no frame off, which a shifted frame would be), and the metadata."""
    assert back.schema == store.schema
    assert back.episode_ends.tolist() == store.episode_ends.tolist()
    for i in range(len(store)):
        original, restored = store.episode(i), back.episode(i)
        for key, spec in store.schema.items():
            if lossy_images and spec.is_image:
                error = np.abs(restored[key].astype(float) - original[key].astype(float))
                assert error.mean() < 8, (key, error.mean())
                assert np.all(error.mean(axis=(1, 2, 3)) < 12), key
            else:
                np.testing.assert_array_equal(restored[key], original[key], err_msg=key)
        fields = ("task", "robot_id", "success", "outcome", "policy_version", "start_time", "extra")
        a, b = store.episode_meta(i), back.episode_meta(i)
        assert [getattr(b, f) for f in fields] == [getattr(a, f) for f in fields], i
