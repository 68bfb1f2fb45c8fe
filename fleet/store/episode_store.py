"""The episode store: every step a robot or a human took, in one zarr (v3) group on disk.

Layout (a superset of the Diffusion Policy replay buffer, so its readers work unchanged):

    data/<key>            all committed episodes concatenated along time, one array per step key
    meta/episode_ends     cumulative end index of each committed episode (int64)
    meta/<field>          per-episode metadata: robot_id, task, policy_version, outcome (str),
                          success (bool), start_time, end_time (float64 seconds since the epoch),
                          extra (str, JSON)
    zarr.json attributes  {"flotilla_store": {"format": 1, "schema": {key: {shape, dtype}}}}

Step keys: the observation's keys, plus the reserved `action`, `label` (a ControlLabel code),
`timestamp`, optional `goal`, and one `signal_<name>` per signal (uncertainty, risk, ...). The schema
(keys, shapes, dtypes) is declared at creation or fixed by the first step ever appended.

Chunking: images (uint8, H x W x C) one frame per chunk; everything else chunked along time.

Crash safety. An episode is buffered in memory while it is open (it may still be relabelled: when a
human takes over, the robot's last steps become pre_intervention) and written only at commit. Every
file write is atomic (zarr's local store writes a temporary file and renames it), and a commit writes
in an order that never lets a shape point past data that is not yet on disk:
    1. for each data and meta array: write the new chunks, then save the grown shape;
    2. last, meta/episode_ends the same way. Saving its shape is the commit point.
A writer killed at any moment therefore leaves `meta/episode_ends` listing only fully written
episodes; arrays may be longer than that, and the next writer trims them. Readers only ever look at
the prefix `meta/episode_ends` describes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import json
import os
import shutil
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec
from zarr.core.sync import sync

from fleet.labels import ControlLabel

FORMAT_VERSION = 1
ATTRS_KEY = "flotilla_store"
RESERVED_KEYS = ("action", "label", "timestamp", "goal")
SIGNAL_PREFIX = "signal_"
LOWDIM_CHUNK_STEPS = 1024
META_CHUNK_EPISODES = 4096

# Per-episode metadata arrays and their dtypes (str means a variable-length UTF-8 string).
META_FIELDS: dict[str, Any] = {
    "robot_id": str,
    "task": str,
    "policy_version": str,
    "outcome": str,
    "success": np.bool_,
    "start_time": np.float64,
    "end_time": np.float64,
    "extra": str,
}

_IMAGE_CODEC = BloscCodec(cname="zstd", clevel=3, shuffle="noshuffle")
_LOWDIM_CODEC = BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")


class StoreError(Exception):
    """An episode store cannot be opened or used as asked."""


class StoreCorruptError(StoreError):
    """The files on disk are not a readable episode store."""


class StepError(ValueError):
    """A step does not match the store's schema; the open episode is left unchanged."""


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def is_image(self) -> bool:
        return self.dtype == np.uint8 and len(self.shape) == 3

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "dtype": self.dtype.str}

    @classmethod
    def from_json(cls, value: Mapping) -> FieldSpec:
        return cls(tuple(int(d) for d in value["shape"]), np.dtype(value["dtype"]))


Schema = dict[str, FieldSpec]


@dataclasses.dataclass(frozen=True)
class EpisodeMeta:
    index: int
    length: int
    robot_id: str
    task: str
    policy_version: str
    outcome: str
    success: bool
    start_time: float
    end_time: float
    extra: dict


def schema_from_example(step: Mapping[str, Any]) -> Schema:
    """A schema from one flat step (key -> array-like), as the first appended step fixes it."""
    schema = {}
    for key, value in step.items():
        array = np.asarray(value)
        if array.dtype == object or array.dtype.kind in "USO":
            raise StepError(f"step key {key!r}: dtype {array.dtype} cannot be stored; use numeric arrays")
        schema[key] = FieldSpec(array.shape, array.dtype)
    return schema


