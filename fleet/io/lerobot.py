"""LeRobotDataset v3.0, out and in (facts: ../shared/formats.md).

Export writes every file LeRobot's loader opens (a missing one becomes a misleading network error in
LeRobot): meta/info.json, meta/stats.json (with quantiles), meta/tasks.parquet,
meta/episodes/chunk-000/file-000.parquet, data/chunk-000/file-000.parquet (further files past
data_files_size_in_mb), and with video=true videos/<key>/chunk-000/file-000.mp4 per camera (h264
yuv420p through PyAV, keyframe every 2 frames, episodes concatenated). Features:
    observation.state          the chosen low-dim observation keys, flattened, concatenated (float32);
                               names `<key>.<i>` say which column is which (the import splits them back)
    observation.images.<cam>   each `<cam>_rgb` key: PNG in parquet (image) or mp4 (video)
    action, goal               float32 vectors
    control_label              int64 [1], the Flotilla control label code (fleet/labels.py)
    signal_<name>              float32 [1]
    timestamp = frame_index / fps (float32), frame_index, episode_index, index, task_index (int64)
Each episode's Flotilla metadata (robot, success, outcome, policy version, start time, extra) rides in
extra `flotilla/...` columns of the episodes parquet, which LeRobot loads and ignores.

Import reads the same (parquet + PNG, or mp4 through PyAV) back into an episode store: features are
renamed by `keys` or by rule (`observation.images.X` -> `X_rgb`, `observation.X` -> `X`, dots -> `_`),
labels come from `control_label`, else from an intervention column (intervention / robot), else `demo`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from fleet.io.common import (
    CAMERA_SUFFIX,
    CONTROL_HZ_KEY,
    DataIOError,
    ImportedEpisode,
    camera_name,
    check_keys,
    concat_state,
    control_rate,
    episode_steps,
    image_keys,
    lowdim_obs_keys,
    progress,
    require,
)
from fleet.labels import ControlLabel
from fleet.store.episode_store import SIGNAL_PREFIX, EpisodeStore

CODEBASE_VERSION = "v3.0"
CHUNKS_SIZE = 1000  # files per chunk folder
DATA_FILE_MB = 100
VIDEO_FILE_MB = 200
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
EPISODES_PATH = "meta/episodes/chunk-000/file-000.parquet"
IMAGE_PREFIX = "observation.images."
STATE = "observation.state"
LABEL = "control_label"
META_PREFIX = "flotilla/"  # Flotilla's per-episode metadata columns in the episodes parquet
INTERVENTION_KEYS = ("is_intervention", "intervention", "complementary_info.is_intervention")
QUANTILES = {"q01": 0.01, "q10": 0.10, "q50": 0.50, "q90": 0.90, "q99": 0.99}
VIDEO_CODEC, VIDEO_PIX_FMT = "libx264", "yuv420p"
VIDEO_OPTIONS = {"crf": "18", "g": "2"}  # g=2: LeRobot's keyframe interval, for random access
INDEX_FEATURES = ("timestamp", "frame_index", "episode_index", "index", "task_index")


def _feature(dtype: str, shape: tuple[int, ...], names: Any = None) -> dict:
    return {"dtype": dtype, "shape": list(shape), "names": names}


class _Plan:
    """How the store's keys become LeRobot features."""

    def __init__(self, store: EpisodeStore, state_keys: list[str] | None, video: bool, fps: int):
        schema = store.schema or {}
        self.state_keys = lowdim_obs_keys(schema) if state_keys is None else list(state_keys)
        check_keys(self.state_keys, schema, "state_keys")
        self.cameras = {IMAGE_PREFIX + camera_name(key): key for key in image_keys(schema)}
        self.vectors = {key: key for key in ("action", "goal") if key in schema}  # feature -> store key
        self.scalars = {key: key for key in schema if key.startswith(SIGNAL_PREFIX)}
        self.video = video
        features: dict[str, dict] = {}
        if self.state_keys:
            names = [f"{key}.{i}" for key in self.state_keys for i in range(int(np.prod(schema[key].shape)))]
            features[STATE] = _feature("float32", (len(names),), names)
        for feature, key in self.cameras.items():
            spec = schema[key]
            if video and (spec.shape[0] % 2 or spec.shape[1] % 2):
                raise DataIOError(f"{key}: video=true needs even image sizes (yuv420p), got {spec.shape}")
            features[feature] = _feature(
                "video" if video else "image", spec.shape, ["height", "width", "channels"]
            )
            if video:
                features[feature]["info"] = {
                    "video.height": spec.shape[0],
                    "video.width": spec.shape[1],
                    "video.codec": "h264",
                    "video.pix_fmt": VIDEO_PIX_FMT,
                    "video.is_depth_map": False,
                    "video.fps": fps,
                    "video.channels": 3,
                    "has_audio": False,
                }
        for feature, key in self.vectors.items():
            size = int(np.prod(schema[key].shape))
            features[feature] = _feature("float32", (size,), [f"{feature}.{i}" for i in range(size)])
        features[LABEL] = _feature("int64", (1,), None)
        for feature in self.scalars:
            features[feature] = _feature("float32", (1,), None)
        features["timestamp"] = _feature("float32", (1,))
        for name in INDEX_FEATURES[1:]:
            features[name] = _feature("int64", (1,))
        self.features = features


