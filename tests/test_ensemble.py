"""Policy ensembles: bagged training in the real trainer, one checkpoint, members' spread as uncertainty."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from fleet.store import EpisodeStore
from policies.checkpoint import CheckpointError, load_checkpoint, read_config, save_checkpoint
from policies.models import MLPPolicy, PolicyEnsemble, ShapeMeta, build_policy
from policies.models.ensemble import bootstrap_counts
from policies.runner import PolicyRunner
from policies.train import train
from tests import test_trainer

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")
TINY_MLP = [
    "task=push",
    "policy=mlp",
    "policy.hidden_dims=[32,32]",
    "policy.horizon=8",
    "policy.n_action_steps=4",
    "steps=60",
    "batch_size=8",
    "val_every=30",
    "checkpoint_every=60",
    "progress=false",
    "tensorboard=false",
    "threads=1",
]
META = ShapeMeta(obs={"ee_pos": (3,)}, action_dim=4, goal_dim=3)
# Tiny models on one thread (tests/conftest.py), and the six scripted push demos of the trainer tests.
pytestmark = pytest.mark.usefixtures("one_torch_thread")
demos = test_trainer.push_demos


def train_config(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=[*TINY_MLP, *overrides])


@pytest.fixture(scope="module")
def ensemble_checkpoint(demos, tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("run") / "ens"
    return train(train_config(f"data={demos}", f"out={out}", "ensemble=3"))


def first_obs(store_path) -> dict[str, np.ndarray]:
    return {key: value[0] for key, value in EpisodeStore.open(store_path).episode(0).items()}


def first_plan_inputs(policy, obs: dict[str, np.ndarray]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """What a runner feeds the policy on its first step: the first observation repeated To times, the goal."""
    history = {
        key: torch.from_numpy(np.stack([obs[key]] * policy.n_obs_steps))[None]
        for key in policy.shape_meta.obs
    }
    return history, torch.from_numpy(obs["goal"])[None]


def fitted(policy):
    rng = np.random.default_rng(0)
    policy.normalizer.fit(
        {
            "ee_pos": rng.uniform(0.2, 0.6, (64, 3)),
            "action": rng.uniform(-1, 1, (64, 4)),
            "goal": rng.uniform(0.2, 0.6, (64, 3)),
        }
    )
    return policy


def batch_of(size: int, horizon: int = 8) -> dict:
    gen = torch.Generator().manual_seed(0)
    return {
        "obs": {"ee_pos": torch.rand((size, 2, 3), generator=gen)},
        "goal": torch.rand((size, 3), generator=gen),
        "action": torch.rand((size, horizon, 4), generator=gen) * 2 - 1,
        "index": torch.arange(size),
    }


def test_ensemble_trains_into_one_checkpoint_and_members_differ(ensemble_checkpoint, demos):
    config = read_config(ensemble_checkpoint)
    assert config["ensemble"] == 3 and config["policy"]["kind"] == "mlp" and config["step"] == 60
    assert set(config["normalizer"]) >= {"stats.action.scale", "stats.ee_pos.offset"}  # stored once, as usual
    checkpoint = load_checkpoint(ensemble_checkpoint)
    policy = checkpoint.policy
    assert isinstance(policy, PolicyEnsemble) and policy.ensemble_size == 3
    assert all(member.normalizer is policy.normalizer for member in policy.members)
    assert policy.normalizer.is_fitted("action")
    batch, goal = first_plan_inputs(policy, first_obs(demos))
    with torch.inference_mode():
        chunks = [member.predict_action(batch, goal)[0, 0] for member in policy.members]
        samples = policy.predict_action(batch, goal, num_samples=6)[0]
    for i in range(3):
        for j in range(i + 1, 3):
            assert (chunks[i] - chunks[j]).abs().max() > 1e-3, f"members {i} and {j} predict the same chunk"
    for k in range(6):  # sample k is member k mod E's
        torch.testing.assert_close(samples[k], chunks[k % 3])


def test_resume_keeps_the_ensemble_and_rejects_another_size(ensemble_checkpoint, demos, tmp_path):
    resumed = train(
        train_config(
            f"data={demos}",
            f"out={tmp_path / 'resumed'}",
            "ensemble=3",
            f"resume={ensemble_checkpoint}",
            "steps=70",
            "checkpoint_every=70",
        )
    )
    config = read_config(resumed)
    assert config["step"] == 70 and config["ensemble"] == 3
    with pytest.raises(CheckpointError, match="ensemble 3 cannot resume a run with ensemble=2"):
        train(
            train_config(
                f"data={demos}", f"out={tmp_path / 'x'}", "ensemble=2", f"resume={ensemble_checkpoint}"
            )
        )


def test_runner_reports_the_members_spread_for_an_mlp_ensemble(ensemble_checkpoint, demos):
    obs = first_obs(demos)
    policy = load_checkpoint(ensemble_checkpoint).policy
    alone = PolicyRunner.from_checkpoint(ensemble_checkpoint)
    runner = PolicyRunner.from_checkpoint(ensemble_checkpoint, num_samples=2)
    assert runner.num_samples == 3  # raised to the ensemble size: every member gets a say
    action = runner.act(obs)
    assert runner.uncertainty > 1e-4
    # The executed action is member 0's, with or without the spread being measured.
    np.testing.assert_allclose(action, alone.act(obs), atol=1e-6)
    assert alone.uncertainty == 0.0
    # The spread uses the runner's normalization: std over members of normalized executed actions / 2.
    with torch.inference_mode():
        chunks = policy.predict_action(*first_plan_inputs(policy, obs), num_samples=3)[0, :, 1:5]
    expected = float(policy.normalizer.normalize("action", chunks).std(dim=0).mean() / 2)
    assert runner.uncertainty == pytest.approx(expected, rel=1e-5)
    # One deterministic mlp has no spread at all, however many samples it is asked for.
    single = PolicyRunner(policy.members[0], num_samples=4)
    single.act(obs)
    assert single.uncertainty == 0.0


def test_bad_ensemble_sizes_are_rejected_naming_the_key(demos, tmp_path):
    for bad in (0, -2, 2.5, "3", True):
        with pytest.raises(ValueError, match=r"ensemble must be an integer >= 1"):
            build_policy("mlp", META, ensemble=bad)
    with pytest.raises(ValueError, match=r"ensemble: must be an integer >= 1, got 0"):
        train(train_config(f"data={demos}", f"out={tmp_path / 'zero'}", "ensemble=0"))
    assert not (tmp_path / "zero").exists()


def test_checkpoints_whose_ensemble_size_mismatches_the_weights_are_rejected(ensemble_checkpoint, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(ensemble_checkpoint, broken)
    config = json.loads((broken / "config.json").read_text())
    for value, message in (
        (2, "says ensemble 2 but the weights hold 3"),
        (0, "ensemble must be an integer"),
        ("x", "ensemble must be an integer"),
    ):
        (broken / "config.json").write_text(json.dumps({**config, "ensemble": value}))
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(broken)
    del config["ensemble"]  # an old-style config over ensemble weights
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="says ensemble 1 but the weights hold 3"):
        load_checkpoint(broken)


def test_old_checkpoints_without_the_key_load_as_a_single_policy(tmp_path):
    torch.manual_seed(0)
    policy = fitted(build_policy("mlp", META, horizon=8, n_action_steps=4, hidden_dims=(16,)))
    folder = save_checkpoint(tmp_path / "old", policy, META, "old-v1")
    config = json.loads((folder / "config.json").read_text())
    assert config["ensemble"] == 1
    del config["ensemble"]
    (folder / "config.json").write_text(json.dumps(config))
    loaded = load_checkpoint(folder).policy
    assert isinstance(loaded, MLPPolicy)
    batch = batch_of(2)
    with torch.inference_mode():
        torch.testing.assert_close(
            loaded.predict_action(batch["obs"], batch["goal"]),
            policy.eval().predict_action(batch["obs"], batch["goal"]),
        )


def test_bagging_weights_are_fixed_per_member_and_sample():
    index = np.arange(20000)
    counts = [bootstrap_counts(7, member, index) for member in range(3)]
    np.testing.assert_array_equal(counts[0], bootstrap_counts(7, 0, index))  # the same every epoch
    assert abs(counts[0].mean() - 1) < 0.03 and abs((counts[0] == 0).mean() - np.exp(-1)) < 0.02  # Poisson(1)
    assert (counts[0] != counts[1]).mean() > 0.5 and (counts[0] != bootstrap_counts(8, 0, index)).mean() > 0.5

    torch.manual_seed(0)
    ensemble = fitted(build_policy("mlp", META, ensemble=3, horizon=8, n_action_steps=4, hidden_dims=(16,)))
    batch = batch_of(16)
    member_losses = torch.stack([member.compute_loss(batch) for member in ensemble.members])
    weights = torch.from_numpy(np.stack([bootstrap_counts(0, i, np.arange(16)) for i in range(3)]))
    torch.testing.assert_close(ensemble.train().compute_loss(batch), (member_losses * weights).mean(0))
    torch.testing.assert_close(
        ensemble.eval().compute_loss(batch), member_losses.mean(0)
    )  # validation: no bagging


def test_diffusion_ensemble_executes_member_zero_and_spreads_samples_over_members():
    torch.manual_seed(0)
    ensemble = fitted(
        build_policy(
            "diffusion",
            META,
            ensemble=2,
            horizon=8,
            n_action_steps=4,
            down_dims=(8, 16),
            num_inference_steps=2,
        )
    ).eval()
    first, second = ensemble.members
    assert any((a - b).abs().max() > 0 for a, b in zip(first.parameters(), second.parameters(), strict=True))
    batch = batch_of(1)
    with torch.inference_mode():
        one = ensemble.predict_action(batch["obs"], batch["goal"], generator=torch.Generator().manual_seed(3))
        alone = first.predict_action(batch["obs"], batch["goal"], generator=torch.Generator().manual_seed(3))
        many = ensemble.predict_action(batch["obs"], batch["goal"], num_samples=5)
    torch.testing.assert_close(one, alone)
    assert one.shape == (1, 1, 8, 4) and many.shape == (1, 5, 8, 4)
    runner = PolicyRunner(ensemble, num_samples=4)
    runner.act({"ee_pos": np.full(3, 0.4, np.float32)}, goal=np.full(3, 0.4, np.float32))
    assert runner.uncertainty > 0.0


def test_ensemble_trains_under_ddp_on_two_cpu_processes(demos, tmp_path):
    out = tmp_path / "ddp"
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_port=29537",
            "-m",
            "policies.train",
            f"data={demos}",
            f"out={out}",
            *TINY_MLP,
            "steps=20",
            "ensemble=2",
        ],
        cwd=root,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(root)},
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    config = read_config(out / "checkpoints" / "latest")
    assert config["ensemble"] == 2 and config["step"] == 20
    assert load_checkpoint(out / "checkpoints" / "latest").policy.ensemble_size == 2
