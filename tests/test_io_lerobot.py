"""LeRobotDataset v3.0 export and import: round trips (PNG bit-exact, mp4 within codec error) and the
export checked field by field against ../shared/formats.md with pyarrow, pandas and PyAV."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from fleet.labels import ControlLabel
from fleet.store import EpisodeStore
from tests.io_data import CONTROL_HZ, all_steps, assert_same_store, make_store
from tests.test_cli import ROOT, flotilla

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
pd = pytest.importorskip("pandas")
av = pytest.importorskip("av")

REQUIRED_INFO = {
    "codebase_version", "robot_type", "total_episodes", "total_frames", "total_tasks", "chunks_size",
    "data_files_size_in_mb", "video_files_size_in_mb", "fps", "splits", "data_path", "video_path", "features",
}  # fmt: skip
EPISODE_COLUMNS = {
    "episode_index", "tasks", "length", "data/chunk_index", "data/file_index", "dataset_from_index",
    "dataset_to_index", "meta/episodes/chunk_index", "meta/episodes/file_index",
}  # fmt: skip
STATS = {"min", "max", "mean", "std", "count", "q01", "q10", "q50", "q90", "q99"}


def lerobot(job: str, src, out, *args: str, check: bool = True):
    """`flotilla export|import SRC format=lerobot out=OUT ...` in a subprocess."""
    return flotilla(job, str(src), "format=lerobot", f"out={out}", "progress=false", *args, check=check)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("io") / "fleet.zarr"
    with make_store(path, episodes=4, cameras=("front", "wrist")) as store:
        yield store


def export(store, tmp_path_factory, video: bool):
    out = tmp_path_factory.mktemp("lerobot") / "dataset"
    lerobot("export", store.path, out, f"video={str(video).lower()}")
    return out


@pytest.fixture(scope="module")
def png(store, tmp_path_factory):
    return export(store, tmp_path_factory, video=False)


@pytest.fixture(scope="module")
def mp4(store, tmp_path_factory):
    return export(store, tmp_path_factory, video=True)


@pytest.fixture(params=["png", "mp4"])
def exported(request):
    """(dataset folder, whether its cameras are video)."""
    return request.getfixturevalue(request.param), request.param == "mp4"


def test_round_trip_gives_the_store_back(store, exported, tmp_path):
    dataset, video = exported
    lerobot("import", dataset, tmp_path / "back.zarr")
    with EpisodeStore.open(tmp_path / "back.zarr") as back:
        assert_same_store(back, store, lossy_images=video)


def test_export_matches_the_v3_format_field_by_field(store, exported):
    dataset, video = exported
    info = json.loads((dataset / "meta" / "info.json").read_text())
    assert REQUIRED_INFO <= set(info)
    total = store.num_steps
    assert info["codebase_version"] == "v3.0" and info["fps"] == CONTROL_HZ and isinstance(info["fps"], int)
    assert (info["total_episodes"], info["total_frames"], info["total_tasks"]) == (len(store), total, 1)
    assert info["splits"] == {"train": f"0:{len(store)}"} and info["chunks_size"] == 1000
    assert info["data_path"] == "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
    assert info["video_path"] == (
        "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4" if video else None
    )
    features = info["features"]
    for name, dtype in [("timestamp", "float32")] + [
        (name, "int64") for name in ("frame_index", "episode_index", "index", "task_index")
    ]:
        assert features[name]["dtype"] == dtype and features[name]["shape"] == [1], name
    for name, ft in features.items():
        assert "/" not in name and ft["shape"] != [] and {"dtype", "shape", "names"} <= set(ft), name
    assert features["control_label"] == {"dtype": "int64", "shape": [1], "names": None}
    assert features["observation.state"]["names"][:4] == ["ee_pos.0", "ee_pos.1", "ee_pos.2", "gripper.0"]
    assert features["action"]["shape"] == [4] and features["goal"]["shape"] == [2]
    for camera in ("front", "wrist"):
        ft = features[f"observation.images.{camera}"]
        assert ft["dtype"] == ("video" if video else "image")
        assert ft["shape"] == [32, 32, 3] and ft["names"] == ["height", "width", "channels"]
        if video:
            assert ft["info"]["video.codec"] == "h264" and ft["info"]["video.pix_fmt"] == "yuv420p"
            assert ft["info"]["video.fps"] == CONTROL_HZ

    table = pq.read_table(dataset / "data" / "chunk-000" / "file-000.parquet")
    assert set(table.column_names) == {name for name, ft in features.items() if ft["dtype"] != "video"}
    steps = all_steps(store)
    assert table.column("index").to_pylist() == list(range(total))
    frame_index = np.asarray(table.column("frame_index"))
    assert table.schema.field("timestamp").type == pa.float32()
    np.testing.assert_array_equal(
        np.asarray(table.column("timestamp")), (frame_index / CONTROL_HZ).astype(np.float32)
    )
    assert pa.types.is_fixed_size_list(table.schema.field("action").type)
    np.testing.assert_array_equal(
        np.stack(table.column("action").to_numpy(zero_copy_only=False)), steps["action"]
    )
    np.testing.assert_array_equal(np.asarray(table.column("control_label")), steps["label"])
    if not video:
        cell = table.column("observation.images.front")[0].as_py()
        assert set(cell) == {"bytes", "path"} and cell["bytes"].startswith(b"\x89PNG\r\n\x1a\n")

    tasks = pd.read_parquet(dataset / "meta" / "tasks.parquet")
    assert tasks.index.name == "task" and list(tasks.index) == ["push"]
    assert tasks["task_index"].dtype == np.int64 and tasks["task_index"].tolist() == [0]

    episodes = pq.read_table(dataset / "meta" / "episodes" / "chunk-000" / "file-000.parquet").to_pylist()
    ends = store.episode_ends.tolist()
    for e, row in enumerate(episodes):
        assert EPISODE_COLUMNS <= set(row)
        assert row["episode_index"] == e and row["tasks"] == ["push"]
        assert (row["dataset_from_index"], row["dataset_to_index"]) == ((ends[e - 1] if e else 0), ends[e])
        assert row["length"] == ends[e] - (ends[e - 1] if e else 0)

    stats = json.loads((dataset / "meta" / "stats.json").read_text())
    for name in features:
        assert set(stats[name]) == STATS, name
    image = stats["observation.images.front"]
    assert np.asarray(image["mean"]).shape == (3, 1, 1)
    assert 0 <= np.min(image["q01"]) <= np.max(image["q99"]) <= 1
    np.testing.assert_allclose(
        np.asarray(image["mean"]).ravel(), steps["front_rgb"].reshape(-1, 3).mean(0) / 255, atol=1e-9
    )
    np.testing.assert_allclose(stats["action"]["q50"], np.quantile(steps["action"], 0.5, axis=0), rtol=1e-6)

    if video:
        for camera in ("front", "wrist"):
            key = f"observation.images.{camera}"
            with av.open(str(dataset / "videos" / key / "chunk-000" / "file-000.mp4")) as container:
                stream = container.streams.video[0]
                assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
                times = [float(frame.pts * frame.time_base) for frame in container.decode(stream)]
            assert len(times) == total
            # LeRobot looks a frame up at from_timestamp + timestamp, within 1e-4 s.
            wanted = [
                row[f"videos/{key}/from_timestamp"] + t / CONTROL_HZ
                for row in episodes
                for t in range(row["length"])
            ]
            np.testing.assert_allclose(times, wanted, atol=1e-4)


def test_import_labels_from_an_intervention_column(png, tmp_path):
    """A LeRobot dataset from another tool: no control_label, an is_intervention column."""
    dataset = png

    copy = tmp_path / "other"
    shutil.copytree(dataset, copy)
    path = copy / "data" / "chunk-000" / "file-000.parquet"
    table = pq.read_table(path)
    flags = pa.array(np.asarray(table.column("control_label")) == ControlLabel.INTERVENTION)
    table = table.drop_columns(["control_label"]).append_column("is_intervention", flags)
    pq.write_table(table, path)
    info = json.loads((copy / "meta" / "info.json").read_text())
    info["features"]["is_intervention"] = {"dtype": "bool", "shape": [1], "names": None}
    del info["features"]["control_label"]
    (copy / "meta" / "info.json").write_text(json.dumps(info))
    lerobot("import", copy, tmp_path / "s.zarr")
    with EpisodeStore.open(tmp_path / "s.zarr") as imported:
        labels = imported.labels()
    expected = np.where(np.asarray(flags), ControlLabel.INTERVENTION, ControlLabel.ROBOT)
    np.testing.assert_array_equal(labels, expected)
    assert set(np.unique(labels)) == {ControlLabel.ROBOT, ControlLabel.INTERVENTION}
    # Without either column every step is a demo.
    info["features"].pop("is_intervention")
    pq.write_table(table.drop_columns(["is_intervention"]), path)
    (copy / "meta" / "info.json").write_text(json.dumps(info))
    lerobot("import", copy, tmp_path / "demo.zarr")
    with EpisodeStore.open(tmp_path / "demo.zarr") as imported:
        assert np.all(imported.labels() == ControlLabel.DEMO)


def test_missing_files_and_bad_settings_get_one_line_errors(png, tmp_path):
    dataset = png

    copy = tmp_path / "broken"
    shutil.copytree(dataset, copy)
    (copy / "meta" / "tasks.parquet").unlink()
    result = lerobot("import", copy, tmp_path / "s.zarr", check=False)
    assert result.returncode == 2 and "meta/tasks.parquet is missing" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "s.zarr").exists()
    result = flotilla("info", str(dataset), check=False)
    assert result.returncode == 2 and "format=lerobot" in result.stderr


def test_fps_falls_back_to_the_timestamps(tmp_path):
    with make_store(tmp_path / "s.zarr", episodes=2, cameras=(), control_hz=None):
        pass
    result = lerobot("export", tmp_path / "s.zarr", tmp_path / "out")
    assert "fps 10 (estimated from the step timestamps" in result.stdout
    assert json.loads((tmp_path / "out" / "meta" / "info.json").read_text())["fps"] == CONTROL_HZ
    result = lerobot("export", tmp_path / "s.zarr", tmp_path / "out2", "fps=15")
    assert json.loads((tmp_path / "out2" / "meta" / "info.json").read_text())["fps"] == 15


def test_without_the_data_extra_lerobot_names_it_and_dp_still_works(store, tmp_path):
    """The base install (no pyarrow, PyAV, pandas): a LeRobot export is one line naming the extra; the
    Diffusion Policy format needs only zarr."""
    hide = "import sys; sys.modules.update(dict.fromkeys(['pyarrow', 'av', 'pandas', 'matplotlib'])); "
    run = "from flotilla.cli import main; sys.exit(main(sys.argv[1:]))"
    stderr = {}
    for fmt, code in (("lerobot", 2), ("diffusion_policy", 0)):
        result = subprocess.run(
            [sys.executable, "-c", hide + run, "export", str(store.path), f"format={fmt}", f"out={tmp_path / fmt}", "progress=false"],
            capture_output=True, text=True, cwd=ROOT, timeout=300,
        )  # fmt: skip
        assert result.returncode == code, result.stderr
        stderr[fmt] = result.stderr.strip().splitlines()
    assert len(stderr["lerobot"]) == 1 and "pip install 'flotilla[data]'" in stderr["lerobot"][0]
    assert (tmp_path / "diffusion_policy" / ".zgroup").is_file()
