"""Diffusion Policy export and import: the export read by zarr-python 2 the way DP's ReplayBuffer and
SequenceSampler read it (in a throwaway venv with zarr<3 from the package registry), round trips, and a
Push-T-style dataset imported and trained on."""

import json
import subprocess
import venv

import numpy as np
import pytest
import zarr

from fleet.labels import ControlLabel
from fleet.store import EpisodeStore
from tests.io_data import all_steps, assert_same_store, make_store
from tests.test_cli import flotilla

# What DP's ReplayBuffer.copy_from_path / create_from_path do with zarr 2 (zarr.open, zarr.MemoryStore,
# zarr.copy_store, group.items(), the length assert), then SequenceSampler-style windows over episodes.
DP_READER = r"""
import json, sys
import numpy as np
import zarr

path, keys = sys.argv[1], sys.argv[2].split(",")
src = zarr.open(path, "r")                                   # create_from_path(mode="r")
assert "data" in src and "meta" in src and "episode_ends" in src["meta"], "not a replay buffer"
store = zarr.MemoryStore()                                   # copy_from_path(store=zarr.MemoryStore())
root = zarr.group(store=store)
zarr.copy_store(source=src.store, dest=store, source_path="/meta", dest_path="/meta")
data = root.create_group("data", overwrite=True)
for key in keys:
    if key == "img":  # DP recompresses a key whose compressor differs from its config: zarr.copy
        zarr.copy(source=src["data"][key], dest=data, name=key, chunks=src["data"][key].chunks)
    else:
        zarr.copy_store(source=src.store, dest=store, source_path="/data/" + key, dest_path="/data/" + key)
ends = root["meta"]["episode_ends"][:]
for key, value in root["data"].items():                      # ReplayBuffer.__init__'s check
    assert value.shape[0] == ends[-1], (key, value.shape, ends[-1])
windows, horizon = 0, 4                                      # SequenceSampler.create_indices + sample
for start, end in zip(np.r_[0, ends[:-1]], ends):
    for i in range(start, end - horizon + 1):
        sample = {key: root["data"][key][i : i + horizon] for key in keys}
        windows += 1
out = {key: {"shape": list(root["data"][key].shape), "dtype": str(root["data"][key].dtype),
             "sum": float(np.asarray(root["data"][key][:], dtype=np.float64).sum())} for key in keys}
print(json.dumps({"zarr": zarr.__version__, "ends": ends.tolist(), "windows": windows, "arrays": out}))
"""


DP_ZARR = ["zarr==2.12.0", "numcodecs==0.11.0", "numpy<2"]


@pytest.fixture(scope="session")
def zarr2_python(tmp_path_factory):
    """A Python with DP's pin, zarr-python 2.12 (numcodecs 0.11, the oldest with wheels for this Python;
    DP's numpy 1.x), from the package registry; ~10 s with pip's cache. 2.18 reads the same (tried)."""
    home = tmp_path_factory.mktemp("zarr2_venv")
    venv.create(home, with_pip=True)
    python = home / "bin" / "python"
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--only-binary", ":all:", *DP_ZARR],
        check=True,
        capture_output=True,
        timeout=600,
    )
    return python


def dp_read(python, path, keys) -> subprocess.CompletedProcess:
    return subprocess.run(
        [python, "-c", DP_READER, str(path), ",".join(keys)], capture_output=True, text=True, timeout=300
    )


def dp(job: str, src, out, *args: str, check: bool = True):
    """`flotilla export|import SRC format=diffusion_policy out=OUT ...` in a subprocess."""
    return flotilla(
        job, str(src), "format=diffusion_policy", f"out={out}", "progress=false", *args, check=check
    )


@pytest.fixture
def store(tmp_path):
    with make_store(tmp_path / "fleet.zarr", cameras=("front", "wrist")) as store:
        yield store


def test_zarr2_reads_the_export_as_diffusion_policy_does_but_not_the_store(zarr2_python, store, tmp_path):
    out = tmp_path / "dp.zarr"
    dp("export", store.path, out)
    keys = ["action", "state", "img", "label", "goal", "wrist_rgb"]
    result = dp_read(zarr2_python, out, keys)
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    assert got["zarr"] == "2.12.0"
    assert got["ends"] == store.episode_ends.tolist()
    assert got["windows"] == sum(int(n) - 3 for n in np.diff(store.episode_ends, prepend=0))
    steps = all_steps(store)
    state = np.concatenate(
        [steps[k].reshape(len(steps["action"]), -1) for k in ("ee_pos", "gripper", "object_to_goal")], 1
    )
    expected = {
        "action": steps["action"],
        "state": state,
        "img": steps["front_rgb"],
        "label": steps["label"],
        "goal": steps["goal"],
        "wrist_rgb": steps["wrist_rgb"],
    }
    for key, values in expected.items():
        assert got["arrays"][key]["shape"] == list(values.shape), key
        assert got["arrays"][key]["dtype"] == str(values.dtype), key
        assert got["arrays"][key]["sum"] == pytest.approx(float(values.astype(np.float64).sum()), rel=1e-6), (
            key
        )
    # The episode store itself (zarr format 3) is what DP's zarr-2 readers cannot open: the bug.
    result = dp_read(zarr2_python, store.path, ["action"])
    assert result.returncode != 0