def _arrow_schema(features: Mapping[str, dict]):
    pa = require("pyarrow")
    fields = []
    for name, ft in features.items():
        if ft["dtype"] == "video":
            continue
        if ft["dtype"] == "image":
            kind = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
        elif ft["shape"] == [1]:
            kind = pa.from_numpy_dtype(np.dtype(ft["dtype"]))
        else:
            kind = pa.list_(pa.from_numpy_dtype(np.dtype(ft["dtype"])), ft["shape"][0])
        fields.append(pa.field(name, kind))
    return pa.schema(fields)


def _png(image: np.ndarray) -> bytes:
    import cv2  # opencv-python-headless is in the base install

    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(image[..., ::-1]))
    if not ok:
        raise DataIOError("PNG encoding failed")
    return encoded.tobytes()


def _unpng(data: bytes, feature: str) -> np.ndarray:
    import cv2

    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None or image.ndim != 3 or image.shape[-1] != 3:
        raise DataIOError(f"{feature}: an image is not a 3-channel PNG/JPEG")
    return image[..., ::-1]


class _Stats:
    """meta/stats.json: min, max, mean, std, count and quantiles per feature; uint8 images per channel
    from exact 256-bin histograms, in [0, 1] with shape (3, 1, 1)."""

    def __init__(self):
        self.values: dict[str, list[np.ndarray]] = {}
        self.histograms: dict[str, np.ndarray] = {}
        self.frames: dict[str, int] = {}

    def add(self, feature: str, values: np.ndarray) -> None:
        values = np.asarray(values)
        if values.ndim == 4:  # (T, H, W, 3) uint8
            counts = self.histograms.setdefault(feature, np.zeros((3, 256), np.int64))
            self.frames[feature] = self.frames.get(feature, 0) + len(values)
            for channel in range(3):
                counts[channel] += np.bincount(values[..., channel].ravel(), minlength=256)
        else:
            self.values.setdefault(feature, []).append(values.reshape(len(values), -1).astype(np.float64))

    def to_json(self) -> dict:
        out = {}
        for feature, parts in self.values.items():
            values = np.concatenate(parts)
            stats = {
                "min": values.min(0),
                "max": values.max(0),
                "mean": values.mean(0),
                "std": values.std(0),
                "count": np.array([len(values)]),
            }
            stats.update({name: np.quantile(values, q, axis=0) for name, q in QUANTILES.items()})
            out[feature] = {name: value.tolist() for name, value in stats.items()}
        levels = np.arange(256) / 255.0
        for feature, counts in self.histograms.items():
            total = counts.sum(1, keepdims=True)
            mean = (counts * levels).sum(1) / total[:, 0]
            std = np.sqrt((counts * (levels - mean[:, None]) ** 2).sum(1) / total[:, 0])
            cumulative = np.cumsum(counts, 1) / total
            stats = {
                "min": levels[np.argmax(counts > 0, 1)],
                "max": levels[255 - np.argmax(counts[:, ::-1] > 0, 1)],
                "mean": mean,
                "std": std,
            }
            stats.update({name: levels[np.argmax(cumulative >= q, 1)] for name, q in QUANTILES.items()})
            out[feature] = {name: value.reshape(3, 1, 1).tolist() for name, value in stats.items()}
            out[feature]["count"] = [self.frames[feature]]
        return out


