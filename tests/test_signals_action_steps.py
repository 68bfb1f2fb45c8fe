"""benchmarks.signals with another SafetyConfig.action_steps (--safety-action-steps).

The rollouts record each plan's candidate summaries at the width the safety models will read, so a
rollout made for another width must be refused (not fed to models of the wrong input size), and a fresh
rollout must record the width asked for, not SafetyConfig's default.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks.signals import cached_rollouts, run_rollouts, save_rollouts
from policies.checkpoint import read_config
from policies.safety.fit import Rollout

V1 = Path(__file__).resolve().parent / "fixtures" / "checkpoints_v1" / "diffusion"


def cache(folder: Path, width: int) -> None:
    rollout = Rollout(
        condition="normal",
        states=[torch.zeros(5)],
        candidates=[torch.zeros(3, width)],
        plan_steps=[0],
        choices=[0],
        uncertainty=[0.0],
        length=8,
        success=True,
    )
    save_rollouts(folder / "rollouts_calib_normal", [rollout])


def test_cached_rollouts_at_another_width_are_refused(tmp_path):
    cache(tmp_path, width=16)

    def never():
        raise AssertionError("a usable cache must not be rolled out again")

    assert len(cached_rollouts(tmp_path, "calib_normal", never, width=16)) == 1
    with pytest.raises(
        SystemExit, match=r"cached candidates are 16 wide, not 32 \(.*\): give --out another folder"
    ):
        cached_rollouts(tmp_path, "calib_normal", never, width=32)


def test_rollouts_record_candidates_at_the_width_asked_for(one_torch_thread):
    action_dim = read_config(V1)["shape_meta"]["action_dim"]
    for steps in (2, 4):  # the fixture executes 4 steps of each chunk; SafetyConfig's default is 4
        (rollout,) = run_rollouts(V1, "reach", "normal", [7], num_samples=3, action_steps=steps)
        assert rollout.candidates and {tuple(c.shape) for c in rollout.candidates} == {
            (3, steps * action_dim)
        }
    with pytest.raises(SystemExit, match="action_steps 5 exceeds the 4 steps it executes"):
        run_rollouts(V1, "reach", "normal", [7], num_samples=3, action_steps=5)
