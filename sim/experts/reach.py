"""Reach expert: move the tool straight at the goal, slowing down proportionally on arrival."""

from __future__ import annotations

import numpy as np

from sim.conventions import GRIPPER_OPEN
from sim.experts.base import ScriptedOperator
from sim.tasks.panda_env import ee_delta_to_action

# Fraction of the remaining distance covered per step (capped at full speed): below 1 so that an
# operator who reacts a few steps late still settles on the goal instead of oscillating around it.
_GAIN = 0.4


class ReachExpert(ScriptedOperator):
    def policy(self, obs: dict) -> np.ndarray:
        delta = np.asarray(obs["goal"], dtype=np.float64) - obs["ee_pos"]
        return np.append(ee_delta_to_action(_GAIN * delta), GRIPPER_OPEN)