class _RollingFile:
    """Numbered files under a size budget: a new file when the current one is over it (between episodes,
    never inside one, as LeRobot keeps an episode in one file)."""

    def __init__(self, root: Path, pattern: str, budget_mb: int, **names: str):
        self.root, self.pattern, self.budget, self.names = root, pattern, budget_mb * 2**20, names
        self.chunk = self.file = 0
        self.path: Path | None = None

    def next_path(self) -> Path:
        if self.path is not None:
            self.file += 1
            if self.file == CHUNKS_SIZE:
                self.chunk, self.file = self.chunk + 1, 0
        self.path = self.root / self.pattern.format(
            chunk_index=self.chunk, file_index=self.file, **self.names
        )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return self.path

    def full(self) -> bool:
        return self.path is not None and self.path.exists() and self.path.stat().st_size > self.budget


class _VideoWriter:
    """One mp4 per camera (rolled over past VIDEO_FILE_MB), frames at pts = frame number, time base 1/fps."""

    def __init__(self, root: Path, feature: str, fps: int, shape: tuple[int, ...]):
        self.files = _RollingFile(root, VIDEO_PATH, VIDEO_FILE_MB, video_key=feature)
        self.fps, self.shape = fps, shape
        self.container = self.stream = None
        self.frames = 0

    def _open(self) -> None:
        av = require("av")
        self.container = av.open(str(self.files.next_path()), mode="w")
        self.stream = self.container.add_stream(VIDEO_CODEC, rate=self.fps, options=dict(VIDEO_OPTIONS))
        self.stream.height, self.stream.width = self.shape[0], self.shape[1]
        self.stream.pix_fmt = VIDEO_PIX_FMT
        self.stream.time_base = Fraction(1, self.fps)
        self.frames = 0

    def add_episode(self, frames: np.ndarray) -> dict:
        """Append an episode's frames; its location (chunk, file, from/to timestamp) for the episodes table."""
        av = require("av")
        if self.container is not None and self.files.full():
            self.close()
        if self.container is None:
            self._open()
        start = self.frames
        for image in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            frame.pts = self.frames
            frame.time_base = Fraction(1, self.fps)
            self.container.mux(self.stream.encode(frame))
            self.frames += 1
        return {
            "chunk_index": self.files.chunk,
            "file_index": self.files.file,
            "from_timestamp": start / self.fps,
            "to_timestamp": self.frames / self.fps,
        }

    def close(self) -> None:
        if self.container is not None:
            self.container.mux(self.stream.encode(None))
            self.container.close()
            self.container = None