def flatten_step(
    obs: Mapping[str, Any],
    action: Any,
    label: ControlLabel | str | int,
    goal: Any = None,
    signals: Mapping[str, float] | None = None,
    timestamp: float | None = None,
) -> dict[str, Any]:
    """One step as the flat key -> value mapping the store keeps."""
    clash = [key for key in obs if key in RESERVED_KEYS and key != "goal" or key.startswith(SIGNAL_PREFIX)]
    if clash:
        raise StepError(f"observation keys {clash} clash with reserved step keys {RESERVED_KEYS + (SIGNAL_PREFIX + '*',)}")
    try:
        code = np.uint8(ControlLabel.parse(label))
    except ValueError as err:
        raise StepError(f"step key 'label': {err}") from None
    step: dict[str, Any] = {key: value for key, value in obs.items() if key != "goal"}
    if goal is None:
        goal = obs.get("goal")
    if goal is not None:
        step["goal"] = goal
    step["action"] = action
    step["label"] = code
    step["timestamp"] = np.float64(time.time() if timestamp is None else timestamp)
    for name, value in (signals or {}).items():
        step[SIGNAL_PREFIX + name] = np.float32(value)
    return step


def validate_step(schema: Schema, step: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Check a flat step against the schema; return it as arrays of the schema's dtypes."""
    missing = sorted(set(schema) - set(step))
    unexpected = sorted(set(step) - set(schema))
    if missing:
        raise StepError(f"step is missing key(s) {missing}; the store's schema has {sorted(schema)}")
    if unexpected:
        raise StepError(f"step has unexpected key(s) {unexpected}; the store's schema has {sorted(schema)}")
    checked = {}
    for key, spec in schema.items():
        value = np.asarray(step[key])
        if value.shape != spec.shape:
            raise StepError(f"step key {key!r}: shape {value.shape}, but the schema says {spec.shape}")
        if not np.can_cast(value.dtype, spec.dtype, casting="same_kind"):
            raise StepError(f"step key {key!r}: dtype {value.dtype} cannot be stored as {spec.dtype}")
        if value.dtype.kind in "fc" and not np.all(np.isfinite(value)):
            raise StepError(f"step key {key!r} contains NaN or infinity")
        checked[key] = value.astype(spec.dtype, copy=False)
    return checked


class OpenEpisode:
    """An episode being recorded. Steps stay in memory until `commit`; `abort` drops them."""

    def __init__(self, store: EpisodeStore, robot_id: str, task: str, policy_version: str,
                 start_time: float, extra: dict):
        self._store = store
        self.robot_id = robot_id
        self.task = task
        self.policy_version = policy_version
        self.start_time = start_time
        self.extra = extra
        self._steps: list[dict[str, np.ndarray]] = []
        self.closed = False

    def __len__(self) -> int:
        return len(self._steps)

    def append(self, obs: Mapping[str, Any], action: Any, label: ControlLabel | str | int, *,
               goal: Any = None, signals: Mapping[str, float] | None = None,
               timestamp: float | None = None) -> None:
        """Add one step; a step that does not fit the schema raises StepError and changes nothing."""
        self.append_flat(flatten_step(obs, action, label, goal, signals, timestamp))

    def append_flat(self, step: Mapping[str, Any]) -> None:
        self._check_open()
        self._steps.append(validate_step(self._store._schema_for(step), step))

    def labels(self) -> np.ndarray:
        return np.array([step["label"] for step in self._steps], dtype=np.uint8)

    def relabel_last(self, count: int, new_label: ControlLabel, only: ControlLabel | None = ControlLabel.ROBOT) -> int:
        """Relabel up to `count` most recent steps (those labelled `only`, if given); returns how many.

        Sirius marks the robot's last steps before a takeover as pre_intervention this way.
        """
        self._check_open()
        changed = 0
        for step in reversed(self._steps[-count:] if count > 0 else []):
            if only is None or step["label"] == only:
                step["label"] = np.uint8(new_label)
                changed += 1
        return changed

    def commit(self, success: bool, outcome: str = "") -> int:
        """Write the episode to disk; returns its index. Only after this is it visible to readers."""
        return self._store.commit_many([(self, success, outcome)])[0]

    def abort(self) -> None:
        self._close()

    def _close(self) -> None:
        self.closed = True
        self._steps = []

    def _stacked(self) -> dict[str, np.ndarray]:
        return {key: np.stack([step[key] for step in self._steps]) for key in self._steps[0]}

    def _check_open(self) -> None:
        if self.closed:
            raise StoreError(f"episode of robot {self.robot_id!r} is already committed or aborted")


class EpisodeStore:
    """A zarr v3 episode store; see the module docstring for layout and guarantees.

    `EpisodeStore.open(path)` reads; `EpisodeStore.open(path, mode="a")` or `EpisodeStore.create(path)`
    writes. One process writes at a time (a lock file enforces it); any number may read, and a reader
    sees new episodes after `refresh()`.
    """

    def __init__(self, path: str | os.PathLike, group: zarr.Group, writable: bool, lock_fd: int | None = None):
        self.path = Path(path)
        self._group = group
        self.writable = writable
        self._lock_fd = lock_fd
        self._commit_lock = threading.Lock()
        self._schema: Schema | None = None
        self._ends = np.zeros(0, dtype=np.int64)
        self._arrays: dict[str, zarr.Array] = {}
        self.refresh()
        if writable:
            self._trim_uncommitted()

    # -- opening ---------------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | os.PathLike, schema: Schema | None = None, overwrite: bool = False) -> EpisodeStore:
        """Create a new, empty store (`overwrite=True` replaces an existing one)."""
        path = Path(path)
        if path.exists() and any(path.iterdir()):
            if not overwrite:
                raise StoreError(f"{path} already exists; open it with mode='a' or pass overwrite=True")
            _release_writer_lock(_acquire_writer_lock(path))  # refuse to delete a store being written
            shutil.rmtree(path)
        group = zarr.open_group(str(path), mode="w", zarr_format=3)
        lock_fd = _acquire_writer_lock(path)  # after mode="w", which empties the folder
        group.attrs[ATTRS_KEY] = {"format": FORMAT_VERSION, "schema": None}
        group.require_group("data")
        meta = group.require_group("meta")
        meta.create_array("episode_ends", shape=(0,), chunks=(META_CHUNK_EPISODES,), dtype=np.int64)
        for name, dtype in META_FIELDS.items():
            meta.create_array(name, shape=(0,), chunks=(META_CHUNK_EPISODES,), dtype=dtype)
        store = cls(path, group, writable=True, lock_fd=lock_fd)
        if schema:
            store._fix_schema(schema)
        return store

    @classmethod
    def open(cls, path: str | os.PathLike, mode: str = "r") -> EpisodeStore:
        """Open for reading (`mode="r"`), or for appending (`mode="a"`, creating it if missing)."""
        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' (read) or 'a' (append), not {mode!r}")
        path = Path(path)
        if not (path / "zarr.json").exists():
            if mode == "a" and (not path.exists() or not any(path.iterdir())):
                return cls.create(path)
            raise StoreError(f"{path} is not an episode store (no zarr.json)")
        lock_fd = _acquire_writer_lock(path) if mode == "a" else None
        try:
            group = zarr.open_group(str(path), mode="r+" if mode == "a" else "r", zarr_format=3)
            return cls(path, group, writable=mode == "a", lock_fd=lock_fd)
        except StoreError:
            _release_writer_lock(lock_fd)
            raise
        except Exception as err:  # zarr raises many kinds on damaged files
            _release_writer_lock(lock_fd)
            raise StoreCorruptError(f"{path}: cannot read the episode store ({type(err).__name__}: {err})") from err

    def close(self) -> None:
        _release_writer_lock(self._lock_fd)
        self._lock_fd = None
        self.writable = False

    def __enter__(self) -> EpisodeStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def refresh(self) -> None:
        """Re-read the committed state from disk (readers call this to see new episodes)."""
        self._arrays = {}
        attrs = self._group.attrs.get(ATTRS_KEY)
        if not isinstance(attrs, Mapping) or "format" not in attrs:
            raise StoreCorruptError(f"{self.path} is a zarr group but not a Flotilla episode store")
        if attrs["format"] != FORMAT_VERSION:
            raise StoreCorruptError(f"{self.path}: store format {attrs['format']}, this code reads {FORMAT_VERSION}")
        self._schema = None if attrs.get("schema") is None else {
            key: FieldSpec.from_json(spec) for key, spec in attrs["schema"].items()
        }
        try:
            ends = self._meta("episode_ends")[:]
        except KeyError:
            raise StoreCorruptError(f"{self.path}: meta/episode_ends is missing") from None
        if ends.size and (np.any(np.diff(ends) <= 0) or ends[0] <= 0):
            raise StoreCorruptError(f"{self.path}: meta/episode_ends is not strictly increasing")
        self._ends = ends.astype(np.int64)
        self._check_lengths()

    def _check_lengths(self) -> None:
        for name in META_FIELDS:
            if self._meta(name).shape[0] < self.num_episodes:
                raise StoreCorruptError(f"{self.path}: meta/{name} is shorter than meta/episode_ends")
        for key in self._schema or {}:
            if self._data(key).shape[0] < self.num_steps:
                raise StoreCorruptError(f"{self.path}: data/{key} is shorter than the committed steps")

    def _trim_uncommitted(self) -> None:
        """Drop what a killed writer left past the commit point (never committed, never visible)."""
        for name in META_FIELDS:
            array = self._meta(name)
            if array.shape[0] > self.num_episodes:
                array.resize((self.num_episodes,))
        for key in self._schema or {}:
            array = self._data(key)
            if array.shape[0] > self.num_steps:
                array.resize((self.num_steps, *array.shape[1:]))
        for leftover in self.path.rglob("*.partial"):  # temporary files of interrupted atomic writes
            leftover.unlink(missing_ok=True)

    # -- schema ----------------------------------------------------------------------------------

    @property
    def schema(self) -> Schema | None:
        return None if self._schema is None else dict(self._schema)

    def _schema_for(self, step: Mapping[str, Any]) -> Schema:
        if self._schema is None:
            self._fix_schema(schema_from_example(step))
        return self._schema

    def _fix_schema(self, schema: Schema) -> None:
        if not self.writable:
            raise StoreError(f"{self.path} is open read-only")
        if "action" not in schema or "label" not in schema:
            raise StepError(f"a schema needs 'action' and 'label' keys, got {sorted(schema)}")
        with self._commit_lock:
            if self._schema is not None:
                return
            data = self._group["data"]
            for key, spec in schema.items():
                if key not in data:
                    chunks = (1, *spec.shape) if spec.is_image else (LOWDIM_CHUNK_STEPS, *spec.shape)
                    data.create_array(key, shape=(0, *spec.shape), chunks=chunks, dtype=spec.dtype,
                                      compressors=_IMAGE_CODEC if spec.is_image else _LOWDIM_CODEC)
            attrs = dict(self._group.attrs[ATTRS_KEY])
            attrs["schema"] = {key: spec.to_json() for key, spec in schema.items()}
            self._group.attrs[ATTRS_KEY] = attrs
            self._schema = dict(schema)

    # -- writing ---------------------------------------------------------------------------------

    def begin_episode(self, robot_id: str, task: str, policy_version: str = "", start_time: float | None = None,
                      extra: Mapping | None = None) -> OpenEpisode:
        if not self.writable:
            raise StoreError(f"{self.path} is open read-only; open it with mode='a' to record episodes")
        return OpenEpisode(self, str(robot_id), str(task), str(policy_version),
                           time.time() if start_time is None else float(start_time), dict(extra or {}))

    def commit_many(self, finished: Sequence[tuple[OpenEpisode, bool, str]]) -> list[int]:
        """Commit several episodes in one write (a fleet's episode writer drains its queue this way).

        Each item is (episode, success, outcome); returns their indices. All or none become visible.
        """
        if not self.writable:
            raise StoreError(f"{self.path} is no longer open for writing")
        for episode, _, _ in finished:
            episode._check_open()
            if not len(episode):
                raise StoreError("cannot commit an empty episode (it has no steps); abort it instead")
        if not finished:
            return []
        now = time.time()
        stacked = [episode._stacked() for episode, _, _ in finished]
        steps = {key: np.concatenate([s[key] for s in stacked]) for key in stacked[0]}
        meta_columns = {
            "robot_id": [e.robot_id for e, _, _ in finished],
            "task": [e.task for e, _, _ in finished],
            "policy_version": [e.policy_version for e, _, _ in finished],
            "outcome": [outcome or ("success" if success else "failure") for _, success, outcome in finished],
            "success": [bool(success) for _, success, _ in finished],
            "start_time": [e.start_time for e, _, _ in finished],
            "end_time": [now] * len(finished),
            "extra": [json.dumps(e.extra) for e, _, _ in finished],
        }
        with self._commit_lock:
            start_step, first_index = self.num_steps, self.num_episodes
            new_ends = start_step + np.cumsum([len(e) for e, _, _ in finished], dtype=np.int64)
            writes = [(self._data(key), start_step, values) for key, values in steps.items()]
            writes += [(self._meta(name), first_index, np.array(column, dtype=META_FIELDS[name]))
                       for name, column in meta_columns.items()]
            sync(_write_then_grow(writes))
            # The commit point: episode_ends grows only after everything it points at is on disk.
            sync(_write_then_grow([(self._meta("episode_ends"), first_index, new_ends)]))
            self._ends = np.concatenate([self._ends, new_ends])
        for episode, _, _ in finished:
            episode._close()
        return list(range(first_index, first_index + len(finished)))

    # -- reading ---------------------------------------------------------------------------------

    @property
    def num_episodes(self) -> int:
        return int(self._ends.shape[0])

    @property
    def num_steps(self) -> int:
        return int(self._ends[-1]) if self._ends.size else 0

    def __len__(self) -> int:
        return self.num_episodes

    @property
    def episode_ends(self) -> np.ndarray:
        return self._ends.copy()

    def episode_bounds(self, index: int) -> tuple[int, int]:
        index = self._check_index(index)
        return (int(self._ends[index - 1]) if index else 0), int(self._ends[index])

    def episode(self, index: int, keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """All steps of episode `index` as key -> (T, ...) arrays."""
        start, end = self.episode_bounds(index)
        return self._read(start, end, keys)

    def read_window(self, index: int, start: int, length: int, keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Steps [start, start + length) of episode `index`."""
        first, end = self.episode_bounds(index)
        if start < 0 or length < 1 or first + start + length > end:
            raise IndexError(f"window [{start}, {start + length}) is outside episode {index} of length {end - first}")
        return self._read(first + start, first + start + length, keys)

    def random_windows(self, count: int, length: int, rng: np.random.Generator,
                       keys: Iterable[str] | None = None) -> list[dict[str, np.ndarray]]:
        """`count` windows of `length` steps, uniform over all valid start steps of all episodes."""
        lengths = np.diff(self._ends, prepend=0)
        starts_per_episode = np.maximum(lengths - length + 1, 0)
        total = int(starts_per_episode.sum())
        if total == 0:
            raise StoreError(f"no episode in {self.path} has {length} steps")
        picks = rng.integers(0, total, size=count)
        cumulative = np.cumsum(starts_per_episode)
        episodes = np.searchsorted(cumulative, picks, side="right")
        offsets = picks - (cumulative[episodes] - starts_per_episode[episodes])
        firsts = np.r_[0, self._ends[:-1]][episodes] + offsets
        return [self._read(int(first), int(first) + length, keys) for first in firsts]

    def labels(self) -> np.ndarray:
        """Control label codes of every committed step."""
        return self._data("label")[: self.num_steps] if self._schema else np.zeros(0, np.uint8)

    def episode_meta(self, index: int) -> EpisodeMeta:
        index = self._check_index(index)
        row = {name: self._meta(name)[index] for name in META_FIELDS}
        start, end = self.episode_bounds(index)
        return EpisodeMeta(index=index, length=end - start, robot_id=str(row["robot_id"]), task=str(row["task"]),
                           policy_version=str(row["policy_version"]), outcome=str(row["outcome"]),
                           success=bool(row["success"]), start_time=float(row["start_time"]),
                           end_time=float(row["end_time"]), extra=json.loads(str(row["extra"]) or "{}"))

    def meta_column(self, name: str) -> np.ndarray:
        """One metadata field for every committed episode."""
        if name not in META_FIELDS:
            raise KeyError(f"unknown episode metadata field {name!r}; fields: {', '.join(META_FIELDS)}")
        return self._meta(name)[: self.num_episodes]

    def size_on_disk(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())

    def _read(self, start: int, end: int, keys: Iterable[str] | None) -> dict[str, np.ndarray]:
        names = list(self._schema or {}) if keys is None else list(keys)
        unknown = [key for key in names if key not in (self._schema or {})]
        if unknown:
            raise KeyError(f"unknown step key(s) {unknown}; the store has {sorted(self._schema or {})}")
        # One round trip to zarr's event loop for all keys rather than one per key. (Gathering many
        # windows at once is slower again: the same chunks get decoded over and over concurrently.)
        values = sync(_read_all([(self._data(key)._async_array, slice(start, end)) for key in names]))
        return dict(zip(names, values, strict=True))

    def _check_index(self, index: int) -> int:
        if not -self.num_episodes <= index < self.num_episodes:
            raise IndexError(f"episode {index} out of range: the store has {self.num_episodes} episodes")
        return index % self.num_episodes

    def _data(self, key: str) -> zarr.Array:
        return self._array(f"data/{key}")

    def _meta(self, name: str) -> zarr.Array:
        return self._array(f"meta/{name}")

    def _array(self, path: str) -> zarr.Array:
        # Opening an array reads its metadata file; keep the handles (refresh() drops them).
        if path not in self._arrays:
            self._arrays[path] = self._group[path]
        return self._arrays[path]


async def _write_then_grow(writes: list[tuple[zarr.Array, int, np.ndarray]]) -> None:
    """For each (array, start, values): write values at [start, start + len), then save the grown shape.

    Writing through a copy of the array that already has the new shape (in memory only) puts the
    chunks on disk first; saving the metadata afterwards is the single atomic step that makes them
    part of the array, so a crash in between leaves the old, consistent shape. All chunk writes run
    concurrently, then all metadata saves.
    """
    grown = []
    for array, start, values in writes:
        inner = array._async_array
        new_shape = (start + len(values), *array.shape[1:])
        grown.append((inner, new_shape, dataclasses.replace(inner, metadata=inner.metadata.update_shape(new_shape))))
    await asyncio.gather(*(copy.setitem(slice(start, None), values)
                           for (_, start, values), (_, _, copy) in zip(writes, grown, strict=True)))
    await asyncio.gather(*(inner.resize(new_shape) for inner, new_shape, _ in grown))


async def _read_all(reads: list[tuple[Any, slice]]) -> list[np.ndarray]:
    return await asyncio.gather(*(array.getitem(selection) for array, selection in reads))


def _acquire_writer_lock(path: Path) -> int:
    # The lock is on the store's folder itself: a lock file inside would trip zarr's member listing.
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreError(f"{path} is already open for writing by another process") from None
    return fd


def _release_writer_lock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)

