"""The trainer, checkpoints, inference runner and eval, end to end on real scripted demos."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fleet.store import EpisodeStore
from policies.action_space import ActionSpace
from policies.checkpoint import CheckpointError, load_checkpoint, read_config
from policies.models.factory import ShapeMeta
from policies.runner import PolicyRunner
from sim.collect import collect_demos
from tests.test_cli import flotilla  # the real CLI in a subprocess

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "policy.down_dims=[16,32,64]",
    "steps=30",
    "batch_size=16",
    "val_every=15",
    "checkpoint_every=15",
    "progress=false",
    "tensorboard=false",
    "threads=1",
]


@pytest.fixture(scope="module")
def push_demos(tmp_path_factory):
    path = tmp_path_factory.mktemp("demos") / "push.zarr"
    with EpisodeStore.create(path) as store:
        collect_demos(store, "push", episodes=6, seed=0, progress=False)
    return path


@pytest.fixture(scope="module")
def trained(push_demos, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "diff"
    flotilla("train", f"data={push_demos}", f"out={out}", *TINY)
    return out / "checkpoints" / "latest"


def test_checkpoint_holds_config_normalizer_and_training_summary(trained, push_demos):
    config = read_config(trained)
    assert config["format"] == 2 and config["policy"]["kind"] == "diffusion" and config["step"] == 30
    assert config["training"]["episodes"] == 6 and config["training"]["weighting"] == "sirius"
    assert set(config["normalizer"]) >= {"stats.action.scale", "stats.goal.offset"}
    assert sorted(os.listdir(trained)) == [
        "config.json",
        "model.safetensors",
        "trainer.json",
        "trainer.safetensors",
    ]
    checkpoint = load_checkpoint(trained)
    assert checkpoint.version == config["version"] and checkpoint.shape_meta.goal_dim == 2
    # The loaded normalizer is the fitted one: the demos' end-effector targets map into [-1, 1].
    assert checkpoint.action_space.kind == "target"
    episode = EpisodeStore.open(push_demos).episode(0)
    targets = checkpoint.action_space.to_policy(episode["action"], episode["ee_pos"])
    normalized = checkpoint.policy.normalizer.normalize("action", torch.from_numpy(targets))
    assert normalized.abs().max() <= 1.0 + 1e-5


def test_resume_continues_from_the_saved_step(trained, push_demos, tmp_path):
    out = tmp_path / "resumed"
    result = flotilla("train", f"data={push_demos}", f"out={out}", f"resume={trained}", *TINY, "steps=40")
    assert "for 40 steps" in result.stdout
    assert read_config(out / "checkpoints" / "latest")["step"] == 40
    assert "lr_scheduler" not in result.stderr  # the schedule starts at the saved step, no catch-up warning
    mismatched = flotilla(
        "train",
        f"data={push_demos}",
        f"out={tmp_path / 'x'}",
        f"resume={trained}",
        "policy=mlp",
        "steps=35",
        "progress=false",
        check=False,
    )
    assert mismatched.returncode != 0 and "cannot resume" in mismatched.stderr


def test_init_from_fine_tunes_a_trained_policy(trained, push_demos, tmp_path):
    from safetensors.torch import load_file

    # lr 0: the run changes nothing, so the new checkpoint must hold the old weights and normalizer exactly.
    out = tmp_path / "tuned"
    flotilla("train", f"data={push_demos}", f"out={out}", f"init_from={trained}", *TINY, "steps=5", "lr=0.0")
    tuned = out / "checkpoints" / "latest"
    config = read_config(tuned)
    assert config["step"] == 5 and config["training"]["init_from"] == str(trained)
    assert config["normalizer"] == read_config(trained)["normalizer"]
    before, after = load_file(str(trained / "model.safetensors")), load_file(str(tuned / "model.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[key], after[key]) for key in before)

    wrong_kind = flotilla(
        "train",
        f"data={push_demos}",
        f"out={tmp_path / 'mlp'}",
        f"init_from={trained}",
        "policy=mlp",
        "steps=5",
        "progress=false",
        check=False,
    )
    assert wrong_kind.returncode != 0 and "cannot start a mlp run" in wrong_kind.stderr
    both = flotilla(
        "train",
        f"data={push_demos}",
        f"out={tmp_path / 'both'}",
        f"init_from={trained}",
        f"resume={trained}",
        *TINY,
        check=False,
    )
    assert both.returncode != 0 and "not both" in both.stderr


def test_corrupt_or_mismatched_checkpoints_get_clear_errors(trained, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(trained, broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match="damaged safetensors"):
        load_checkpoint(broken)

    shutil.rmtree(broken)
    shutil.copytree(trained, broken)
    config = json.loads((broken / "config.json").read_text())
    config["policy"]["down_dims"] = [32, 64, 128]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_checkpoint(broken)

    (broken / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="damaged JSON"):
        load_checkpoint(broken)
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_checkpoint(tmp_path)


def test_eval_runs_the_policy_in_sim_and_writes_a_video(trained, tmp_path):
    video = tmp_path / "eval.mp4"
    result = flotilla(
        "eval",
        f"checkpoint={trained}",
        "episodes=2",
        "num_samples=4",
        "video=true",
        f"video_path={video}",
        "progress=false",
        "task.max_steps=20",
    )
    summary = json.loads(result.stdout[result.stdout.index("{") :])
    assert summary["episodes"] == 2 and 0.0 <= summary["success_rate"] <= 1.0
    assert 1 <= summary["mean_episode_length"] <= 20
    assert summary["mean_uncertainty"] > 0.0  # four samples of an undertrained policy disagree
    assert video.stat().st_size > 1000


class RecordingPolicy(torch.nn.Module):
    """Predicts chunks whose actions encode (plan number, step in chunk) and records what it saw."""

    kind = "recording"

    def __init__(self, n_obs_steps=2, horizon=8, n_action_steps=3):
        super().__init__()
        self.n_obs_steps, self.horizon, self.n_action_steps = n_obs_steps, horizon, n_action_steps
        self.shape_meta = ShapeMeta(obs={"x": (1,)}, action_dim=2, goal_dim=0)
        self.seen = []

    def predict_action(self, obs, goal=None, num_samples=1):
        self.seen.append(obs["x"][0, :, 0].tolist())
        plan = len(self.seen)
        chunk = torch.stack(
            [torch.full((self.horizon,), float(plan)), torch.arange(self.horizon).float()], -1
        )
        return chunk.expand(1, num_samples, self.horizon, 2)


def test_target_action_space_round_trips_and_closes_the_loop():
    space = ActionSpace(kind="target", position_key="ee_pos", step_m=0.03)
    actions = np.array([[0.5, -1.0, 0.2, 1.0], [0.0, 0.3, -0.4, -1.0]], np.float32)
    positions = np.array([[0.4, 0.0, 0.1], [0.41, -0.03, 0.106]], np.float32)
    targets = space.to_policy(actions, positions)
    np.testing.assert_allclose(targets[0, :3], [0.415, -0.03, 0.106], atol=1e-6)
    for action, target, position in zip(actions, targets, positions, strict=True):
        np.testing.assert_allclose(space.to_robot(target, position), action, atol=1e-5)
    # From wherever the arm really is, the step heads for the target (clipped to the action bounds).
    np.testing.assert_allclose(
        space.to_robot(targets[0], np.array([0.5, -0.03, 0.106])), [-1, 0, 0, 1], atol=1e-5
    )
    with pytest.raises(ValueError, match="unknown action space"):
        ActionSpace(kind="velocity")


def test_runner_executes_ta_actions_from_index_to_minus_one():
    policy = RecordingPolicy(n_obs_steps=2, horizon=8, n_action_steps=3)
    runner = PolicyRunner(policy)
    actions = [runner.act({"x": np.array([t], np.float32)}) for t in range(7)]
    # Plans at steps 0, 3, 6; each executes chunk entries 1, 2, 3 (To-1 .. To-1+Ta).
    assert [tuple(a) for a in actions] == [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3), (3, 1)]
    # The history holds the last To observations; at the start it repeats the first one.
    assert policy.seen == [[0, 0], [2, 3], [5, 6]]
    runner.reset()
    runner.act({"x": np.array([9], np.float32)})
    assert policy.seen[-1] == [9, 9]
    with pytest.raises(KeyError, match="lacks key"):
        runner.act({"y": np.zeros(1)})
    with pytest.raises(ValueError, match="does not fit"):
        PolicyRunner(policy, n_action_steps=8)


@pytest.mark.slow
def test_ddp_training_on_two_cpu_processes(push_demos, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_port=29531",
            "-m",
            "policies.train",
            f"data={push_demos}",
            f"out={out}",
            *TINY,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "for 30 steps" in result.stdout
    config = read_config(out / "checkpoints" / "latest")
    assert config["step"] == 30


def test_fixed_noise_seed_makes_plans_repeatable(trained, push_demos):
    obs = {key: value[0] for key, value in EpisodeStore.open(push_demos).episode(0).items()}
    fixed = PolicyRunner.from_checkpoint(trained, noise_seed=7)
    first = fixed.act(obs)
    fixed.reset()
    np.testing.assert_array_equal(fixed.act(obs), first)
    fresh = PolicyRunner.from_checkpoint(trained)
    draws = []
    for _ in range(3):
        fresh.reset()
        draws.append(fresh.act(obs))
    assert not all(np.array_equal(draws[0], d) for d in draws[1:])  # fresh noise: plans differ
