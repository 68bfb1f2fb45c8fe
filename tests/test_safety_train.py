"""`flotilla safety`: safety models from a checkpoint's demos and logged episodes, saved into it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fleet.labels import ControlLabel
from fleet.store import EpisodeStore
from policies.checkpoint import load_checkpoint
from policies.runner import PolicyRunner
from policies.safety.filter import FilterConfig
from policies.safety.models import SAFETY_JSON
from policies.safety.train import logged_rollouts

V1 = Path(__file__).resolve().parent / "fixtures" / "checkpoints_v1" / "diffusion"
ROOT = Path(__file__).resolve().parent.parent
LENGTH = 20

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_store(path: Path, episodes: list[dict]) -> Path:
    """Reach-shaped episodes: each dict gives label, success and optionally takeover/violation steps."""
    rng = np.random.default_rng(len(episodes))
    with EpisodeStore.create(path, overwrite=True) as store:
        for spec in episodes:
            episode = store.begin_episode("arm-1", "reach")
            goal = rng.uniform(0.3, 0.5, 3).astype(np.float32)
            for t in range(LENGTH):
                label = spec["label"]
                if t >= spec.get("takeover", LENGTH):
                    label = ControlLabel.INTERVENTION
                violation = float(t >= spec.get("violation", LENGTH))
                episode.append(
                    {"ee_pos": rng.uniform(0.3, 0.5, 3).astype(np.float32)},
                    rng.uniform(-1, 1, 4).astype(np.float32),
                    label,
                    goal=goal,
                    signals={
                        "uncertainty": 0.0,
                        "risk": 0.0,
                        "density": 0.0,
                        "constraint_violation": violation,
                    },
                )
            episode.commit(spec["success"])
    return path


@pytest.fixture
def stores(tmp_path):
    demos = write_store(tmp_path / "demos.zarr", [{"label": ControlLabel.DEMO, "success": True}] * 6)
    logged = [{"label": ControlLabel.ROBOT, "success": i % 2 == 0} for i in range(10)]
    logged[1]["takeover"] = 9  # a human took over at step 9
    logged[3]["violation"] = 13
    fleet = write_store(tmp_path / "fleet.zarr", logged + [{"label": ControlLabel.DEMO, "success": True}])
    return demos, fleet


def test_logged_episodes_become_the_policys_rollouts(stores):
    policy = load_checkpoint(V1).policy
    rollouts = logged_rollouts(policy, load_checkpoint(V1).action_space, [str(stores[1])], 4, num_samples=3)
    assert len(rollouts) == 10  # the demo episode is left out
    takeover, violation = rollouts[1], rollouts[3]
    assert takeover.length == 9 and not takeover.success and takeover.failure_step == 9
    assert violation.violation_step == 13 and violation.failure_step == 13
    assert [r.success for r in rollouts] == [i % 2 == 0 for i in range(10)]
    assert takeover.plan_steps == [0, 4, 8] and all(c.shape == (3, 16) for c in takeover.candidates)


def flotilla_safety(stores, tmp_path, train_steps: int, *settings: str):
    """`flotilla safety` on a copy of the format-1 diffusion checkpoint: (its folder, the finished run)."""
    checkpoint = tmp_path / "diffusion"
    shutil.copytree(V1, checkpoint)
    demos, fleet = stores
    steps = [f"model.{key}={train_steps}" for key in ("flow_steps", "rnd_steps", "risk_steps", "ldm_steps")]
    result = subprocess.run(
        [sys.executable, "-m", "flotilla.cli", "safety", f"checkpoint={checkpoint}", f"data=[{fleet}]"]
        + [f"demos=[{demos}]", *settings, *steps],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return checkpoint, result


def test_flotilla_safety_trains_calibrates_and_saves_into_the_checkpoint(stores, tmp_path):
    checkpoint, result = flotilla_safety(
        stores, tmp_path, 30, "model.hidden=16", "num_samples=3", "calibration_ratio=0.5"
    )
    assert "calibrated on 2" in result.stdout  # half of the 5 successful episodes, rounded
    assert "warning" not in result.stderr
    meta = json.loads((checkpoint / SAFETY_JSON).read_text())
    assert meta["models"] == ["flow", "ldm", "risk", "rnd"]
    assert set(meta["thresholds"]) == {"uncertainty", "novelty", "rnd", "risk", "ldm", "agree"}
    assert set(meta["filter_thresholds"]) == {"novelty", "ldm"}
    assert set(meta["nominal"]) == {"uncertainty", "novelty", "rnd", "risk", "ldm"}
    runner = PolicyRunner.from_checkpoint(checkpoint, num_samples=4, safety_filter=FilterConfig(mode="ldm"))
    runner.act({"ee_pos": np.full(3, 0.4, np.float32), "goal": np.full(3, 0.4, np.float32)})
    assert runner.signals["filter"] in ("pass", "switched", "hold")


def test_a_bad_setting_is_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "flotilla.cli", "safety", f"checkpoint={tmp_path}", "models=[flow,magic]"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("flotilla safety: models: must be one of")


def test_a_single_held_out_success_still_calibrates(stores, tmp_path):
    # One successful episode held out (0.2 of 5): time-varying thresholds need two halves of the episodes,
    # so they are constant here rather than the job failing after training.
    from policies.safety.config import SafetyConfig, SafetyJobConfig
    from policies.safety.train import fit_checkpoint

    checkpoint = tmp_path / "diffusion"
    shutil.copytree(V1, checkpoint)
    demos, fleet = stores
    model = SafetyConfig(hidden=16, flow_steps=20, rnd_steps=20, risk_steps=20, ldm_steps=20)
    config = SafetyJobConfig(
        checkpoint=str(checkpoint),
        data=[str(fleet)],
        demos=[str(demos)],
        model=model,
        models=["flow", "risk"],
        num_samples=3,
        calibration_ratio=0.2,
    )
    assert fit_checkpoint(config)["calibration_episodes"] == 1
    thresholds = json.loads((checkpoint / SAFETY_JSON).read_text())["thresholds"]
    assert {name: len(t["thresholds"]) for name, t in thresholds.items()} == dict.fromkeys(thresholds, 1)
    assert {"uncertainty", "novelty", "risk"} <= set(thresholds)


def test_flotilla_safety_without_calibration_episodes_warns_that_no_threshold_was_set(stores, tmp_path):
    _, result = flotilla_safety(
        stores, tmp_path, 5, "model.hidden=8", "num_samples=2", "calibration_ratio=0.05"
    )
    assert "calibrated on 0" in result.stdout  # 5% of 5 successful episodes rounds to none
    assert "warning: no successful episode to calibrate on" in result.stderr
