"""Pick-and-place expert: open, go above the cube, descend, close, lift, carry, lower, release.

The phase is read off the observation every step, in order:

1. cube resting at the goal: open the gripper, then rise (release and retreat);
2. cube held (between the closed fingers, gripper at the cube's width): lift it, carry it above the
   goal, lower it onto the goal;
3. tool at the grasp pose around the cube: close (or, if the fingers closed on nothing, rise);
4. gripper open and above the cube: descend onto it;
5. tool low but not ready to descend (gripper closed, or off to the side): rise while opening;
6. otherwise travel above the cube at hover height with the gripper open.

A dropped cube is simply "not held" again, so the expert starts over from wherever it is.
"""

from __future__ import annotations

import numpy as np

from sim.conventions import GRIPPER_CLOSED, GRIPPER_OPEN
from sim.experts.base import ScriptedOperator
from sim.tasks.panda_env import FINGERTIP_BELOW_TCP_M, ee_delta_to_action
from sim.tasks.pick_place import CUBE_HALF_M

HOVER_HEIGHT_M = 0.09  # TCP height above which open fingers clear the cube
CARRY_HEIGHT_M = 0.10  # cube centre height while carrying
GRASP_ABOVE_CENTRE_M = 0.012  # TCP this far above the cube's centre when closing: fingertips ~21 mm up
# The tool never goes lower than this: fingertips 12 mm above the table.
TOOL_FLOOR_M = FINGERTIP_BELOW_TCP_M + 0.012
_CUBE_WIDTH_M = 2 * CUBE_HALF_M
_OPEN_M = 0.07  # finger opening that counts as open
_EMPTY_M = _CUBE_WIDTH_M - 0.012  # fingers closed past the cube's width: nothing between them
# A yawed cube is gripped across its corners, up to its diagonal apart.
_HELD_MAX_M = _CUBE_WIDTH_M * np.sqrt(2.0) + 0.003
_ABOVE_M = 0.012  # xy error within which the tool is above the cube (start the descent)
_GRASP_XY_M = 0.02  # xy error tolerated once descending: the open fingers leave 2 cm each side
_LOWER_XY_M = 0.02  # start lowering the held cube once this close (xy) to the goal
_PLACE_XY_M = 0.012  # release once the cube is down this close (xy) to the goal
# Lower the cube to just above its goal and let go there: pressing it into the table would make
# the fingers slide down it onto the table.
_SET_DOWN_ABOVE_M = 0.004
_RELEASE_ABOVE_GOAL_M = 0.008
_CLEAR_TABLE_M = 0.015  # lift the cube this far before carrying it sideways
# Fraction of the remaining error corrected per step, capped at full speed. Well below 1 so that an
# operator who reacts a few steps late still converges; lowest for moving down (towards the table).
_XY_GAIN = 0.3
_DOWN_GAIN = 0.2
_UP_GAIN = 0.4


def _toward(current: np.ndarray, target: np.ndarray, tool_z: float | None = None) -> np.ndarray:
    """Action moving `current` (the tool, or the held cube with the tool at `tool_z`) to `target`,
    never taking the tool below TOOL_FLOOR_M."""
    delta = np.asarray(target, dtype=np.float64) - current
    tool_z = current[2] if tool_z is None else tool_z
    delta[2] = max(delta[2], TOOL_FLOOR_M - tool_z)
    delta[:2] *= _XY_GAIN
    delta[2] *= _DOWN_GAIN if delta[2] < 0 else _UP_GAIN
    return ee_delta_to_action(delta)


class PickPlaceExpert(ScriptedOperator):
    def policy(self, obs: dict) -> np.ndarray:
        tool = np.asarray(obs["ee_pos"], dtype=np.float64)
        cube = np.asarray(obs["object_pos"], dtype=np.float64)
        goal = np.asarray(obs["goal"], dtype=np.float64)
        width = float(np.asarray(obs["gripper"]).reshape(-1)[0])
        opened = width > _OPEN_M

        cube_to_goal_xy = float(np.linalg.norm(goal[:2] - cube[:2]))
        # Set down: the cube is (nearly) on its goal, or as low as the tool may take it.
        set_down = cube[2] < goal[2] + _RELEASE_ABOVE_GOAL_M or tool[2] < TOOL_FLOOR_M + 0.004
        if cube_to_goal_xy < _PLACE_XY_M and set_down:
            if not opened:
                return np.array([0.0, 0.0, 0.0, GRIPPER_OPEN])
            return np.append(_toward(tool, [tool[0], tool[1], HOVER_HEIGHT_M]), GRIPPER_OPEN)

        tool_to_cube_xy = float(np.linalg.norm(cube[:2] - tool[:2]))
        held = (
            tool_to_cube_xy < _GRASP_XY_M
            and abs(cube[2] - tool[2]) < 0.025
            and _EMPTY_M < width < _HELD_MAX_M
        )
        if held:
            # Carry at height until nearly above the goal, then lower it while still correcting.
            height = CARRY_HEIGHT_M if cube_to_goal_xy > _LOWER_XY_M else goal[2] + _SET_DOWN_ABOVE_M
            cube_target = np.array([goal[0], goal[1], height])
            if cube[2] < CUBE_HALF_M + _CLEAR_TABLE_M and cube_to_goal_xy > _LOWER_XY_M:
                cube_target[:2] = cube[:2]  # straight up off the table first
            return np.append(_toward(cube, cube_target, tool_z=tool[2]), GRIPPER_CLOSED)

        grasp_pose = np.array([cube[0], cube[1], cube[2] + GRASP_ABOVE_CENTRE_M])
        if tool_to_cube_xy < _GRASP_XY_M and abs(tool[2] - grasp_pose[2]) < 0.01:
            if width < _EMPTY_M:  # closed on nothing: back off and retry
                return np.append(_toward(tool, [tool[0], tool[1], HOVER_HEIGHT_M]), GRIPPER_OPEN)
            return np.array([0.0, 0.0, 0.0, GRIPPER_CLOSED])

        low = tool[2] < HOVER_HEIGHT_M - 0.015
        above_cube = tool_to_cube_xy < (_GRASP_XY_M if low else _ABOVE_M)
        if opened and above_cube:
            return np.append(_toward(tool, grasp_pose), GRIPPER_OPEN)
        if low:
            return np.append(_toward(tool, [tool[0], tool[1], HOVER_HEIGHT_M]), GRIPPER_OPEN)
        return np.append(_toward(tool, [cube[0], cube[1], HOVER_HEIGHT_M]), GRIPPER_OPEN)
