"""Checkpoints written by older code keep loading and acting the same, and today's format (2) stores the
typed policy config.

- format 1 (tests/fixtures/checkpoints_v1, commit 86962a3): before the typed configs;
- format 2 (tests/fixtures/checkpoints_v2, commit 0c2d448, the last release): diffusion with safety
  models, gc_diffusion, a diffusion policy with a camera, a gc_diffusion ensemble, and a registry folder
  holding a published mlp, each with what the old runner did on the same six observations."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fleet.client import fetch_checkpoint, list_policies
from policies.checkpoint import FORMAT_VERSION, load_checkpoint, read_config, save_checkpoint
from policies.models.configs import EncoderConfig, GCDiffusionConfig, MLPConfig
from policies.runner import PolicyRunner
from policies.safety.filter import FilterConfig

FIXTURES = Path(__file__).resolve().parent / "fixtures"
V1, V2 = FIXTURES / "checkpoints_v1", FIXTURES / "checkpoints_v2"
RECORD = json.loads((V1 / "expected.json").read_text())
RECORD_V2 = json.loads((V2 / "expected.json").read_text())
INPUTS = RECORD["inputs"]  # format 2's checkpoints acted on format 1's observations
REGISTRY_VERSION = "mlp-v2"
CASES = sorted(RECORD["expected"])
# (format, name, folder, what it did when written)
WRITTEN = [(1, name, V1 / name, RECORD["expected"][name]) for name in CASES] + [
    (2, name, V2 / "registry" / REGISTRY_VERSION if name == "registry" else V2 / name, expected)
    for name, expected in sorted(RECORD_V2["expected"].items())
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def observation(frame: dict) -> dict[str, np.ndarray]:
    obs = {}
    for key, value in frame.items():
        if isinstance(value, dict):
            obs[key] = np.frombuffer(base64.b64decode(value["uint8_b64"]), np.uint8).reshape(value["shape"])
        else:
            obs[key] = np.asarray(value, np.float32)
    return obs


def act_through(path: Path, num_samples: int, **runner_options) -> dict:
    """What the runner does on the six observations: actions, uncertainty and, with safety models, each
    plan's signals and every candidate's scores (the record's shape)."""
    runner = PolicyRunner.from_checkpoint(
        path, num_samples=num_samples, noise_seed=RECORD["noise_seed"], **runner_options
    )
    out = {"actions": [], "uncertainty": []}
    for frame in INPUTS:
        out["actions"].append(runner.act(observation(frame)))
        out["uncertainty"].append(runner.uncertainty)
        if runner.safety is not None:
            out.setdefault("signals", []).append(dict(runner.signals))
            out.setdefault("scores", []).append({k: v.tolist() for k, v in runner.safety.last.scores.items()})
    return out


def assert_acts_as_recorded(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    np.testing.assert_allclose(
        np.stack(got["actions"]), np.asarray(expected["actions"]), rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(got["uncertainty"], expected["uncertainty"], rtol=1e-4, atol=1e-6)
    for key in ("signals", "scores"):
        for step, (now, then) in enumerate(zip(got.get(key, []), expected.get(key, []), strict=True)):
            assert now.keys() == then.keys(), (key, step)
            for name, value in then.items():
                if isinstance(value, str):  # the filter's decision
                    assert now[name] == value, (key, step, name)
                else:
                    np.testing.assert_allclose(
                        now[name], value, rtol=1e-4, atol=1e-5, err_msg=f"{key} {step} {name}"
                    )


@pytest.mark.parametrize(
    ("format_version", "name", "path", "expected"), WRITTEN, ids=[f"v{w[0]}-{w[1]}" for w in WRITTEN]
)
@pytest.mark.parametrize("num_samples", [1, 4])
def test_old_checkpoints_load_and_act_as_when_written(format_version, name, path, expected, num_samples):
    assert read_config(path)["format"] == format_version
    assert_acts_as_recorded(act_through(path, num_samples), expected[f"num_samples_{num_samples}"])


@pytest.mark.parametrize("name", sorted(RECORD_V2["safety_filter"]))
def test_format2_safety_models_filter_as_when_written(name):
    """The calibrated LDM bound passed candidate 0 at each plan; a density bound of 500 held at the first
    plan and switched candidates at the second (the decisions, signals and scores are in the record)."""
    record = RECORD_V2["safety_filter"][name]
    got = act_through(V2 / "diffusion", 4, safety_filter=FilterConfig(**record["settings"]))
    assert_acts_as_recorded(got, record["num_samples_4"])


def test_a_registry_written_by_the_last_release_serves_its_version(make_server, tmp_path):
    """A server started on it serves the version (files as published, acting as recorded, safety signals
    included) and takes the allocator's request thresholds from the version's own calibration."""
    registry = tmp_path / "registry"
    shutil.copytree(V2 / "registry", registry)
    server = make_server(registry_dir=str(registry))
    published = V2 / "registry" / REGISTRY_VERSION
    calibrated = json.loads((published / "safety.json").read_text())["thresholds"]
    allocator = server.server.fleet.allocator
    assert allocator.risk.schedule.thresholds == calibrated["risk"]["thresholds"]
    assert allocator.uncertainty.schedule.thresholds == calibrated["uncertainty"]["thresholds"]
    versions = list_policies(server.address, "robot-token")
    assert (list(versions.versions), versions.latest, list(versions.damaged)) == (
        [REGISTRY_VERSION],
        REGISTRY_VERSION,
        [],
    )
    fetched = fetch_checkpoint(server.address, "robot-token", tmp_path / "fetched")
    assert sorted(p.name for p in fetched.iterdir()) == sorted(p.name for p in published.glob("[!.]*"))
    assert all(p.read_bytes() == (published / p.name).read_bytes() for p in fetched.iterdir())
    assert load_checkpoint(fetched).version == REGISTRY_VERSION
    assert_acts_as_recorded(act_through(fetched, 4), RECORD_V2["expected"]["registry"]["num_samples_4"])


@pytest.mark.parametrize(("folder", "version"), [(V1, "v1"), (V2, "v2")], ids=["v1", "v2"])
def test_old_checkpoints_keep_their_version_and_settings(folder, version):
    checkpoint = load_checkpoint(folder / "gc_diffusion")
    assert checkpoint.version == f"gc_diffusion-{version}" and checkpoint.action_space.kind == "target"
    assert checkpoint.policy.cfg_weight == 0.5 and checkpoint.policy.horizon == 8
    ensemble = "mlp_ensemble" if version == "v1" else "gc_ensemble"
    assert load_checkpoint(folder / ensemble).policy.ensemble_size == 2
    diffusion = load_checkpoint(folder / "diffusion")
    assert diffusion.policy.num_inference_steps == 4 and diffusion.action_space.kind == "delta"


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
    assert_acts_as_recorded(act_through(folder, 4), RECORD["expected"][name]["num_samples_4"])


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


def test_eval_renders_the_cameras_at_the_size_the_policy_was_trained_on():
    """mlp_images was trained on 24x24 frames; the sim's default is larger. Eval renders at the policy's
    size; a different size asked for is one config error naming both (was a shape traceback)."""
    from configs.schema import ConfigError
    from sim.evaluate import evaluate

    result = evaluate(V1 / "mlp_images", "reach", episodes=1, max_steps=3, progress=False, device="cpu")
    assert result["episodes"] == 1
    with pytest.raises(ConfigError, match=r"task\.env\.image_size.*32.*trained on 24x24"):
        evaluate(V1 / "mlp_images", "reach", 1, max_steps=3, env_kwargs={"image_size": 32}, progress=False)