# ReplayBuffer.copy_from_store's numpy backend (store=None): every meta array and every data array read
# whole, chunk by chunk, under zarr 2; prints each data array's chunks.
DP_COPY_TO_NUMPY = r"""
import json, sys
import numpy as np
import zarr

src = zarr.open(sys.argv[1], "r")
meta = {key: (np.array(value) if len(value.shape) == 0 else value[:]) for key, value in src["meta"].items()}
data = {key: value[:] for key, value in src["data"].items()}
assert all(len(value) == meta["episode_ends"][-1] for value in data.values())
print(json.dumps({key: list(src["data"][key].chunks) for key in data}))
"""


def test_a_large_export_has_dp_sized_chunks_and_copies_into_memory_under_zarr2(zarr2_python, tmp_path):
    """Images in chunks of about 2 MB as DP's own stores (not a file per frame, nor one chunk of all);
    low-dim keys in chunks of many steps."""
    with make_store(tmp_path / "fleet.zarr", episodes=5, length=30, size=96) as store:
        out = tmp_path / "dp.zarr"
        dp("export", store.path, out)
        result = subprocess.run(
            [zarr2_python, "-c", DP_COPY_TO_NUMPY, str(out)], capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, result.stderr
        chunks = json.loads(result.stdout)
        frame_bytes = 96 * 96 * 3
        assert 1 < chunks["img"][0] < store.num_steps, chunks["img"]
        assert chunks["img"][0] * frame_bytes <= 2_000_000 < (chunks["img"][0] + 1) * frame_bytes
        assert chunks["action"][0] == chunks["state"][0] == store.num_steps  # one chunk: < 1024 steps
        image_files = [p for p in (out / "data" / "img").iterdir() if not p.name.startswith(".")]
        assert len(image_files) == -(-store.num_steps // chunks["img"][0])


def test_export_then_import_gives_the_store_back(store, tmp_path):
    dp("export", store.path, tmp_path / "dp.zarr")
    dp("import", tmp_path / "dp.zarr", tmp_path / "back.zarr")
    with EpisodeStore.open(tmp_path / "back.zarr") as back:
        assert_same_store(back, store)


def test_export_state_keys_and_camera_choose_the_mapping(store, tmp_path):
    out = tmp_path / "dp.zarr"
    dp("export", store.path, out, "state_keys=[gripper,ee_pos]", "camera=wrist")
    root = zarr.open_group(str(out), mode="r", zarr_format=2)
    first = store.episode(0)
    np.testing.assert_array_equal(
        root["data"]["state"][:3], np.concatenate([first["gripper"], first["ee_pos"]], 1)[:3]
    )
    np.testing.assert_array_equal(root["data"]["img"][:3], first["wrist_rgb"][:3])
    assert "front_rgb" in root["data"] and "wrist_rgb" not in root["data"]
    # Bad mappings and an existing output are one line naming the problem.
    bad = dp("export", store.path, tmp_path / "x.zarr", "state_keys=[nope]", check=False)
    assert bad.returncode == 2 and "nope" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    again = dp("export", store.path, out, check=False)
    assert (
        again.stderr.strip()
        == f"flotilla export: out: {out} already exists; pass overwrite=true to replace it"
    )
    assert again.returncode == 2
    assert not (tmp_path / "x.zarr").exists() and not (tmp_path / "x.zarr.partial").exists()


def write_pusht(path, zarr_format: int, episodes=4, length=20, float_scale=255.0):
    """A Push-T-style replay buffer as DP ships it: float32 img in [0, 255], state (5), keypoint (9, 2), action (2)."""
    rng = np.random.default_rng(1)
    total = episodes * length
    root = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    data = root.create_group("data")
    images = rng.integers(0, 256, size=(total, 16, 16, 3)).astype(np.float32)
    images[2 * length : 3 * length] %= 2  # a dark episode: values 0 and 1 must not read as [0, 1] images
    arrays = {
        "img": images / 255.0 * float_scale,
        "state": rng.normal(size=(total, 5)).astype(np.float32),
        "keypoint": rng.normal(size=(total, 9, 2)).astype(np.float32),
        "action": rng.normal(size=(total, 2)).astype(np.float32),
    }
    for key, values in arrays.items():
        data.create_array(key, shape=values.shape, dtype=values.dtype)[:] = values
    root.create_group("meta").create_array("episode_ends", shape=(episodes,), dtype=np.int64)[:] = (
        np.arange(1, episodes + 1) * length
    )
    return arrays, images.astype(np.uint8)


@pytest.mark.parametrize("zarr_format,scale", [(2, 255.0), (3, 1.0)])
def test_import_pusht_style(tmp_path, zarr_format, scale):
    arrays, images = write_pusht(tmp_path / "pusht.zarr", zarr_format, float_scale=scale)
    dp("import", tmp_path / "pusht.zarr", tmp_path / "s.zarr")
    with EpisodeStore.open(tmp_path / "s.zarr") as store:
        assert store.num_episodes == 4 and store.num_steps == 80
        assert set(store.schema) == {"front_rgb", "state", "keypoint", "action", "label", "timestamp"}
        steps = all_steps(store)
        np.testing.assert_array_equal(steps["front_rgb"], images)
        np.testing.assert_array_equal(steps["keypoint"], arrays["keypoint"])
        assert np.all(steps["label"] == ControlLabel.DEMO)
        np.testing.assert_allclose(np.diff(store.episode(0)["timestamp"]), 0.1)
        assert store.episode_meta(0).extra["control_hz"] == 10


# Push-T as DP ships it, written by zarr-python 2 with the numcodecs compressors DP's stores use.
PUSHT_ZARR2 = r"""
import sys
import numcodecs
import numpy as np
import zarr

path, compressor = sys.argv[1], sys.argv[2]
store = zarr.ZipStore(path, mode="w") if path.endswith(".zip") else zarr.DirectoryStore(path)  # DP's caches
compressor = {
    "blosc-lz4": numcodecs.Blosc("lz4", 5, numcodecs.Blosc.NOSHUFFLE),
    "blosc-zstd": numcodecs.Blosc("zstd", 5, numcodecs.Blosc.BITSHUFFLE),
    "zstd": numcodecs.Zstd(3),
}[compressor]
ends = np.array([7, 12, 21])
root = zarr.group(store=store, overwrite=True)
data = root.create_group("data")
steps = np.arange(ends[-1], dtype=np.float32)
img = np.broadcast_to((steps * 10 % 256)[:, None, None, None], (ends[-1], 96, 96, 3))
data.create_dataset("img", data=img, chunks=(4, 96, 96, 3), compressor=compressor)
data.create_dataset("state", data=np.stack([steps] * 5, 1), chunks=(10, 5), compressor=compressor)
data.create_dataset("keypoint", data=np.stack([steps] * 18, 1).reshape(-1, 9, 2), compressor=compressor)
data.create_dataset("action", data=np.stack([steps, -steps], 1), compressor=compressor)
data.create_dataset("n_contacts", data=(steps % 2)[:, None], compressor=compressor)
root.create_group("meta").create_dataset("episode_ends", data=ends, compressor=None)
store.close()
"""


@pytest.mark.parametrize(
    "compressor,name", [("blosc-lz4", "pusht.zarr"), ("blosc-zstd", "pusht.zarr"), ("zstd", "cache.zarr.zip")]
)
def test_import_a_pusht_store_zarr2_wrote(zarr2_python, tmp_path, compressor, name):
    path = tmp_path / name
    written = subprocess.run(
        [zarr2_python, "-c", PUSHT_ZARR2, str(path), compressor], capture_output=True, text=True, timeout=300
    )
    assert written.returncode == 0, written.stderr
    dp("import", path, tmp_path / "s.zarr")
    with EpisodeStore.open(tmp_path / "s.zarr") as store:
        assert store.episode_ends.tolist() == [7, 12, 21]
        shapes = {key: spec.shape for key, spec in store.schema.items()}
        assert shapes == {
            "front_rgb": (96, 96, 3), "state": (5,), "keypoint": (9, 2), "action": (2,), "n_contacts": (1,),
            "label": (), "timestamp": (),
        }  # fmt: skip
        second = store.episode(1)
        steps = np.arange(7, 12)
        np.testing.assert_array_equal(second["front_rgb"][:, 50, 50, 0], steps * 10 % 256)
        np.testing.assert_array_equal(second["action"], np.stack([steps, -steps], 1))
        np.testing.assert_array_equal(second["keypoint"][:, 8, 1], steps)
        np.testing.assert_array_equal(second["n_contacts"][:, 0], steps % 2)


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_info_and_train_on_a_dp_dataset_point_at_import(tmp_path, zarr_format):
    write_pusht(tmp_path / "pusht.zarr", zarr_format)
    jobs = [("info", str(tmp_path / "pusht.zarr"))] + [("train", f"data={tmp_path / 'pusht.zarr'}")] * (
        zarr_format == 2
    )
    for job, arg in jobs:
        result = flotilla(job, arg, check=False)
        assert result.returncode == 2, result.stderr
        assert "flotilla import" in result.stderr and "format=diffusion_policy" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_info_on_a_zipped_dp_cache_points_at_import(tmp_path):
    import zipfile

    cache = tmp_path / "pusht_cache.zarr.zip"
    with zipfile.ZipFile(cache, "w") as archive:
        archive.writestr(".zgroup", '{"zarr_format": 2}')
    result = flotilla("info", str(cache), check=False)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert f"flotilla import {cache} format=diffusion_policy out=STORE" in result.stderr


def test_bad_dp_inputs_get_one_line_errors(tmp_path):
    write_pusht(tmp_path / "pusht.zarr", 3)
    root = zarr.open_group(str(tmp_path / "pusht.zarr"), mode="a")
    root["data"].create_array("short", shape=(3,), dtype=np.float32)
    result = dp("import", tmp_path / "pusht.zarr", tmp_path / "s.zarr", check=False)
    assert result.returncode == 2 and "data/short has 3 steps" in result.stderr
    assert not (tmp_path / "s.zarr").exists()
    result = dp("import", tmp_path / "nothing", tmp_path / "s.zarr", check=False)
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_a_real_robot_dataset_folder_points_at_its_replay_buffer(tmp_path):
    """DP's real-robot layout: replay_buffer.zarr (low-dim) beside videos/<episode>/<camera>.mp4."""
    write_pusht(tmp_path / "real" / "replay_buffer.zarr", 2)
    (tmp_path / "real" / "videos" / "0").mkdir(parents=True)
    (tmp_path / "real" / "videos" / "0" / "0.mp4").write_bytes(b"")
    result = dp("import", tmp_path / "real", tmp_path / "s.zarr", check=False)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "real-robot dataset: import its replay_buffer.zarr" in result.stderr
    result = dp("import", tmp_path / "real" / "replay_buffer.zarr", tmp_path / "s.zarr")
    assert "camera mp4s in" in result.stdout and "not imported" in result.stdout
    with EpisodeStore.open(tmp_path / "s.zarr") as store:
        assert store.num_episodes == 4


@pytest.mark.slow
def test_train_on_an_imported_pusht_dataset(tmp_path):
    """The two commands a DP user runs: import, then train (with the camera, on the imported state)."""
    write_pusht(tmp_path / "pusht.zarr", 2, episodes=6)
    dp("import", tmp_path / "pusht.zarr", tmp_path / "s.zarr")
    out = tmp_path / "run"
    result = flotilla(
        "train", f"data={tmp_path / 's.zarr'}", f"out={out}", "task.obs_keys=[state]", "action_space.kind=delta",
        "cameras=true", "policy.down_dims=[16,32,64]", "steps=4", "batch_size=4", "val_every=2",
        "checkpoint_every=2", "progress=false", "tensorboard=false", "threads=1",
    )  # fmt: skip
    config = json.loads((out / "checkpoints" / "latest" / "config.json").read_text())
    assert config["training"]["episodes"] == 6 and config["step"] == 4, result.stdout


def test_a_wide_state_is_exported_in_chunks_of_bounded_bytes(tmp_path):
    """A 1.6 MB state per step (a point cloud kept as low-dim) gets chunks of a few steps, as the store's,
    not 1024 steps (a 1.6 GB chunk that the export had to build in memory); the values round-trip."""
    from fleet.io.diffusion_policy import export_diffusion_policy
    from fleet.store.episode_store import LOWDIM_CHUNK_BYTES

    rng = np.random.default_rng(0)
    with EpisodeStore.create(tmp_path / "wide.zarr") as store:
        episode = store.begin_episode("robot-0", "push", "v1")
        for t in range(6):
            cloud = rng.normal(size=400_000).astype(np.float32)
            episode.append({"cloud": cloud}, np.zeros(4, np.float32), ControlLabel.DEMO, timestamp=t * 0.1)
        episode.commit(success=True)
        export_diffusion_policy(store, tmp_path / "dp.zarr")
        root = zarr.open_group(str(tmp_path / "dp.zarr"), mode="r", zarr_format=2)
        state = root["data"]["state"]
        assert state.chunks[0] == LOWDIM_CHUNK_BYTES // (400_000 * 4) and state.chunks[0] < 6
        np.testing.assert_array_equal(state[:], store.episode(0)["cloud"])
