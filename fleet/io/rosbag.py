"""`flotilla import-bag PATH... mapping=MAPPING.yaml out=STORE`: rosbag2 recordings (mcap or sqlite3) into
an episode store, steps labelled `demo`.

Each bag is read twice with rosbags' AnyReader: the first pass keeps every mapped low-dim value and the
time of every mapped message (images are not decoded), the second decodes only the camera frames the
steps use, so memory holds the low-dim streams and the frames of the episodes not yet written, never a
whole bag of images. Between the passes the streams are resampled to the mapping's control rate
(fleet/io/bag_mapping.py): the step at grid time t holds each source's newest sample at or before t;
a step where some source's newest sample is older than its max staleness is a gap step, a gap of up to
max_gap_s is bridged (its steps keep the held values), a longer one splits the episode and its steps
are dropped; gaps at an episode's ends are trimmed. Times are integer nanoseconds (header stamps are
sec + nanosec), so a sample exactly on a grid time is held there. Low-dim keys are stored as float32.

Message conversion (images, joint states, arrays) is fleet/ros2/messages.py's, shared with the ROS node.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from configs.schema import ConfigError, check, register_job
from fleet.io.bag_mapping import BagMapping, Source, load_mapping
from fleet.io.common import (
    CAMERA_SUFFIX,
    CONTROL_HZ_KEY,
    DataIOError,
    ImportedEpisode,
    episode_steps,
    require,
    write_episodes,
)
from fleet.store.episode_store import StepError, StoreError

IMAGE_TYPES = ("sensor_msgs/msg/CompressedImage", "sensor_msgs/msg/Image")
# Per-joint messages, picked by joint name: the field naming the joints, and the per-joint value fields
# (the first is the default). A JointTrajectory's values are its first point's.
JOINT_TYPES = {
    "sensor_msgs/msg/JointState": ("name", ("position", "velocity", "effort")),
    "trajectory_msgs/msg/JointTrajectory": (
        "joint_names",
        ("positions", "velocities", "accelerations", "effort"),
    ),
}
ARRAY_TYPES = ("std_msgs/msg/Float64MultiArray", "std_msgs/msg/Float32MultiArray")
BOOL, STRING = "std_msgs/msg/Bool", "std_msgs/msg/String"
NS = 1_000_000_000


@dataclass
class ImportBagConfig:
    """`flotilla import-bag PATH... mapping=MAPPING.yaml out=STORE` (configs/import-bag.yaml)."""

    # rosbag2 folders (or their .mcap / .db3 file): the command's bare arguments
    paths: list[str] = field(default_factory=list)
    mapping: str | None = None  # the mapping YAML (fleet/io/bag_mapping.py)
    out: str | None = None  # the episode store to create
    overwrite: bool = False  # replace an existing episode store at `out`
    # The episodes' task name (not `task`: that is the config group of the sim tasks).
    task_name: str = "rosbag"
    robot_id: str = "rosbag"
    success: bool = True  # imported demonstrations count as successful
    progress: bool = True

    def __post_init__(self):
        check(
            bool(self.paths),
            "paths",
            "missing: give one or more rosbag2 folders, e.g. `flotilla import-bag run1 run2 ...`",
        )
        check(
            bool(self.mapping),
            "mapping",
            "missing: give mapping=MAPPING.yaml (which topic becomes which key)",
        )
        check(bool(self.out), "out", "missing: give out=STORE, the episode store to write")


register_job("import-bag", ImportBagConfig)


class BagError(DataIOError):
    """A bag does not fit its mapping (a missing topic, a wrong type, an unknown joint or field), or
    (setting "paths") is not a readable rosbag2 recording."""

    def __init__(self, message: str, setting: str = "mapping"):
        super().__init__(message)
        self.setting = setting


@dataclass
class ImportResult:
    episodes: int = 0
    steps: int = 0
    bridged_steps: int = 0  # gap steps kept (a gap up to max_gap_s)
    dropped_steps: int = 0  # gap steps dropped (longer gaps, gaps at an episode's ends, too-short pieces)
    splits: int = 0  # episodes split at a long gap
    messages: int = 0
    bytes: int = 0  # size of the bags' files


# ------------------------------------------------------------------------------------------ sources
@dataclass
class _Stream:
    """One mapped source resolved against a bag: its samples (time, value or frame ordinal) in bag order."""

    key: str
    source: Source
    msgtype: str
    stale_ns: int
    times: list[int] = field(default_factory=list)
    values: list[np.ndarray] = field(default_factory=list)  # low-dim; images keep only their ordinals
    width: int | None = None
    # JointState: joint names of the messages skipped for lacking some of the mapped joints (another
    # publisher on the same topic, e.g. a gripper's driver beside the arm's)
    other_joints: set[str] = field(default_factory=set)

    @property
    def is_image(self) -> bool:
        return self.msgtype in IMAGE_TYPES

    def where(self) -> str:
        setting = self.key if self.key == "action" else f"observation.{self.key}"
        return f"{setting}: topic {self.source.topic} ({self.msgtype})"

    def add(self, msg: Any, time_ns: int) -> None:
        if self.msgtype in JOINT_TYPES and not set(self.source.joints) <= set(
            _joint_names(msg, self.msgtype)
        ):
            self.other_joints.update(_joint_names(msg, self.msgtype))
            return
        self.times.append(time_ns)
        if self.is_image:
            return
        value = self._lowdim(msg)
        if value.size == 0:
            raise BagError(f"{self.where()}: a message at {time_ns / NS:.3f} s holds no numbers")
        if self.width is None:
            self.width = value.size
        elif value.size != self.width:
            raise BagError(
                f"{self.where()}: a message at {time_ns / NS:.3f} s has {value.size} values, earlier ones {self.width}"
            )
        self.values.append(value)

    def _lowdim(self, msg: Any) -> np.ndarray:
        from fleet.ros2.messages import float_array, joint_positions

        if self.msgtype in JOINT_TYPES:
            field_name = self.source.field or JOINT_TYPES[self.msgtype][1][0]
            holder = msg
            if self.msgtype != "sensor_msgs/msg/JointState":
                if not msg.points:
                    raise BagError(f"{self.where()}: a JointTrajectory has no points")
                holder = msg.points[0]
            names, values = _joint_names(msg, self.msgtype), getattr(holder, field_name)
            if len(values) != len(names):  # e.g. a driver that leaves velocity or effort empty
                raise BagError(
                    f"{self.where()}: a message has {len(values)} {field_name} values for {len(names)} joints"
                )
            # joint_positions reads `position`; any per-joint array is picked the same way
            return joint_positions(_Named(names, values), self.source.joints)
        if self.source.field is not None:
            return _numbers(
                _field(msg, self.source.field, self.where()), f"{self.where()} field {self.source.field}"
            )
        if self.msgtype in ARRAY_TYPES:
            return float_array(msg)
        return _numbers(msg, self.where())

    def image(self, msg: Any) -> np.ndarray:
        import cv2

        from fleet.ros2.messages import compressed_image_to_rgb, image_to_rgb

        try:
            rgb = compressed_image_to_rgb(msg) if self.msgtype == IMAGE_TYPES[0] else image_to_rgb(msg)
        except ValueError as err:
            raise BagError(f"{self.where()}: {err}") from None
        if self.source.size is None or tuple(rgb.shape[:2]) == tuple(self.source.size):
            return rgb
        height, width = self.source.size
        return cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA)


def _joint_names(msg: Any, msgtype: str) -> list[str]:
    return [str(name) for name in getattr(msg, JOINT_TYPES[msgtype][0])]


@dataclass(frozen=True)
class _Named:
    name: Any
    position: Any


def _field(msg: Any, path: str, where: str) -> Any:
    value = msg
    for i, name in enumerate(path.split(".")):
        if name.startswith("_") or not hasattr(value, name):
            inside = ".".join(path.split(".")[:i]) or "the message"
            raise BagError(
                f"{where}: {inside} has no field {name!r} (fields: {', '.join(_fields(value)) or 'none'})"
            )
        value = getattr(value, name)
    return value


def _fields(value: Any) -> list[str]:
    if not dataclasses.is_dataclass(value):
        return []
    return [f.name for f in dataclasses.fields(value) if not f.name.startswith("_")]


def _numbers(value: Any, where: str) -> np.ndarray:
    """The numeric content of a value in field order (float64, flat); the header is skipped."""
    if isinstance(value, bool | int | float | np.number):
        return np.array([value], np.float64)
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
        return value.astype(np.float64).reshape(-1)
    if isinstance(value, list | tuple) and all(isinstance(v, bool | int | float) for v in value):
        return np.asarray(value, np.float64).reshape(-1)
    if dataclasses.is_dataclass(value):
        parts = [_numbers(getattr(value, name), where) for name in _fields(value) if name != "header"]
        return np.concatenate(parts) if parts else np.zeros(0)
    raise BagError(
        f"{where}: holds a {type(value).__name__}, not numbers; pick a numeric sub-message with field="
    )


def _resolve(mapping: BagMapping, topics: dict, bag: Path) -> list[_Stream]:
    """The mapping's sources checked against the bag's topics and their message types."""
    streams = []
    for key, sources in mapping.keys().items():
        where = key if key == "action" else f"observation.{key}"
        for source in sources:
            info = topics.get(source.topic)
            if info is None:
                have = ", ".join(sorted(topics)) or "no topics"
                raise BagError(f"{where}: topic {source.topic} is not in {bag} (it has {have})")
            msgtype = info.msgtype
            stream = _Stream(key, source, msgtype, round(mapping.staleness_s(source) * NS))
            is_image_key = key.endswith(CAMERA_SUFFIX)
            if is_image_key != (msgtype in IMAGE_TYPES):
                want = (
                    "a camera topic (" + " or ".join(IMAGE_TYPES) + ")"
                    if is_image_key
                    else f"a key named <camera>{CAMERA_SUFFIX}"
                )
                raise BagError(f"{where}: topic {source.topic} is {msgtype}; it needs {want}")
            if (msgtype in JOINT_TYPES) != (source.joints is not None):
                problem = (
                    "give joints: [...] (the joint names, in order)"
                    if source.joints is None
                    else f"joints: is for {' and '.join(JOINT_TYPES)} topics"
                )
                raise BagError(f"{where}: topic {source.topic} is {msgtype}; {problem}")
            fields = JOINT_TYPES.get(msgtype, (None, ()))[1]
            if fields and (source.field or fields[0]) not in fields:
                raise BagError(
                    f"{where}: topic {source.topic} ({msgtype}): field must be one of {', '.join(fields)}, "
                    f"got {source.field!r}"
                )
            streams.append(stream)
    return streams


# ------------------------------------------------------------------------------------------ resampling
def hold(times: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Index into sorted `times` of the newest sample at or before each grid time (-1: none yet)."""
    return np.searchsorted(times, grid, side="right") - 1


