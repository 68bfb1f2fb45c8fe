"""Shared base for the Franka Panda table-top tasks (reach, push, pick_place).

Scene (world frame, metres): the robot base stands at the origin on a table whose top is the
plane z = 0 and spans ``TABLE_X`` x ``TABLE_Y``. The tool centre point (TCP) is the Panda's
``panda_grasptarget`` link, midway between the fingertip pads; the fingertips reach about
``FINGERTIP_BELOW_TCP_M`` below it.

Control (sim/conventions.py): each control step adds ``action[:3] * MAX_EE_STEP_M`` to a commanded
TCP target (kept within ``TARGET_LEASH_M`` of the measured TCP), clamps the target to the workspace
box ``WORKSPACE_LOW``..``WORKSPACE_HIGH``, solves pybullet IK once (gripper pointing straight down,
fixed yaw) and position-controls the 7 arm joints, ramping their targets over the
``PHYSICS_HZ / CONTROL_HZ`` physics substeps. ``action[3]`` sets the finger opening proportionally
(-1 open .. +1 closed); the two fingers are geared together. The workspace floor deliberately lets
the fingertips reach below the table top, so a bad policy *can* drive the tool into the table.

Constraint violations (checked after every control step): the object's centre beyond the table
edge or below the table top, any robot link touching the table, or an arm joint within
``JOINT_LIMIT_MARGIN_RAD`` of its limit. The first violation blocks the env: it reports
``constraint_violation``/``blocked`` on every step, the arm holds its pose and actions are ignored
until ``reset()``. A blocked env never reports success.

Every env owns its own pybullet client, so several envs can step side by side in one process.
Episodes start from a snapshot taken at construction (``restoreState``), so the same seed and
actions give bit-identical observations whatever ran before.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
from collections.abc import Sequence

import numpy as np
from gymnasium import spaces
from gymnasium.utils import seeding

from sim.conventions import (
    ACTION_DIM,
    CONTROL_HZ,
    GRIPPER_OPEN,
    IMAGE_SIZE,
    MAX_EE_STEP_M,
    goal_from_options,
)
from sim.task_env import TaskEnv
from sim.tasks.bullet import PhysicsClient, pybullet, pybullet_data

PHYSICS_HZ = 240
SUBSTEPS = PHYSICS_HZ // CONTROL_HZ

# Table top: z = 0, x in TABLE_X, y in TABLE_Y (the robot base stands on it at the origin).
TABLE_X = (-0.15, 0.72)
TABLE_Y = (-0.40, 0.40)
TABLE_THICKNESS_M = 0.04
# Where the TCP target may go. x >= 0.25 keeps the arm off its own base; near (0.25, 0, low) the
# elbow folds to its limit, and z = 0 puts the fingertips ~1 cm into the table: both reachable on
# purpose so that bad policies meet constraint violations.
WORKSPACE_LOW = np.array([0.25, -0.35, 0.0])
WORKSPACE_HIGH = np.array([0.75, 0.35, 0.45])
# The commanded target is kept at most this far from the measured TCP before each action is added
# (free motion lags by ~5 mm), so pushing against something does not wind up a target that the
# tool then jumps to when it slips free.
TARGET_LEASH_M = 0.01
FINGERTIP_BELOW_TCP_M = 0.011
HOME_TCP = np.array([0.45, 0.0, 0.25])

JOINT_LIMIT_MARGIN_RAD = 0.02
FINGER_MAX_OPENING_M = 0.08
FINGER_FORCE_N = 40.0
FINGER_FRICTION = 1.5
TABLE_FRICTION = 0.5

_ARM_JOINTS = list(range(7))
_FINGER_JOINTS = [9, 10]
_HAND_LINK = 8
_TCP_LINK = 11  # panda_grasptarget
# Motor force limits above the real Panda's (87/12 N m): at those the 10 Hz position targets
# overshoot by centimetres under gravity; these track within a few millimetres.
_ARM_FORCES = [150.0] * 4 + [40.0] * 3
_ARM_POSITION_GAIN = 0.25
_IK_ITERATIONS = 30
# Null-space IK: limits for the 7 arm joints + 2 fingers, and a comfortable elbow-up rest pose the
# solver is pulled towards so the arm stays far from its joint limits across the workspace.
_IK_LOWER = [-2.9671, -1.8326, -2.9671, -3.1416, -2.9671, -0.0873, -2.9671, 0.0, 0.0]
_IK_UPPER = [2.9671, 1.8326, 2.9671, 0.0, 2.9671, 3.8223, 2.9671, 0.04, 0.04]
_IK_RANGES = [hi - lo for lo, hi in zip(_IK_LOWER, _IK_UPPER, strict=True)]
_IK_REST = [0.0, 0.2, 0.0, -2.2, 0.0, 2.4, 0.785, 0.04, 0.04]
# Gripper pointing straight down with the fingers closing along world y.
DOWN_QUAT = np.array(pybullet.getQuaternionFromEuler([np.pi, 0.0, 0.0]))

CAMERAS = ("front", "wrist")


@functools.cache
def lowpoly_panda_urdf() -> str:
    """Path of a copy of pybullet_data's Panda URDF that draws the links with their (low-poly)
    collision meshes: the CPU renderer is ~15x faster with them and loading ~20x faster; physics is
    unchanged. Written once per process to a temporary folder.
    """
    source_dir = os.path.join(pybullet_data.getDataPath(), "franka_panda")
    with open(os.path.join(source_dir, "panda.urdf")) as f:
        urdf = f.read()
    urdf = urdf.replace("package://meshes/visual/", "package://meshes/collision/")
    urdf = urdf.replace("package://meshes/", os.path.join(source_dir, "meshes") + "/")
    folder = tempfile.mkdtemp(prefix="flotilla_panda_")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    path = os.path.join(folder, "panda_lowpoly.urdf")
    with open(path, "w") as f:
        f.write(urdf)
    return path


def ee_delta_to_action(delta_m: np.ndarray, max_speed: float = 1.0) -> np.ndarray:
    """Normalized translation action that moves the TCP by `delta_m` metres this step.

    Scaled down as a whole (direction kept) when any axis would exceed `max_speed` (in action units).
    """
    action = np.asarray(delta_m, dtype=np.float64) / MAX_EE_STEP_M
    peak = float(np.max(np.abs(action)))
    if peak > max_speed:
        action *= max_speed / peak
    return action


# The table-top workspace of the object tasks (push, pick_place), x and y in metres, world frame: where
# the object starts, where its goal may lie, and how far apart the two are.
OBJECT_START_XY = (np.array([0.42, -0.15]), np.array([0.58, 0.15]))
OBJECT_GOAL_XY = (np.array([0.36, -0.25]), np.array([0.64, 0.25]))
OBJECT_GOAL_DISTANCE_M = (0.10, 0.25)


def sample_start_and_goal_xy(
    rng: np.random.Generator,
    goal_xy: np.ndarray | None = None,
    start_box: tuple[np.ndarray, np.ndarray] = OBJECT_START_XY,
    goal_box: tuple[np.ndarray, np.ndarray] = OBJECT_GOAL_XY,
    distance: tuple[float, float] = OBJECT_GOAL_DISTANCE_M,
) -> tuple[np.ndarray, np.ndarray]:
    """An object start (x, y) in `start_box` and a goal (x, y) in `goal_box` whose distance from it
    lies in `distance` (min, max), in a uniformly random direction. A given `goal_xy` is kept and
    only the start is sampled to suit it.
    """
    for _ in range(1000):
        start = rng.uniform(*start_box)
        if goal_xy is None:
            angle = rng.uniform(-np.pi, np.pi)
            goal = start + rng.uniform(*distance) * np.array([np.cos(angle), np.sin(angle)])
            if np.all(goal >= goal_box[0]) and np.all(goal <= goal_box[1]):
                return start, goal
        elif distance[0] <= np.linalg.norm(goal_xy - start) <= distance[1]:
            return start, np.asarray(goal_xy, dtype=np.float64)
    raise ValueError(
        f"no object start in {start_box} lies {distance} m from the goal {goal_xy}; choose a goal nearer "
        "the middle of the table"
    )


class PandaEnv(TaskEnv):
    """Panda on a table; subclasses add the object, goal sampling and the success test.

    Subclass hooks: ``_create_object`` (optional), ``_sample_episode``, ``_is_success`` and
    ``_goal_marker_position``; class attributes ``task_name``, ``goal_dim``, ``default_max_steps``.
    """

    metadata = {"render_modes": []}
    task_name: str = ""
    goal_dim: int = 3
    default_max_steps: int = 100

    def __init__(
        self,
        seed: int | None = None,
        cameras: Sequence[str] = (),
        image_size: int = IMAGE_SIZE,
        max_steps: int | None = None,
    ):
        cameras = tuple(cameras)
        unknown = [c for c in cameras if c not in CAMERAS]
        if unknown:
            raise ValueError(f"unknown camera(s) {unknown}; known cameras: {', '.join(CAMERAS)}")
        self.cameras = cameras
        self._set_image_size_and_max_steps(image_size, max_steps)

        self._p = PhysicsClient(pybullet.DIRECT)
        self._build_scene()
        # Settle with the motors holding home, so the snapshot includes the resting contacts:
        # restoring it then overwrites whatever contact cache the previous episode left behind.
        self._command_arm(self._home_q)
        self._command_gripper(GRIPPER_OPEN)
        for _ in range(SUBSTEPS):
            self._p.stepSimulation()
        self._initial_state = self._p.saveState()
        self.np_random, _ = seeding.np_random(seed)

        self.action_space = spaces.Box(-1.0, 1.0, (ACTION_DIM,), dtype=np.float32)
        self.observation_space = self._make_observation_space()
        self._goal = np.zeros(self.goal_dim)
        self._target = HOME_TCP.copy()
        self._arm_command = self._home_q.copy()
        self._steps = 0
        self._violation = ""
        self._needs_reset = True

    # ----------------------------------------------------------------- task hooks

    def _create_object(self) -> int | None:
        """Create the manipulated object (once, at construction); None for tasks without one."""
        return None

    def _sample_episode(self, goal: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        """Return (goal, object start [x, y, z, yaw] or None) drawn from ``self.np_random``.

        `goal` is the caller's goal when given (``reset(options={"goal": ...})``); the object start
        must then be sampled to suit it.
        """
        raise NotImplementedError

    def _is_success(self, state: dict) -> bool:
        raise NotImplementedError

    def _goal_marker_position(self, goal: np.ndarray) -> np.ndarray:
        """Where the goal marker (seen only by cameras) is drawn."""
        return np.asarray(goal, dtype=np.float64)

    def _goal_marker_visual(self) -> dict:
        """createVisualShape kwargs for the goal marker."""
        return {"shapeType": pybullet.GEOM_SPHERE, "radius": 0.015, "rgbaColor": [0.1, 0.8, 0.2, 1.0]}

    # ----------------------------------------------------------------- scene

    def _build_scene(self) -> None:
        p = self._p
        p.setAdditionalSearchPath(pybullet_data.getDataPath())
        p.setGravity(0, 0, -9.81)
        p.setTimeStep(1.0 / PHYSICS_HZ)

        half = [(TABLE_X[1] - TABLE_X[0]) / 2, (TABLE_Y[1] - TABLE_Y[0]) / 2, TABLE_THICKNESS_M / 2]
        centre = [(TABLE_X[0] + TABLE_X[1]) / 2, (TABLE_Y[0] + TABLE_Y[1]) / 2, -TABLE_THICKNESS_M / 2]
        self.table_id = p.createMultiBody(
            baseMass=0.0,
            baseCollisionShapeIndex=p.createCollisionShape(pybullet.GEOM_BOX, halfExtents=half),
            baseVisualShapeIndex=p.createVisualShape(
                pybullet.GEOM_BOX, halfExtents=half, rgbaColor=[0.75, 0.6, 0.45, 1.0]
            ),
            basePosition=centre,
        )
        p.changeDynamics(self.table_id, -1, lateralFriction=TABLE_FRICTION)
        # A floor well below the table, so whatever falls off comes to rest. Invisible: cameras
        # render faster without it.
        floor = p.createMultiBody(
            baseMass=0.0,
            baseCollisionShapeIndex=p.createCollisionShape(pybullet.GEOM_PLANE),
            basePosition=[0, 0, -0.75],
        )
        p.changeVisualShape(floor, -1, rgbaColor=[0, 0, 0, 0])

        self.robot_id = p.loadURDF(lowpoly_panda_urdf(), [0, 0, 0], useFixedBase=True)
        # The base stands on the table: that contact is by design, not a violation.
        p.setCollisionFilterPair(self.robot_id, self.table_id, -1, -1, 0)
        for finger in _FINGER_JOINTS:
            p.changeDynamics(self.robot_id, finger, lateralFriction=FINGER_FRICTION)
        # Couple the fingers (mirror images, as the real gripper's mechanism does); independent
        # fingers both pressing at full force let a grasped object slide sideways between them.
        gear = p.createConstraint(
            self.robot_id,
            _FINGER_JOINTS[0],
            self.robot_id,
            _FINGER_JOINTS[1],
            jointType=pybullet.JOINT_GEAR,
            jointAxis=[1, 0, 0],
            parentFramePosition=[0, 0, 0],
            childFramePosition=[0, 0, 0],
        )
        p.changeConstraint(gear, gearRatio=-1, erp=0.1, maxForce=50)

        self.object_id = self._create_object()
        self.marker_id = p.createMultiBody(
            baseMass=0.0,
            baseVisualShapeIndex=p.createVisualShape(**self._goal_marker_visual()),
            basePosition=[0, 0, -0.5],
        )
        self._home_q = self._solve_home_pose()
        for joint, q in zip(_ARM_JOINTS, self._home_q, strict=True):
            p.resetJointState(self.robot_id, joint, q)
        for joint in _FINGER_JOINTS:
            p.resetJointState(self.robot_id, joint, FINGER_MAX_OPENING_M / 2)

    def _solve_home_pose(self) -> np.ndarray:
        """Arm joints that put the TCP at HOME_TCP pointing down (IK iterated from the rest pose)."""
        p = self._p
        for joint, q in zip(_ARM_JOINTS + _FINGER_JOINTS, _IK_REST, strict=True):
            p.resetJointState(self.robot_id, joint, q)
        for _ in range(20):
            q = self._ik(HOME_TCP)
            for joint, qj in zip(_ARM_JOINTS, q, strict=True):
                p.resetJointState(self.robot_id, joint, qj)
        return q

    def _ik(self, target: np.ndarray) -> np.ndarray:
        solution = self._p.calculateInverseKinematics(
            self.robot_id,
            _TCP_LINK,
            target.tolist(),
            DOWN_QUAT.tolist(),
            lowerLimits=_IK_LOWER,
            upperLimits=_IK_UPPER,
            jointRanges=_IK_RANGES,
            restPoses=_IK_REST,
            maxNumIterations=_IK_ITERATIONS,
            residualThreshold=1e-5,
        )
        return np.asarray(solution[:7])

    def _make_cube(self, half_size: float, mass: float, friction: float, rgba: Sequence[float]) -> int:
        """A dynamic cube with explicit size, mass and friction (for subclasses' objects)."""
        p = self._p
        body = p.createMultiBody(
            baseMass=mass,
            baseCollisionShapeIndex=p.createCollisionShape(pybullet.GEOM_BOX, halfExtents=[half_size] * 3),
            baseVisualShapeIndex=p.createVisualShape(
                pybullet.GEOM_BOX, halfExtents=[half_size] * 3, rgbaColor=list(rgba)
            ),
            basePosition=[0.5, 0.0, half_size],
        )
        p.changeDynamics(body, -1, lateralFriction=friction)
        return body

    # ----------------------------------------------------------------- spaces and observations

    def _make_observation_space(self) -> spaces.Dict:
        f32 = np.float32
        lower = np.asarray(_IK_LOWER[:7], dtype=f32) - 0.1
        upper = np.asarray(_IK_UPPER[:7], dtype=f32) + 0.1
        keys: dict[str, spaces.Space] = {
            "joint_pos": spaces.Box(lower, upper, dtype=f32),
            "ee_pos": spaces.Box(-np.inf, np.inf, (3,), dtype=f32),
            "ee_quat": spaces.Box(-1.0, 1.0, (4,), dtype=f32),
            "gripper": spaces.Box(-0.01, FINGER_MAX_OPENING_M + 0.01, (1,), dtype=f32),
        }
        if self.object_id is not None:
            keys["object_pos"] = spaces.Box(-np.inf, np.inf, (3,), dtype=f32)
            keys["object_quat"] = spaces.Box(-1.0, 1.0, (4,), dtype=f32)
            keys["ee_to_object"] = spaces.Box(-np.inf, np.inf, (3,), dtype=f32)
            keys["object_to_goal"] = spaces.Box(-np.inf, np.inf, (self.goal_dim,), dtype=f32)
        keys["goal"] = spaces.Box(-np.inf, np.inf, (self.goal_dim,), dtype=f32)
        for cam in self.cameras:
            keys[f"{cam}_rgb"] = spaces.Box(0, 255, (self.image_size, self.image_size, 3), dtype=np.uint8)
        return spaces.Dict(keys)

    def _read_state(self) -> dict:
        """Simulator state in float64 (observations are its float32 copy)."""
        p = self._p
        joints = p.getJointStates(self.robot_id, _ARM_JOINTS + _FINGER_JOINTS)
        tcp = p.getLinkState(self.robot_id, _TCP_LINK, computeForwardKinematics=True)
        state = {
            "joint_pos": np.array([j[0] for j in joints[:7]]),
            "ee_pos": np.array(tcp[4]),
            "ee_quat": np.array(tcp[5]),
            "gripper": np.array([joints[7][0] + joints[8][0]]),
        }
        if self.object_id is not None:
            pos, quat = p.getBasePositionAndOrientation(self.object_id)
            state["object_pos"] = np.array(pos)
            state["object_quat"] = np.array(quat)
        return state

    def _observation(self, state: dict) -> dict:
        obs = {key: value.astype(np.float32) for key, value in state.items()}
        if "object_pos" in state:
            # Relative positions, as robosuite's observables give them: a policy learns "push towards
            # the goal" from 50 demos far more easily than it derives it from absolute coordinates.
            obs["ee_to_object"] = (state["object_pos"] - state["ee_pos"]).astype(np.float32)
            obs["object_to_goal"] = (self._goal - state["object_pos"][: self.goal_dim]).astype(np.float32)
        obs["goal"] = self._goal.astype(np.float32)
        for cam in self.cameras:
            obs[f"{cam}_rgb"] = self._render(cam)
        return obs

    def _render(self, camera: str) -> np.ndarray:
        p = self._p
        size = self.image_size
        if camera == "front":
            view = p.computeViewMatrix([1.15, 0.0, 0.75], [0.45, 0.0, 0.0], [0, 0, 1])
            proj = p.computeProjectionMatrixFOV(fov=45, aspect=1.0, nearVal=0.05, farVal=3.0)
        else:  # wrist: on the hand, looking down between the fingers
            hand_pos, hand_quat = p.getLinkState(self.robot_id, _HAND_LINK)[4:6]
            rot = np.array(p.getMatrixFromQuaternion(hand_quat)).reshape(3, 3)
            eye = np.array(hand_pos) + rot @ [0.09, 0.0, 0.04]
            look_at = np.array(hand_pos) + rot @ [0.0, 0.0, 0.2]
            view = p.computeViewMatrix(eye.tolist(), look_at.tolist(), (rot @ [1.0, 0.0, 0.0]).tolist())
            proj = p.computeProjectionMatrixFOV(fov=75, aspect=1.0, nearVal=0.01, farVal=2.0)
        _, _, rgba, _, _ = p.getCameraImage(
            size,
            size,
            viewMatrix=view,
            projectionMatrix=proj,
            renderer=pybullet.ER_TINY_RENDERER,
            flags=pybullet.ER_NO_SEGMENTATION_MASK,
        )
        return np.asarray(rgba, dtype=np.uint8).reshape(size, size, 4)[:, :, :3].copy()

    # ----------------------------------------------------------------- gym API

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        goal = goal_from_options(options, self.goal_dim, self.task_name)
        p = self._p
        # Drop the contact caches of the previous episode (object on the floor or in the fingers,
        # fingers on the table): the snapshot restores the pairs it holds but leaves others behind.
        for body, height in ((self.robot_id, 10.0), (self.object_id, 20.0)):
            if body is not None:
                p.resetBasePositionAndOrientation(body, [0.0, 0.0, height], [0, 0, 0, 1])
        p.performCollisionDetection()
        p.restoreState(self._initial_state)
        # restoreState restores bodies, not motor targets: command the home pose explicitly.
        self._arm_command = self._home_q.copy()
        self._command_arm(self._arm_command)
        self._command_gripper(GRIPPER_OPEN)

        self._goal, object_start = self._sample_episode(goal)
        if object_start is not None:
            x, y, z, yaw = object_start
            p.resetBasePositionAndOrientation(
                self.object_id, [x, y, z], p.getQuaternionFromEuler([0.0, 0.0, yaw])
            )
            p.resetBaseVelocity(self.object_id, [0, 0, 0], [0, 0, 0])
        p.resetBasePositionAndOrientation(
            self.marker_id, self._goal_marker_position(self._goal).tolist(), [0, 0, 0, 1]
        )

        self._target = HOME_TCP.copy()
        return self._start_episode(self._observation(self._read_state()))

    def step(self, action):
        action = self._checked_action(action)
        if self.blocked:
            self._simulate(self._arm_command)
        else:
            self._command_gripper(action[3])
            self._simulate(self._arm_target_for(action))
        state = self._read_state()
        outcome = self._finish_step(state)
        return self._observation(state), *outcome

    def _hold(self, state: dict) -> None:
        # Freeze the arm where it is; the fingers keep their last command.
        self._arm_command = state["joint_pos"]
        self._command_arm(self._arm_command)

    def close(self):
        if getattr(self, "_p", None) is not None:
            self._p.disconnect()
            self._p = None

    # ----------------------------------------------------------------- control and constraints

    def _arm_target_for(self, action: np.ndarray) -> np.ndarray:
        """Move the commanded TCP target by the action; return the arm joints that reach it."""
        ee = np.array(self._p.getLinkState(self.robot_id, _TCP_LINK, computeForwardKinematics=True)[4])
        lag = self._target - ee
        lag_norm = float(np.linalg.norm(lag))
        if lag_norm > TARGET_LEASH_M:  # blocked by contact: forget the wound-up part
            lag *= TARGET_LEASH_M / lag_norm
        target = np.clip(ee + lag + action[:3] * MAX_EE_STEP_M, WORKSPACE_LOW, WORKSPACE_HIGH)
        self._target = target
        return self._ik(target)

    def _simulate(self, arm_goal: np.ndarray) -> None:
        """Run one control step of physics, ramping the arm's joint targets linearly to `arm_goal`.

        Ramping (rather than jumping the targets once per control step) makes the arm move at a steady
        speed through the step; a jump would whip the tool at ~1 m/s for a few milliseconds and fling
        whatever it touches.
        """
        start = self._arm_command
        for i in range(1, SUBSTEPS + 1):
            self._command_arm(start + (arm_goal - start) * (i / SUBSTEPS))
            self._p.stepSimulation()
        self._arm_command = arm_goal

    def _command_arm(self, joint_targets: np.ndarray) -> None:
        self._p.setJointMotorControlArray(
            self.robot_id,
            _ARM_JOINTS,
            pybullet.POSITION_CONTROL,
            targetPositions=list(joint_targets),
            forces=_ARM_FORCES,
            positionGains=[_ARM_POSITION_GAIN] * 7,
        )

    def _command_gripper(self, command: float) -> None:
        opening = FINGER_MAX_OPENING_M * (1.0 - float(command)) / 2.0
        self._p.setJointMotorControlArray(
            self.robot_id,
            _FINGER_JOINTS,
            pybullet.POSITION_CONTROL,
            targetPositions=[opening / 2.0] * 2,
            forces=[FINGER_FORCE_N] * 2,
        )

    def _check_violation(self, state: dict) -> str:
        """The reason for a constraint violation in `state`, '' if none."""
        if "object_pos" in state:
            x, y, z = state["object_pos"]
            if not (TABLE_X[0] <= x <= TABLE_X[1] and TABLE_Y[0] <= y <= TABLE_Y[1]) or z < 0.0:
                return f"object off the table at ({x:.3f}, {y:.3f}, {z:.3f})"
        contacts = self._p.getContactPoints(bodyA=self.robot_id, bodyB=self.table_id)
        if contacts:
            link = self._p.getJointInfo(self.robot_id, contacts[0][3])[12].decode()
            return f"robot link {link} touches the table"
        q = state["joint_pos"]
        lower = np.asarray(_IK_LOWER[:7]) + JOINT_LIMIT_MARGIN_RAD
        upper = np.asarray(_IK_UPPER[:7]) - JOINT_LIMIT_MARGIN_RAD
        at_limit = np.flatnonzero((q < lower) | (q > upper))
        if at_limit.size:
            j = int(at_limit[0])
            return f"arm joint {j + 1} at its limit ({q[j]:.3f} rad, range {_IK_LOWER[j]}..{_IK_UPPER[j]})"
        return ""
