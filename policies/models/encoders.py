"""Shape meta, observation encoders and the part every policy shares (normalizer, obs features, config).

Observation encoding (per time step):
    low-dim keys   normalized by the policy's LinearNormalizer and concatenated (sorted key order);
    image keys     uint8 (H, W, C) -> float [0, 1], channels first -> crop (random in train mode, centre
                   in eval mode) -> a small residual CNN with GroupNorm -> spatial softmax keypoints
                   (expected x, y per keypoint channel) -> linear -> ``feature_dim`` features
                   (``EncoderConfig``, policies/models/configs.py). One CNN per camera key.
The per-step feature is concat(low-dim, image features...) of size ``ObsEncoder.feature_dim``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from policies.models.base import Policy
from policies.models.configs import EncoderConfig, PolicyConfig
from policies.models.normalizer import LinearNormalizer


# =========================================================================================== shape meta
@dataclass
class ShapeMeta:
    """What a policy sees: ``obs`` maps each key to its per-step shape ((D,) low-dim, (H, W, C) uint8
    image), plus the action and goal sizes (goal_dim 0: no goal)."""

    obs: dict[str, tuple[int, ...]]
    action_dim: int
    goal_dim: int = 0
    _keys: tuple[list[str], list[str]] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if not isinstance(self.obs, dict) or not self.obs:
            raise ValueError("ShapeMeta.obs must be a non-empty dict of key -> shape")
        shapes = {}
        for key, shape in self.obs.items():
            if isinstance(shape, int):
                shape = (shape,)
            shape = tuple(int(s) for s in shape)
            if len(shape) not in (1, 3) or any(s <= 0 for s in shape):
                raise ValueError(
                    f"obs key {key!r}: shape {shape} must be (D,) for low-dim or (H, W, C) for an image"
                )
            if not key or "." in key or key in ("action", "goal"):
                raise ValueError(f"obs key {key!r} is not allowed (empty, contains '.', or reserved)")
            shapes[str(key)] = shape
        self.obs = shapes
        self.action_dim, self.goal_dim = int(self.action_dim), int(self.goal_dim)
        if self.action_dim <= 0 or self.goal_dim < 0:
            raise ValueError(
                f"action_dim must be > 0 and goal_dim >= 0, got {self.action_dim}, {self.goal_dim}"
            )
        lowdim = sorted(k for k, s in shapes.items() if len(s) == 1)
        images = sorted(k for k, s in shapes.items() if len(s) == 3)
        self._keys = (lowdim, images)

    @property
    def lowdim_keys(self) -> list[str]:
        return list(self._keys[0])

    @property
    def image_keys(self) -> list[str]:
        return list(self._keys[1])

    @property
    def lowdim_dim(self) -> int:
        return sum(self.obs[k][0] for k in self.lowdim_keys)

    def to_dict(self) -> dict:
        return {
            "obs": {k: list(s) for k, s in self.obs.items()},
            "action_dim": self.action_dim,
            "goal_dim": self.goal_dim,
        }

    @classmethod
    def from_dict(cls, data: dict) -> ShapeMeta:
        if isinstance(data, ShapeMeta):
            return data
        try:
            return cls(
                obs={k: tuple(v) for k, v in dict(data["obs"]).items()},
                action_dim=data["action_dim"],
                goal_dim=data.get("goal_dim", 0),
            )
        except (KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"bad shape meta {data!r}: {err}") from None


# =========================================================================================== image encoder
def _groups(channels: int) -> int:
    for g in (8, 4, 2, 1):
        if channels % g == 0 and channels // g >= 4:
            return g
    return 1


class _ResBlock2d(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(_groups(c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(_groups(c_out), c_out)
        self.shortcut = (
            nn.Identity()
            if stride == 1 and c_in == c_out
            else nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.GroupNorm(_groups(c_out), c_out)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(h))
        return F.relu(h + self.shortcut(x))


class SpatialSoftmax(nn.Module):
    """1x1 conv to K keypoint maps, softmax over pixels, expected (x, y) in [-1, 1] per map -> (N, 2K)."""

    def __init__(self, channels: int, height: int, width: int, num_keypoints: int):
        super().__init__()
        self.keypoints = nn.Conv2d(channels, num_keypoints, 1)
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
        self.register_buffer("grid", torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.keypoints(x).flatten(2)  # (N, K, H*W)
        attention = torch.softmax(maps, dim=-1)
        return (attention @ self.grid).flatten(1)  # (N, K*2)


class ImageEncoder(nn.Module):
    """uint8 (N, H, W, C) -> (N, config.feature_dim). Random crop in train mode, centre crop in eval mode."""

    def __init__(self, shape: tuple[int, int, int], config: EncoderConfig | None = None):
        super().__init__()
        config = config or EncoderConfig()
        height, width, in_ch = shape
        channels, blocks_per_stage = tuple(config.channels), config.blocks_per_stage
        self.crop = (max(8, round(height * config.crop_ratio)), max(8, round(width * config.crop_ratio)))
        self.crop = (min(self.crop[0], height), min(self.crop[1], width))
        self.in_shape = (height, width, in_ch)
        layers: list[nn.Module] = [
            nn.Conv2d(in_ch, channels[0], 3, stride=2, padding=1, bias=False),
            nn.GroupNorm(_groups(channels[0]), channels[0]),
            nn.ReLU(),
        ]
        c_prev = channels[0]
        for stage, c in enumerate(channels):
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(_ResBlock2d(c_prev, c, stride))
                c_prev = c
        self.backbone = nn.Sequential(*layers)
        with torch.no_grad():
            out = self.backbone(torch.zeros(1, in_ch, *self.crop))
        self.pool = SpatialSoftmax(c_prev, out.shape[2], out.shape[3], config.num_keypoints)
        self.head = nn.Linear(2 * config.num_keypoints, config.feature_dim)
        self.feature_dim = config.feature_dim

    def crop_images(self, x: torch.Tensor) -> torch.Tensor:
        """(N, H, W, C) -> (N, ch, cw, C): independent random crops in train mode, centre crop otherwise."""
        n, h, w, _ = x.shape
        ch, cw = self.crop
        if (ch, cw) == (h, w):
            return x
        if not self.training:
            top, left = (h - ch) // 2, (w - cw) // 2
            return x[:, top : top + ch, left : left + cw]
        top = torch.randint(0, h - ch + 1, (n, 1, 1), device=x.device)
        left = torch.randint(0, w - cw + 1, (n, 1, 1), device=x.device)
        rows = top + torch.arange(ch, device=x.device).view(1, ch, 1)
        cols = left + torch.arange(cw, device=x.device).view(1, 1, cw)
        index = torch.arange(n, device=x.device).view(n, 1, 1)
        return x[index, rows, cols]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1:] != self.in_shape:
            raise ValueError(
                f"image batch has shape {tuple(images.shape[1:])}, encoder expects {self.in_shape}"
            )
        x = self.crop_images(images)
        x = x.permute(0, 3, 1, 2).float()
        if images.dtype == torch.uint8:
            x = x * (1.0 / 255.0)
        return self.head(self.pool(self.backbone(x)))


class ObsEncoder(nn.Module):
    """Normalized obs dict {key: (B, T, ...)} -> per-step features (B, T, feature_dim)."""

    def __init__(self, shape_meta: ShapeMeta, config: EncoderConfig | None = None):
        super().__init__()
        config = config or EncoderConfig()
        self.lowdim_keys = shape_meta.lowdim_keys
        self.image_keys = shape_meta.image_keys
        self.images = nn.ModuleDict(
            {key: ImageEncoder(shape_meta.obs[key], config) for key in self.image_keys}
        )
        self.feature_dim = shape_meta.lowdim_dim + config.feature_dim * len(self.image_keys)

    def forward(self, nobs: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = [nobs[key] for key in self.lowdim_keys]
        for key in self.image_keys:
            x = nobs[key]
            b, t = x.shape[:2]
            parts.append(self.images[key](x.reshape(b * t, *x.shape[2:])).reshape(b, t, -1))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


# =========================================================================================== policy base
class PolicyBase(Policy):
    """What the single-model policies share: config, horizons, the normalizer, observation checks and encoding."""

    kind = "base"
    config_class: type[PolicyConfig] = PolicyConfig

    def __init__(self, shape_meta: ShapeMeta, config: PolicyConfig | None = None):
        super().__init__()
        config = self.config_class() if config is None else config
        if type(config) is not self.config_class:
            raise ValueError(
                f"{type(self).__name__} is built from a {self.config_class.__name__}, "
                f"got {type(config).__name__}"
            )
        self.config = copy.deepcopy(config)  # the policy's own: inference settings changed later update it
        self.shape_meta = ShapeMeta.from_dict(shape_meta) if isinstance(shape_meta, dict) else shape_meta
        if not isinstance(self.shape_meta, ShapeMeta):
            raise ValueError(f"shape_meta must be a ShapeMeta or its dict, got {type(shape_meta).__name__}")
        self.n_obs_steps, self.horizon, self.n_action_steps = (
            config.n_obs_steps,
            config.horizon,
            config.n_action_steps,
        )
        self.action_dim, self.goal_dim = self.shape_meta.action_dim, self.shape_meta.goal_dim
        dims = {key: self.shape_meta.obs[key][0] for key in self.shape_meta.lowdim_keys}
        dims["action"] = self.action_dim
        if self.goal_dim:
            dims["goal"] = self.goal_dim
        self.normalizer = LinearNormalizer(dims)
        self.obs_encoder = ObsEncoder(self.shape_meta, config.encoder)
        self.obs_feature_dim = self.obs_encoder.feature_dim * self.n_obs_steps

    # ------------------------------------------------------------------------------ inputs
    def _check_obs(self, obs: dict[str, torch.Tensor]) -> int:
        batch = None
        for key, shape in self.shape_meta.obs.items():
            if key not in obs:
                raise KeyError(f"observation key {key!r} is missing; got {sorted(obs)}")
            x = obs[key]
            expected = (self.n_obs_steps, *shape)
            if tuple(x.shape[1:]) != expected:
                raise ValueError(
                    f"obs[{key!r}] has shape {tuple(x.shape)}, expected (B, {', '.join(map(str, expected))})"
                )
            if batch is None:
                batch = x.shape[0]
            elif x.shape[0] != batch:
                raise ValueError(f"obs[{key!r}] has batch size {x.shape[0]}, other keys have {batch}")
        return batch

    def _normalized_goal(self, goal: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        if not self.goal_dim:
            return None
        if goal is None:
            raise ValueError(
                f"{self.kind} policy was built with goal_dim={self.goal_dim}; a goal is required"
            )
        if tuple(goal.shape) != (batch, self.goal_dim):
            raise ValueError(f"goal has shape {tuple(goal.shape)}, expected ({batch}, {self.goal_dim})")
        return self.normalizer.normalize("goal", goal)

    def encode_obs(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Unnormalized obs {key: (B, To, ...)} -> flat features (B, To * per-step feature)."""
        batch = self._check_obs(obs)
        nobs = {key: self.normalizer.normalize(key, obs[key]) for key in self.shape_meta.lowdim_keys}
        nobs.update({key: obs[key] for key in self.shape_meta.image_keys})
        return self.obs_encoder(nobs).reshape(batch, -1)

    def _features(
        self, obs: dict[str, torch.Tensor], goal: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The observation features (B, obs_feature_dim) and the normalized goal (None if goal_dim is 0)."""
        features = self.encode_obs(obs)
        return features, self._normalized_goal(goal, features.shape[0])

    def _condition(self, obs: dict[str, torch.Tensor], goal: torch.Tensor | None) -> torch.Tensor:
        """What the network is conditioned on: the features, followed by the normalized goal if any."""
        features, ngoal = self._features(obs, goal)
        return features if ngoal is None else torch.cat([features, ngoal], dim=-1)

    def _check_action(self, action: torch.Tensor, batch: int) -> None:
        if tuple(action.shape) != (batch, self.horizon, self.action_dim):
            raise ValueError(
                f"batch['action'] has shape {tuple(action.shape)}, "
                f"expected ({batch}, {self.horizon}, {self.action_dim})"
            )


def chunk_loss(squared_error: torch.Tensor, batch: dict) -> torch.Tensor:
    """Per-sample loss (B,) from a (B, Tp, A) squared error.

    With ``batch["action_mask"]`` (B, Tp; 1 = a step that happened, 0 = padding past an episode's
    edge) padded steps carry no loss: the edge copies are not behaviour, and learning them teaches
    a policy to stop (repeated positions) or to overshoot (repeated steps) near every goal.
    """
    mask = batch.get("action_mask")
    if mask is None:
        return squared_error.mean(dim=(1, 2))
    mask = mask.to(squared_error.dtype)
    return (squared_error * mask[..., None]).sum(dim=(1, 2)) / (
        mask.sum(dim=1) * squared_error.shape[-1]
    ).clamp_min(1)
