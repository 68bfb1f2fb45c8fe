"""Reach: bring the tool centre point to a goal point.

Goal: (3,) the target TCP position (x, y, z) in metres, world frame, sampled uniformly in
``GOAL_LOW``..``GOAL_HIGH`` at least ``MIN_GOAL_DISTANCE_M`` from the start. Success: the TCP within
``SUCCESS_RADIUS_M`` of the goal.
"""

from __future__ import annotations

import numpy as np

from sim.tasks.panda_env import HOME_TCP, PandaEnv

GOAL_LOW = np.array([0.32, -0.28, 0.06])
GOAL_HIGH = np.array([0.66, 0.28, 0.35])
MIN_GOAL_DISTANCE_M = 0.10
SUCCESS_RADIUS_M = 0.02


class ReachEnv(PandaEnv):
    task_name = "reach"
    goal_dim = 3
    default_max_steps = 50

    def _sample_episode(self, goal):
        if goal is None:
            while True:
                goal = self.np_random.uniform(GOAL_LOW, GOAL_HIGH)
                if np.linalg.norm(goal - HOME_TCP) >= MIN_GOAL_DISTANCE_M:
                    break
        return goal, None

    def _is_success(self, state):
        return np.linalg.norm(state["ee_pos"] - self._goal) < SUCCESS_RADIUS_M
