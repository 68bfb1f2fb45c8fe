"""What every simulated task env shares (pybullet tasks and the robosuite adapter alike)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np

from sim.conventions import validate_action


class TaskEnv(gym.Env):
    """A goal-conditioned env that blocks after a constraint violation (sim/conventions.py).

    Subclasses keep ``self._goal`` (the episode's goal), ``self._violation`` ('' when none), ``max_steps``,
    and implement ``_check_violation(state)``, ``_is_success(state)`` and ``_hold(state)`` (keep the robot
    where a new violation was seen); their ``reset`` ends with ``_start_episode`` and their ``step`` runs
    between ``_checked_action`` and ``_finish_step``.
    """

    _goal: np.ndarray
    _violation: str = ""
    _steps: int = 0
    _needs_reset: bool = True
    default_max_steps: int
    max_steps: int
    image_size: int

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

    def _set_image_size_and_max_steps(self, image_size: int, max_steps: int | None) -> None:
        """Camera images of image_size pixels square (>= 8); episodes of max_steps steps (None: the task's
        default_max_steps)."""
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8 pixels, got {image_size}")
        self.image_size = int(image_size)
        self.max_steps = int(max_steps if max_steps is not None else self.default_max_steps)
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")

    def _start_episode(self, observation: dict) -> tuple[dict, dict]:
        """reset()'s return, once the step count and the violation are cleared."""
        self._steps = 0
        self._violation = ""
        self._needs_reset = False
        return observation, self._info(success=False)

    def _checked_action(self, action) -> np.ndarray:
        """A step's action, checked (sim/conventions.py), once reset() has started the episode."""
        action = validate_action(action)
        if self._needs_reset:
            raise RuntimeError("call reset() before step()")
        return action

    def _finish_step(self, state) -> tuple[float, bool, bool, dict]:
        """Count the step and check the constraints on its state (a new violation holds the robot);
        gym's reward, terminated, truncated and info: success is reaching the goal while not blocked."""
        self._steps += 1
        if not self.blocked:
            self._violation = self._check_violation(state)
            if self._violation:
                self._hold(state)
        success = not self.blocked and bool(self._is_success(state))
        truncated = self._steps >= self.max_steps
        return float(success), success, truncated, self._info(success)

    def _check_violation(self, state) -> str:
        raise NotImplementedError

    def _is_success(self, state) -> bool:
        raise NotImplementedError

    def _hold(self, state) -> None:
        raise NotImplementedError
