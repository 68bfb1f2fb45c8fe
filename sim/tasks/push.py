"""Push: slide a block across the table to a goal position (it cannot be grasped usefully: the
expert and policies push it with the closed fingers).

Goal: (2,) the target (x, y) of the block's centre on the table, metres, world frame. The block
starts in ``OBJECT_START_XY`` (sim/tasks/panda_env.py) with a random yaw; the goal lies
``OBJECT_GOAL_DISTANCE_M`` away from it in any direction, inside ``OBJECT_GOAL_XY``. Success: the
block's centre within ``SUCCESS_RADIUS_M`` of the goal in the plane (its orientation does not matter).
"""

from __future__ import annotations

import numpy as np

from sim.tasks.bullet import pybullet
from sim.tasks.panda_env import PandaEnv, sample_start_and_goal_xy

BLOCK_HALF_M = 0.025
BLOCK_MASS_KG = 0.3
BLOCK_FRICTION = 0.5  # pybullet multiplies frictions: 0.25 against the table, 0.75 against the fingers
SUCCESS_RADIUS_M = 0.03


class PushEnv(PandaEnv):
    task_name = "push"
    goal_dim = 2
    default_max_steps = 150

    def _create_object(self):
        return self._make_cube(BLOCK_HALF_M, BLOCK_MASS_KG, BLOCK_FRICTION, [0.85, 0.2, 0.15, 1.0])

    def _sample_episode(self, goal):
        start, goal = sample_start_and_goal_xy(self.np_random, goal)
        yaw = self.np_random.uniform(-np.pi / 4, np.pi / 4)
        return goal, np.array([start[0], start[1], BLOCK_HALF_M, yaw])

    def _is_success(self, state):
        return np.linalg.norm(state["object_pos"][:2] - self._goal) < SUCCESS_RADIUS_M

    def _goal_marker_position(self, goal):
        return np.array([goal[0], goal[1], 0.0005])

    def _goal_marker_visual(self):
        return {
            "shapeType": pybullet.GEOM_BOX,
            "halfExtents": [BLOCK_HALF_M, BLOCK_HALF_M, 0.0005],
            "rgbaColor": [0.1, 0.8, 0.2, 1.0],
        }
