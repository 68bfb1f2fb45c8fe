"""Pick and place: grasp a cube, carry it and set it down at a goal position on the table.

Goal: (3,) the target position (x, y, z) of the cube's centre, metres, world frame; z is the
height of the centre of a cube resting on the table (``CUBE_HALF_M``). The cube starts in
``OBJECT_START_XY`` (sim/tasks/panda_env.py) with a small random yaw; the goal lies
``OBJECT_GOAL_DISTANCE_M`` away from it in the plane, inside ``OBJECT_GOAL_XY``. Success: the cube's
centre within ``SUCCESS_RADIUS_M`` of the goal, released (no robot link touching it) and at rest.
"""

from __future__ import annotations

import numpy as np

from sim.tasks.bullet import pybullet
from sim.tasks.panda_env import PandaEnv, sample_start_and_goal_xy

CUBE_HALF_M = 0.02
CUBE_MASS_KG = 0.1
CUBE_FRICTION = 1.0  # pybullet multiplies frictions: 0.5 against the table, 1.5 against the fingers
CUBE_MAX_YAW_RAD = np.pi / 6
SUCCESS_RADIUS_M = 0.03
AT_REST_SPEED_M_S = 0.05


class PickPlaceEnv(PandaEnv):
    task_name = "pick_place"
    goal_dim = 3
    default_max_steps = 150

    def _create_object(self):
        return self._make_cube(CUBE_HALF_M, CUBE_MASS_KG, CUBE_FRICTION, [0.2, 0.35, 0.85, 1.0])

    def _sample_episode(self, goal):
        start, goal_xy = sample_start_and_goal_xy(self.np_random, None if goal is None else goal[:2])
        yaw = self.np_random.uniform(-CUBE_MAX_YAW_RAD, CUBE_MAX_YAW_RAD)
        goal = np.array([goal_xy[0], goal_xy[1], CUBE_HALF_M if goal is None else goal[2]])
        return goal, np.array([start[0], start[1], CUBE_HALF_M, yaw])

    def _is_success(self, state):
        if np.linalg.norm(state["object_pos"] - self._goal) >= SUCCESS_RADIUS_M:
            return False
        released = not self._p.getContactPoints(bodyA=self.robot_id, bodyB=self.object_id)
        speed = np.linalg.norm(self._p.getBaseVelocity(self.object_id)[0])
        return released and speed < AT_REST_SPEED_M_S

    def _goal_marker_position(self, goal):
        return np.array([goal[0], goal[1], 0.0005])

    def _goal_marker_visual(self):
        return {
            "shapeType": pybullet.GEOM_BOX,
            "halfExtents": [CUBE_HALF_M, CUBE_HALF_M, 0.0005],
            "rgbaColor": [0.1, 0.8, 0.2, 1.0],
        }
