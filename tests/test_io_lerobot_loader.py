"""LeRobot's own loader (lerobot 0.4.4, the newest for Python 3.11) on `flotilla export format=lerobot`,
offline, and `flotilla import` of a dataset LeRobot's own writer made.

lerobot is installed in a throwaway venv that sees this Python's CPU torch: `pip install --no-deps
lerobot==0.4.4` plus the few packages its dataset code imports (datasets, huggingface-hub, accelerate,
draccus, jsonlines). Its full install would pull CUDA torch, and so would torchvision: PyPI's torchvision
wheels link libtorch_cuda ("operator torchvision::nms does not exist" on a CPU torch). The dataset loader
uses one thing of torchvision, `transforms.ToTensor` (PIL image -> float CHW in [0, 1]), so the venv gets
a ten-line stand-in for exactly that; everything else is LeRobot's code. Video decoding needs torchcodec
(or torchvision's video reader) built for this torch, so only PNG datasets are loaded here; the mp4
export is checked with PyAV in test_io_lerobot.py. LeRobot's writer needs no decoder: a video dataset it
wrote (AV1, episodes in one mp4) is imported here too.
"""

import json
import os
import subprocess
import venv

import numpy as np
import pytest

from fleet.labels import ControlLabel
from fleet.store import EpisodeStore
from tests.io_data import CONTROL_HZ, all_steps, make_store
from tests.test_cli import flotilla

pytestmark = pytest.mark.slow  # ~1 min to build the venv (pip's cache makes reruns faster)

LEROBOT = ["lerobot==0.4.4"]
LOADER_DEPS = [
    "datasets>=4,<5",
    "huggingface-hub<0.36",
    "accelerate>=1.10,<2",
    "draccus==0.10.0",
    "jsonlines",
]
TO_TENSOR = """
import numpy as np
import torch


class ToTensor:
    def __call__(self, image):
        return torch.from_numpy(np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1))).float().div(255)
"""

LOAD = r"""
import json, sys
from lerobot.datasets.lerobot_dataset import LeRobotDataset
root, indices = sys.argv[1], [int(i) for i in sys.argv[2].split(",")]
ds = LeRobotDataset("flotilla/export", root=root, delta_timestamps={"action": [0.0, 0.1]})
items = []
for i in indices:
    item = ds[i]
    items.append({k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in item.items()})
print(json.dumps({"len": len(ds), "episodes": ds.num_episodes, "fps": ds.fps, "items": items,
                  "stats_q01": ds.meta.stats["action"]["q01"].tolist()}))
"""

WRITE = r"""
import sys
import numpy as np
from lerobot.datasets.lerobot_dataset import LeRobotDataset
features = {
    "observation.state": {"dtype": "float32", "shape": (3,), "names": ["x", "y", "z"]},
    "observation.images.top": {"dtype": "image", "shape": (16, 16, 3), "names": ["height", "width", "channels"]},
    "action": {"dtype": "float32", "shape": (2,), "names": ["a", "b"]},
    "is_intervention": {"dtype": "bool", "shape": (1,), "names": None},
}
ds = LeRobotDataset.create("me/made", fps=15, root=sys.argv[1], features=features, use_videos=False)
rng = np.random.default_rng(0)
for e in range(2):
    for t in range(5 + e):
        ds.add_frame({"observation.state": rng.normal(size=3).astype(np.float32),
                      "observation.images.top": rng.integers(0, 256, (16, 16, 3)).astype(np.uint8),
                      "action": rng.normal(size=2).astype(np.float32), "is_intervention": np.array([t > 2]),
                      "task": "pick the cube"})
    ds.save_episode()
ds.finalize()
"""

# LeRobot's own video path: every episode encoded with its default codec (AV1, libsvtav1 through PyAV)
# and concatenated into one mp4, found again by videos/<key>/from_timestamp.
WRITE_VIDEO = r"""
import sys
import numpy as np
from lerobot.datasets.lerobot_dataset import LeRobotDataset
features = {
    "observation.state": {"dtype": "float32", "shape": (2,), "names": ["episode", "frame"]},
    "observation.images.top": {"dtype": "video", "shape": (32, 48, 3), "names": ["height", "width", "channels"]},
    "action": {"dtype": "float32", "shape": (2,), "names": ["a", "b"]},
}
ds = LeRobotDataset.create("me/video", fps=15, root=sys.argv[1], features=features, use_videos=True)
for e in range(3):
    for t in range(5 + e):
        image = np.full((32, 48, 3), 100, np.uint8)
        image[..., 0], image[..., 1] = 20 + 40 * e, 10 + 8 * t
        ds.add_frame({"observation.state": np.array([e, t], np.float32), "observation.images.top": image,
                      "action": np.array([e, t], np.float32), "task": "pick the cube"})
    ds.save_episode()
ds.finalize()
"""


