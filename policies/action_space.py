"""How a policy's outputs map to the robot's actions.

- delta: the policy predicts the robot's actions as they are (normalized end-effector steps, see
  sim/conventions.py).
- target: the policy predicts absolute end-effector positions (the rest of the action, the gripper,
  as is). Training data is converted with target = position + action * step_m, and at run time each
  target becomes the step that reaches it from the *measured* position, clipped to the action
  bounds. Errors then do not pile up over an open-loop chunk of actions the way summed deltas do;
  Diffusion Policy (Chi et al., 2023) reports the same for position versus velocity control.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from configs.schema import ConfigError

KINDS = ("delta", "target")


@dataclass
class ActionSpace:
    """Also the trainer's ``action_space`` setting (policies/config.py); a checkpoint stores it."""

    kind: str = "delta"  # delta | target
    position_key: str = "ee_pos"
    step_m: float = 0.03  # metres per unit of normalized action: sim/conventions.py MAX_EE_STEP_M

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError("kind", f"unknown action space {self.kind!r}; choose one of {', '.join(KINDS)}")
        if not self.step_m > 0:
            raise ConfigError("step_m", f"must be positive, got {self.step_m}")

    def to_policy(self, actions: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Robot actions (T, A) at measured positions (T, P) -> what the policy learns to predict."""
        if self.kind == "delta":
            return actions
        out = np.array(actions, dtype=np.float32, copy=True)
        dims = positions.shape[-1]
        out[..., :dims] = positions + actions[..., :dims] * self.step_m
        return out

    def to_robot(self, policy_action: np.ndarray, position: np.ndarray | None) -> np.ndarray:
        """One predicted action -> the robot action to send now from the measured `position`."""
        if self.kind == "delta":
            return policy_action
        if position is None:
            raise KeyError(f"a target-space policy needs the observation's {self.position_key!r}")
        out = np.array(policy_action, dtype=np.float32, copy=True)
        dims = len(position)
        out[:dims] = np.clip((policy_action[:dims] - position) / self.step_m, -1.0, 1.0)
        return out

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict | None) -> ActionSpace:
        return cls(**(values or {}))


DELTA = ActionSpace()  # the robot's own actions, unchanged
