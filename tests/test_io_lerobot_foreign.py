"""`flotilla import format=lerobot` on LeRobotDataset v3.0 folders laid out as LeRobot itself writes them
(../shared/formats.md), built here with pyarrow and PyAV: several episodes concatenated in one AV1 mp4 per
camera and found by their `videos/<key>/from_timestamp`, data split over several parquet files, `names`
as a list, a dict or null, shape-[1] features as plain columns (float and bool), and a v2.1 folder."""

import json
import shutil

import numpy as np
import pytest

from fleet.store import EpisodeStore
from tests.test_io_lerobot import lerobot

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
pd = pytest.importorskip("pandas")
av = pytest.importorskip("av")

FPS = 10
CAMERA = "observation.images.top"
TASKS = ["pick the cube", "push the cube"]


def frame(episode: int, i: int) -> np.ndarray:
    """Flat colour saying (episode, frame): red 20 + 40 episode, green 10 + 8 i (far beyond codec error)."""
    image = np.full((32, 64, 3), 100, np.uint8)
    image[..., 0], image[..., 1] = 20 + 40 * episode, 10 + 8 * i
    return image


def which_frames(images: np.ndarray) -> tuple[list[int], list[int]]:
    red, green = images[..., 0].mean(axis=(1, 2)), images[..., 1].mean(axis=(1, 2))
    return np.round((red - 20) / 40).astype(int).tolist(), np.round((green - 10) / 8).astype(int).tolist()


def encode(path, frames: list[np.ndarray], codec: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=FPS, options={"g": "2", "crf": "30"})
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())


