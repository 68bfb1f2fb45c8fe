"""Reach expert: move the tool straight at the goal, proportionally slowing down on arrival."""

from __future__ import annotations

import numpy as np

from sim.conventions import GRIPPER_OPEN
from sim.experts.base import ScriptedOperator
from sim.tasks.panda_env import ee_delta_to_action


class ReachExpert(ScriptedOperator):
    def policy(self, obs: dict) -> np.ndarray:
        delta = np.asarray(obs["goal"], dtype=np.float64) - obs["ee_pos"]
        return np.append(ee_delta_to_action(delta), GRIPPER_OPEN)
