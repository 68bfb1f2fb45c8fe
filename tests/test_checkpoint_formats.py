"""Checkpoints written by older code keep loading and acting the same (tests/fixtures/checkpoints_v1), and
today's format (2) stores the typed policy config."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest

from policies.checkpoint import FORMAT_VERSION, load_checkpoint, read_config, save_checkpoint
from policies.models.configs import EncoderConfig, GCDiffusionConfig, MLPConfig
from policies.runner import PolicyRunner

V1 = Path(__file__).resolve().parent / "fixtures" / "checkpoints_v1"
RECORD = json.loads((V1 / "expected.json").read_text())
CASES = sorted(RECORD["expected"])


pytestmark = pytest.mark.usefixtures("one_torch_thread")


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


def test_format1_configs_read_as_the_typed_policy_config():
    config = read_config(V1 / "mlp_images")
    assert config["format"] == 1 and "policy_config" not in config
    assert config["policy"]["encoder"] == {
        "feature_dim": 8,
        "channels": [4, 8],
        "blocks_per_stage": 1,
        "num_keypoints": 4,
        "crop_ratio": 0.75,
    }
    policy = load_checkpoint(V1 / "mlp_images").policy
    assert policy.config == MLPConfig(
        horizon=8,
        n_action_steps=4,
        hidden_dims=[16, 16],
        encoder=EncoderConfig(feature_dim=8, channels=[4, 8], num_keypoints=4, crop_ratio=0.75),
    )


@pytest.mark.parametrize("name", CASES)
def test_resaved_in_format2_they_hold_the_typed_config_and_act_the_same(name, tmp_path):
    old = load_checkpoint(V1 / name)
    folder = save_checkpoint(
        tmp_path / name,
        old.policy,
        old.shape_meta,
        old.version,
        old.action_space,
        training=old.config.get("training"),
        step=old.config.get("step", 0),
    )
    written = json.loads((folder / "config.json").read_text())
    assert written["format"] == FORMAT_VERSION == 2
    assert written["policy"] == old.policy.config.to_dict() and written["policy"]["kind"] == old.policy.kind
    assert "policy_config" not in written and "kind" not in written
    actions, uncertainty = act_through(folder, 4)
    expected = RECORD["expected"][name]["num_samples_4"]
    np.testing.assert_allclose(np.stack(actions), np.asarray(expected["actions"]), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(uncertainty, expected["uncertainty"], rtol=1e-4, atol=1e-6)


def test_inference_settings_changed_after_loading_are_what_a_checkpoint_keeps(tmp_path):
    checkpoint = load_checkpoint(V1 / "gc_diffusion")
    policy = checkpoint.policy
    policy.num_inference_steps, policy.sampler, policy.cfg_weight = 5, "dpmpp_2m", 0.0
    assert isinstance(policy.config, GCDiffusionConfig)
    assert (policy.config.num_inference_steps, policy.config.sampler, policy.config.cfg_weight) == (
        5,
        "dpmpp_2m",
        0.0,
    )
    folder = save_checkpoint(tmp_path / "gc", policy, checkpoint.shape_meta, "gc-v2", checkpoint.action_space)
    assert load_checkpoint(folder).policy.config == policy.config