def pieces(fresh: np.ndarray, max_gap_steps: int) -> tuple[list[tuple[int, int]], int]:
    """Runs [start, end) of the grid made of fresh steps, joining runs whose gap is at most
    `max_gap_steps` stale steps; and how many times a longer gap split them."""
    starts = np.flatnonzero(fresh & ~np.r_[False, fresh[:-1]])
    ends = np.flatnonzero(fresh & ~np.r_[fresh[1:], False]) + 1
    runs: list[tuple[int, int]] = []
    splits = 0
    for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
        if runs and start - runs[-1][1] <= max_gap_steps:
            runs[-1] = (runs[-1][0], end)
        else:
            splits += bool(runs)
            runs.append((start, end))
    return runs, splits


def grid(start_ns: int, end_ns: int, rate_hz: float) -> np.ndarray:
    """Control step times in [start, end): start + round(k / rate) seconds."""
    period = NS / rate_hz
    count = max(int(np.ceil((end_ns - start_ns) / period)), 0)
    times = start_ns + np.round(np.arange(count) * period).astype(np.int64)
    return times[times < end_ns]


# ------------------------------------------------------------------------------------------ episodes
def intervals(
    mapping: BagMapping, streams: list[_Stream], marker: tuple[list[int], list[Any]]
) -> list[tuple[int, int]]:
    """[start, end) of each episode in the bag's time, before gaps split them."""
    cut = mapping.episodes
    first = min(s.times[0] for s in streams)
    last = max(s.times[-1] for s in streams) + 1
    times, values = marker
    if cut.cut == "bag":
        return [(first, last)]
    if cut.cut == "topic":
        return _marked(times, values, first, last, cut)
    order = np.argsort(times, kind="stable")
    times = np.asarray(times, np.int64)[order]
    active = np.array([v is None or np.max(np.abs(v), initial=0.0) > cut.still for v in values], bool)[order]
    moving = times[active]
    if moving.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(moving) >= round(cut.pause_s * NS))
    starts = np.r_[moving[0], moving[breaks + 1]]
    ends = np.r_[moving[breaks], moving[-1]] + 1
    return list(zip(starts.tolist(), ends.tolist(), strict=True))