def write_dataset(
    root, lengths=(5, 7, 6), codec="libsvtav1", data_files=2, names="list", skipped=3, video_order=None
):
    """A v3.0 folder as LeRobot writes it: episodes concatenated in one mp4 (after `skipped` frames of an
    episode since deleted), each found by its from_timestamp; data rows in `data_files` parquet files."""
    root.mkdir(parents=True)
    state_names = {"list": ["x", "y"], "dict": {"motors": ["x", "y"]}, "null": None}[names]
    scalar = {"dtype": "float32", "shape": [1], "names": None}
    features = {
        "observation.state": {"dtype": "float32", "shape": [2], "names": state_names},
        "action": {"dtype": "float32", "shape": [2], "names": None if names == "null" else ["vx", "vy"]},
        "next.reward": scalar,
        "next.done": {**scalar, "dtype": "bool"},
        CAMERA: {
            "dtype": "video", "shape": [32, 64, 3], "names": ["height", "width", "channels"],
            "info": {"video.height": 32, "video.width": 64, "video.codec": "av1", "video.pix_fmt": "yuv420p",
                     "video.is_depth_map": False, "video.fps": FPS, "video.channels": 3, "has_audio": False},
        },
        "timestamp": scalar,
        **{name: {**scalar, "dtype": "int64"} for name in ("frame_index", "episode_index", "index", "task_index")},
    }  # fmt: skip
    info = {
        "codebase_version": "v3.0", "robot_type": "so100", "total_episodes": len(lengths),
        "total_frames": sum(lengths), "total_tasks": len(TASKS), "chunks_size": 1000, "data_files_size_in_mb": 100,
        "video_files_size_in_mb": 200, "fps": FPS, "splits": {"train": f"0:{len(lengths)}"},
        "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
        "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4", "features": features,
    }  # fmt: skip
    (root / "meta").mkdir()
    (root / "meta" / "info.json").write_text(json.dumps(info, indent=4))
    (root / "meta" / "stats.json").write_text("{}")
    pd.DataFrame({"task_index": range(len(TASKS))}, index=pd.Index(TASKS, name="task")).to_parquet(
        root / "meta" / "tasks.parquet"
    )
    # Where each episode's frames sit in the mp4: in episode order unless `video_order` says otherwise.
    frames, starts = [frame(5, i) for i in range(skipped)], {}
    for e in video_order or range(len(lengths)):
        starts[e] = len(frames) / FPS
        frames += [frame(e, i) for i in range(lengths[e])]
    rows, episodes, per_file = [[] for _ in range(data_files)], [], -(-len(lengths) // data_files)
    for e, length in enumerate(lengths):
        start, file = starts[e], e // per_file
        for i in range(length):
            rows[file].append({
                "observation.state": [float(e), float(i)], "action": [e + 0.5, i + 0.5],
                "next.reward": float(i == length - 1), "next.done": i == length - 1, "timestamp": i / FPS,
                "frame_index": i, "episode_index": e, "index": sum(lengths[:e]) + i, "task_index": e % 2,
            })  # fmt: skip
        episodes.append({
            "episode_index": e, "tasks": [TASKS[e % 2]], "length": length, "data/chunk_index": 0,
            "data/file_index": file, "dataset_from_index": sum(lengths[:e]), "dataset_to_index": sum(lengths[: e + 1]),
            f"videos/{CAMERA}/chunk_index": 0, f"videos/{CAMERA}/file_index": 0,
            f"videos/{CAMERA}/from_timestamp": start, f"videos/{CAMERA}/to_timestamp": start + length / FPS,
            "meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0,
        })  # fmt: skip
    schema = pa.schema(
        [("observation.state", pa.list_(pa.float32(), 2)), ("action", pa.list_(pa.float32(), 2)),
         ("next.reward", pa.float32()), ("next.done", pa.bool_()), ("timestamp", pa.float32())]
        + [(name, pa.int64()) for name in ("frame_index", "episode_index", "index", "task_index")]
    )  # fmt: skip
    for file, file_rows in enumerate(rows):
        path = root / "data" / "chunk-000" / f"file-{file:03d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(file_rows, schema=schema), path)
    (root / "meta" / "episodes" / "chunk-000").mkdir(parents=True)
    pq.write_table(
        pa.Table.from_pylist(episodes), root / "meta" / "episodes" / "chunk-000" / "file-000.parquet"
    )
    encode(root / "videos" / CAMERA / "chunk-000" / "file-000.mp4", frames, codec)
    return root


def codec(name: str) -> str:
    if name not in av.codecs_available:
        pytest.skip(f"PyAV here has no {name} encoder")
    return name


@pytest.mark.parametrize("encoder,names", [("libsvtav1", "list"), ("libsvtav1", "dict"), ("libx264", "null")])
def test_a_dataset_as_lerobot_writes_it_imports_each_episode_with_its_own_frames(tmp_path, encoder, names):
    lengths = (5, 7, 6)
    dataset = write_dataset(tmp_path / "dataset", lengths, codec(encoder), names=names)
    lerobot("import", dataset, tmp_path / "s.zarr")
    with EpisodeStore.open(tmp_path / "s.zarr") as store:
        assert store.episode_ends.tolist() == np.cumsum(lengths).tolist()
        assert {k: (v.shape, v.dtype.name) for k, v in store.schema.items() if k not in ("label", "timestamp")} == {
            "state": ((2,), "float32"), "action": ((2,), "float32"), "next_reward": ((), "float32"),
            "next_done": ((), "bool"), "top_rgb": ((32, 64, 3), "uint8"),
        }  # fmt: skip
        for e, length in enumerate(lengths):
            steps = store.episode(e)
            # Episode e's frames, from its from_timestamp: not episode 0's, nor the deleted one's.
            assert which_frames(steps["top_rgb"]) == ([e] * length, list(range(length))), e
            np.testing.assert_array_equal(steps["state"], np.c_[np.full(length, e), np.arange(length)])
            np.testing.assert_array_equal(steps["next_done"], np.arange(length) == length - 1)
            assert store.episode_meta(e).task == TASKS[e % 2]
            assert store.episode_meta(e).extra["control_hz"] == FPS


def test_episodes_stored_out_of_order_in_the_video_get_their_own_frames(tmp_path):
    """Episode 0's frames after episode 1's in the mp4 (as after editing a dataset): read by from_timestamp,
    not by position."""
    dataset = write_dataset(tmp_path / "dataset", (4, 6), codec("libx264"), data_files=1, video_order=[1, 0])
    lerobot("import", dataset, tmp_path / "s.zarr")
    with EpisodeStore.open(tmp_path / "s.zarr") as store:
        for e, length in enumerate((4, 6)):
            assert which_frames(store.episode(e)["top_rgb"]) == ([e] * length, list(range(length))), e


def test_a_v2_1_dataset_is_one_line_pointing_at_lerobots_converter(tmp_path):
    dataset = tmp_path / "v21"
    (dataset / "meta").mkdir(parents=True)
    (dataset / "meta" / "info.json").write_text(json.dumps({"codebase_version": "v2.1", "fps": 30}))
    (dataset / "meta" / "episodes.jsonl").write_text('{"episode_index": 0, "length": 3}\n')
    result = lerobot("import", dataset, tmp_path / "s.zarr", check=False)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "v2.1, which is not supported" in result.stderr
    assert "lerobot.datasets.v30.convert_dataset_v21_to_v30" in result.stderr
    assert not (tmp_path / "s.zarr").exists()


def test_a_missing_video_file_names_it(tmp_path):
    dataset = write_dataset(tmp_path / "dataset", codec=codec("libx264"))
    shutil.rmtree(dataset / "videos")
    result = lerobot("import", dataset, tmp_path / "s.zarr", check=False)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert f"videos/{CAMERA}/chunk-000/file-000.mp4 is missing" in result.stderr
