"""``Policy``: the contract every model and the ensemble implement, for the trainer, checkpoints and runner."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from policies.models.configs import PolicyConfig
from policies.models.normalizer import LinearNormalizer


class Policy(nn.Module, ABC):
    """A policy: per-sample training loss, action chunks at inference, its typed config.

    Attributes every policy sets: ``kind``; ``config`` (its ``PolicyConfig``, current inference settings
    included, which is what a checkpoint stores); ``shape_meta``; ``normalizer`` (a ``LinearNormalizer``
    whose statistics live in the state dict); the horizons ``n_obs_steps``, ``horizon``,
    ``n_action_steps``; ``action_dim`` and ``goal_dim``; ``ensemble_size`` (1, or E for an ensemble).
    ``forward(batch)`` is ``compute_loss(batch)``, so a DistributedDataParallel wrapper trains any policy.
    """

    kind: str
    config: PolicyConfig
    normalizer: LinearNormalizer

    @property
    def ensemble_size(self) -> int:
        return 1

    @abstractmethod
    def compute_loss(self, batch: dict) -> torch.Tensor:
        """Per-sample loss (B,) of an unnormalized batch, differentiable (see policies/models/__init__.py)."""

    def predict_action(
        self,
        obs: dict[str, torch.Tensor],
        goal: torch.Tensor | None = None,
        num_samples: int = 1,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """(B, num_samples, Tp, action_dim) unnormalized actions."""
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        return self._predict(obs, goal, num_samples, generator)

    @abstractmethod
    def _predict(
        self,
        obs: dict[str, torch.Tensor],
        goal: torch.Tensor | None,
        num_samples: int,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """``predict_action`` with ``num_samples`` (>= 1) checked."""

    def forward(self, batch: dict) -> torch.Tensor:
        return self.compute_loss(batch)

    def normalizer_keys(self) -> list[str]:
        """Keys the normalizer must hold: low-dim obs keys, "action" and "goal" (if goal_dim > 0)."""
        return self.normalizer.keys()

    def set_normalizer(self, normalizer: LinearNormalizer) -> None:
        """Copy the statistics this policy needs from a fitted normalizer (KeyError if one is missing)."""
        missing = [key for key in self.normalizer_keys() if not normalizer.is_fitted(key)]
        if missing:
            raise KeyError(
                f"normalizer lacks fitted statistics for {missing}; it has {normalizer.fitted_keys()}"
            )
        self.normalizer.load_from(normalizer, self.normalizer_keys())


class StepwiseSampling(ABC):
    """``num_inference_steps`` of a policy that samples in steps: changeable after loading, kept in its config."""

    @property
    def num_inference_steps(self) -> int:
        return self._num_inference_steps

    @num_inference_steps.setter
    def num_inference_steps(self, steps: int) -> None:
        steps = int(steps)
        self._schedule(steps)
        self._num_inference_steps = self.config.num_inference_steps = steps

    @abstractmethod
    def _schedule(self, steps: int) -> None:
        """Check ``steps`` (ValueError) and precompute what sampling in that many steps needs."""
