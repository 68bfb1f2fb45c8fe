"""Diffusion Policy's replay-buffer layout, out and in.

Export: a zarr **format 2** group (its readers use zarr-python 2, which cannot open format 3), with
`data/<key>` concatenated over the committed episodes and `meta/episode_ends` (int64, cumulative):
    action   the store's action
    state    the chosen low-dim observation keys, flattened and concatenated (float32)
    img      one camera's frames, uint8 (T, H, W, 3); further cameras under their own key (`wrist_rgb`)
    label    the control label code per step (uint8; fleet/labels.py), goal, timestamp, signal_*: extras
             a DP config can ignore, or use
The root's `flotilla_export` attribute records how `state` was built and each episode's metadata, so
an import of the export gets the store back.

Import: a DP dataset (zarr format 2 or 3, e.g. Push-T's img/state/keypoint/action) into an episode
store: image arrays (T, H, W, 3) become `<camera>_rgb` (float images in [0, 1] or [0, 255] become
uint8), other arrays keep their name unless `keys` renames them, every step is labelled `demo` (or by a
`label` array, as this exporter writes), and timestamps are step / fps unless there is a `timestamp`.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import zarr

from fleet.io.common import (
    CAMERA_SUFFIX,
    CONTROL_HZ_KEY,
    DataIOError,
    ImportedEpisode,
    check_keys,
    concat_state,
    episode_steps,
    image_keys,
    image_scale,
    lowdim_obs_keys,
    progress,
    to_uint8_images,
)
from fleet.store.episode_store import LOWDIM_CHUNK_BYTES, LOWDIM_CHUNK_STEPS, SIGNAL_PREFIX, EpisodeStore

ATTRS_KEY = "flotilla_export"
# Image chunks of about 2 MB, as DP's own stores have (a chunk per frame is a file per frame on disk and
# a read per frame for DP's copy into memory; one chunk of everything is read whole for any window).
IMAGE_CHUNK_BYTES = 2_000_000
EXPORT_BATCH_STEPS = 4096  # steps read from the store per write
DEFAULT_CAMERA = "front"  # DP's `img` imports as front_rgb: the camera `flotilla train cameras=true` uses
# DP's real-robot datasets: this zarr (low-dim arrays) beside videos/<episode>/<camera>.mp4
REAL_ROBOT_BUFFER = "replay_buffer.zarr"


def _compressor(image: bool):
    import numcodecs  # zarr depends on it; codecs zarr-python 2 and numcodecs 0.10 (DP's pins) decode

    shuffle = numcodecs.Blosc.NOSHUFFLE if image else numcodecs.Blosc.SHUFFLE
    return numcodecs.Blosc(cname="zstd", clevel=3, shuffle=shuffle)


def export_plan(
    store: EpisodeStore, state_keys: list[str] | None, camera: str | None
) -> dict[str, list[str]]:
    """Which store keys become which DP arrays: {dp_key: [store keys]} (several only for `state`)."""
    schema = store.schema or {}
    if not store.num_episodes:
        raise DataIOError(f"{store.path} has no committed episodes to export")
    state = lowdim_obs_keys(schema) if state_keys is None else list(state_keys)
    check_keys(state, schema, "state_keys")
    cameras = image_keys(schema)
    if camera is not None:
        key = camera if camera in schema else camera + CAMERA_SUFFIX
        check_keys([key], schema, "camera")
        cameras = [key] + [other for other in cameras if other != key]
    plan = {"action": ["action"]}
    if state:
        plan["state"] = state
    if cameras:
        plan["img"] = [cameras[0]]
        plan.update({key: [key] for key in cameras[1:]})
    extras = ["label", "goal", "timestamp"] + sorted(k for k in schema if k.startswith(SIGNAL_PREFIX))
    plan.update({key: [key] for key in extras if key in schema})
    return plan


def export_diffusion_policy(
    store: EpisodeStore,
    out: Path,
    state_keys: list[str] | None = None,
    camera: str | None = None,
    progress_bar: bool = False,
) -> dict:
    """Write the store's committed episodes to `out` (an empty folder) in DP's layout; returns a summary."""
    schema = store.schema or {}
    plan = export_plan(store, state_keys, camera)
    total = store.num_steps
    root = zarr.open_group(str(out), mode="w", zarr_format=2)
    data, meta = root.create_group("data"), root.create_group("meta")
    arrays = {}
    for dp_key, keys in plan.items():
        if dp_key == "state":
            step_shape, dtype = (sum(int(np.prod(schema[k].shape)) for k in keys),), np.dtype(np.float32)
        else:
            step_shape, dtype = schema[keys[0]].shape, schema[keys[0]].dtype
        image = len(step_shape) == 3 and dtype == np.uint8
        step_bytes = int(np.prod(step_shape)) * dtype.itemsize
        # Low-dim chunks as the store's: 1024 steps, fewer when a step is large (a wide state vector).
        chunk_bytes, most_steps = (
            (IMAGE_CHUNK_BYTES, total) if image else (LOWDIM_CHUNK_BYTES, LOWDIM_CHUNK_STEPS)
        )
        chunk_steps = max(1, min(most_steps, chunk_bytes // step_bytes))
        arrays[dp_key] = data.create_array(
            dp_key,
            shape=(total, *step_shape),
            chunks=(min(chunk_steps, total), *step_shape),
            dtype=dtype,
            compressors=_compressor(image),
        )
    store_keys = sorted({key for keys in plan.values() for key in keys})
    start, batch = 0, []
    for index in progress(range(store.num_episodes), store.num_episodes, "export", progress_bar):
        batch.append(store.episode(index, store_keys))
        if (
            sum(len(steps["action"]) for steps in batch) >= EXPORT_BATCH_STEPS
            or index == store.num_episodes - 1
        ):
            steps = {key: np.concatenate([s[key] for s in batch]) for key in store_keys}
            end = start + len(steps["action"])
            for dp_key, keys in plan.items():
                values = concat_state(steps, keys) if dp_key == "state" else steps[keys[0]]
                arrays[dp_key][start:end] = values
            start, batch = end, []
    ends = meta.create_array(
        "episode_ends",
        shape=(store.num_episodes,),
        chunks=(store.num_episodes,),
        dtype=np.int64,
        compressors=_compressor(False),
    )
    ends[:] = store.episode_ends
    episodes = [
        {
            name: getattr(m, name)
            for name in ("task", "robot_id", "policy_version", "success", "outcome", "start_time", "extra")
        }
        for m in (store.episode_meta(i) for i in range(store.num_episodes))
    ]
    state = {key: list(schema[key].shape) for key in plan.get("state", [])}
    dtypes = {key: schema[key].dtype.str for key in plan.get("state", [])}
    root.attrs[ATTRS_KEY] = {
        "source": str(store.path),
        "state_keys": state,
        "state_dtypes": dtypes,
        "img": plan.get("img", [None])[0],
        "episodes": episodes,
    }
    return {"episodes": store.num_episodes, "steps": total, "arrays": {k: v for k, v in plan.items()}}


# --------------------------------------------------------------------------------------------- import
def open_replay_buffer(src: str | os.PathLike) -> tuple[zarr.Group, np.ndarray]:
    """The DP group at `src` (format 2 or 3) and its episode_ends, checked as DP's ReplayBuffer checks
    them: data/ and meta/episode_ends present, ends increasing, every data array as long as the last end."""
    if (Path(src) / REAL_ROBOT_BUFFER).is_dir():
        caches = sorted(p.name for p in Path(src).glob("*.zarr.zip")) or ["<hash>.zarr.zip"]
        raise DataIOError(
            f"{src} is a Diffusion Policy real-robot dataset: import its {REAL_ROBOT_BUFFER} (low-dim only: "
            f"the camera mp4s in its videos/ are not read) or, with the frames, the cache DP's training "
            f"writes there ({', '.join(caches)})"
        )
    # DP caches datasets as .zarr.zip (a zarr.ZipStore), e.g. its real-robot datasets' image caches
    zipped = Path(src).is_file() and zipfile.is_zipfile(src)
    try:
        root = zarr.open_group(zarr.storage.ZipStore(src, mode="r") if zipped else str(src), mode="r")
    except Exception as err:  # zarr raises several kinds for "not a group"
        raise DataIOError(f"{src} is not a zarr group ({type(err).__name__}: {err})") from None
    for name in ("data", "meta"):
        if not isinstance(root.get(name), zarr.Group):
            raise DataIOError(
                f"{src}: no {name}/ group; a Diffusion Policy replay buffer has data/ and meta/"
            )
    if not isinstance(root["meta"].get("episode_ends"), zarr.Array):
        raise DataIOError(f"{src}: no meta/episode_ends array")
    ends = np.asarray(root["meta"]["episode_ends"][:], dtype=np.int64)
    if ends.ndim != 1 or (ends.size and (ends[0] <= 0 or np.any(np.diff(ends) <= 0))):
        raise DataIOError(f"{src}: meta/episode_ends is not a strictly increasing list of ends")
    total = int(ends[-1]) if ends.size else 0
    for key, array in root["data"].arrays():
        if array.shape[0] != total:
            raise DataIOError(f"{src}: data/{key} has {array.shape[0]} steps, episode_ends says {total}")
    return root, ends


def read_diffusion_policy(
    src: str | os.PathLike,
    keys: Mapping[str, str] | None = None,
    cameras: Mapping[str, str] | None = None,
    fps: int = 10,
    task: str = "imported",
) -> tuple[int, Iterator[ImportedEpisode]]:
    """(episode count, the episodes) of the DP dataset at `src`, mapped to episode-store keys.

    `keys` renames arrays (`{keypoint: object_keypoints}`; an empty name drops one); `cameras` names the
    camera of an image array (`{img: front}` -> `front_rgb`; an image array not named there keeps its key
    plus `_rgb`, but `img` becomes `front_rgb`).
    """
    root, ends = open_replay_buffer(src)
    keys, cameras = dict(keys or {}), dict(cameras or {})
    data = dict(root["data"].arrays())
    unknown = sorted((set(keys) | set(cameras)) - set(data))
    if unknown:
        raise DataIOError(f"{src}: no data array(s) {unknown}; it has {sorted(data)}")
    if "action" not in data and "action" not in keys.values():
        raise DataIOError(f"{src}: no data/action (map one with +keys.<name>=action); it has {sorted(data)}")
    info = root.attrs.get(ATTRS_KEY) or {}
    split = info.get("state_keys") if "state" not in keys and "state" in data else None
    targets, images = {}, set()
    for key, array in data.items():
        is_image = array.ndim == 4 and array.shape[-1] == 3
        if key in cameras or (is_image and key not in keys):
            images.add(key)
            name = cameras.get(key) or (info.get("img") or DEFAULT_CAMERA if key == "img" else key)
            targets[key] = name if name.endswith(CAMERA_SUFFIX) else name + CAMERA_SUFFIX
        else:
            targets[key] = keys.get(key, key)
    episodes_meta = info.get("episodes") or []
    videos = Path(src).parent / "videos"
    if Path(src).name == REAL_ROBOT_BUFFER and videos.is_dir():
        print(f"note: the camera mp4s in {videos} are not imported, only the replay buffer's arrays")

    def episodes() -> Iterator[ImportedEpisode]:
        scales: dict[str, float] = {}  # per image array, from its first episode
        for index, (start, end) in enumerate(zip(np.r_[0, ends[:-1]], ends, strict=True)):
            arrays, labels, stamps = {}, None, None
            for key, array in data.items():
                name, values = targets[key], array[int(start) : int(end)]
                if not name:
                    continue
                if name == "label":
                    labels = values
                elif name == "timestamp":
                    stamps = values
                elif key in images:
                    if key not in scales:
                        scales[key] = image_scale(values, f"data/{key}")
                    arrays[name] = to_uint8_images(values, f"data/{key}", scales[key])
                elif key == "state" and split:
                    arrays.update(_split_state(values, split, info.get("state_dtypes") or {}))
                else:
                    arrays[name] = values
            length = int(end - start)
            if stamps is None:
                stamps = (start + np.arange(length)) / fps
            # This exporter's own metadata when there is some, else what is known of a DP dataset.
            m = episodes_meta[index] if index < len(episodes_meta) else {}
            extra = m["extra"] if "extra" in m else {CONTROL_HZ_KEY: fps, "source": str(src)}
            yield ImportedEpisode(
                episode_steps(arrays, labels, stamps, length),
                task=m.get("task", task),
                robot_id=m.get("robot_id", "imported"),
                success=bool(m.get("success", True)),
                outcome=m.get("outcome", ""),
                policy_version=m.get("policy_version", ""),
                extra=extra,
            )

    return len(ends), episodes()


def _split_state(values: np.ndarray, shapes: Mapping[str, list], dtypes: Mapping[str, str]) -> dict:
    """A `state` this exporter concatenated, back into its keys."""
    out, column = {}, 0
    for key, shape in shapes.items():
        size = int(np.prod(shape))
        part = values[:, column : column + size].reshape(len(values), *shape)
        out[key] = part.astype(dtypes.get(key, part.dtype))
        column += size
    if column != values.shape[1]:
        raise DataIOError(f"data/state has {values.shape[1]} columns, the export's attributes say {column}")
    return out