@pytest.fixture(scope="session")
def lerobot_python(tmp_path_factory):
    home = tmp_path_factory.mktemp("lerobot_venv")
    venv.create(home / "venv", system_site_packages=True, with_pip=True)  # this Python's CPU torch
    python = home / "venv" / "bin" / "python"
    for args in (["--no-deps", *LEROBOT], LOADER_DEPS):
        subprocess.run(
            [python, "-m", "pip", "install", "-q", *args], check=True, capture_output=True, timeout=900
        )
    shim = home / "shim" / "torchvision"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("from . import transforms  # noqa: F401\n")
    (shim / "transforms.py").write_text(TO_TENSOR)
    env = {
        **os.environ,
        "PYTHONPATH": str(home / "shim"),
        "HF_HUB_OFFLINE": "1",  # offline: a missing file must not turn into a download
        "HF_HOME": str(home / "hf"),
        "HF_LEROBOT_HOME": str(home / "lerobot"),
    }

    def run(script: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [python, "-c", script, *args], capture_output=True, text=True, env=env, timeout=600
        )

    return run


def test_lerobot_loads_the_export_offline(lerobot_python, tmp_path):
    with make_store(tmp_path / "s.zarr", episodes=3, cameras=("front",)) as store:
        flotilla("export", str(store.path), "format=lerobot", f"out={tmp_path / 'ds'}", "progress=false")
        steps = all_steps(store)
    indices = [0, 5, 12, 13, len(steps["action"]) - 1]
    result = lerobot_python(LOAD, str(tmp_path / "ds"), ",".join(map(str, indices)))
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert (got["len"], got["episodes"], got["fps"]) == (len(steps["action"]), 3, CONTROL_HZ)
    assert len(got["stats_q01"]) == 4
    state = np.concatenate([steps[k] for k in ("ee_pos", "gripper", "object_to_goal")], axis=1)
    ends = store.episode_ends
    for i, item in zip(indices, got["items"], strict=True):
        episode = int(np.searchsorted(ends, i, side="right"))
        first = int(ends[episode - 1]) if episode else 0
        np.testing.assert_array_equal(np.float32(item["observation.state"]), state[i])
        np.testing.assert_allclose(
            np.asarray(item["observation.images.front"]),
            steps["front_rgb"][i].transpose(2, 0, 1) / 255,
            atol=1e-6,
        )
        # delta_timestamps: this step's action and the next one (the last step's repeats, padded)
        following = min(i + 1, int(ends[episode]) - 1)
        np.testing.assert_array_equal(np.float32(item["action"]), steps["action"][[i, following]])
        assert item["action_is_pad"] == [False, i + 1 >= int(ends[episode])]
        assert item["control_label"] == steps["label"][i] and item["task"] == "push"
        assert (item["episode_index"], item["frame_index"], item["index"]) == (episode, i - first, i)
        assert item["timestamp"] == pytest.approx((i - first) / CONTROL_HZ)


def test_import_a_dataset_lerobot_wrote(lerobot_python, tmp_path):
    result = lerobot_python(WRITE, str(tmp_path / "made"))
    assert result.returncode == 0, result.stderr[-3000:]
    flotilla(
        "import", str(tmp_path / "made"), "format=lerobot", f"out={tmp_path / 's.zarr'}", "progress=false"
    )
    with EpisodeStore.open(tmp_path / "s.zarr") as store:
        assert store.num_episodes == 2 and store.episode_ends.tolist() == [5, 11]
        assert set(store.schema) == {"state", "top_rgb", "action", "label", "timestamp"}
        assert store.episode_meta(1).task == "pick the cube"
        rng = np.random.default_rng(0)  # the frames WRITE drew, in its order
        for e in range(2):
            episode = store.episode(e)
            for t in range(5 + e):
                np.testing.assert_array_equal(episode["state"][t], rng.normal(size=3).astype(np.float32))
                np.testing.assert_array_equal(episode["top_rgb"][t], rng.integers(0, 256, (16, 16, 3)))
                np.testing.assert_array_equal(episode["action"][t], rng.normal(size=2).astype(np.float32))
            labels = [ControlLabel.INTERVENTION if t > 2 else ControlLabel.ROBOT for t in range(5 + e)]
            assert episode["label"].tolist() == labels
            np.testing.assert_allclose(np.diff(episode["timestamp"]), 1 / 15)


def test_import_an_av1_video_dataset_lerobot_wrote(lerobot_python, tmp_path):
    result = lerobot_python(WRITE_VIDEO, str(tmp_path / "made"))
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((tmp_path / "made" / "meta" / "info.json").read_text())
    assert info["features"]["observation.images.top"]["info"]["video.codec"] == "av1"
    assert len(list((tmp_path / "made" / "videos").rglob("*.mp4"))) == 1  # the episodes share one file
    flotilla(
        "import", str(tmp_path / "made"), "format=lerobot", f"out={tmp_path / 's.zarr'}", "progress=false"
    )
    with EpisodeStore.open(tmp_path / "s.zarr") as store:
        assert store.episode_ends.tolist() == [5, 11, 18]
        for e in range(3):
            episode = store.episode(e)
            # Each episode's own frames (flat colours saying episode and frame), within AV1's error.
            red, green = (
                episode["top_rgb"][..., 0].mean(axis=(1, 2)),
                episode["top_rgb"][..., 1].mean(axis=(1, 2)),
            )
            assert np.round((red - 20) / 40).astype(int).tolist() == [e] * (5 + e)
            assert np.round((green - 10) / 8).astype(int).tolist() == list(range(5 + e))
            np.testing.assert_array_equal(episode["state"][:, 1], np.arange(5 + e))
