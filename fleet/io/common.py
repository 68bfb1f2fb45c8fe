"""What every exporter and importer shares: the key mapping rules, the control rate, image conversion,
the output folder, and writing imported episodes into an episode store."""

from __future__ import annotations

import importlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fleet.labels import ControlLabel
from fleet.store.episode_store import RESERVED_KEYS, SIGNAL_PREFIX, EpisodeStore, Schema

EXTRA = "data"  # the pyproject extra that brings the io modules' dependencies
CONTROL_HZ_KEY = "control_hz"  # per-episode `extra` field: the control rate an episode was recorded at
CAMERA_SUFFIX = "_rgb"
IMPORT_BATCH_EPISODES = 16  # episodes per commit_many: fewer, larger writes


class DataIOError(ValueError):
    """A dataset cannot be exported or imported as asked (bad input, a missing dependency)."""


class MissingExtraError(DataIOError):
    """A module of the `data` extra is not installed."""


def require(module: str) -> Any:
    """Import `module`, or raise DataIOError naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtraError(
            f"{module} is not installed ({err}); install the data extra: pip install 'flotilla[{EXTRA}]'"
        ) from None


def image_keys(schema: Schema) -> list[str]:
    return [key for key, spec in schema.items() if spec.is_image and spec.shape[-1] == 3]


def lowdim_obs_keys(schema: Schema) -> list[str]:
    """Observation keys that are not images: what a `state` vector is made of by default."""
    images = set(image_keys(schema))
    return [
        key
        for key, spec in schema.items()
        if key not in RESERVED_KEYS and not key.startswith(SIGNAL_PREFIX) and key not in images
    ]


def camera_name(key: str) -> str:
    return key[: -len(CAMERA_SUFFIX)] if key.endswith(CAMERA_SUFFIX) else key


def check_keys(wanted: Iterable[str], schema: Schema, setting: str) -> None:
    missing = [key for key in wanted if key not in schema]
    if missing:
        raise DataIOError(f"{setting}: the store has no key(s) {missing}; it has {sorted(schema)}")


def concat_state(steps: Mapping[str, np.ndarray], keys: list[str]) -> np.ndarray:
    """(T, D) float32: the low-dim keys flattened per step and concatenated in order."""
    length = len(steps["action"])
    return np.concatenate(
        [np.asarray(steps[key], dtype=np.float32).reshape(length, -1) for key in keys], axis=1
    )


def control_rate(store: EpisodeStore, fps: int | None) -> tuple[int, str]:
    """Frames per second for an export and where the number came from: `fps` if given, else the episodes'
    recorded control rate (extra['control_hz']), else the median spacing of the step timestamps."""
    if fps is not None:
        return int(fps), "given"
    rates = {json.loads(str(extra) or "{}").get(CONTROL_HZ_KEY) for extra in store.meta_column("extra")}
    if len(rates) == 1 and None not in rates:
        rate = rates.pop()
        if isinstance(rate, int | float) and rate >= 1 and float(rate).is_integer():
            return int(rate), "the episodes' control_hz"
    sampled = range(min(store.num_episodes, 50))  # plenty for a median
    gaps = np.concatenate([np.diff(store.episode(i, ["timestamp"])["timestamp"]) for i in sampled] or [[]])
    gaps = gaps[gaps > 0]
    if gaps.size == 0:
        raise DataIOError("cannot tell the control rate from the step timestamps; give fps=N")
    estimate = round(1.0 / float(np.median(gaps)))
    if estimate < 1:
        raise DataIOError(f"the step timestamps say {1 / np.median(gaps):.3f} steps/s; give fps=N")
    return estimate, "estimated from the step timestamps; give fps=N if that is not the control rate"


def image_scale(images: np.ndarray, key: str) -> float:
    """What turns these (T, H, W, 3) images into [0, 255]: 1 for uint8 or values in [0, 255], 255 for
    floats in [0, 1]. A dataset decides once, from its first episode, so every episode is scaled alike."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise DataIOError(f"{key}: images must be (T, H, W, 3), got {images.shape}")
    if images.dtype == np.uint8 or images.size == 0:
        return 1.0
    if images.dtype.kind not in "fiu":
        raise DataIOError(f"{key}: cannot turn {images.dtype} images into uint8")
    high = float(images.max())
    return 255.0 if images.dtype.kind == "f" and high <= 1.0 else 1.0