def _marked(times: list[int], values: list[Any], first: int, last: int, cut) -> list[tuple[int, int]]:
    order = sorted(range(len(times)), key=times.__getitem__)
    if values and all(isinstance(v, bool | str) for v in values):  # Bool or String markers: start / stop
        out, opened = [], None
        for i in order:
            if values[i] in (True, cut.start) and opened is None:
                opened = times[i]
            elif values[i] in (False, cut.stop) and opened is not None:
                out.append((opened, times[i]))
                opened = None
        return out + ([(opened, last)] if opened is not None else [])
    bounds = [first] + [times[i] for i in order] + [last]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


@dataclass
class _Planned:
    """An episode cut and resampled, waiting for its camera frames."""

    times: np.ndarray  # grid times, ns
    lowdim: dict[str, np.ndarray]
    frames: dict[int, np.ndarray]  # stream index -> frame ordinal per step
    images: dict[str, np.ndarray] = field(default_factory=dict)  # camera key -> (T, H, W, 3), once decoded


def plan(mapping: BagMapping, streams: list[_Stream], marker, result: ImportResult) -> list[_Planned]:
    """Every episode of one bag: cut, resampled, split at long gaps, with the frame each step shows."""
    sorted_streams = []  # (sorted times, their indices in bag order, the low-dim values stacked)
    for stream in streams:
        order = np.argsort(np.asarray(stream.times, np.int64), kind="stable")
        values = None if stream.is_image else np.stack(stream.values)
        sorted_streams.append((np.asarray(stream.times, np.int64)[order], order, values))
    max_gap_steps = int(np.floor(mapping.max_gap_s * mapping.rate_hz + 1e-9))
    planned = []
    for start, end in intervals(mapping, streams, marker):
        steps = grid(start, end, mapping.rate_hz)
        if steps.size == 0:
            continue
        fresh = np.ones(steps.size, bool)
        held = []
        for stream, (times, order, _) in zip(streams, sorted_streams, strict=True):
            index = hold(times, steps)
            fresh &= (index >= 0) & (steps - times[np.maximum(index, 0)] <= stream.stale_ns)
            held.append(order[np.maximum(index, 0)])
        runs, splits = pieces(fresh, max_gap_steps)
        result.splits += splits
        kept = 0
        for a, b in runs:
            if b - a < mapping.min_episode_steps:
                continue
            kept += b - a
            result.bridged_steps += int(np.count_nonzero(~fresh[a:b]))
            lowdim: dict[str, list[np.ndarray]] = {}
            frames = {}
            for i, stream in enumerate(streams):
                if stream.is_image:
                    frames[i] = held[i][a:b]
                else:
                    lowdim.setdefault(stream.key, []).append(sorted_streams[i][2][held[i][a:b]])
            planned.append(
                _Planned(
                    steps[a:b],
                    {key: np.concatenate(v, axis=1).astype(np.float32) for key, v in lowdim.items()},
                    frames,
                )
            )
        result.dropped_steps += steps.size - kept
    return planned


