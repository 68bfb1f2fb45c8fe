"""benchmarks.policy_results: per-policy training steps and reusing checkpoints trained for the same run."""

import json

import pytest

from benchmarks.policy_results import parse_policy_steps, trained_checkpoint


def test_policy_steps_default_and_overrides():
    steps = parse_policy_steps(["diffusion=12000"], ["mlp", "diffusion"], 3000)
    assert steps == {"mlp": 3000, "diffusion": 12000}


@pytest.mark.parametrize(
    "pair, problem",
    [
        ("diffusion", "POLICY=STEPS"),
        ("mlp=-5", "positive"),
        ("mlp=lots", "positive"),
        ("transformer=100", "not among"),
    ],
)
def test_policy_steps_bad_pairs_are_named(pair, problem):
    with pytest.raises(SystemExit, match=problem):
        parse_policy_steps([pair], ["mlp", "diffusion"], 3000)


def write_checkpoint_config(run_dir, step, store):
    latest = run_dir / "checkpoints" / "latest"
    latest.mkdir(parents=True)
    (latest / "config.json").write_text(json.dumps({"step": step, "training": {"stores": [store]}}))
    return latest


def test_reuses_only_a_checkpoint_of_the_same_steps_and_demos(tmp_path):
    data = tmp_path / "push_50_demos.zarr"
    latest = write_checkpoint_config(tmp_path / "push_50_mlp", 3000, "elsewhere/push_50_demos.zarr")
    assert trained_checkpoint(tmp_path / "push_50_mlp", 3000, data) == latest
    assert trained_checkpoint(tmp_path / "push_50_mlp", 12000, data) is None
    assert trained_checkpoint(tmp_path / "push_50_mlp", 3000, tmp_path / "push_200_demos.zarr") is None
    assert trained_checkpoint(tmp_path / "never_trained", 3000, data) is None
