"""The `flotilla` command end to end: real subprocesses, real pybullet, a real store on disk."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from fleet.store import EpisodeStore

ROOT = Path(__file__).resolve().parents[1]


def flotilla(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flotilla.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=check,
        timeout=600,
    )


def test_help_lists_every_job_with_a_summary():
    out = flotilla("--help").stdout
    for job in ("collect", "info"):
        line = next(line for line in out.splitlines() if line.strip().startswith(job + " "))
        assert len(line.split(maxsplit=1)[1]) > 10


def test_unknown_job_is_refused():
    result = flotilla("fly", check=False)
    assert result.returncode == 2 and "unknown job 'fly'" in result.stderr


def test_collect_with_cameras_then_info(tmp_path):
    out = tmp_path / "reach.zarr"
    flotilla("collect", "task=reach", "episodes=3", f"out={out}", "cameras=true", "progress=false")
    store = EpisodeStore.open(out)
    assert store.num_episodes == 3
    assert all(store.episode_meta(i).success for i in range(3))
    assert set(np.unique(store.labels())) == {0}  # every step is a demo
    frames = store.episode(0, keys=["front_rgb"])["front_rgb"]
    assert frames.dtype == np.uint8 and frames.shape[1:] == (96, 96, 3) and frames.std() > 1.0

    # A second run appends to the same store.
    flotilla(
        "collect", "task=reach", "episodes=2", f"out={out}", "cameras=true", "progress=false", "seed=100"
    )
    summary = json.loads(flotilla("info", str(out), "json=true").stdout)
    assert summary["episodes"] == 5 and summary["labels"]["demo"] == summary["steps"]
    assert summary["success_rate"] == 1.0 and summary["tasks"] == {"reach": 5}


def test_collect_is_reproducible_for_a_seed(tmp_path):
    for name in ("a", "b"):
        flotilla("collect", "task=push", "episodes=2", f"out={tmp_path / name}", "progress=false", "seed=5")
    a, b = EpisodeStore.open(tmp_path / "a"), EpisodeStore.open(tmp_path / "b")
    np.testing.assert_array_equal(a.episode_ends, b.episode_ends)
    for key in ("action", "object_pos", "goal"):
        np.testing.assert_array_equal(a.episode(1)[key], b.episode(1)[key])


def test_bad_config_values_get_clear_errors(tmp_path):
    result = flotilla("collect", "task=fly", f"out={tmp_path / 'x'}", check=False)
    assert result.returncode != 0 and "task/fly" in result.stderr
    result = flotilla("collect", "episodes=-3", f"out={tmp_path / 'x'}", check=False)
    assert (
        result.returncode == 2
        and result.stderr.strip() == "flotilla collect: episodes: must be an integer >= 1, got -3"
    )
    result = flotilla(
        "collect",
        "task=reach",
        "episodes=1",
        "cameras=true",
        f"out={tmp_path / 'y'}",
        "progress=false",
        check=True,
    )
    # Appending low-dim-only episodes to a store recorded with cameras names the missing key.
    result = flotilla(
        "collect", "task=reach", "episodes=1", f"out={tmp_path / 'y'}", "progress=false", check=False
    )
    assert result.returncode != 0 and "front_rgb" in result.stderr
    assert EpisodeStore.open(tmp_path / "y").num_episodes == 1  # nothing saved was lost
    result = flotilla("info", str(tmp_path / "missing"), check=False)
    assert result.returncode != 0 and "does not exist" in result.stderr


def test_a_reader_that_closes_stdout_ends_the_job_quietly(tmp_path):
    """`flotilla info X | head`, `flotilla demo --cfg job | head`: no traceback once the reader has gone."""
    store = EpisodeStore.open(tmp_path / "s.zarr", mode="a")
    episode = store.begin_episode("robot-0", "reach")
    episode.append({"ee_pos": np.zeros(3, np.float32)}, np.zeros(4, np.float32), "robot")
    episode.commit(success=True)
    for args in (["info", str(tmp_path / "s.zarr")], ["demo", "--cfg", "job"]):
        job = subprocess.Popen(
            [sys.executable, "-m", "flotilla.cli", *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        job.stdout.close()  # before the job writes: its first write finds the pipe closed
        stderr = job.stderr.read()
        assert job.wait(timeout=120) == 141 and stderr == "", (args, stderr)
