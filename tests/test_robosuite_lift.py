"""The robosuite Lift adapter on real robosuite/MuJoCo: the observation/action contract of
sim/conventions.py, determinism, action scaling, constraint blocking, cameras, and the scripted
expert from reset and after a takeover."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sim.collect import run_until_done

pytest.importorskip("robosuite")

from omegaconf import OmegaConf  # noqa: E402

from sim.conventions import (  # noqa: E402
    ACTION_DIM,
    GRIPPER_CLOSED,
    GRIPPER_OPEN,
    IMAGE_SIZE,
    MAX_EE_STEP_M,
    OBJECT_STATE_SHAPES,
)
from sim.experts import make_expert  # noqa: E402
from sim.tasks import make_env  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
STATE_KEYS = {**OBJECT_STATE_SHAPES, "goal": (3,)}
INFO_KEYS = {"success", "constraint_violation", "violation", "blocked", "goal"}


@pytest.fixture(scope="module")
def env():
    env = make_env("lift", seed=0)
    yield env
    env.close()


def run_expert(env, expert, obs):
    """Let the expert act until the episode ends; return the final info."""
    return run_until_done(env, expert, obs)[1]


def per_step_motion(env, direction, scale=1.0, steps=6):
    """Tool displacement along `direction` in each of `steps` steps of a constant command."""
    obs, _ = env.reset(seed=1)
    positions = [obs["ee_pos"].astype(np.float64)]
    for _ in range(steps):
        obs, *_ = env.step(np.append(scale * np.asarray(direction, dtype=np.float64), GRIPPER_OPEN))
        positions.append(obs["ee_pos"].astype(np.float64))
    return np.diff(positions, axis=0) @ np.asarray(direction, dtype=np.float64)


def test_registries_do_not_import_robosuite():
    code = (
        "import sys, sim.tasks, sim.experts, sim.robosuite.lift; "
        "sim.tasks.task_class('lift'); sim.experts.make_expert('lift'); "
        "assert 'robosuite' not in sys.modules and 'mujoco' not in sys.modules, 'imported too early'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_task_config_obs_keys_are_observations(env):
    cfg = OmegaConf.load(REPO / "configs" / "task" / "lift.yaml")
    assert len(cfg.obs_keys) > 0 and set(cfg.obs_keys) <= set(env.observation_space.spaces)


def test_observations_follow_the_conventions(env):
    assert env.task_name == "lift" and env.goal_dim == 3
    assert env.action_space.shape == (ACTION_DIM,)
    assert np.all(env.action_space.low == -1.0) and np.all(env.action_space.high == 1.0)
    assert set(env.observation_space.spaces) == set(STATE_KEYS)
    obs, info = env.reset(seed=3)
    for _ in range(2):
        assert set(obs) == set(STATE_KEYS)
        for key, shape in STATE_KEYS.items():
            assert obs[key].shape == shape and obs[key].dtype == np.float32, key
            assert (
                env.observation_space[key].shape == shape and env.observation_space[key].dtype == np.float32
            )
        assert env.observation_space.contains(obs)
        assert INFO_KEYS <= set(info)
        assert not info["blocked"] and info["violation"] == ""
        np.testing.assert_array_equal(info["goal"], obs["goal"])
        obs, reward, terminated, truncated, info = env.step(np.zeros(ACTION_DIM))
        assert reward == 0.0 and not terminated and not truncated
    # The tool points down (xyzw quaternion ~ a half turn about a horizontal axis), the goal is up in
    # the air above the table, and the cube rests on the table below it.
    assert abs(np.linalg.norm(obs["ee_quat"]) - 1.0) < 1e-4 and abs(obs["ee_quat"][3]) < 0.1
    assert obs["goal"][2] >= obs["object_pos"][2] + 0.07


def test_same_seed_and_actions_give_the_same_observations():
    actions = np.random.default_rng(0).uniform(-1, 1, (12, ACTION_DIM))

    def rollout(env, seed):
        obs, _ = env.reset(seed=seed)
        trace = [obs]
        for action in actions:
            trace.append(env.step(action)[0])
        return trace

    first, second = make_env("lift", seed=1), make_env("lift", seed=2)
    try:
        a = rollout(first, 7)
        rollout(first, 8)  # another episode in between changes nothing
        b = rollout(first, 7)
        c = rollout(second, 7)  # nor does the seed the env was built with
        for trace in (b, c):
            for x, y in zip(a, trace, strict=True):
                for key in x:
                    np.testing.assert_array_equal(x[key], y[key], err_msg=key)
        other = rollout(second, 9)
        assert not np.array_equal(a[0]["object_pos"], other[0]["object_pos"])
        assert not np.array_equal(a[0]["goal"], other[0]["goal"])
    finally:
        first.close()
        second.close()


def test_goal_option_sets_the_goal_and_bad_goals_are_rejected(env):
    goal = [0.05, -0.03, 0.97]
    obs, info = env.reset(seed=0, options={"goal": goal})
    np.testing.assert_allclose(obs["goal"], goal, rtol=0, atol=1e-6)
    np.testing.assert_allclose(info["goal"], goal, rtol=0, atol=1e-6)
    for bad in ([0.0, 0.0], [0.0, np.nan, 1.0]):
        with pytest.raises(ValueError, match="goal"):
            env.reset(options={"goal": bad})


def test_unit_action_moves_the_tool_about_max_ee_step(env):
    for direction in ([1, 0, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]):
        steady = per_step_motion(env, direction)[2:]
        assert np.all(np.abs(steady / MAX_EE_STEP_M - 1.0) < 0.2), (direction, steady)
    half = per_step_motion(env, [1, 0, 0], scale=0.5)[2:]
    assert np.all(np.abs(half / (0.5 * MAX_EE_STEP_M) - 1.0) < 0.25), half
    # Out-of-range actions are clipped to the unit action.
    np.testing.assert_allclose(per_step_motion(env, [1, 0, 0], scale=5.0), per_step_motion(env, [1, 0, 0]))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_actions_are_rejected(env, bad):
    env.reset(seed=0)
    action = np.zeros(ACTION_DIM)
    action[1] = bad
    with pytest.raises(ValueError, match="non-finite"):
        env.step(action)
    with pytest.raises(ValueError, match="shape"):
        env.step(np.zeros(3))


def test_gripper_command_sets_the_opening_proportionally(env):
    env.reset(seed=0)
    widths = {}
    for command in (GRIPPER_OPEN, 0.0, GRIPPER_CLOSED):
        for _ in range(4):
            obs, *_ = env.step(np.array([0.0, 0.0, 0.0, command]))
        widths[command] = float(obs["gripper"][0])
    assert widths[GRIPPER_OPEN] > 0.075
    assert abs(widths[0.0] - 0.04) < 0.005
    assert widths[GRIPPER_CLOSED] < 0.005


def test_driving_into_the_table_blocks_the_env_until_reset(env):
    obs, _ = env.reset(seed=0, options={"goal": [0.0, 0.0, 0.95]})
    # Beside the cube, then straight down into the table.
    info = {"blocked": False}
    for _ in range(40):
        obs, reward, terminated, _, info = env.step(
            np.array([0.0, -1.0 if obs["ee_pos"][1] > -0.12 else 0.0, -1.0, 0.0])
        )
        if info["blocked"]:
            break
    assert info["blocked"] and info["constraint_violation"]
    assert "table" in info["violation"]
    frozen = obs["ee_pos"].copy()
    for _ in range(5):
        obs, reward, terminated, _, info = env.step(np.array([1.0, 1.0, 1.0, GRIPPER_OPEN]))
        assert info["blocked"] and reward == 0.0 and not terminated
    assert np.linalg.norm(obs["ee_pos"] - frozen) < 0.01, "a blocked env must ignore actions"
    _, info = env.reset(seed=0)
    assert not info["blocked"] and not info["constraint_violation"] and info["violation"] == ""


def test_episode_truncates_at_max_steps():
    env = make_env("lift", seed=0, max_steps=3)
    try:
        env.reset(seed=0)
        truncated = [env.step(np.zeros(ACTION_DIM))[3] for _ in range(3)]
        assert truncated == [False, False, True]
    finally:
        env.close()


def test_task_config_builds_the_env():
    cfg = OmegaConf.load(REPO / "configs" / "task" / "lift.yaml")
    assert cfg.name == "lift" and int(cfg.max_steps) > 0
    env = make_env(cfg.name, seed=0, max_steps=int(cfg.max_steps), **OmegaConf.to_container(cfg.env))
    try:
        assert env.max_steps == cfg.max_steps
    finally:
        env.close()


def test_expert_actions_follow_the_action_contract(env):
    expert = make_expert("lift", seed=0)
    obs, _ = env.reset(seed=0)
    for _ in range(10):
        action = expert.act(obs)
        assert action.shape == (ACTION_DIM,) and action.dtype == np.float32
        assert np.all(np.abs(action) <= 1.0)
        obs, *_ = env.step(action)


@pytest.mark.slow
def test_expert_succeeds_from_reset(env):
    expert = make_expert("lift")
    wins = 0
    for seed in range(50):
        obs, _ = env.reset(seed=seed)
        expert.reset(seed=seed)
        wins += run_expert(env, expert, obs)["success"]
    assert wins / 50 >= 0.95


@pytest.mark.slow
def test_expert_takes_over_after_random_actions(env):
    expert = make_expert("lift")
    wins = tries = 0
    for seed in range(100, 130):
        obs, _ = env.reset(seed=seed)
        rng = np.random.default_rng(seed)
        info = {"blocked": False}
        for _ in range(rng.integers(10, 21)):
            obs, _, _, _, info = env.step(rng.uniform(-1, 1, ACTION_DIM))
        if info["blocked"]:  # random flailing may hit a joint limit: nothing to take over
            continue
        tries += 1
        expert.reset(seed=seed)
        wins += run_expert(env, expert, obs)["success"]
    assert tries >= 20
    assert wins / tries >= 0.9


def test_expert_takes_over_with_the_gripper_closed_beside_the_cube(env):
    obs, _ = env.reset(seed=4)
    for _ in range(6):  # close the gripper and drop to just above the cube's top, off to the side
        target = obs["object_pos"] + np.array([0.0, 0.06, 0.05])
        obs, *_ = env.step(
            np.append(np.clip((target - obs["ee_pos"]) / MAX_EE_STEP_M, -1, 1), GRIPPER_CLOSED)
        )
    assert obs["gripper"][0] < 0.01
    assert run_expert(env, make_expert("lift", seed=4), obs)["success"]


@pytest.fixture(scope="module")
def camera_env():
    try:
        env = make_env("lift", seed=0, cameras=("front", "wrist"), image_size=IMAGE_SIZE)
    except RuntimeError as exc:
        if "rendering" in str(exc):
            pytest.skip(f"no headless OpenGL renderer here: {exc}")
        raise
    yield env
    env.close()


def test_camera_images_are_upright_and_show_the_goal(camera_env):
    obs, _ = camera_env.reset(seed=0, options={"goal": [0.0, 0.0, 0.95]})
    for name in ("front_rgb", "wrist_rgb"):
        image = obs[name]
        assert image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and image.dtype == np.uint8
        assert camera_env.observation_space[name].shape == image.shape
        assert image.std() > 5, f"{name} is blank"
    assert camera_env.observation_space.contains(obs)
    front = obs["front_rgb"].astype(np.float64)
    # Upright: the white table fills the lower half of the front view; the wall and the robot's
    # base are at the top.
    assert front[IMAGE_SIZE // 2 :].mean() > front[: IMAGE_SIZE // 4].mean() + 20
    # The green goal marker and the red cube are both in the front view.
    r, g, b = front[..., 0], front[..., 1], front[..., 2]
    assert np.count_nonzero((g > 120) & (r < 100) & (b < 100)) > 0, "goal marker not visible"
    assert np.count_nonzero((r > 120) & (g < 80) & (b < 80)) > 0, "cube not visible"
    # The wrist view moves with the arm.
    moved, *_ = camera_env.step(np.array([1.0, 1.0, -1.0, GRIPPER_OPEN]))
    assert np.abs(moved["wrist_rgb"].astype(int) - obs["wrist_rgb"].astype(int)).mean() > 1.0
