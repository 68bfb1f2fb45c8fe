"""robosuite's Lift (Panda, one cube on a table) behind Flotilla's task contract (sim/conventions.py).

Goal (G=3): a world-frame target position for the cube's centre, above the table: x, y within
`goal_xy_range` of the table centre and z `goal_height_range` above the table top. The episode
succeeds (reward 1, terminated) when the cube's centre is within `success_radius` of the goal,
which, since the goal is at least 8 cm up, means the cube is held in the air. (robosuite's own
Lift only asks for the cube to be 4 cm up; the goal makes it goal-conditioned.)

Control: robosuite's OSC_POSITION arm controller at CONTROL_HZ, the tool held pointing down, and
a proportional Panda gripper. An action of 1.0 moves the tool about MAX_EE_STEP_M in one step
(see backend.OSC_TRACKING_RATIO).

Constraint violations (the env then blocks, ignoring actions until reset): the cube off the
table, any arm link or the gripper touching the table, or an arm joint within
`joint_limit_margin` rad of its limit.

Cameras: `front` (robosuite's agentview), `wrist` (robot0_eye_in_hand), `side` (sideview),
`top` (birdview); any robosuite camera name is accepted as is. Rendering needs a headless GL:
robosuite picks EGL (MUJOCO_GL=egl) unless MUJOCO_GL=osmesa is set; on Debian the EGL path needs
the libegl1 and libgl1-mesa-dri packages, the OSMesa path libosmesa6.
"""

from __future__ import annotations

from collections.abc import Sequence

import gymnasium as gym
import numpy as np

from sim.conventions import (
    ACTION_DIM,
    CONTROL_HZ,
    GRIPPER_CLOSED,
    GRIPPER_OPEN,
    IMAGE_SIZE,
    MAX_EE_STEP_M,
)
from sim.experts.base import ScriptedOperator
from sim.robosuite.backend import (
    PROPORTIONAL_GRIPPER,
    import_robosuite,
    osc_position_controller_config,
    seeded_global_numpy,
)

CAMERA_ALIASES = {
    "front": "agentview",
    "wrist": "robot0_eye_in_hand",
    "side": "sideview",
    "top": "birdview",
}
_ROBOSUITE_CAMERAS = ("agentview", "robot0_eye_in_hand", "sideview", "birdview", "frontview", "robot0_robotview")

# Table collision geom in robosuite's TableArena.
_TABLE_GEOM = "table_collision"
# The cube counts as off the table once its centre is this far below the table top.
_OFF_TABLE_DROP_M = 0.05


