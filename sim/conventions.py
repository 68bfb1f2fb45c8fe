"""Conventions every simulated task follows (pybullet tasks and the robosuite adapter alike).

Policies, the episode store and the fleet see only these, so a policy trained on one backend
reads the other's observations and actions the same way.

Action: a float32 vector of 4 values in [-1, 1]:
    [dx, dy, dz, gripper]
    - dx, dy, dz: end-effector translation for this control step in the world frame, scaled by
      ``MAX_EE_STEP_M`` (so 1.0 means MAX_EE_STEP_M metres). The end-effector keeps pointing down.
    - gripper: -1 opens fully, +1 closes fully (robosuite's sign), values in between are
      proportional.
Actions outside [-1, 1] are clipped; a non-finite action is rejected with ValueError.

Control: ``CONTROL_HZ`` control steps per second, each integrating the physics in substeps.

Observation (a dict of float32 arrays unless noted):
    joint_pos   (7,)   arm joint positions, rad
    ee_pos      (3,)   end-effector (tool centre point) position, m, world frame
    ee_quat     (4,)   end-effector orientation, xyzw
    gripper     (1,)   finger opening, m (0 closed .. ~0.08 open)
    object_pos  (3,)   manipulated object position (tasks with an object)
    object_quat (4,)   manipulated object orientation, xyzw (tasks with an object)
    ee_to_object (3,)  object_pos - ee_pos (pybullet tasks with an object)
    object_to_goal (G,) goal - the object's position's first G coordinates (pybullet tasks with an object)
    goal        (G,)   the episode's goal, task-specific (see each task)
    <cam>_rgb   (H, W, 3) uint8 camera image, only when cameras are enabled

info (every step): success (bool), constraint_violation (bool), violation (str, '' if none),
    blocked (bool: the env ignores actions until reset), goal (the goal array).
"""

import numpy as np

CONTROL_HZ = 10
MAX_EE_STEP_M = 0.03
ACTION_DIM = 4
GRIPPER_OPEN = -1.0
GRIPPER_CLOSED = 1.0
IMAGE_SIZE = 96
# The arm's and the object's part of an object task's observation (shapes as above; float32).
OBJECT_STATE_SHAPES = {
    "joint_pos": (7,),
    "ee_pos": (3,),
    "ee_quat": (4,),
    "gripper": (1,),
    "object_pos": (3,),
    "object_quat": (4,),
}


def validate_action(action) -> np.ndarray:
    """The action as float64, clipped to [-1, 1]; ValueError for a wrong shape or a non-finite value."""
    action = np.asarray(action, dtype=np.float64)
    if action.shape != (ACTION_DIM,):
        raise ValueError(f"action must have shape ({ACTION_DIM},), got {action.shape}")
    if not np.all(np.isfinite(action)):
        raise ValueError(f"action contains non-finite values (NaN or inf): {action.tolist()}")
    return np.clip(action, -1.0, 1.0)


def goal_from_options(options: dict | None, goal_dim: int, task_name: str) -> np.ndarray | None:
    """The goal `reset(options={"goal": ...})` asks for, or None to sample one; ValueError if malformed."""
    if not options or options.get("goal") is None:
        return None
    goal = np.asarray(options["goal"], dtype=np.float64).reshape(-1)
    if goal.shape != (goal_dim,) or not np.all(np.isfinite(goal)):
        raise ValueError(
            f"{task_name}: options['goal'] must be {goal_dim} finite numbers, got {options['goal']!r}"
        )
    return goal
