"""The episode store: every step a robot or a human took, in one zarr (v3) group on disk.

Layout (Diffusion Policy's replay-buffer layout, plus per-episode metadata; but zarr format 3, which DP's
readers cannot open: they use zarr-python 2. `flotilla export STORE format=diffusion_policy` writes the
format-2 copy they read, fleet/io/diffusion_policy.py):

    data/<key>            all committed episodes concatenated along time, one array per step key
    meta/episode_ends     cumulative end index of each committed episode (int64)
    meta/<field>          per-episode metadata: robot_id, task, policy_version, outcome (str),
                          success (bool), start_time, end_time (float64 seconds since the epoch),
                          extra (str, JSON)
    zarr.json attributes  {"flotilla_store": {"format": 2, "schema": {key: {shape, dtype}}}}

Step keys: the observation's keys, plus the reserved `action`, `label` (a ControlLabel code),
`timestamp`, optional `goal`, and one `signal_<name>` per signal (uncertainty, risk, ..., as the fleet
server logs them: fleet/server/robots.py SIGNAL_NAMES). The schema
(keys, shapes, dtypes; see `check_schema` for what is allowed) is declared at creation or fixed by the
first commit. An open episode of a store without a schema takes its schema from its own first step.

Chunking: images (uint8, H x W x C) one frame per chunk; everything else chunked along time.

Crash safety. An episode is buffered in memory while it is open (it may still be relabelled: when a
human takes over, the robot's last steps become pre_intervention) and written only at commit. Every
file write is atomic (zarr's local store writes a temporary file and renames it), and a commit writes
in an order that never lets a shape point past data that is not yet on disk:
    1. for each data and meta array: write the new chunks, then save the grown shape
       (the first commit creates the data arrays before, and saves the schema after this step);
    2. last, meta/episode_ends the same way. Saving its shape is the commit point.
A writer killed at any moment therefore leaves `meta/episode_ends` listing only fully written
episodes; arrays may be longer than that, and the next writer trims them (and removes the data arrays
of an interrupted first commit). Readers only ever look at the prefix `meta/episode_ends` describes.
A new store is built inside its folder under the writer lock, its root zarr.json written last.

Integrity. Data that cannot be read back exactly raises StoreCorruptError naming the array and the
step (or episode) range, never wrong values:
  - every array carries a crc32c checksum codec (verified by zarr on every chunk read), and this code
    writes every chunk, even one that holds only the fill value (zarr skips those by default), so a
    chunk missing inside the committed range is damage: reads check that each chunk file exists;
  - opening (and `refresh`) checks the attributes, the schema (`check_schema`), that each array's
    metadata decodes as this code wrote it (dtype, step shape, chunks, chunk keys, fill value,
    codecs), that data/ holds exactly the schema's arrays, each at least as long as the committed
    range, and that `meta/episode_ends` reads back strictly increasing;
  - a writer reads back the committed part of the last chunk of every array when it opens, and at
    each commit that of the partly filled ones (the chunks a commit rewrites), so that damage there
    is never built upon (zarr would read a missing one as fill values and write it back valid).
Cost (benchmarks/store_throughput.py's episodes, format 1 vs 2 interleaved in one process, best of 9,
2 busy cores): commits of 100-step low-dim episodes ~24% slower (4.2k -> 3.2k steps/s one episode per
commit, 36k -> 28k ten per commit; ~3 ms per commit is the read-back of the ~20 partly filled chunks),
image episodes within noise (disk bound); random 16-step windows ~9% slower (515 -> 471 per s low-dim,
210 -> 192 with a 96x96 image); opening +1.7 ms.
Format-1 stores (written before the checksums) still open, read and append: their arrays have no
checksum, and zarr skipped writing their all-fill chunks (an all-demo label chunk, an all-False
success chunk), so a missing chunk there cannot be told from a legitimate one and reads as the fill
value; the other checks apply. Not detectable at all: a shape of `meta/episode_ends` set smaller
(it looks exactly like an interrupted commit), and whole valid chunk files swapped for one another.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import functools
import json
import math
import operator
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.storage
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec
from zarr.core.sync import sync

from fleet.labels import ControlLabel
from fleet.text import clip

FORMAT_VERSION = 2  # 2: every array checksummed, every chunk written
READABLE_FORMATS = (1, 2)
ATTRS_KEY = "flotilla_store"
RESERVED_KEYS = ("action", "label", "timestamp", "goal")
SIGNAL_PREFIX = "signal_"
LOWDIM_CHUNK_STEPS = 1024
# ... but at most this many bytes: a commit rewrites an array's last chunk whole, so a large non-image step
# (a float depth map, a point cloud; a hello may declare 16 MB) at 1024 rows made one chunk of up to 16 GB.
# Arrays created before this keep their 1024 rows (_layout_problem accepts them).
LOWDIM_CHUNK_BYTES = 4 * 1024**2
META_CHUNK_EPISODES = 4096

# Schema rules (check_schema): key names that are safe as folder names, plain numeric dtypes, bounded steps.
KEY_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")
STEP_DTYPES = frozenset(
    "bool int8 int16 int32 int64 uint8 uint16 uint32 uint64 float16 float32 float64".split()
)
MAX_STEP_DIMS = 4
MAX_STEP_BYTES = 64 * 2**20  # per key and step

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

_COMPRESSORS = {
    "image": BloscCodec(cname="zstd", clevel=3, shuffle="noshuffle"),
    "lowdim": BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"),
    "meta": ZstdCodec(level=0, checksum=False),  # zarr's default, which format-1 stores got
}
_ENDS = "meta/episode_ends"


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

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(operator.index(d) for d in self.shape))
        object.__setattr__(self, "dtype", np.dtype(self.dtype))

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


def check_schema(schema: Schema) -> None:
    """Raise StepError naming the first problem of a schema: key names matching KEY_PATTERN (they become
    folder names), dtypes from STEP_DTYPES in native or little-endian order, at most MAX_STEP_DIMS
    dimensions and MAX_STEP_BYTES per key and step, and an `action` and a uint8 scalar `label`."""
    for key, spec in schema.items():
        if not isinstance(key, str) or not KEY_PATTERN.fullmatch(key):
            raise StepError(f"step key {clip(str(key))!r}: a key must match {KEY_PATTERN.pattern}")
        if not isinstance(spec, FieldSpec):
            raise StepError(f"step key {clip(str(key))!r}: {spec!r} is not a FieldSpec")
        if spec.dtype.name not in STEP_DTYPES or spec.dtype.byteorder == ">":
            raise StepError(
                f"step key {clip(str(key))!r}: dtype {spec.dtype.str} ({spec.dtype}) cannot be stored; use one "
                f"of {', '.join(sorted(STEP_DTYPES))} (native or little-endian)"
            )
        if len(spec.shape) > MAX_STEP_DIMS or any(d < 1 for d in spec.shape):
            raise StepError(
                f"step key {clip(str(key))!r}: shape {spec.shape}; a step may have at most {MAX_STEP_DIMS} "
                f"dimensions, each at least 1"
            )
        if math.prod(spec.shape) * spec.dtype.itemsize > MAX_STEP_BYTES:
            raise StepError(
                f"step key {clip(str(key))!r}: {spec.shape} {spec.dtype} is over {MAX_STEP_BYTES} bytes per step"
            )
    missing = [key for key in ("action", "label") if key not in schema]
    if missing:
        raise StepError(f"a schema needs 'action' and 'label' keys; missing {missing} in {sorted(schema)}")
    if schema["label"] != FieldSpec((), np.dtype(np.uint8)):
        raise StepError(
            f"step key 'label' must be a uint8 scalar (a ControlLabel code), not {schema['label']}"
        )


def schema_difference(expected: Schema, got: Schema) -> str:
    """One line naming how `got` differs from `expected` ('' when they are equal)."""
    problems = []
    if missing := sorted(set(expected) - set(got)):
        problems.append(f"missing key(s) {missing}")
    if unexpected := sorted(set(got) - set(expected)):
        problems.append(f"unexpected key(s) {unexpected}")
    problems += [
        f"{key!r} is {got[key].shape} {got[key].dtype}, not {spec.shape} {spec.dtype}"
        for key, spec in expected.items()
        if key in got and got[key] != spec
    ]
    return "; ".join(problems)


def schema_from_example(step: Mapping[str, Any]) -> Schema:
    """A schema from one flat step (key -> array-like), as an episode's first step fixes it; checked."""
    schema = {}
    for key, value in step.items():
        array = np.asarray(value)
        schema[key] = FieldSpec(array.shape, array.dtype)
    check_schema(schema)
    return schema


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

    def __init__(
        self,
        store: EpisodeStore,
        robot_id: str,
        task: str,
        policy_version: str,
        start_time: float,
        extra: dict,
    ):
        self._store = store
        self.robot_id = robot_id
        self.task = task
        self.policy_version = policy_version
        self.start_time = start_time
        self.extra = extra
        self._steps: list[dict[str, np.ndarray]] = []
        self.schema: Schema | None = None  # the store's, or (while it has none) this episode's first step's
        self.closed = False

    def __len__(self) -> int:
        return len(self._steps)

    def append(
        self,
        obs: Mapping[str, Any],
        action: Any,
        label: ControlLabel | str | int,
        *,
        goal: Any = None,
        signals: Mapping[str, float] | None = None,
        timestamp: float | None = None,
    ) -> None:
        """Add one step (flattened to the key -> value mapping the store keeps); a step that does not fit
        the schema raises StepError and changes nothing."""
        clash = [
            key for key in obs if key in RESERVED_KEYS and key != "goal" or key.startswith(SIGNAL_PREFIX)
        ]
        if clash:
            raise StepError(
                f"observation keys {clash} clash with reserved step keys {RESERVED_KEYS + (SIGNAL_PREFIX + '*',)}"
            )
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
        self.append_flat(step)

    def append_flat(self, step: Mapping[str, Any]) -> None:
        self._check_open()
        schema = self.schema or self._store._schema or schema_from_example(step)
        self._steps.append(validate_step(schema, step))
        self.schema = schema

    def append_checked(self, step: Mapping[str, np.ndarray]) -> None:
        """Add a step its caller has already checked, key by key, against one fixed spec: the fleet server
        decodes every robot step against the robot's declared spec (fleet/server/robots.py), so checking
        it again here would double the writer's cost per step. The episode's schema comes from its first
        step (check_schema applies), later steps must have the same keys, and a commit still refuses an
        episode whose schema differs from the store's (schema_mismatch)."""
        self._check_open()
        if self.schema is None:
            self.schema = schema_from_example(step)
        elif step.keys() != self.schema.keys():
            raise StepError(f"step keys {sorted(step)} differ from the episode's {sorted(self.schema)}")
        self._steps.append(step)  # the caller hands it over (the writer's decoded step, used once)

    def labels(self) -> np.ndarray:
        return np.array([step["label"] for step in self._steps], dtype=np.uint8)

    def relabel_last(
        self, count: int, new_label: ControlLabel, only: ControlLabel | None = ControlLabel.ROBOT
    ) -> int:
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
    writes. One process writes at a time (a lock on the folder enforces it); any number may read, and a
    reader sees new episodes after `refresh()`.
    """

    def __init__(self, path: str | os.PathLike, writable: bool, lock_fd: int | None = None):
        self.path = Path(path)
        self.writable = writable
        self._lock_fd = lock_fd
        self._commit_lock = threading.Lock()
        self._schema: Schema | None = None
        self._ends = np.zeros(0, dtype=np.int64)
        self._arrays: dict[str, zarr.Array] = {}
        self._checksummed: set[str] = set()
        self.refresh()
        if writable:
            self._trim_uncommitted()
            self._verify_tails()

    # -- opening ---------------------------------------------------------------------------------

    @classmethod
    def create(
        cls, path: str | os.PathLike, schema: Schema | None = None, overwrite: bool = False
    ) -> EpisodeStore:
        """Create a new, empty store (`overwrite=True` replaces an existing episode store, nothing else)."""
        path = Path(path)
        schema = schema or None
        if schema is not None:
            check_schema(schema)
        if not overwrite and _has_entries(path):  # the usual mistake, told before taking the lock
            raise StoreError(f"{path} already exists; open it with mode='a' or pass overwrite=True")

        def build(lock_fd: int) -> EpisodeStore:
            if _has_entries(path):  # again under the lock: another process may have created it meanwhile
                if not overwrite:
                    raise StoreError(f"{path} was just created by another process; open it with mode='a'")
                _clear_store_folder(path)
            _build_store(path, schema)
            return cls(path, writable=True, lock_fd=lock_fd)

        return _under_writer_lock(path, build)

    @classmethod
    def open(cls, path: str | os.PathLike, mode: str = "r") -> EpisodeStore:
        """Open for reading (`mode="r"`), or for appending (`mode="a"`, creating it if missing)."""
        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' (read) or 'a' (append), not {mode!r}")
        path = Path(path)
        if mode == "r":
            return cls(path, writable=False)

        def append(lock_fd: int) -> EpisodeStore:
            if not _has_entries(path):  # under the lock, so no other process is creating it now
                _build_store(path, None)
            return cls(path, writable=True, lock_fd=lock_fd)

        return _under_writer_lock(path, append)

    def close(self) -> None:
        _release_writer_lock(self._lock_fd)
        self._lock_fd = None
        self.writable = False

    def __enter__(self) -> EpisodeStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def refresh(self) -> None:
        """Re-read the committed state from disk (readers call this to see new episodes), checking it."""
        with _damage_named(f"{self.path}: cannot read the episode store"):
            self._load()

    def _load(self) -> None:
        if hint := _foreign_dataset_hint(self.path):
            raise StoreError(hint)
        if not (self.path / "zarr.json").is_file():
            if (self.path / "meta").exists():
                raise StoreCorruptError(
                    f"{self.path}: zarr.json is missing (damaged, or still being created)"
                )
            raise StoreError(f"{self.path} is not an episode store (no zarr.json)")
        # A reader races a live writer, which grows every array and writes the schema before it grows
        # episode_ends (the commit point). Reading the commit point first, and showing the store as of
        # then, makes everything read after it hold at least what it says is committed.
        visible = None if self.writable else _committed_episodes(self.path)
        root = zarr.open_group(str(self.path), mode="r+" if self.writable else "r", zarr_format=3)
        attrs = root.attrs.get(ATTRS_KEY)
        if not isinstance(attrs, Mapping) or "format" not in attrs:
            raise StoreCorruptError(f"{self.path} is a zarr group but not a Flotilla episode store")
        if attrs["format"] not in READABLE_FORMATS:
            raise StoreCorruptError(
                f"{self.path}: store format {attrs['format']!r}, this code reads {READABLE_FORMATS}"
            )
        schema = (
            None
            if attrs.get("schema") is None
            else {key: FieldSpec.from_json(spec) for key, spec in attrs["schema"].items()}
        )
        if schema is not None:
            try:
                check_schema(schema)
            except StepError as err:
                raise StoreCorruptError(f"{self.path}: the schema in zarr.json is damaged: {err}") from None
        self._group, self._schema, self._arrays, self._checksummed = root, schema, {}, set()
        for group in ("data", "meta"):
            if not isinstance(root.get(group), zarr.Group):
                raise StoreCorruptError(f"{self.path}: the {group}/ group is missing")
        data_keys = {entry.name for entry in (self.path / "data").iterdir() if entry.is_dir()}
        if schema is not None and data_keys != set(schema):
            raise StoreCorruptError(
                f"{self.path}: data/ holds {sorted(data_keys)}, but the schema has {sorted(schema)}"
            )
        for name, layout in self._layouts().items():
            with _damage_named(f"{self.path}: cannot read the episode store: {name}/zarr.json"):
                self._array(name)
            problem = _layout_problem(self._array(name), layout, legacy_ok=attrs["format"] == 1)
            if problem:
                raise StoreCorruptError(f"{self.path}: {name}/zarr.json is damaged: {problem}")
            if Crc32cCodec() in self._array(name).metadata.codecs:
                self._checksummed.add(name)
        count = self._array(_ENDS).shape[0] if visible is None else min(visible, self._array(_ENDS).shape[0])
        ends = self._read_checked([(_ENDS, 0, count)])[0].astype(np.int64)
        if ends.size and (np.any(np.diff(ends) <= 0) or ends[0] <= 0):
            raise StoreCorruptError(f"{self.path}: {_ENDS} is not strictly increasing")
        if schema is None and ends.size:
            raise StoreCorruptError(f"{self.path}: {ends.size} committed episodes but no schema in zarr.json")
        self._ends = ends
        for name in self._layouts():
            if self._array(name).shape[0] < self._committed(name):
                raise StoreCorruptError(f"{self.path}: {name} is shorter than the committed {_unit(name)}")

    def _layouts(self) -> dict[str, _Layout]:
        """Every array of the store (by path) and how it is laid out."""
        layouts = {f"meta/{name}": _meta_layout(dtype) for name, dtype in META_FIELDS.items()}
        layouts[_ENDS] = _meta_layout(np.int64)
        layouts.update({f"data/{key}": _data_layout(spec) for key, spec in (self._schema or {}).items()})
        return layouts

    def _committed(self, name: str) -> int:
        """How far array `name` is committed (episodes for meta/, steps for data/)."""
        return self.num_steps if name.startswith("data/") else self.num_episodes

    def _trim_uncommitted(self) -> None:
        """Drop what a killed writer left past the commit point (never committed, never visible)."""
        for name in self._layouts():
            array = self._array(name)
            if array.shape[0] > self._committed(name):
                array.resize((self._committed(name), *array.shape[1:]))
        if self._schema is None:  # data arrays of an interrupted first commit
            for entry in (self.path / "data").iterdir():
                if entry.is_dir():
                    shutil.rmtree(entry)
        for leftover in self.path.rglob("*.partial"):  # temporary files of interrupted atomic writes
            leftover.unlink(missing_ok=True)

    def _verify_tails(self, rewritten_only: bool = False) -> None:
        """Read back the committed part of every array's last chunk, or with `rewritten_only` of those the
        next commit rewrites (the partly filled ones), so that damage there is never built upon."""
        reads = []
        for name in self._layouts():
            committed, chunk = self._committed(name), self._array(name).chunks[0]
            if committed and not (rewritten_only and committed % chunk == 0):
                reads.append((name, (committed - 1) // chunk * chunk, committed))
        self._read_checked(reads)

    # -- schema ----------------------------------------------------------------------------------

    @property
    def schema(self) -> Schema | None:
        return None if self._schema is None else dict(self._schema)

    def schema_mismatch(self, episode: OpenEpisode) -> str:
        """'' when `episode` could be committed now, else one line saying why not (usually how its schema
        differs from the store's), so a writer can fail just that episode before a batched commit_many."""
        if episode.closed:
            return "the episode is already committed or aborted"
        if not len(episode):
            return "the episode has no steps"
        schema = self._schema
        difference = "" if schema is None else schema_difference(schema, episode.schema)
        return difference and f"the episode's schema differs from the store's: {difference}"

    # -- writing ---------------------------------------------------------------------------------

    def begin_episode(
        self,
        robot_id: str,
        task: str,
        policy_version: str = "",
        start_time: float | None = None,
        extra: Mapping | None = None,
    ) -> OpenEpisode:
        if not self.writable:
            raise StoreError(f"{self.path} is open read-only; open it with mode='a' to record episodes")
        return OpenEpisode(
            self,
            str(robot_id),
            str(task),
            str(policy_version),
            time.time() if start_time is None else float(start_time),
            dict(extra or {}),
        )

    def commit_many(self, finished: Sequence[tuple[OpenEpisode, bool, str]]) -> list[int]:
        """Commit several episodes in one write (a fleet's episode writer drains its queue this way).

        Each item is (episode, success, outcome); returns their indices. All or none become visible. The
        first commit fixes the store's schema (from the first episode); an episode whose schema differs
        raises StepError and nothing is written.
        """
        if not self.writable:
            raise StoreError(f"{self.path} is no longer open for writing")
        for episode, _, _ in finished:
            episode._check_open()
            if not len(episode):
                raise StoreError("cannot commit an empty episode (it has no steps); abort it instead")
        if not finished:
            return []
        with self._commit_lock:
            schema = self._schema or finished[0][0].schema
            for episode, _, _ in finished:
                if difference := schema_difference(schema, episode.schema):
                    raise StepError(
                        f"episode of robot {episode.robot_id!r} does not fit the store's schema: "
                        f"{difference}; nothing was committed"
                    )
            now = time.time()
            stacked = [episode._stacked() for episode, _, _ in finished]
            steps = {key: np.concatenate([s[key] for s in stacked]) for key in stacked[0]}
            meta_columns = {
                "robot_id": [e.robot_id for e, _, _ in finished],
                "task": [e.task for e, _, _ in finished],
                "policy_version": [e.policy_version for e, _, _ in finished],
                "outcome": [
                    outcome or ("success" if success else "failure") for _, success, outcome in finished
                ],
                "success": [bool(success) for _, success, _ in finished],
                "start_time": [e.start_time for e, _, _ in finished],
                "end_time": [now] * len(finished),
                "extra": [json.dumps(e.extra) for e, _, _ in finished],
            }
            self._verify_tails(rewritten_only=True)  # never rewrite a damaged chunk into a valid one
            first_commit = self._schema is None
            if first_commit:
                data = self._group["data"]
                for key, spec in schema.items():  # overwrite: leftovers of a failed first commit
                    self._arrays[f"data/{key}"] = _data_layout(spec).create(data, key, overwrite=True)
            start_step, first_index = self.num_steps, self.num_episodes
            new_ends = start_step + np.cumsum([len(e) for e, _, _ in finished], dtype=np.int64)
            writes = [(self._array(f"data/{key}"), start_step, values) for key, values in steps.items()]
            writes += [
                (self._array(f"meta/{name}"), first_index, np.array(column, dtype=META_FIELDS[name]))
                for name, column in meta_columns.items()
            ]
            sync(_write_then_grow(writes))
            if first_commit:
                self._group.attrs[ATTRS_KEY] = {
                    **self._group.attrs[ATTRS_KEY],
                    "schema": _schema_json(schema),
                }
                self._schema = dict(schema)
                self._checksummed.update(f"data/{key}" for key in schema)
            # The commit point: episode_ends grows only after everything it points at is on disk.
            sync(_write_then_grow([(self._array(_ENDS), first_index, new_ends)]))
            self._ends = np.concatenate([self._ends, new_ends])
        for episode, _, _ in finished:
            episode._close()
        return list(range(first_index, first_index + len(finished)))

    def update_extra(self, index: int, update: Callable[[dict], None]) -> None:
        """Change a committed episode's `extra` metadata in place: `update(extra)` edits the dict. For what
        arrives after an episode may be committed (an operator's note, a discarded correction). The chunk
        of meta/extra holding it is rewritten atomically: a crash leaves the old value or the new one."""
        if not self.writable:
            raise StoreError(f"{self.path} is not open for writing")
        with self._commit_lock:
            index = self._check_index(index)
            extra = self.episode_meta(index).extra
            update(extra)
            self._array("meta/extra")[index] = json.dumps(extra)

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

    def read_window(
        self, index: int, start: int, length: int, keys: Iterable[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Steps [start, start + length) of episode `index`."""
        first, end = self.episode_bounds(index)
        if start < 0 or length < 1 or first + start + length > end:
            raise IndexError(
                f"window [{start}, {start + length}) is outside episode {index} of length {end - first}"
            )
        return self._read(first + start, first + start + length, keys)

    def random_windows(
        self, count: int, length: int, rng: np.random.Generator, keys: Iterable[str] | None = None
    ) -> list[dict[str, np.ndarray]]:
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
        return self._read(0, self.num_steps, ["label"])["label"] if self._schema else np.zeros(0, np.uint8)

    def episode_meta(self, index: int) -> EpisodeMeta:
        index = self._check_index(index)
        values = self._read_checked([(f"meta/{name}", index, index + 1) for name in META_FIELDS])
        row = {name: value[0] for name, value in zip(META_FIELDS, values, strict=True)}
        start, end = self.episode_bounds(index)
        try:
            extra = json.loads(str(row["extra"]) or "{}")
        except ValueError as err:
            raise StoreCorruptError(
                f"{self.path}: meta/extra of episode {index} is not JSON ({err})"
            ) from None
        return EpisodeMeta(
            index=index,
            length=end - start,
            robot_id=str(row["robot_id"]),
            task=str(row["task"]),
            policy_version=str(row["policy_version"]),
            outcome=str(row["outcome"]),
            success=bool(row["success"]),
            start_time=float(row["start_time"]),
            end_time=float(row["end_time"]),
            extra=extra,
        )

    def meta_column(self, name: str) -> np.ndarray:
        """One metadata field for every committed episode."""
        if name not in META_FIELDS:
            raise KeyError(f"unknown episode metadata field {name!r}; fields: {', '.join(META_FIELDS)}")
        return self._read_checked([(f"meta/{name}", 0, self.num_episodes)])[0]

    def size_on_disk(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())

    def _read(self, start: int, end: int, keys: Iterable[str] | None) -> dict[str, np.ndarray]:
        names = list(self._schema or {}) if keys is None else list(keys)
        unknown = [key for key in names if key not in (self._schema or {})]
        if unknown:
            raise KeyError(f"unknown step key(s) {unknown}; the store has {sorted(self._schema or {})}")
        values = self._read_checked([(f"data/{key}", start, end) for key in names])
        return dict(zip(names, values, strict=True))

    def _read_checked(self, reads: Sequence[tuple[str, int, int]]) -> list[np.ndarray]:
        """Rows [start, end) of each (array path, start, end), exactly as committed, or StoreCorruptError
        naming the array and the range. Every read of committed data goes through here."""
        for name, start, end in reads:
            if name in self._checksummed:  # zarr would read a missing chunk as fill values
                array, chunk = self._array(name), self._array(name).chunks[0]
                for index in range(start // chunk, (end - 1) // chunk + 1):
                    key = array.metadata.encode_chunk_key((index,) + (0,) * (array.ndim - 1))
                    if not os.path.isfile(os.path.join(self.path, name, key)):
                        raise StoreCorruptError(f"{self._where(name, start, end)}: chunk {key} is missing")
        # One round trip to zarr's event loop for all reads rather than one per read. (Gathering many
        # windows at once is slower again: the same chunks get decoded over and over concurrently.)
        results = sync(
            _read_all([(self._array(name)._async_array, slice(start, end)) for name, start, end in reads])
        )
        for (name, start, end), result in zip(reads, results, strict=True):
            if isinstance(result, Exception):
                raise StoreCorruptError(
                    f"{self._where(name, start, end)} cannot be read back ({type(result).__name__}: {result})"
                ) from result
        return results

    def _where(self, name: str, start: int, end: int) -> str:
        return f"{self.path}: {name}, {_unit(name)} [{start}, {end})"

    def _check_index(self, index: int) -> int:
        if not -self.num_episodes <= index < self.num_episodes:
            raise IndexError(f"episode {index} out of range: the store has {self.num_episodes} episodes")
        return index % self.num_episodes

    def _array(self, path: str) -> zarr.Array:
        # Opening an array reads its metadata file; keep the handles (refresh() drops them).
        if path not in self._arrays:
            self._arrays[path] = self._group[path]
        return self._arrays[path]


def _committed_episodes(path: Path) -> int | None:
    """How many episodes meta/episode_ends holds now (None when it cannot be read: the full load then
    says why)."""
    try:
        return int(zarr.open_array(str(path / _ENDS), mode="r", zarr_format=3).shape[0])
    except Exception:  # any damage is reported by the checked load that follows
        return None


@dataclasses.dataclass(frozen=True)
class _Layout:
    """How one array is laid out on disk: the one rule both for creating it and for checking it."""

    dtype: Any
    step_shape: tuple[int, ...]
    chunk_rows: int
    compressor: str  # a key of _COMPRESSORS

    def create(self, parent: zarr.Group, name: str, overwrite: bool = False) -> zarr.Array:
        return parent.create_array(
            name,
            shape=(0, *self.step_shape),
            chunks=(self.chunk_rows, *self.step_shape),
            dtype=self.dtype,
            compressors=(_COMPRESSORS[self.compressor], Crc32cCodec()),
            overwrite=overwrite,
        )


def _data_layout(spec: FieldSpec) -> _Layout:
    if spec.is_image:
        return _Layout(spec.dtype, spec.shape, 1, "image")
    step_bytes = max(1, math.prod(spec.shape) * spec.dtype.itemsize)
    return _Layout(
        spec.dtype, spec.shape, max(1, min(LOWDIM_CHUNK_STEPS, LOWDIM_CHUNK_BYTES // step_bytes)), "lowdim"
    )


def _meta_layout(dtype: Any) -> _Layout:
    return _Layout(dtype, (), META_CHUNK_EPISODES, "meta")


def _layout_problem(array: zarr.Array, layout: _Layout, legacy_ok: bool) -> str:
    """'' when `array`'s metadata decodes its chunks as `layout` says, else what differs. With `legacy_ok`
    (a format-1 store) the checksum codec may be absent."""
    got, want = _decoding_fields(array.metadata), _decoding_fields(_reference_metadata(layout))
    if layout.compressor == "lowdim" and got["chunk_grid"] != want["chunk_grid"]:
        legacy = dataclasses.replace(layout, chunk_rows=LOWDIM_CHUNK_STEPS)  # before LOWDIM_CHUNK_BYTES
        if got["chunk_grid"] == _decoding_fields(_reference_metadata(legacy))["chunk_grid"]:
            want["chunk_grid"] = got["chunk_grid"]
    if legacy_ok and {"name": "crc32c"} not in got["codecs"]:
        want["codecs"] = [codec for codec in want["codecs"] if codec["name"] != "crc32c"]
    return "; ".join(
        f"{field} is {got[field]}, expected {want[field]}" for field in want if got[field] != want[field]
    )


def _decoding_fields(metadata: Any) -> dict:
    """The metadata that decides what values a chunk decodes to. (Compressor settings do not: blosc and zstd
    record theirs in each chunk. The array's length is checked against the commits instead.)"""
    fields = metadata.to_dict()
    return {
        "step shape": tuple(fields["shape"][1:]),
        "data_type": fields["data_type"],
        "chunk_grid": fields["chunk_grid"],
        "chunk_key_encoding": fields["chunk_key_encoding"],
        "fill_value": fields["fill_value"],
        "codecs": [
            codec if codec["name"] in ("bytes", "vlen-utf8") else {"name": codec["name"]}
            for codec in fields["codecs"]
        ],
    }


@functools.lru_cache(maxsize=256)
def _reference_metadata(layout: _Layout) -> Any:
    return layout.create(zarr.create_group(zarr.storage.MemoryStore(), zarr_format=3), "reference").metadata


@contextlib.contextmanager
def _damage_named(what: str):
    """Raise any error but StoreError as StoreCorruptError(what): zarr and json raise many kinds on damaged
    files."""
    try:
        yield
    except StoreError:
        raise
    except Exception as err:
        raise StoreCorruptError(f"{what} ({type(err).__name__}: {err})") from err


def _unit(name: str) -> str:
    return "steps" if name.startswith("data/") else "episodes"


def _schema_json(schema: Schema | None) -> dict | None:
    return None if schema is None else {key: spec.to_json() for key, spec in schema.items()}


def _foreign_dataset_hint(path: Path) -> str:
    """'' unless `path` holds another tool's dataset rather than an episode store; then one line saying
    which and how to import it (fleet/io)."""
    if (path / "meta" / "info.json").is_file() and not (path / "zarr.json").is_file():
        kind = ("a LeRobot dataset", "lerobot")
    elif path.name.endswith(".zarr.zip") and path.is_file():  # how Diffusion Policy caches its datasets
        kind = ("a zipped zarr store (a Diffusion Policy dataset cache?)", "diffusion_policy")
    elif (path / ".zgroup").is_file():
        kind = ("a zarr format-2 group (a Diffusion Policy replay buffer?)", "diffusion_policy")
    elif (path / "meta" / "episode_ends" / "zarr.json").is_file() and not any(
        (path / "meta" / name).exists()
        for name in META_FIELDS  # else a damaged episode store
    ):
        try:
            foreign = ATTRS_KEY not in json.loads((path / "zarr.json").read_bytes()).get("attributes", {})
        except (OSError, ValueError, AttributeError):
            foreign = False
        kind = ("a Diffusion Policy replay buffer", "diffusion_policy") if foreign else None
    else:
        kind = None
    if kind is None:
        return ""
    return (
        f"{path} is {kind[0]}, not a Flotilla episode store; import it first: "
        f"flotilla import {path} format={kind[1]} out=STORE"
    )


def _has_entries(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def _build_store(path: Path, schema: Schema | None) -> None:
    """Write a new, empty store into its locked, empty folder. The root zarr.json goes last, so a root
    that says "episode store" never points at missing groups."""
    meta = zarr.create_group(str(path / "meta"), zarr_format=3)
    for name, dtype in {**META_FIELDS, "episode_ends": np.int64}.items():
        _meta_layout(dtype).create(meta, name)
    data = zarr.create_group(str(path / "data"), zarr_format=3)
    for key, spec in (schema or {}).items():
        _data_layout(spec).create(data, key)
    attrs = {"format": FORMAT_VERSION, "schema": _schema_json(schema)}
    zarr.create_group(str(path), zarr_format=3, attributes={ATTRS_KEY: attrs})


def _clear_store_folder(path: Path) -> None:
    """Delete an episode store's files for create(overwrite=True); any other folder is refused. The folder
    itself stays: its writer lock is held."""
    try:
        is_store = ATTRS_KEY in json.loads((path / "zarr.json").read_bytes())["attributes"]
    except (OSError, ValueError, KeyError, TypeError):
        is_store = False
    if not is_store:
        raise StoreError(
            f"{path} is not an episode store (no zarr.json with the {ATTRS_KEY!r} attribute); "
            f"refusing to delete it for overwrite=True"
        )
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


async def _write_then_grow(writes: list[tuple[zarr.Array, int, np.ndarray]]) -> None:
    """For each (array, start, values): write values at [start, start + len), then save the grown shape.

    Writing through a copy of the array that already has the new shape (in memory only) puts the
    chunks on disk first; saving the metadata afterwards is the single atomic step that makes them
    part of the array, so a crash in between leaves the old, consistent shape. All chunk writes run
    concurrently, then all metadata saves. Every chunk is written, even one of fill values only, so
    that a missing chunk always means damage.
    """
    grown = []
    for array, start, values in writes:
        inner = array._async_array
        new_shape = (start + len(values), *array.shape[1:])
        copy = dataclasses.replace(inner, metadata=inner.metadata.update_shape(new_shape))
        grown.append((inner, new_shape, copy.with_config({"write_empty_chunks": True})))
    await asyncio.gather(
        *(
            copy.setitem(slice(start, None), values)
            for (_, start, values), (_, _, copy) in zip(writes, grown, strict=True)
        )
    )
    await asyncio.gather(*(inner.resize(new_shape) for inner, new_shape, _ in grown))


async def _read_all(reads: list[tuple[Any, slice]]) -> list[np.ndarray | Exception]:
    return await asyncio.gather(
        *(array.getitem(selection) for array, selection in reads), return_exceptions=True
    )


def _under_writer_lock(path: Path, build: Callable[[int], EpisodeStore]) -> EpisodeStore:
    """`build(lock_fd)` with the writer lock on `path` held; released again if it raises."""
    lock_fd = _acquire_writer_lock(path)
    try:
        return build(lock_fd)
    except BaseException:
        _release_writer_lock(lock_fd)
        raise


def _acquire_writer_lock(path: Path) -> int:
    # The lock is on the store's folder itself: a lock file inside would trip zarr's member listing.
    if path.exists() and not path.is_dir():
        raise StoreError(f"{path} is a file, not an episode store folder")
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
