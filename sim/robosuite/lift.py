"""robosuite's Lift (Panda, one cube on a table) behind Flotilla's task contract (sim/conventions.py).

Goal (G=3): a world-frame target position (m) for the cube's centre, above the table: x, y within
`goal_xy_range` of the table centre, z `goal_height_range` above the table top. The episode
succeeds (reward 1, terminated) when the cube's centre is within `success_radius` of the goal,
which, the goal being at least 10 cm up, means the cube is held in the air. (robosuite's own Lift
only asks for the cube to be 4 cm up; the goal makes it goal-conditioned.) A green sphere, seen only
by the cameras, marks the goal.

Control: robosuite's OSC_POSITION arm controller at CONTROL_HZ, the tool held pointing down as at
reset, and a proportional Panda gripper (backend.py). An action of 1.0 moves the tool about
MAX_EE_STEP_M per step (measured 0.029-0.031 m at steady state; the first step from rest ~0.027 m).
ee_pos is robosuite's grip site, between the finger pads; the fingertips reach ~1 cm below it.

Constraint violations (checked after every control step): the cube off the table, any arm link or
the gripper touching the table, or an arm joint within `joint_limit_margin` rad of its limit. The
first one blocks the env: it reports constraint_violation/blocked on every step, the arm holds
where it is (fingers keep their last command) and actions are ignored until reset(). A blocked env
never reports success.

Seeding: reset(seed=s) decides the episode (robosuite's joint noise and cube placement, the goal),
whatever seed the env was built with; the same seed and actions give identical observations. The
cube's size (robosuite draws 4.0-4.4 cm) is the same in every env.

Cameras: `front` (robosuite's agentview), `wrist` (robot0_eye_in_hand), `side` (sideview), `top`
(birdview); any robosuite camera name is accepted as is. Rendering needs a headless GL: robosuite
uses EGL (it sets MUJOCO_GL=egl itself unless MUJOCO_GL=osmesa or glx is set). On Debian the EGL
path needs libegl1, libegl-mesa0 and libgl1-mesa-dri; the OSMesa path (MUJOCO_GL=osmesa
PYOPENGL_PLATFORM=osmesa) libosmesa6.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence

import gymnasium as gym
import numpy as np
from gymnasium.utils import seeding

from sim.conventions import (
    ACTION_DIM,
    CONTROL_HZ,
    GRIPPER_OPEN,
    IMAGE_SIZE,
    goal_from_options,
)
from sim.robosuite.backend import (
    OSC_OUTPUT_LIMIT_M,
    PROPORTIONAL_GRIPPER,
    import_robosuite,
    osc_position_controller_config,
    seeded_global_numpy,
)
from sim.task_env import TaskEnv

CAMERA_ALIASES = {
    "front": "agentview",
    "wrist": "robot0_eye_in_hand",
    "side": "sideview",
    "top": "birdview",
}
_ROBOSUITE_CAMERAS = (
    "agentview",
    "robot0_eye_in_hand",
    "sideview",
    "birdview",
    "frontview",
    "robot0_robotview",
)

# Table collision geom in robosuite's TableArena.
_TABLE_GEOM = "table_collision"
# Seed of the one-off model randomness (the cube's size).
_MODEL_SEED = 0
# The cube counts as off the table once its centre is this far below the table top.
_OFF_TABLE_DROP_M = 0.05
_GOAL_MARKER = "flotilla_goal_marker"
_GOAL_MARKER_RGBA = "0.1 0.8 0.2 1"
_GOAL_MARKER_RADIUS_M = 0.015

_lift_class = None


def _robosuite_lift_class():
    """robosuite's Lift plus a goal marker, rendering offscreen without multisampling.

    The marker is a mocap body with one visual-only sphere, moved to the goal at every reset.
    Multisampling: without a GPU, MuJoCo renders through Mesa's software rasterizer, where MuJoCo's
    default 4x MSAA makes every frame several times slower and changes nothing visible at ~96 px.
    It is fixed when the render context is made (during construction), so it is switched off on
    the model as soon as the simulation exists.
    """
    global _lift_class
    if _lift_class is None:
        import_robosuite()
        from robosuite.environments.manipulation.lift import Lift

        class FlotillaLift(Lift):
            def _load_model(self):
                super()._load_model()
                marker = ET.Element("body", name=_GOAL_MARKER, mocap="true", pos="0 0 -1")
                ET.SubElement(
                    marker,
                    "geom",
                    name=_GOAL_MARKER,
                    type="sphere",
                    size=str(_GOAL_MARKER_RADIUS_M),
                    rgba=_GOAL_MARKER_RGBA,
                    contype="0",
                    conaffinity="0",
                    group="1",  # robosuite's visual group: rendered, never collides
                )
                self.model.worldbody.append(marker)

            def _initialize_sim(self, xml_string=None):
                super()._initialize_sim(xml_string)
                self.sim.model.vis.quality.offsamples = 0

        _lift_class = FlotillaLift
    return _lift_class


def _float_box(size: int, low: float = -np.inf, high: float = np.inf) -> gym.spaces.Box:
    return gym.spaces.Box(low, high, shape=(size,), dtype=np.float32)


class RobosuiteLiftEnv(TaskEnv):
    """Lift the cube to a goal position. See the module docstring for goal, success and constraints."""

    metadata = {"render_modes": []}
    task_name = "lift"
    goal_dim = 3
    default_max_steps = 100

    def __init__(
        self,
        seed: int | None = None,
        cameras: Sequence[str] = (),
        image_size: int = IMAGE_SIZE,
        max_steps: int | None = None,
        goal_xy_range: float = 0.08,
        goal_height_range: Sequence[float] = (0.10, 0.20),
        success_radius: float = 0.03,
        joint_limit_margin: float = 0.05,
    ):
        if isinstance(cameras, str):
            cameras = (cameras,)
        self.cameras = tuple(cameras)
        self._rs_cameras = [self._robosuite_camera(name) for name in self.cameras]
        self._set_image_size_and_max_steps(image_size, max_steps)
        low, high = (float(v) for v in goal_height_range)
        if not 0.0 < low <= high:
            raise ValueError(f"goal_height_range must be 0 < low <= high, got {tuple(goal_height_range)}")
        self.goal_xy_range = float(goal_xy_range)
        self.goal_height_range = (low, high)
        self.success_radius = float(success_radius)
        self.joint_limit_margin = float(joint_limit_margin)

        self._env = self._make_robosuite_env()
        self._setup_references()
        self.np_random, _ = seeding.np_random(seed)

        spaces = {
            "joint_pos": _float_box(7),
            "ee_pos": _float_box(3),
            "ee_quat": _float_box(4, -1.0, 1.0),
            "gripper": _float_box(1, 0.0, 0.1),
            "object_pos": _float_box(3),
            "object_quat": _float_box(4, -1.0, 1.0),
            "goal": _float_box(self.goal_dim),
        }
        for name in self.cameras:
            spaces[f"{name}_rgb"] = gym.spaces.Box(
                0, 255, (self.image_size, self.image_size, 3), dtype=np.uint8
            )
        self.observation_space = gym.spaces.Dict(spaces)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (ACTION_DIM,), dtype=np.float32)

        self._goal = np.zeros(self.goal_dim)
        self._steps = 0
        self._violation = ""
        self._hold_gripper = GRIPPER_OPEN
        self._hold_pos = np.zeros(3)
        self._needs_reset = True

    # ---------------------------------------------------------------- construction

    @staticmethod
    def _robosuite_camera(name: str) -> str:
        camera = CAMERA_ALIASES.get(name, name)
        if camera not in _ROBOSUITE_CAMERAS:
            raise ValueError(
                f"unknown camera {name!r}; known cameras: {', '.join(CAMERA_ALIASES)} "
                f"or a robosuite camera name ({', '.join(_ROBOSUITE_CAMERAS)})"
            )
        return camera

    def _make_robosuite_env(self):
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
            hard_reset=False,  # keep one model: a hard reset rebuilds it from XML every episode
        )
        if use_cameras:
            kwargs.update(
                camera_names=list(self._rs_cameras),
                camera_heights=self.image_size,
                camera_widths=self.image_size,
            )
        # robosuite draws the cube's size from the global np.random when it builds the model, once
        # per env (no hard resets). A fixed seed gives every env the same cube, so that
        # reset(seed=s) alone decides an episode, whatever seed the env was built with.
        with seeded_global_numpy(_MODEL_SEED):
            try:
                env = _robosuite_lift_class()(**kwargs)
            except Exception as exc:
                if not use_cameras:
                    raise
                raise RuntimeError(
                    f"robosuite could not set up offscreen rendering for cameras {self.cameras}: {exc}. "
                    "Headless rendering needs EGL (apt-get install libegl1 libegl-mesa0 libgl1-mesa-dri; "
                    "robosuite's default, MUJOCO_GL=egl) or OSMesa (apt-get install libosmesa6; "
                    "MUJOCO_GL=osmesa PYOPENGL_PLATFORM=osmesa)."
                ) from exc
        if use_cameras:
            import mujoco

            # The table's mirror reflection renders the scene twice: ~40% of a software-rendered
            # frame, for a reflection that is barely visible at this size.
            env.sim._render_context_offscreen.scn.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        return env

    def _setup_references(self):
        env = self._env
        sim = env.sim
        robot = env.robots[0]
        self._robot = robot
        self._gripper_model = robot.gripper["right"]
        self._eef_site = robot.eef_site_id["right"]  # the grip site: robosuite's eef_pos
        self._table_top = np.array(env.model.mujoco_arena.table_top_abs, dtype=np.float64)
        self._table_half_xy = np.array(env.table_full_size[:2], dtype=np.float64) / 2.0
        joint_ids = [sim.model.joint_name2id(name) for name in robot.robot_joints]
        self._joint_range = np.array(sim.model.jnt_range[joint_ids], dtype=np.float64)
        self._marker_mocap = int(sim.model.body_mocapid[sim.model.body_name2id(_GOAL_MARKER)])
        # OSC_POSITION takes deltas in the robot base frame; actions are in the world frame.
        base_body = sim.model.body_name2id(robot.robot_model.root_body)
        self._world_to_base = np.array(sim.data.body_xmat[base_body], dtype=np.float64).reshape(3, 3).T

    # ---------------------------------------------------------------- gym API

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        goal = goal_from_options(options, self.goal_dim, self.task_name)
        # robosuite's reset randomness (joint noise, cube placement) comes from the global np.random.
        with seeded_global_numpy(int(self.np_random.integers(2**31))):
            raw = self._env.reset()
        self._goal = self._sample_goal() if goal is None else goal
        self._env.sim.data.mocap_pos[self._marker_mocap] = self._goal
        if self.cameras:
            # Re-render so that the first images already show the marker at the new goal.
            self._env.sim.forward()
            raw = self._env._get_observations(force_update=True)
        self._hold_gripper = GRIPPER_OPEN
        return self._start_episode(self._observation(raw))

    def step(self, action):
        action = self._checked_action(action)
        if self.blocked:
            # Hold where the violation was seen; the fingers keep their last command. A zero delta
            # would not do: OSC re-bases its goal on the moving tool, so momentum carries it on.
            pull = (self._hold_pos - self._ee_pos()) / OSC_OUTPUT_LIMIT_M
            command = np.append(np.clip(self._world_to_base @ pull, -1.0, 1.0), self._hold_gripper)
        else:
            command = np.concatenate([self._world_to_base @ action[:3], action[3:]])
            self._hold_gripper = float(action[3])
        raw, _, _, _ = self._env.step(command)
        obs = self._observation(raw)
        return obs, *self._finish_step(obs)

    def _hold(self, obs: dict) -> None:
        self._hold_pos = self._ee_pos()

    def close(self):
        if getattr(self, "_env", None) is not None:
            self._env.close()
            self._env = None

    def _ee_pos(self) -> np.ndarray:
        return np.array(self._env.sim.data.site_xpos[self._eef_site], dtype=np.float64)

    # ---------------------------------------------------------------- task logic

    def _sample_goal(self) -> np.ndarray:
        xy = self._table_top[:2] + self.np_random.uniform(-self.goal_xy_range, self.goal_xy_range, size=2)
        z = self._table_top[2] + self.np_random.uniform(*self.goal_height_range)
        return np.array([xy[0], xy[1], z])

    def _is_success(self, obs: dict) -> bool:
        return bool(np.linalg.norm(obs["object_pos"].astype(np.float64) - self._goal) <= self.success_radius)

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
        margin = self.joint_limit_margin
        near = (q < self._joint_range[:, 0] + margin) | (q > self._joint_range[:, 1] - margin)
        if np.any(near):
            return f"joint {int(np.flatnonzero(near)[0]) + 1} within {margin} rad of its limit"
        return ""

    def _observation(self, raw: dict) -> dict:
        finger = np.asarray(raw["robot0_gripper_qpos"], dtype=np.float64)
        obs = {
            "joint_pos": np.asarray(raw["robot0_joint_pos"], dtype=np.float32),
            "ee_pos": np.asarray(raw["robot0_eef_pos"], dtype=np.float32),
            "ee_quat": np.asarray(raw["robot0_eef_quat"], dtype=np.float32),
            # The finger joints open symmetrically (+q, -q): their difference is the opening.
            "gripper": np.array([max(finger[0] - finger[1], 0.0)], dtype=np.float32),
            "object_pos": np.asarray(raw["cube_pos"], dtype=np.float32),
            "object_quat": np.asarray(raw["cube_quat"], dtype=np.float32),
            "goal": self._goal.astype(np.float32),
        }
        for name, camera in zip(self.cameras, self._rs_cameras, strict=True):
            # MuJoCo renders the bottom row first (OpenGL convention): flip so the image is upright.
            obs[f"{name}_rgb"] = np.ascontiguousarray(
                np.asarray(raw[f"{camera}_image"], dtype=np.uint8)[::-1]
            )
        return obs