def to_uint8_images(images: np.ndarray, key: str, scale: float) -> np.ndarray:
    """(T, H, W, 3) images as uint8: values times `scale` (image_scale), rounded; values outside [0, 255]
    after scaling are an error, not clipped."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    scaled = np.rint(images.astype(np.float32) * scale)
    if scaled.size and not (0 <= float(scaled.min()) and float(scaled.max()) <= 255):
        low, high = float(images.min()), float(images.max())
        expected = "[0, 1]" if scale != 1 else "[0, 255]"
        raise DataIOError(
            f"{key}: image values span [{low}, {high}]; expected {expected}, as in its first episode"
        )
    return scaled.astype(np.uint8)


def progress(items: Iterable, total: int, desc: str, enabled: bool) -> Iterator:
    """`items` with a progress bar when tqdm is installed and `enabled`."""
    if enabled:
        try:
            from tqdm import tqdm
        except ImportError:
            pass
        else:
            yield from tqdm(items, total=total, desc=desc, unit="ep")
            return
    yield from items


# --------------------------------------------------------------------------------------------- output
def start_output(out: str | os.PathLike, overwrite: bool, looks_like: str) -> Path:
    """A fresh temporary folder beside `out` to write into; `finish_output` moves it into place, so a
    failed export never leaves a half-written dataset under `out`. An existing `out` is replaced only with
    `overwrite` and only if it holds `looks_like` (a file every dataset of the format has)."""
    out = Path(out)
    if out.exists():
        if not overwrite:
            raise DataIOError(f"{out} already exists; pass overwrite=true to replace it")
        if not (out / looks_like).is_file():
            raise DataIOError(
                f"{out} exists and has no {looks_like}; refusing to replace a folder this did not write"
            )
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    return partial


def finish_output(partial: Path, out: str | os.PathLike) -> None:
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)


# --------------------------------------------------------------------------------------------- import
@dataclass
class ImportedEpisode:
    """One episode read from another format, as flat step arrays (key -> (T, ...)), ready to store."""

    steps: dict[str, np.ndarray]
    task: str
    robot_id: str = "imported"
    success: bool = True
    outcome: str = ""
    policy_version: str = ""
    extra: dict = field(default_factory=dict)


def episode_steps(
    arrays: Mapping[str, np.ndarray], labels: np.ndarray | None, timestamps: np.ndarray, length: int
) -> dict[str, np.ndarray]:
    """The flat step arrays of an imported episode: `arrays` plus the label (demo when not known) and
    timestamp keys."""
    steps = dict(arrays)
    steps["label"] = (
        np.full(length, ControlLabel.DEMO, np.uint8) if labels is None else np.asarray(labels, np.uint8)
    )
    steps["timestamp"] = np.asarray(timestamps, np.float64)
    return steps


def write_episodes(
    out: str | os.PathLike,
    episodes: Iterable[ImportedEpisode],
    overwrite: bool,
    total: int,
    progress_bar: bool,
) -> EpisodeStore:
    """Commit `episodes` into a new episode store at `out`, a batch at a time; every step is checked
    against the store's schema (the first episode fixes it)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise DataIOError(f"{out} already exists; pass overwrite=true to replace it")
    store = EpisodeStore.create(out, overwrite=overwrite)
    try:
        batch = []
        for imported in progress(episodes, total, f"import -> {out.name}", progress_bar):
            episode = store.begin_episode(
                imported.robot_id,
                imported.task,
                imported.policy_version,
                start_time=float(imported.steps["timestamp"][0]),
                extra=imported.extra,
            )
            length = len(imported.steps["action"])
            for t in range(length):
                episode.append_flat({key: values[t] for key, values in imported.steps.items()})
            batch.append((episode, imported.success, imported.outcome))
            if len(batch) == IMPORT_BATCH_EPISODES:
                store.commit_many(batch)
                batch = []
        store.commit_many(batch)
    except BaseException:
        store.close()
        shutil.rmtree(out, ignore_errors=True)  # no half import (a store it replaced is gone either way)
        raise
    return store