# ------------------------------------------------------------------------------------------ reading
@functools.cache
def _fallback_typestore():
    """For bags that carry no message definitions (sqlite3 bags before ROS 2 Iron)."""
    typesys = require("rosbags.typesys")
    return typesys.get_typestore(typesys.Stores.ROS2_JAZZY)


def _stamp_ns(msg: Any, receive_ns: int, use_header: bool) -> int:
    """The header stamp in integer nanoseconds (not messages.stamp_seconds' float: a float of ~1.7e9 s
    loses the ns that decide whether a sample lands exactly on a grid time); the receive time for a
    message without a header or with a zero stamp (unset; "now" to a JointTrajectory controller)."""
    stamp = getattr(getattr(msg, "header", None), "stamp", None) if use_header else None
    stamp_ns = 0 if stamp is None else int(stamp.sec) * NS + int(stamp.nanosec)
    return stamp_ns or receive_ns


MAX_CLOCK_SPREAD_S = 3600.0  # streams of one recording starting further apart are on different clocks


def _check_clocks(streams: list[_Stream], mapping: BagMapping) -> None:
    """Refuse streams whose times cannot share one grid: header stamps on simulated time while others are
    on wall-clock time (the grid between them would be years of steps)."""
    starts = [min(stream.times) for stream in streams]
    early, late = streams[int(np.argmin(starts))], streams[int(np.argmax(starts))]
    spread_s = (max(starts) - min(starts)) / NS
    if spread_s > MAX_CLOCK_SPREAD_S:
        hint = "; try time: receive" if mapping.time == "header" else ""
        raise BagError(
            f"{early.where()}: its first time is {spread_s:.0f} s before that of {late.source.topic} "
            f"(stamps on another clock?){hint}"
        )


