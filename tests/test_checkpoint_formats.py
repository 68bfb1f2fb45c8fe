"""Checkpoints written by older code keep loading and acting the same (tests/fixtures/checkpoints_v1)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from policies.checkpoint import load_checkpoint
from policies.runner import PolicyRunner

V1 = Path(__file__).resolve().parent / "fixtures" / "checkpoints_v1"
RECORD = json.loads((V1 / "expected.json").read_text())
CASES = sorted(RECORD["expected"])


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def observation(frame: dict) -> dict[str, np.ndarray]:
    obs = {}
    for key, value in frame.items():
        if isinstance(value, dict):
            obs[key] = np.frombuffer(base64.b64decode(value["uint8_b64"]), np.uint8).reshape(value["shape"])
        else:
            obs[key] = np.asarray(value, np.float32)
    return obs


def act_through(path: Path, num_samples: int) -> tuple[list[np.ndarray], list[float]]:
    runner = PolicyRunner.from_checkpoint(path, num_samples=num_samples, noise_seed=RECORD["noise_seed"])
    actions, uncertainty = [], []
    for frame in RECORD["inputs"]:
        actions.append(runner.act(observation(frame)))
        uncertainty.append(runner.uncertainty)
    return actions, uncertainty


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("num_samples", [1, 4])
def test_format1_checkpoints_load_and_act_as_when_written(name, num_samples):
    assert json.loads((V1 / name / "config.json").read_text())["format"] == 1
    actions, uncertainty = act_through(V1 / name, num_samples)
    expected = RECORD["expected"][name][f"num_samples_{num_samples}"]
    np.testing.assert_allclose(np.stack(actions), np.asarray(expected["actions"]), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(uncertainty, expected["uncertainty"], rtol=1e-4, atol=1e-6)


def test_format1_checkpoints_keep_their_version_and_settings():
    checkpoint = load_checkpoint(V1 / "gc_diffusion")
    assert checkpoint.version == "gc_diffusion-v1" and checkpoint.action_space.kind == "target"
    assert checkpoint.policy.cfg_weight == 0.5 and checkpoint.policy.horizon == 8
    assert load_checkpoint(V1 / "mlp_ensemble").policy.ensemble_size == 2
    assert load_checkpoint(V1 / "diffusion").policy.num_inference_steps == 4
