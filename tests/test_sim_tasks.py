"""The pybullet Panda tasks: observation/action contract, determinism, isolation, success and
constraint violations, all on real pybullet physics."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sim.conventions import ACTION_DIM, GRIPPER_OPEN
from sim.tasks import make_env

TASKS = ("reach", "push", "pick_place")
GOAL_DIMS = {"reach": 3, "push": 2, "pick_place": 3}
DOWN = np.array([0.0, 0.0, -1.0, GRIPPER_OPEN])
REPO = Path(__file__).resolve().parents[1]


def rollout(env, actions, seed):
    obs, _ = env.reset(seed=seed)
    trace = [obs]
    for action in actions:
        obs, *_ = env.step(action)
        trace.append(obs)
    return trace


def random_actions(n, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (n, ACTION_DIM)).astype(np.float32)


def assert_same_trace(a, b):
    assert len(a) == len(b)
    for obs_a, obs_b in zip(a, b, strict=True):
        assert obs_a.keys() == obs_b.keys()
        for key in obs_a:
            np.testing.assert_array_equal(obs_a[key], obs_b[key], err_msg=key)


@pytest.mark.parametrize("task", TASKS)
def test_spaces_shapes_and_dtypes(task):
    env = make_env(task, seed=0)
    assert env.task_name == task
    assert env.goal_dim == GOAL_DIMS[task]
    assert env.action_space.shape == (ACTION_DIM,)
    assert np.all(env.action_space.low == -1) and np.all(env.action_space.high == 1)
    obs, info = env.reset()
    expected = {"joint_pos", "ee_pos", "ee_quat", "gripper", "goal"}
    if task != "reach":
        expected |= {"object_pos", "object_quat", "ee_to_object", "object_to_goal"}
        np.testing.assert_allclose(obs["ee_to_object"], obs["object_pos"] - obs["ee_pos"], atol=1e-6)
        np.testing.assert_allclose(
            obs["object_to_goal"], obs["goal"] - obs["object_pos"][: env.goal_dim], atol=1e-6
        )
    assert set(obs) == expected == set(env.observation_space.spaces)
    assert env.observation_space.contains(obs)
    assert obs["goal"].shape == (env.goal_dim,)
    for action in random_actions(5):
        obs, reward, terminated, truncated, info = env.step(action)
        assert env.observation_space.contains(obs)
        assert all(v.dtype == np.float32 for v in obs.values())
        assert isinstance(reward, float) and isinstance(terminated, bool) and isinstance(truncated, bool)
        assert set(info) >= {"success", "constraint_violation", "violation", "blocked", "goal"}
        np.testing.assert_array_equal(info["goal"], obs["goal"])
    env.close()


@pytest.mark.parametrize("task", TASKS)
def test_same_seed_same_actions_is_bit_identical_whatever_ran_before(task):
    actions = random_actions(25, seed=1)
    fresh = rollout(make_env(task), actions, seed=7)
    env = make_env(task)
    rollout(env, random_actions(40, seed=2), seed=3)  # a different history first
    assert_same_trace(fresh, rollout(env, actions, seed=7))
    other_seed = rollout(env, actions, seed=8)
    assert not np.array_equal(other_seed[0]["goal"], fresh[0]["goal"])


def test_constructor_seed_seeds_the_first_reset():
    a, _ = make_env("push", seed=11).reset()
    b, _ = make_env("push").reset(seed=11)
    np.testing.assert_array_equal(a["goal"], b["goal"])
    np.testing.assert_array_equal(a["object_pos"], b["object_pos"])


def test_two_envs_stepping_interleaved_match_each_alone():
    actions_a, actions_b = random_actions(20, seed=3), random_actions(20, seed=4)
    alone_a = rollout(make_env("pick_place"), actions_a, seed=1)
    alone_b = rollout(make_env("push"), actions_b, seed=2)
    env_a, env_b = make_env("pick_place"), make_env("push")
    side_a, side_b = [env_a.reset(seed=1)[0]], [env_b.reset(seed=2)[0]]
    for action_a, action_b in zip(actions_a, actions_b, strict=True):
        side_a.append(env_a.step(action_a)[0])
        side_b.append(env_b.step(action_b)[0])
    assert_same_trace(alone_a, side_a)
    assert_same_trace(alone_b, side_b)


def test_actions_outside_the_box_are_clipped():
    big = np.array([5.0, -3.0, 2.0, 9.0])
    clipped = np.clip(big, -1, 1)
    assert_same_trace(rollout(make_env("reach"), [big] * 3, 0), rollout(make_env("reach"), [clipped] * 3, 0))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_action_raises(bad):
    env = make_env("reach", seed=0)
    env.reset()
    with pytest.raises(ValueError, match="non-finite"):
        env.step(np.array([0.0, bad, 0.0, 0.0]))
    with pytest.raises(ValueError, match="shape"):
        env.step(np.zeros(3))


def test_reach_success_when_the_tool_gets_to_the_goal():
    env = make_env("reach", seed=0)
    obs, _ = env.reset()
    goal = obs["ee_pos"] + np.array([0.05, -0.04, -0.06], dtype=np.float32)
    obs, info = env.reset(options={"goal": goal})
    np.testing.assert_allclose(obs["goal"], goal)
    assert not info["success"]
    for _ in range(env.max_steps):
        step = np.clip((obs["goal"] - obs["ee_pos"]) / 0.03 * 0.5, -1, 1)
        obs, reward, terminated, truncated, info = env.step(np.append(step, GRIPPER_OPEN))
        if terminated:
            break
    assert info["success"] and terminated and reward == 1.0
    assert np.linalg.norm(obs["ee_pos"] - goal) < 0.02


@pytest.mark.parametrize("task", ["push", "pick_place"])
def test_object_resting_on_the_goal_is_success(task):
    env = make_env(task, seed=0)
    obs, _ = env.reset()
    obs, *_ = env.step(np.zeros(ACTION_DIM))
    assert not env.step(np.zeros(ACTION_DIM))[4]["success"]
    goal = obs["goal"]
    env._p.resetBasePositionAndOrientation(env.object_id, [goal[0], goal[1], 0.025], [0, 0, 0, 1])
    for _ in range(3):
        obs, reward, terminated, truncated, info = env.step(np.zeros(ACTION_DIM))
    assert info["success"] and terminated and reward == 1.0


@pytest.mark.parametrize("task", TASKS)
def test_goal_option_is_honoured_and_validated(task):
    env = make_env(task, seed=0)
    goal = {"reach": [0.5, 0.1, 0.2], "push": [0.45, -0.1], "pick_place": [0.5, 0.15, 0.02]}[task]
    obs, info = env.reset(options={"goal": goal})
    np.testing.assert_allclose(obs["goal"], goal, rtol=0, atol=1e-7)
    np.testing.assert_allclose(info["goal"], goal)
    if task != "reach":  # the object starts far enough away that the goal takes real work
        assert np.linalg.norm(obs["object_pos"][:2] - np.asarray(goal)[:2]) >= 0.1
    with pytest.raises(ValueError, match="goal"):
        env.reset(options={"goal": [0.5] * (env.goal_dim + 1)})


@pytest.mark.parametrize("task", TASKS)
def test_driving_the_tool_into_the_table_blocks_until_reset(task):
    env = make_env(task, seed=0)
    env.reset()
    for _ in range(30):
        obs, reward, terminated, truncated, info = env.step(DOWN)
        if info["blocked"]:
            break
    assert info["constraint_violation"] and info["blocked"]
    assert "table" in info["violation"] and not info["success"] and reward == 0.0

    held = obs["joint_pos"].copy()
    for action in random_actions(5, seed=9):
        obs, reward, terminated, truncated, info = env.step(action)
        assert info["blocked"] and info["constraint_violation"] and not info["success"]
    np.testing.assert_allclose(obs["joint_pos"], held, atol=2e-3)  # actions ignored: the arm holds

    obs, info = env.reset()
    assert not info["blocked"] and not info["constraint_violation"] and info["violation"] == ""
    obs, *_, info = env.step(np.array([0.0, 0.0, 1.0, GRIPPER_OPEN]))
    assert not info["blocked"]


def test_pulling_the_tool_into_the_robot_hits_a_joint_limit():
    env = make_env("reach", seed=0)
    env.reset()
    for _ in range(20):
        *_, info = env.step(np.array([-1.0, 0.0, -0.3, 0.0]))
        if info["blocked"]:
            break
    assert info["blocked"] and "joint" in info["violation"] and "limit" in info["violation"]


def test_pushing_the_block_off_the_table_is_a_violation():
    env = make_env("push", seed=0)
    env.reset()
    env._p.resetBasePositionAndOrientation(env.object_id, [0.6, 0.45, 0.025], [0, 0, 0, 1])
    *_, info = env.step(np.zeros(ACTION_DIM))
    assert info["blocked"] and "off the table" in info["violation"]


def test_episode_truncates_at_max_steps():
    env = make_env("reach", seed=0, max_steps=4)
    env.reset()
    flags = [env.step(np.zeros(ACTION_DIM))[3] for _ in range(4)]
    assert flags == [False, False, False, True]


def test_cameras_give_uint8_images_of_the_requested_size():
    env = make_env("pick_place", seed=0, cameras=("front", "wrist"), image_size=64)
    obs, _ = env.reset()
    for _ in range(2):
        obs, *_ = env.step(DOWN)
    assert env.observation_space.contains(obs)
    for cam in ("front", "wrist"):
        image = obs[f"{cam}_rgb"]
        assert image.dtype == np.uint8 and image.shape == (64, 64, 3)
        assert image.std() > 5  # a picture, not a blank frame
    assert not np.array_equal(obs["front_rgb"], obs["wrist_rgb"])
    assert "front_rgb" not in make_env("pick_place").reset(seed=0)[0]


def test_unknown_camera_is_rejected():
    with pytest.raises(ValueError, match="camera"):
        make_env("reach", cameras=("top",))


def test_step_before_reset_raises():
    with pytest.raises(RuntimeError, match="reset"):
        make_env("reach").step(np.zeros(ACTION_DIM))


QUIET_SCRIPT = """
import os, sys, threading, time
print("before", flush=True)
done = threading.Event()