def read_bag(path: Path, mapping: BagMapping, result: ImportResult, bar) -> Iterator[_Planned]:
    """The episodes of one bag, in time order, with their frames."""
    highlevel = require("rosbags.highlevel")
    try:
        reader = highlevel.AnyReader(_storage_files(path), default_typestore=_fallback_typestore())
        reader.open()
    except (highlevel.AnyReaderError, FileNotFoundError) as err:
        raise BagError(f"{path} is not a readable rosbag2 recording ({err})", "paths") from None
    try:
        streams = _resolve(mapping, reader.topics, path)
        marker_topic = _marker_topic(mapping)
        if marker_topic is not None and marker_topic not in reader.topics:
            raise BagError(
                f"episodes.topic: topic {marker_topic} is not in {path} (it has {', '.join(sorted(reader.topics))})"
            )
        by_topic: dict[str, list[_Stream]] = {}
        for stream in streams:
            by_topic.setdefault(stream.source.topic, []).append(stream)
        connections = [c for c in reader.connections if c.topic in by_topic or c.topic == marker_topic]
        _check_types(connections, reader.typestore, by_topic, path)
        cameras = {s.source.topic for s in streams if s.is_image}
        bar.total = (bar.total or 0) + sum(c.msgcount * (1 + (c.topic in cameras)) for c in connections)
        bar.refresh()
        marker: tuple[list[int], list[Any]] = ([], [])
        use_header = mapping.time == "header"
        for connection, receive_ns, raw in reader.messages(connections=connections):
            msg = reader.deserialize(raw, connection.msgtype)
            time_ns = _stamp_ns(msg, receive_ns, use_header)
            for stream in by_topic.get(connection.topic, ()):
                stream.add(msg, time_ns)
            if connection.topic == marker_topic:
                marker[0].append(time_ns)
                marker[1].append(_marker_value(msg, connection.msgtype, by_topic.get(marker_topic, ())))
            result.messages += 1
            bar.update(1)
        for stream in streams:
            if not stream.times and stream.other_joints:
                missing = [name for name in stream.source.joints if name not in stream.other_joints]
                problem = f"no joint {missing[0]!r}" if missing else "no message with all the joints"
                raise BagError(
                    f"{stream.where()}: {problem} (the topic's joints: {', '.join(sorted(stream.other_joints))})"
                )
            if not stream.times:
                raise BagError(f"{stream.where()}: no messages in {path}")
        _check_clocks(streams, mapping)
        planned = plan(mapping, streams, marker, result)
        yield from _with_frames(reader, streams, planned, bar)
    finally:
        reader.close()