def export_lerobot(
    store: EpisodeStore,
    out: Path,
    state_keys: list[str] | None = None,
    video: bool = False,
    fps: int | None = None,
    robot_type: str = "unknown",
    progress_bar: bool = False,
) -> dict:
    """Write the store's committed episodes to `out` (an empty folder) as a LeRobotDataset v3.0."""
    pa, pq, pd = require("pyarrow"), require("pyarrow.parquet"), require("pandas")
    if not store.num_episodes:
        raise DataIOError(f"{store.path} has no committed episodes to export")
    rate, rate_source = control_rate(store, fps)
    plan = _Plan(store, state_keys, video, rate)
    schema = _arrow_schema(plan.features)
    tasks = {task: i for i, task in enumerate(dict.fromkeys(str(t) for t in store.meta_column("task")))}
    stats = _Stats()
    data_files = _RollingFile(out, DATA_PATH, DATA_FILE_MB)
    videos = {
        feature: _VideoWriter(out, feature, rate, store.schema[key].shape)
        for feature, key in plan.cameras.items()
        if video
    }
    writer, episodes, index = None, [], 0
    try:
        for e in progress(range(store.num_episodes), store.num_episodes, "export", progress_bar):
            steps, meta = store.episode(e), store.episode_meta(e)
            length = meta.length
            if writer is None or data_files.full():
                if writer is not None:
                    writer.close()
                writer = pq.ParquetWriter(data_files.next_path(), schema)
            frame_index = np.arange(length, dtype=np.int64)
            columns: dict[str, Any] = {
                "timestamp": (frame_index / rate).astype(np.float32),
                "frame_index": frame_index,
                "episode_index": np.full(length, e, np.int64),
                "index": np.arange(index, index + length, dtype=np.int64),
                "task_index": np.full(length, tasks[meta.task], np.int64),
                LABEL: steps["label"].astype(np.int64),
            }
            if plan.state_keys:
                columns[STATE] = concat_state(steps, plan.state_keys)
            for feature, key in {**plan.vectors, **plan.scalars}.items():
                columns[feature] = steps[key].reshape(length, -1).astype(np.float32)
                if feature in plan.scalars:
                    columns[feature] = columns[feature][:, 0]
            row: dict[str, Any] = {}
            for feature, key in plan.cameras.items():
                frames = steps[key]
                stats.add(feature, frames)
                if video:
                    location = videos[feature].add_episode(frames)
                    row.update({f"videos/{feature}/{name}": value for name, value in location.items()})
                else:
                    columns[feature] = [{"bytes": _png(image), "path": None} for image in frames]
            for feature, values in columns.items():
                if plan.features[feature]["dtype"] != "image":
                    stats.add(feature, values)
            arrays = [_column(pa, columns[field.name], field.type) for field in schema]
            writer.write_table(pa.Table.from_arrays(arrays, schema=schema))
            episodes.append(
                {
                    "episode_index": e,
                    "tasks": [meta.task],
                    "length": length,
                    "data/chunk_index": data_files.chunk,
                    "data/file_index": data_files.file,
                    "dataset_from_index": index,
                    "dataset_to_index": index + length,
                    "meta/episodes/chunk_index": 0,
                    "meta/episodes/file_index": 0,
                    **row,
                    META_PREFIX + "robot_id": meta.robot_id,
                    META_PREFIX + "policy_version": meta.policy_version,
                    META_PREFIX + "success": meta.success,
                    META_PREFIX + "outcome": meta.outcome,
                    META_PREFIX + "start_time": meta.start_time,
                    META_PREFIX + "extra": json.dumps(meta.extra),
                }
            )
            index += length
    finally:
        if writer is not None:
            writer.close()
        for video_writer in videos.values():
            video_writer.close()
    (out / "meta" / "episodes" / "chunk-000").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(episodes), out / EPISODES_PATH)
    frame = pd.DataFrame(
        {"task_index": np.arange(len(tasks), dtype=np.int64)}, index=pd.Index(list(tasks), name="task")
    )
    frame.to_parquet(out / "meta" / "tasks.parquet")
    info = {
        "codebase_version": CODEBASE_VERSION,
        "robot_type": robot_type,
        "total_episodes": store.num_episodes,
        "total_frames": index,
        "total_tasks": len(tasks),
        "chunks_size": CHUNKS_SIZE,
        "data_files_size_in_mb": DATA_FILE_MB,
        "video_files_size_in_mb": VIDEO_FILE_MB,
        "fps": rate,
        "splits": {"train": f"0:{store.num_episodes}"},
        "data_path": DATA_PATH,
        "video_path": VIDEO_PATH if video else None,
        "features": plan.features,
    }
    (out / "meta" / "info.json").write_text(json.dumps(info, indent=4))
    (out / "meta" / "stats.json").write_text(json.dumps(stats.to_json(), indent=4))
    return {"episodes": store.num_episodes, "steps": index, "fps": rate, "fps_source": rate_source}


def _column(pa, values, kind):
    if isinstance(values, list):
        return pa.array(values, type=kind)
    values = np.ascontiguousarray(values)
    if values.ndim == 2:
        return pa.FixedSizeListArray.from_arrays(
            pa.array(values.ravel(), type=kind.value_type), values.shape[1]
        )
    return pa.array(values, type=kind)


# --------------------------------------------------------------------------------------------- import
def _store_key(feature: str, keys: Mapping[str, str]) -> str:
    if feature in keys:
        return keys[feature]
    if feature.startswith(IMAGE_PREFIX):
        return feature[len(IMAGE_PREFIX) :].replace(".", "_") + CAMERA_SUFFIX
    if feature == LABEL:
        return "label"
    name = feature.removeprefix("observation.")
    return name.replace(".", "_").replace("/", "_")


def _split_names(names: Any, size: int) -> dict[str, int] | None:
    """{key: columns} when `names` are this exporter's `<key>.<i>` (in order), else None."""
    if not isinstance(names, list) or len(names) != size:
        return None
    sizes: dict[str, int] = {}
    for name in names:
        match = re.fullmatch(r"([A-Za-z][A-Za-z0-9_]*)\.(\d+)", str(name))
        if not match or int(match.group(2)) != sizes.get(match.group(1), 0):
            return None
        sizes[match.group(1)] = sizes.get(match.group(1), 0) + 1
    return sizes if list(sizes) == list(dict.fromkeys(n.split(".")[0] for n in names)) else None