def talk():  # another thread writing to fd 2 all along, also while pybullet's import holds fds 1 and 2
    i = 0
    while not done.is_set() or i < 10:
        os.write(2, b"talker %d\\n" % i)
        i, _ = i + 1, time.sleep(0.001)


talker = threading.Thread(target=talk)
talker.start()
from sim.tasks import make_env

for name in sys.argv[1:]:
    env = make_env(name, seed=0)
    env.reset(seed=0)
    env.step(env.action_space.sample())
    env.close()
done.set()
talker.join()
os.write(1, b"c-level stdout\\n")
print("done", flush=True)
"""


def test_pybullet_prints_nothing_when_envs_are_created():
    """pybullet's `argv[0]=` (every connect) and `pybullet build time` (import) never reach the user;
    everything else printed meanwhile, by this process or another thread, does, once."""
    result = subprocess.run(
        [sys.executable, "-c", QUIET_SCRIPT, *TASKS, *TASKS],
        cwd=REPO,
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert result.stdout == b"before\nc-level stdout\ndone\n", result.stdout
    lines = result.stderr.splitlines()
    assert sorted(lines) == sorted(b"talker %d" % i for i in range(len(lines))), result.stderr[-2000:]


def test_quiet_native_output_drops_only_the_noise():
    script = (
        "import os, sim.tasks.bullet as b\n"
        "with b.quiet_native_output((b'noise',)):\n"
        "    os.write(1, b'noise one\\nkept one\\n'); os.write(2, b'kept two\\nnoise two\\n')\n"
        "print('after')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, timeout=60, check=True
    )
    assert (result.stdout, result.stderr) == (b"kept one\nafter\n", b"kept two\n")
