"""The scripted-operator base: a clean closed-loop controller plus human-like imperfection.

A subclass writes `policy(obs)`, the ideal action for an observation, using only the observation
(no memory of earlier steps) so it can take over from any state, as a human operator does
mid-episode. This base adds the imperfections a real teleoperator has:

- reaction_delay: the operator acts on what it saw `reaction_delay` control steps ago; right after
  it starts (a takeover) it holds still until it has seen that many frames.
- action_noise: Gaussian noise (std, in normalized action units) on the translation.
- detour_prob: per-step chance to wander for `detour_steps` steps in a random direction.
"""

from __future__ import annotations

import dataclasses
from collections import deque

import numpy as np

from sim.conventions import ACTION_DIM, GRIPPER_CLOSED, GRIPPER_OPEN

# Finger opening (m) above which the gripper counts as open when an operator takes over.
_OPEN_WIDTH_M = 0.04


@dataclasses.dataclass(frozen=True)
class Imperfection:
    """A scripted operator's human-like imperfection (see the module docstring); all zero is a perfect
    operator. The one place these defaults are written: jobs take `imperfection_knobs()` as theirs."""

    reaction_delay: int = 0
    action_noise: float = 0.0
    detour_prob: float = 0.0
    detour_steps: int = 5
    detour_scale: float = 0.6


def imperfection_knobs(**changes) -> dict:
    """The knobs jobs expose (`operator.<knob>=...`), at their defaults unless changed."""
    knobs = dataclasses.asdict(Imperfection())
    del knobs["detour_steps"], knobs["detour_scale"]  # fine detail, not job-level settings
    return {**knobs, **changes}


_DEFAULT = Imperfection()


class ScriptedOperator:
    def __init__(
        self,
        seed: int | None = None,
        reaction_delay: int = _DEFAULT.reaction_delay,
        action_noise: float = _DEFAULT.action_noise,
        detour_prob: float = _DEFAULT.detour_prob,
        detour_steps: int = _DEFAULT.detour_steps,
        detour_scale: float = _DEFAULT.detour_scale,
    ):
        if reaction_delay < 0 or action_noise < 0 or not 0.0 <= detour_prob <= 1.0 or detour_steps < 1:
            raise ValueError(
                "scripted operator knobs out of range: need reaction_delay >= 0, action_noise >= 0, "
                f"0 <= detour_prob <= 1, detour_steps >= 1 (got {reaction_delay}, {action_noise}, "
                f"{detour_prob}, {detour_steps})"
            )
        self.reaction_delay = int(reaction_delay)
        self.action_noise = float(action_noise)
        self.detour_prob = float(detour_prob)
        self.detour_steps = int(detour_steps)
        self.detour_scale = float(detour_scale)
        self.reset(seed)

    def reset(self, seed: int | None = None) -> None:
        """Forget what was seen; call at every episode start and at every takeover."""
        if seed is not None or not hasattr(self, "rng"):
            self.rng = np.random.default_rng(seed)
        self._seen: deque = deque(maxlen=self.reaction_delay + 1)
        self._detour_left = 0
        self._detour_dir = np.zeros(3)

    def policy(self, obs: dict) -> np.ndarray:
        """The ideal action for `obs` (subclasses)."""
        raise NotImplementedError

    def act(self, obs: dict) -> np.ndarray:
        self._seen.append(obs)
        if len(self._seen) <= self.reaction_delay:
            return self._hold(obs)
        action = np.asarray(self.policy(self._seen[0]), dtype=np.float64).copy()

        if self._detour_left == 0 and self.detour_prob > 0 and self.rng.random() < self.detour_prob:
            direction = self.rng.normal(size=3)
            self._detour_dir = self.detour_scale * direction / (np.linalg.norm(direction) + 1e-9)
            self._detour_left = self.detour_steps
        if self._detour_left > 0:
            action[:3] = self._detour_dir
            self._detour_left -= 1
        if self.action_noise > 0:
            action[:3] += self.rng.normal(scale=self.action_noise, size=3)
        return np.clip(action, -1.0, 1.0).astype(np.float32)

    @staticmethod
    def _hold(obs: dict) -> np.ndarray:
        action = np.zeros(ACTION_DIM, dtype=np.float32)
        width = float(np.asarray(obs["gripper"]).reshape(-1)[0])
        action[3] = GRIPPER_OPEN if width > _OPEN_WIDTH_M else GRIPPER_CLOSED
        return action