def read_lerobot(
    src: str | os.PathLike, keys: Mapping[str, str] | None = None, intervention_key: str | None = None
) -> tuple[int, Iterator[ImportedEpisode]]:
    """(episode count, the episodes) of the LeRobotDataset v3.0 folder `src`, mapped to store keys."""
    pq, pd = require("pyarrow.parquet"), require("pandas")
    src, keys = Path(src), dict(keys or {})
    info = _read_json(src / "meta" / "info.json")
    version = info.get("codebase_version")
    if version != CODEBASE_VERSION:
        convert = (  # LeRobot's own converter (lerobot >= 0.4) rewrites v2.1 as v3.0
            "; convert it first with LeRobot's `python -m lerobot.datasets.v30.convert_dataset_v21_to_v30 "
            "--repo-id=NAME --root=DIR`"
            if str(version).startswith("v2")
            else ""
        )
        raise DataIOError(
            f"{src} is a LeRobotDataset {version}, which is not supported: this reads {CODEBASE_VERSION}{convert}"
        )
    features, fps = info.get("features") or {}, info.get("fps")
    if not isinstance(fps, int | float) or fps <= 0:
        raise DataIOError(f"{src}/meta/info.json: fps must be a positive number, got {fps!r}")
    unknown = sorted(set(keys) - set(features))
    if unknown:
        raise DataIOError(f"{src}: no feature(s) {unknown}; it has {sorted(features)}")
    tasks_path = src / "meta" / "tasks.parquet"
    if not tasks_path.is_file():
        raise DataIOError(f"{src}: meta/tasks.parquet is missing")
    tasks = [str(name) for name in pd.read_parquet(tasks_path).index]
    episode_files = sorted((src / "meta" / "episodes").glob("chunk-*/file-*.parquet"))
    if not episode_files:
        raise DataIOError(f"{src}: no meta/episodes/chunk-*/file-*.parquet")
    episodes = [row for path in episode_files for row in pq.read_table(path).to_pylist()]
    episodes.sort(key=lambda row: row["episode_index"])
    if intervention_key is None:
        intervention_key = next((k for k in INTERVENTION_KEYS if k in features), None)
    elif intervention_key not in features:
        raise DataIOError(
            f"{src}: intervention_key {intervention_key!r} is not a feature; it has {sorted(features)}"
        )
    plan = {}
    for feature, ft in features.items():
        if feature in INDEX_FEATURES or feature == intervention_key:
            continue
        name = _store_key(feature, keys)
        if not name or ft.get("dtype") == "string":
            continue
        split = (
            _split_names(ft.get("names"), int(np.prod(ft["shape"])))
            if feature == STATE and feature not in keys
            else None
        )
        plan[feature] = (name, split)

    def read() -> Iterator[ImportedEpisode]:
        tables: dict[Path, Any] = {}
        decoders: dict[str, _VideoReader] = {}
        for row in episodes:
            path = src / info["data_path"].format(
                chunk_index=row["data/chunk_index"], file_index=row["data/file_index"]
            )
            if path not in tables:
                if not path.is_file():
                    raise DataIOError(f"{src}: {path.relative_to(src)} is missing")
                tables.clear()  # one data file in memory at a time; episodes come in file order
                tables[path] = _episode_rows(pq.read_table(path))
            table, rows = tables[path][0], tables[path][1].get(row["episode_index"])
            if rows is None:
                raise DataIOError(
                    f"{src}: episode {row['episode_index']} has no rows in {path.relative_to(src)}"
                )
            length = len(rows)
            arrays: dict[str, np.ndarray] = {}
            for feature, (name, split) in plan.items():
                ft = features[feature]
                if ft["dtype"] == "video":
                    arrays[name] = _video_frames(src, info, row, feature, fps, decoders, length)
                elif ft["dtype"] == "image":
                    column = table.column(feature).take(rows).to_pylist()
                    arrays[name] = np.stack([_unpng(cell["bytes"], feature) for cell in column])
                else:
                    values = _numeric(table.column(feature).take(rows), ft)
                    if split:
                        column = 0
                        for key, size in split.items():
                            arrays[key] = values[:, column : column + size]
                            column += size
                    else:
                        arrays[name] = values
            labels = arrays.pop("label", None)
            if labels is None and intervention_key is not None:
                flags = _numeric(
                    table.column(intervention_key).take(rows), features[intervention_key]
                ).astype(bool)
                labels = np.where(flags, ControlLabel.INTERVENTION, ControlLabel.ROBOT)
            frame_index = np.asarray(table.column("frame_index").take(rows).to_numpy(), np.float64)
            start = float(row.get(META_PREFIX + "start_time") or 0.0)
            task_index = int(table.column("task_index")[int(rows[0])].as_py())
            task = (
                tasks[task_index] if 0 <= task_index < len(tasks) else (row.get("tasks") or ["imported"])[0]
            )
            has_meta = META_PREFIX + "extra" in row
            yield ImportedEpisode(
                episode_steps(arrays, labels, start + frame_index / fps, length),
                task=task,
                robot_id=str(row.get(META_PREFIX + "robot_id", info.get("robot_type") or "imported")),
                success=bool(row.get(META_PREFIX + "success", True)),
                outcome=str(row.get(META_PREFIX + "outcome", "")),
                policy_version=str(row.get(META_PREFIX + "policy_version", "")),
                extra=json.loads(row[META_PREFIX + "extra"])
                if has_meta
                else {CONTROL_HZ_KEY: fps, "source": str(src)},
            )
        for decoder in decoders.values():
            decoder.close()

    return len(episodes), read()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataIOError(f"{path} is missing: not a LeRobotDataset v3.0 folder") from None
    except ValueError as err:
        raise DataIOError(f"{path} is not JSON ({err})") from None


