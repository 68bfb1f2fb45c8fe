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

    @abstractmethod
    def predict_action(
        self,
        obs: dict[str, torch.Tensor],
        goal: torch.Tensor | None = None,
        num_samples: int = 1,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """(B, num_samples, Tp, action_dim) unnormalized actions."""

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
