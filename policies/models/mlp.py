"""Deterministic behaviour-cloning baseline: obs features (+ normalized goal) -> MLP -> normalized action chunk."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from policies.models.configs import MLPConfig
from policies.models.encoders import PolicyBase, ShapeMeta, chunk_loss


class MLPPolicy(PolicyBase):
    kind = "mlp"
    config_class = MLPConfig
    config: MLPConfig

    def __init__(self, shape_meta: ShapeMeta, config: MLPConfig | None = None):
        super().__init__(shape_meta, config)
        layers: list[nn.Module] = []
        width = self.obs_feature_dim + self.goal_dim
        for hidden in self.config.hidden_dims:
            layers += [nn.Linear(width, hidden), nn.Mish()]
            if self.config.dropout > 0:
                layers.append(nn.Dropout(self.config.dropout))
            width = hidden
        layers.append(nn.Linear(width, self.horizon * self.action_dim))
        self.model = nn.Sequential(*layers)

    def _forward(self, obs: dict[str, torch.Tensor], goal: torch.Tensor | None) -> torch.Tensor:
        return self.model(self._condition(obs, goal)).view(-1, self.horizon, self.action_dim)

    def compute_loss(self, batch: dict) -> torch.Tensor:
        """Per-sample MSE (B,) between predicted and demonstrated normalized action chunks."""
        pred = self._forward(batch["obs"], batch.get("goal"))
        self._check_action(batch["action"], pred.shape[0])
        target = self.normalizer.normalize("action", batch["action"])
        return chunk_loss(F.mse_loss(pred, target, reduction="none"), batch)

    def _predict(self, obs, goal, num_samples, generator) -> torch.Tensor:
        """(B, num_samples, Tp, action_dim): the one deterministic chunk repeated num_samples times."""
        action = self.normalizer.unnormalize("action", self._forward(obs, goal))
        return action.unsqueeze(1).expand(-1, num_samples, -1, -1).contiguous()