def _episode_rows(table) -> tuple[Any, dict[int, np.ndarray]]:
    """The table and, per episode index, its rows in frame order."""
    episode = table.column("episode_index").to_numpy()
    frame = table.column("frame_index").to_numpy()
    order = np.lexsort((frame, episode))
    groups = np.split(order, np.flatnonzero(np.diff(episode[order])) + 1)
    return table, {int(episode[g[0]]): g for g in groups if len(g)}


def _numeric(column, ft: Mapping) -> np.ndarray:
    values = column.to_numpy(zero_copy_only=False)
    if values.dtype == object:  # list columns
        values = np.stack(values)
    return values.astype(np.dtype(ft["dtype"]), copy=False)


class _VideoReader:
    """Frames of one mp4 in order, by frame number (pts * time base * fps)."""

    def __init__(self, path: Path, fps: float):
        self.path, self.fps = path, fps
        self._open()

    def _open(self) -> None:
        self.container = require("av").open(str(self.path))
        self.frames = self.container.decode(video=0)
        self.next = 0  # the number of the next frame decoded

    def read(self, first: int, count: int, what: str) -> np.ndarray:
        if first < self.next:  # an episode earlier in the file than the one read last: decode from the start
            self.close()
            self._open()
        out = []
        while len(out) < count:
            frame = next(self.frames, None)
            if frame is None:
                raise DataIOError(f"{what}: the video ends before frame {first + len(out)}")
            number = round(float(frame.pts * frame.time_base) * self.fps)
            if number < first + len(out):
                continue
            if number > first + len(out):
                raise DataIOError(f"{what}: frame {first + len(out)} is missing from the video")
            out.append(frame.to_ndarray(format="rgb24"))
        self.next = first + count
        return np.stack(out)

    def close(self) -> None:
        self.container.close()


def _video_frames(
    src: Path, info: Mapping, row: Mapping, feature: str, fps: float, decoders: dict, length: int
):
    prefix = f"videos/{feature}/"
    try:
        chunk, file = row[prefix + "chunk_index"], row[prefix + "file_index"]
        start = row[prefix + "from_timestamp"]
    except KeyError as err:
        raise DataIOError(f"{src}: the episodes table has no {err.args[0]} column") from None
    path = src / info["video_path"].format(video_key=feature, chunk_index=chunk, file_index=file)
    reader = decoders.get(feature)
    if reader is None or reader.path != path:
        if reader is not None:
            reader.close()
        if not path.is_file():
            raise DataIOError(f"{src}: {path.relative_to(src)} is missing")
        reader = decoders[feature] = _VideoReader(path, fps)
    return reader.read(round(start * fps), length, str(path.relative_to(src)))
