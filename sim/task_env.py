"""What every simulated task env shares (pybullet tasks and the robosuite adapter alike)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np


class TaskEnv(gym.Env):
    """A goal-conditioned env that blocks after a constraint violation (sim/conventions.py).

    Subclasses keep ``self._goal`` (the episode's goal) and ``self._violation`` ('' when none).
    """

    _goal: np.ndarray
    _violation: str = ""

    @property
    def blocked(self) -> bool:
        return bool(self._violation)

    @property
    def goal(self) -> np.ndarray:
        return self._goal.copy()

    def _info(self, success: bool) -> dict:
        return {
            "success": bool(success),
            "constraint_violation": self.blocked,
            "violation": self._violation,
            "blocked": self.blocked,
            "goal": self._goal.astype(np.float32),
        }