class RobosuiteLiftEnv(gym.Env):
    """Lift the cube to a goal position. See the module docstring for goal, success and constraints."""

    metadata = {"render_modes": []}
    task_name = "lift"
    goal_dim = 3

    def __init__(
        self,
        seed: int | None = None,
        cameras: Sequence[str] = (),
        image_size: int = IMAGE_SIZE,
        max_steps: int = 100,
        goal_xy_range: float = 0.08,
        goal_height_range: Sequence[float] = (0.10, 0.20),
        success_radius: float = 0.03,
        joint_limit_margin: float = 0.05,
    ):
        if max_steps < 1 or image_size < 8:
            raise ValueError(f"need max_steps >= 1 and image_size >= 8 (got {max_steps}, {image_size})")
        low, high = (float(v) for v in goal_height_range)
        if not 0.0 < low <= high:
            raise ValueError(f"goal_height_range must be 0 < low <= high (got {goal_height_range})")
        if isinstance(cameras, str):
            cameras = (cameras,)
        self.cameras = tuple(cameras)
        self._rs_cameras = [self._robosuite_camera(name) for name in self.cameras]
        self.image_size = int(image_size)
        self.max_steps = int(max_steps)
        self.goal_xy_range = float(goal_xy_range)
        self.goal_height_range = (low, high)
        self.success_radius = float(success_radius)
        self.joint_limit_margin = float(joint_limit_margin)

        self._rng = np.random.default_rng(seed)
        self._env = self._make_robosuite_env(seed)
        self._setup_references()

        state_box = lambda n: gym.spaces.Box(-np.inf, np.inf, shape=(n,), dtype=np.float32)  # noqa: E731
        spaces = {
            "joint_pos": state_box(7),
            "ee_pos": state_box(3),
            "ee_quat": state_box(4),
            "gripper": gym.spaces.Box(0.0, 0.1, shape=(1,), dtype=np.float32),
            "object_pos": state_box(3),
            "object_quat": state_box(4),
            "goal": state_box(self.goal_dim),
        }
        for name in self.cameras:
            spaces[f"{name}_rgb"] = gym.spaces.Box(
                0, 255, shape=(self.image_size, self.image_size, 3), dtype=np.uint8
            )
        self.observation_space = gym.spaces.Dict(spaces)
        self.action_space = gym.spaces.Box(-1.0, 1.0, shape=(ACTION_DIM,), dtype=np.float32)

        self._goal = np.zeros(self.goal_dim, dtype=np.float32)
        self._steps = 0
        self._blocked = False
        self._violation = ""
        self._last_obs: dict | None = None

    # ---------------------------------------------------------------- construction

    @staticmethod
    def _robosuite_camera(name: str) -> str:
        camera = CAMERA_ALIASES.get(name, name)
        if camera not in _ROBOSUITE_CAMERAS:
            raise ValueError(
                f"unknown camera {name!r}; use one of {', '.join(CAMERA_ALIASES)} "
                f"or a robosuite camera name ({', '.join(_ROBOSUITE_CAMERAS)})"
            )
        return camera

    def _make_robosuite_env(self, seed: int | None):
        suite = import_robosuite()
        use_cameras = bool(self._rs_cameras)
        kwargs = dict(
            robots="Panda",
            gripper_types=PROPORTIONAL_GRIPPER,
            controller_configs=osc_position_controller_config("Panda"),
            control_freq=CONTROL_HZ,
            has_renderer=False,
            has_offscreen_renderer=use_cameras,
            use_camera_obs=use_cameras,
            use_object_obs=True,
            reward_shaping=False,
            ignore_done=True,  # this wrapper owns the horizon
            hard_reset=False,  # keep one model: a hard reset reloads the XML every episode
        )
        if use_cameras:
            kwargs.update(
                camera_names=list(self._rs_cameras),
                camera_heights=self.image_size,
                camera_widths=self.image_size,
            )
        # The cube's size is drawn from the global np.random when the model is built.
        with seeded_global_numpy(None if seed is None else self._rng.integers(2**31)):
            try:
                return suite.make("Lift", **kwargs)
            except Exception as exc:
                if not use_cameras:
                    raise
                raise RuntimeError(
                    f"robosuite could not set up offscreen rendering for cameras {self.cameras}: {exc}. "
                    "Headless rendering needs EGL (apt-get install libegl1 libgl1-mesa-dri; MUJOCO_GL=egl, "
                    "robosuite's default) or OSMesa (apt-get install libosmesa6; MUJOCO_GL=osmesa "
                    "PYOPENGL_PLATFORM=osmesa)."
                ) from exc

    def _setup_references(self):
        env = self._env
        sim = env.sim
        robot = env.robots[0]
        self._robot = robot
        self._gripper_model = robot.gripper["right"]
        self._table_top = np.array(env.model.mujoco_arena.table_top_abs, dtype=np.float64)
        self._table_half_xy = np.array(env.table_full_size[:2], dtype=np.float64) / 2.0
        joint_ids = [sim.model.joint_name2id(name) for name in robot.robot_joints]
        self._joint_range = np.array(sim.model.jnt_range[joint_ids], dtype=np.float64)
        # OSC_POSITION takes deltas in the robot base frame; actions are in the world frame.
        base_body = sim.model.body_name2id(robot.robot_model.root_body)
        self._world_to_base = np.array(sim.data.body_xmat[base_body], dtype=np.float64).reshape(3, 3).T

    # ---------------------------------------------------------------- gym API

    def reset(self, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        # robosuite's reset randomness (joint noise, cube placement) comes from the global RNG.
        with seeded_global_numpy(self._rng.integers(2**31)):
            raw = self._env.reset()
        goal = self._sample_goal()
        if options and options.get("goal") is not None:
            goal = np.asarray(options["goal"], dtype=np.float64).reshape(-1)
            if goal.shape != (self.goal_dim,) or not np.all(np.isfinite(goal)):
                raise ValueError(
                    f"options['goal'] must be {self.goal_dim} finite numbers (a cube position, m), got {options['goal']!r}"
                )
        self._goal = goal.astype(np.float32)
        self._steps = 0
        self._blocked = False
        self._violation = ""
        self._last_obs = self._observation(raw)
        return self._copy_obs(self._last_obs), self._info(success=False)

    def step(self, action):
        action = np.asarray(action, dtype=np.float64).reshape(-1)
        if action.shape != (ACTION_DIM,):
            raise ValueError(f"action must have {ACTION_DIM} values [dx, dy, dz, gripper], got shape {action.shape}")
        if not np.all(np.isfinite(action)):
            raise ValueError(f"action contains non-finite values (NaN or inf): {action.tolist()}")
        if self._last_obs is None:
            raise RuntimeError("call reset() before step()")
        action = np.clip(action, -1.0, 1.0)
        self._steps += 1
        truncated = self._steps >= self.max_steps

        if self._blocked:
            return self._copy_obs(self._last_obs), 0.0, False, truncated, self._info(success=False)

        command = np.concatenate([self._world_to_base @ action[:3], action[3:]])
        raw, _, _, _ = self._env.step(command)
        obs = self._observation(raw)
        self._last_obs = obs

        success = self._is_success(obs)
        violation = "" if success else self._check_violation(obs)
        if violation:
            self._blocked = True
            self._violation = violation
        return self._copy_obs(obs), float(success), bool(success), truncated, self._info(success=success)

    def close(self):
        if getattr(self, "_env", None) is not None:
            self._env.close()
            self._env = None

    # ---------------------------------------------------------------- task logic

    def _sample_goal(self) -> np.ndarray:
        xy = self._table_top[:2] + self._rng.uniform(-self.goal_xy_range, self.goal_xy_range, size=2)
        z = self._table_top[2] + self._rng.uniform(*self.goal_height_range)
        return np.array([xy[0], xy[1], z])

    def _is_success(self, obs: dict) -> bool:
        return bool(np.linalg.norm(obs["object_pos"] - self._goal) <= self.success_radius)

    def _check_violation(self, obs: dict) -> str:
        cube = obs["object_pos"].astype(np.float64)
        off_xy = np.any(np.abs(cube[:2] - self._table_top[:2]) > self._table_half_xy)
        if off_xy or cube[2] < self._table_top[2] - _OFF_TABLE_DROP_M:
            return "cube off the table"
        if self._env.check_contact(self._robot.robot_model, _TABLE_GEOM):
            return "arm in contact with the table"
        if self._env.check_contact(self._gripper_model, _TABLE_GEOM):
            return "gripper in contact with the table"
        q = obs["joint_pos"].astype(np.float64)
        near = (q < self._joint_range[:, 0] + self.joint_limit_margin) | (
            q > self._joint_range[:, 1] - self.joint_limit_margin
        )
        if np.any(near):
            joint = int(np.flatnonzero(near)[0])
            return f"joint {joint + 1} within {self.joint_limit_margin} rad of its limit"
        return ""

    def _observation(self, raw: dict) -> dict:
        finger = np.asarray(raw["robot0_gripper_qpos"], dtype=np.float64)
        obs = {
            "joint_pos": np.asarray(raw["robot0_joint_pos"], dtype=np.float32),
            "ee_pos": np.asarray(raw["robot0_eef_pos"], dtype=np.float32),
            "ee_quat": np.asarray(raw["robot0_eef_quat"], dtype=np.float32),
            # Finger joints open symmetrically (+q, -q); their difference is the opening.
            "gripper": np.array([max(finger[0] - finger[1], 0.0)], dtype=np.float32),
            "object_pos": np.asarray(raw["cube_pos"], dtype=np.float32),
            "object_quat": np.asarray(raw["cube_quat"], dtype=np.float32),
            "goal": self._goal.copy(),
        }
        for name, camera in zip(self.cameras, self._rs_cameras, strict=True):
            # MuJoCo renders bottom row first (OpenGL convention); flip so the image is upright.
            obs[f"{name}_rgb"] = np.ascontiguousarray(np.asarray(raw[f"{camera}_image"], dtype=np.uint8)[::-1])
        return obs

    @staticmethod
    def _copy_obs(obs: dict) -> dict:
        return {key: value.copy() for key, value in obs.items()}

    def _info(self, success: bool) -> dict:
        return {
            "success": bool(success),
            "constraint_violation": self._blocked,
            "violation": self._violation,
            "blocked": self._blocked,
            "goal": self._goal.copy(),
        }


class LiftExpert(ScriptedOperator):
    """Scripted Lift operator, closed-loop on the observation alone.

    Every step it reads the phase off the state: holding the cube -> carry it to the goal; tool at
    the grasp pose -> close; above the cube with the gripper open -> descend; otherwise rise to the
    hover height over the cube, open and line up. So it can take over from any state.
    """

    def __init__(
        self,
        *args,
        hover_height: float = 0.08,
        grasp_offset: float = 0.005,
        xy_tolerance: float = 0.01,
        z_tolerance: float = 0.008,
        gain: float = 0.5,
        descend_gain: float = 0.15,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.hover_height = float(hover_height)
        self.grasp_offset = float(grasp_offset)
        self.xy_tolerance = float(xy_tolerance)
        self.z_tolerance = float(z_tolerance)
        # Fraction of the remaining error closed per step. Vertical moves near the cube use the
        # smaller descend_gain: a low gain keeps the approach free of overshoot (so off the table)
        # even when the operator reacts a few steps late (reaction_delay).
        self.gain = float(gain)
        self.descend_gain = float(descend_gain)

    # Finger openings (m). The cube is 4.0-4.4 cm wide and may sit at any yaw (the tool cannot turn),
    # so fingers closed on it read between its width and its diagonal (~6.2 cm); fully open is ~8 cm.
    _HOLD_MAX_WIDTH = 0.07
    _HOLD_MIN_WIDTH = 0.02
    _OPEN_ENOUGH_WIDTH = 0.072

    def _move(self, target: np.ndarray, ee: np.ndarray, z_gain: float | None = None) -> np.ndarray:
        gains = np.array([self.gain, self.gain, self.gain if z_gain is None else z_gain])
        return np.clip(gains * (target - ee) / MAX_EE_STEP_M, -1.0, 1.0)

    def policy(self, obs: dict) -> np.ndarray:
        ee = np.asarray(obs["ee_pos"], dtype=np.float64)
        cube = np.asarray(obs["object_pos"], dtype=np.float64)
        goal = np.asarray(obs["goal"], dtype=np.float64)
        width = float(np.asarray(obs["gripper"]).reshape(-1)[0])
        grasp = cube + np.array([0.0, 0.0, self.grasp_offset])
        xy_error = float(np.linalg.norm(grasp[:2] - ee[:2]))
        z_error = float(grasp[2] - ee[2])
        action = np.zeros(ACTION_DIM)

        cube_in_hand = xy_error < 0.02 and abs(z_error) < 0.02
        if cube_in_hand and self._HOLD_MIN_WIDTH < width < self._HOLD_MAX_WIDTH:
            # Holding: carry the cube (not the tool) to the goal.
            action[:3] = self._move(goal - cube + ee, ee)
            action[3] = GRIPPER_CLOSED
        elif xy_error < self.xy_tolerance and abs(z_error) < self.z_tolerance and width > self._HOLD_MIN_WIDTH:
            # At the grasp pose: close, holding still.
            action[:3] = self._move(grasp, ee, self.descend_gain)
            action[3] = GRIPPER_CLOSED
        elif xy_error < self.xy_tolerance and width > self._OPEN_ENOUGH_WIDTH and ee[2] > grasp[2] - 0.01:
            # Lined up above the cube with the fingers open: descend.
            action[:3] = self._move(grasp, ee, self.descend_gain)
            action[3] = GRIPPER_OPEN
        else:
            # Rise to the hover height first, then line up over the cube, opening on the way.
            hover = grasp + np.array([0.0, 0.0, self.hover_height])
            if ee[2] < hover[2] - 0.02 and xy_error > self.xy_tolerance:
                hover[:2] = ee[:2]
            action[:3] = self._move(hover, ee, self.descend_gain)
            action[3] = GRIPPER_OPEN
        return action