def _check_types(connections, typestore, by_topic: dict[str, list[_Stream]], path: Path) -> None:
    """Every mapped topic's type must be known: a bag without message definitions (sqlite3 before ROS 2
    Iron) is read with Jazzy's standard types, which lack a vendor's own (kortex_driver/msg/...)."""
    for connection in connections:
        if connection.msgtype not in typestore.fielddefs:
            streams = by_topic.get(connection.topic)
            where = streams[0].where() if streams else f"episodes.topic: topic {connection.topic}"
            raise BagError(
                f"{where}: {path} carries no definition of {connection.msgtype} (a bag recorded before "
                "ROS 2 Iron has none, and only the standard ROS 2 types are known without one)"
            )


def _storage_files(path: Path) -> list[Path]:
    """What to open for `path`: the bag folder, or, when it has no metadata.yaml (the recorder was killed
    before writing it), its .mcap / .db3 files, which rosbags reads as they are."""
    if path.is_dir() and not (path / "metadata.yaml").exists():
        files = sorted([*path.glob("*.mcap"), *path.glob("*.db3")])
        if files:
            return files
        bags = sorted(p.parent.name for p in path.glob("*/metadata.yaml"))
        if bags:  # a folder of bags: the user meant them
            shown = ", ".join(bags[:3]) + (", ..." if len(bags) > 3 else "")
            raise BagError(
                f"{path} is a folder of {len(bags)} bags ({shown}), not a bag: give the bags, e.g. {path}/*",
                "paths",
            )
    return [path]


def _marker_topic(mapping: BagMapping) -> str | None:
    cut = mapping.episodes
    if cut.cut == "pause":
        return cut.topic or mapping.action[0].topic
    return cut.topic if cut.cut == "topic" else None


def _marker_value(msg: Any, msgtype: str, streams) -> Any:
    """A marker message's meaning: Bool and String data; for a pause topic, its mapped values (None: any
    message counts as motion)."""
    if msgtype == BOOL:
        return bool(msg.data)
    if msgtype == STRING:
        return str(msg.data)
    lowdim = [s for s in streams if not s.is_image]
    return lowdim[0].values[-1] if lowdim else None


