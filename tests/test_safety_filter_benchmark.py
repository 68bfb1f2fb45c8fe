"""The safety-filter benchmark's bookkeeping: its per-cell figures and the policy it reuses.

benchmarks.safety_filter reports violations per 100 episodes with a binomial standard error, and
benchmarks.signals reuses a cached checkpoint only when it predicts the actions asked for (a delta-action
run, the condition with violations, must not silently reuse a target-action policy or the reverse).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from benchmarks.safety_filter import summary
from benchmarks.signals import prepare_checkpoint
from policies.safety.fit import Rollout

V1 = Path(__file__).resolve().parent / "fixtures" / "checkpoints_v1" / "diffusion"  # delta actions


def test_summary_counts_violations_holds_and_their_spread():
    rollouts = [
        Rollout(choices=[0, -1, 2], length=30, success=False, violation_step=20),
        Rollout(choices=[0, 0], length=12, success=True),
        Rollout(choices=[-1, -1, 0], length=40, success=False),
        Rollout(choices=[1], length=10, success=True),
    ]
    row = summary(rollouts)
    assert row["episodes"] == 4
    assert row["success"] == 0.5 and row["success_se"] == pytest.approx(np.sqrt(0.25 / 4))
    assert row["violations_per_100"] == 25.0
    assert row["violations_se"] == pytest.approx(100 * np.sqrt(0.25 * 0.75 / 4))
    assert row["held"] == pytest.approx(3 / 9)
    assert row["length"] == 23.0


@pytest.fixture
def cached_run(tmp_path) -> Path:
    """A benchmark folder whose cached demos and checkpoint (the v1 fixture, trained 12 steps on delta
    actions) match `prepare_checkpoint(out, "reach", 3, 12, ...)`, so nothing is collected or trained."""
    (tmp_path / "reach_3_demos.zarr").mkdir()
    (tmp_path / "reach_3_demos.zarr" / "zarr.json").write_text("{}")
    checkpoint = tmp_path / "reach_3_diffusion" / "checkpoints" / "latest"
    shutil.copytree(V1, checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    config["training"]["stores"] = [str(tmp_path / "reach_3_demos.zarr")]
    (checkpoint / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_a_cached_checkpoint_is_reused_only_for_its_own_action_space(cached_run):
    checkpoint = prepare_checkpoint(cached_run, "reach", 3, 12, action_space="delta")
    assert checkpoint == cached_run / "reach_3_diffusion" / "checkpoints" / "latest"
    with pytest.raises(SystemExit, match="predicts delta actions, not target: give --out another folder"):
        prepare_checkpoint(cached_run, "reach", 3, 12, action_space="target")
