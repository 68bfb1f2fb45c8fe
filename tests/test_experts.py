"""Scripted experts on the real pybullet tasks: success from reset, with human-like imperfection,
and taking over from arbitrary states (random actions, closed gripper, nudged or dropped object)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from sim.collect import run_until_done
from sim.conventions import ACTION_DIM, GRIPPER_CLOSED, GRIPPER_OPEN
from sim.experts import make_expert
from sim.tasks import make_env

TASKS = ("reach", "push", "pick_place")
MILD = {"reaction_delay": 2, "action_noise": 0.1, "detour_prob": 0.02}


def finish(env, expert, obs):
    """Let the expert act until the episode ends; return the final info."""
    return run_until_done(env, expert, obs)[1]


def success_rate(task, seeds, random_steps=0, **knobs):
    env = make_env(task)
    expert = make_expert(task, **knobs)
    wins = 0
    for seed in seeds:
        obs, _ = env.reset(seed=seed)
        rng = np.random.default_rng(10_000 + seed)
        for _ in range(rng.integers(random_steps // 2, random_steps + 1) if random_steps else 0):
            obs, *_ = env.step(rng.uniform(-1, 1, ACTION_DIM))
        expert.reset(seed=seed)
        wins += finish(env, expert, obs)["success"]
    env.close()
    return wins / len(seeds)


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
def test_expert_succeeds_from_reset(task):
    assert success_rate(task, range(50)) >= 0.95


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
def test_mildly_imperfect_operator_still_succeeds_mostly(task):
    assert success_rate(task, range(50), **MILD) >= 0.85


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
def test_expert_takes_over_after_random_actions(task):
    assert success_rate(task, range(100, 130), random_steps=20) >= 0.9


@pytest.mark.parametrize("task", TASKS)
def test_expert_actions_follow_the_action_contract(task):
    env, expert = make_env(task, seed=0), make_expert(task, seed=0)
    obs, _ = env.reset()
    for _ in range(10):
        action = expert.act(obs)
        assert action.shape == (ACTION_DIM,) and action.dtype == np.float32
        assert np.all(np.abs(action) <= 1.0)
        obs, *_ = env.step(action)


def test_pick_place_takes_over_with_the_gripper_closed_and_the_cube_nudged():
    env, expert = make_env("pick_place", seed=3), make_expert("pick_place", seed=3)
    obs, _ = env.reset()
    for _ in range(4):  # close the gripper and drop towards the table
        obs, *_ = env.step(np.array([0.0, 0.0, -1.0, GRIPPER_CLOSED]))
    assert obs["gripper"][0] < 0.01
    x, y, _ = obs["object_pos"]
    env._p.resetBasePositionAndOrientation(env.object_id, [x + 0.05, y - 0.04, 0.02], [0, 0, 0.38, 0.92])
    assert finish(env, expert, obs)["success"]


def test_pick_place_starts_over_when_the_cube_is_dropped():
    env, expert = make_env("pick_place", seed=5), make_expert("pick_place", seed=5)
    obs, _ = env.reset()
    while obs["object_pos"][2] < 0.06:  # until the cube has been picked up and lifted
        obs, *_, info = env.step(expert.act(obs))
        assert env._steps < 60, "the expert never lifted the cube"
    for _ in range(3):  # the operator lets go mid-air
        obs, *_ = env.step(np.array([0.0, 0.0, 0.0, GRIPPER_OPEN]))
    assert obs["gripper"][0] > 0.06
    env.max_steps = env._steps + 100
    assert finish(env, expert, obs)["success"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "random_steps, knobs, at_least",
    # Mild imperfection: both approaches lose ~20% on seeds 200..259, to noise driving the fingers
    # into the table at push height (measured: around 13/60 failures, over 12/60).
    [(0, {}, 0.9), (20, {}, 0.9), (0, MILD, 0.7)],
    ids=["reset", "takeover", "mild"],
)
def test_push_around_approach_succeeds(random_steps, knobs, at_least):
    assert (
        success_rate("push", range(200, 230), random_steps=random_steps, approach="around", **knobs)
        >= at_least
    )


def _cross_track_path(seed: int, side: float, steps: int = 12) -> np.ndarray:
    """The tool's offset across the block-to-goal line over the first steps, the expert's side forced."""
    env, expert = make_env("push"), make_expert("push", approach="around")
    obs, _ = env.reset(seed=seed)
    expert.reset(seed=seed)
    expert.side = side
    offsets = []
    for _ in range(steps):
        block, goal = obs["object_pos"][:2], obs["goal"]
        d = (goal - block) / np.linalg.norm(goal - block)
        offsets.append((obs["ee_pos"][:2] - block) @ np.array([-d[1], d[0]]))
        obs, *_ = env.step(expert.act(obs))
    env.close()
    return np.array(offsets)


def test_push_around_goes_either_way_round_from_the_same_start():
    """From a start in front of the block the two sides are two distinct ways round: multimodal demos."""
    seed = next(s for s in range(50) if _starts_in_front(s))
    left, right = _cross_track_path(seed, +1.0), _cross_track_path(seed, -1.0)
    assert left[-1] > 0.03 and right[-1] < -0.03, (left, right)
    sides = set()
    for episode in range(20):
        expert = make_expert("push", approach="around")
        expert.reset(seed=episode)
        sides.add(expert.side)
    assert sides == {1.0, -1.0}


def _starts_in_front(seed: int) -> bool:
    env = make_env("push")
    obs, _ = env.reset(seed=seed)
    env.close()
    rel, to_goal = obs["ee_pos"][:2] - obs["object_pos"][:2], obs["goal"] - obs["object_pos"][:2]
    return rel @ to_goal > 0.8 * np.linalg.norm(rel) * np.linalg.norm(
        to_goal
    )  # within ~37 deg of the goal side


def test_push_rejects_an_unknown_approach():
    with pytest.raises(ValueError, match="approach"):
        make_expert("push", approach="sideways")


def test_push_recovers_when_the_block_is_knocked_off_the_push_line():
    env, expert = make_env("push", seed=2), make_expert("push", seed=2)
    obs, _ = env.reset()
    start = obs["object_pos"].copy()
    while np.linalg.norm(obs["object_pos"][:2] - start[:2]) < 0.03:  # until the push is under way
        obs, *_ = env.step(expert.act(obs))
        assert env._steps < 60, "the expert never moved the block"
    x, y, z = obs["object_pos"]
    env._p.resetBasePositionAndOrientation(env.object_id, [x - 0.04, y + 0.05, z], [0, 0, 0, 1])
    assert finish(env, expert, obs)["success"]


def test_reaction_delay_holds_still_at_takeover():
    env, expert = make_env("reach", seed=0), make_expert("reach", seed=0, reaction_delay=3)
    obs, _ = env.reset()
    for _ in range(3):
        action = expert.act(obs)
        np.testing.assert_array_equal(action[:3], 0.0)
        obs, *_ = env.step(action)
    assert np.linalg.norm(expert.act(obs)[:3]) > 0.1


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize(
    "knobs",
    [{"reaction_delay": -1}, {"action_noise": -0.1}, {"detour_prob": 1.5}, {"detour_steps": 0}],
)
def test_out_of_range_knobs_are_rejected(task, knobs):
    with pytest.raises(ValueError, match="out of range"):
        make_expert(task, **knobs)


def test_unknown_expert_is_rejected():
    with pytest.raises(ValueError, match="no scripted expert"):
        make_expert("juggle")


def test_every_task_follows_one_pattern():
    """A task is an env in sim.tasks.TASKS, a scripted operator in sim/experts/ (sim.experts.EXPERTS) and
    configs/task/<name>.yaml with its name, max_steps and the obs_keys a policy trains on."""
    from sim.experts import EXPERTS
    from sim.tasks import TASKS as REGISTERED

    configs = Path(__file__).resolve().parents[1] / "configs" / "task"
    assert set(REGISTERED) == set(EXPERTS) == {path.stem for path in configs.glob("*.yaml")}
    for name in REGISTERED:
        module, _, cls = EXPERTS[name].partition(":")
        assert module == f"sim.experts.{name}" and cls, EXPERTS[name]
        cfg = OmegaConf.load(configs / f"{name}.yaml")
        assert cfg.name == name and cfg.max_steps > 0, name
        assert len(cfg.obs_keys) > 0 and all(isinstance(key, str) for key in cfg.obs_keys), name


@pytest.mark.parametrize("task", TASKS)
def test_task_obs_keys_are_observations(task):
    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "configs" / "task" / f"{task}.yaml")
    env = make_env(task)
    assert set(cfg.obs_keys) <= set(env.observation_space.spaces), task
    env.close()