def _with_frames(reader, streams, planned: list[_Planned], bar) -> Iterator[_Planned]:
    """Decode the frames the planned episodes show (the second pass) into `images`, yielding each episode
    once all its frames are decoded; a frame is kept only until the last episode showing it is out."""
    cameras = {i: s for i, s in enumerate(streams) if s.is_image}
    if not cameras or not planned:
        yield from planned
        return
    needed = {i: {} for i in cameras}  # camera -> frame ordinal -> index of the last episode showing it
    for e, episode in enumerate(planned):
        for i, ordinals in episode.frames.items():
            needed[i].update(dict.fromkeys(ordinals.tolist(), e))
    decoded: dict[int, dict[int, np.ndarray]] = {i: {} for i in cameras}
    seen = {s.source.topic: -1 for s in cameras.values()}  # ordinal of the topic's latest message
    connections = [c for c in reader.connections if c.topic in seen]
    index = 0
    for connection, _, raw in reader.messages(connections=connections):
        seen[connection.topic] += 1
        ordinal = seen[connection.topic]
        bar.update(1)
        wanted = [
            i for i, s in cameras.items() if s.source.topic == connection.topic and ordinal in needed[i]
        ]
        if wanted:
            msg = reader.deserialize(raw, connection.msgtype)
            for i in wanted:
                decoded[i][ordinal] = cameras[i].image(msg)
        while index < len(planned) and all(
            int(planned[index].frames[i].max()) <= seen[s.source.topic] for i, s in cameras.items()
        ):
            episode = planned[index]
            for i, ordinals in episode.frames.items():
                episode.images[streams[i].key] = np.stack([decoded[i][o] for o in ordinals.tolist()])
                for o in set(ordinals.tolist()):
                    if needed[i][o] == index:
                        del decoded[i][o]
            yield episode
            planned[index] = None  # its arrays go with the store's commit, not with this list
            index += 1
        if index == len(planned):  # the frames after the last episode's are not needed
            bar.total -= sum(c.msgcount for c in connections) - sum(seen.values()) - len(seen)
            bar.refresh()
            return


def import_bags(paths: list[Path], mapping: BagMapping, out: Path, cfg: ImportBagConfig) -> ImportResult:
    """Import `paths` (in order) into a new episode store at `out`."""
    result = ImportResult(bytes=sum(_size(path) for path in paths))
    tqdm = require("tqdm").tqdm
    bar = tqdm(total=None, desc="import-bag", unit="msg", disable=not cfg.progress)

    def episodes() -> Iterator[ImportedEpisode]:
        for path in paths:
            bar.set_postfix_str(path.name)
            for episode in read_bag(path, mapping, result, bar):
                seconds = episode.times.astype(np.float64) / NS
                arrays = {**episode.lowdim, **episode.images}
                result.episodes += 1
                result.steps += len(seconds)
                yield ImportedEpisode(
                    episode_steps(arrays, None, seconds, len(seconds)),
                    task=cfg.task_name,
                    robot_id=cfg.robot_id,
                    success=cfg.success,
                    outcome="demo",
                    extra={"bag": str(path), CONTROL_HZ_KEY: mapping.rate_hz},
                )

    try:
        store = write_episodes(out, episodes(), cfg.overwrite, total=0, progress_bar=False)
        store.close()
    finally:
        bar.close()
    return result


def _size(path: Path) -> int:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files)


def run(cfg: ImportBagConfig) -> None:
    try:
        mapping = load_mapping(cfg.mapping)
    except ConfigError as err:  # `mapping: observation.x.topic: ...`: the key is the mapping file's
        raise ConfigError("mapping", str(err)) from None
    paths = [Path(p) for p in cfg.paths]
    for path in paths:
        check(path.exists(), "paths", f"{path} does not exist")
    out = Path(cfg.out)
    check(
        not out.exists() or cfg.overwrite, "out", f"{out} already exists; pass overwrite=true to replace it"
    )
    try:
        result = import_bags(paths, mapping, out, cfg)
    except BagError as err:
        raise ConfigError(err.setting, str(err)) from None
    except (DataIOError, StoreError, StepError) as err:
        raise ConfigError("out", f"{cfg.out}: {err}") from None
    print(
        f"imported {result.episodes} episodes ({result.steps} steps at {mapping.rate_hz:g} Hz) from "
        f"{len(paths)} bag(s) into {cfg.out}; gaps: {result.bridged_steps} steps bridged, "
        f"{result.dropped_steps} dropped, {result.splits} splits"
    )
