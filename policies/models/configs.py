"""Policy configs: one dataclass per policy kind, holding every default once (no torch here).

Like LeRobot's ``configuration_<policy>.py``: the model (``policies/models/<kind>.py``) is built from
its config (``DiffusionPolicy(shape_meta, DiffusionConfig(...))``), the trainer composes it from the
hydra ``policy`` group (``configs/policy/<kind>.yaml`` lists ``base_<kind>``, this dataclass, and
holds only what differs), and a checkpoint stores it as JSON (``to_dict`` / ``policy_config_from_dict``).
Checks live in ``__post_init__`` and raise ``ConfigError`` naming the key; what can only be checked
against the data (a goal for gc_diffusion) is checked when the model is built.

    PolicyConfig            kind, horizons (n_obs_steps To, horizon Tp, n_action_steps Ta), encoder
      DiffusionConfig       + the U-Net, DDPM training / DDIM sampling
      GCDiffusionConfig     + the U-Net, EDM noise levels, sampler, goal dropout, guidance
      MLPConfig             + hidden layers
    EncoderConfig           the image encoder (used only when the policy sees camera images)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from configs.schema import ConfigError, check, check_choice, check_int, check_number

__all__ = [
    "POLICY_CONFIGS",
    "DiffusionConfig",
    "EncoderConfig",
    "GCDiffusionConfig",
    "MLPConfig",
    "PolicyConfig",
    "policy_config",
    "policy_config_from_dict",
]

PREDICTION_TYPES = ("epsilon", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
SAMPLERS = ("ddim", "dpmpp_2m")
NOISE_DISTRIBUTIONS = ("loguniform", "lognormal")


@dataclass
class EncoderConfig:
    """Image encoder of every policy (policies/models/encoders.py): a stem conv with stride 2, residual
    stages of ``channels`` with GroupNorm, spatial-softmax keypoints, a linear layer to ``feature_dim``;
    random crops of ``crop_ratio`` of the image in training, the centre crop at inference."""

    feature_dim: int = 64
    channels: list[int] = field(default_factory=lambda: [32, 64, 128, 256])
    blocks_per_stage: int = 1
    num_keypoints: int = 32
    crop_ratio: float = 0.875

    def __post_init__(self):
        _lists(self)
        check_int(self.feature_dim, "feature_dim", 1)
        check(len(self.channels) > 0, "channels", "must list at least one channel count")
        for i, channels in enumerate(self.channels):
            check_int(channels, f"channels[{i}]", 1)
        check_int(self.blocks_per_stage, "blocks_per_stage", 1)
        check_int(self.num_keypoints, "num_keypoints", 1)
        check_number(self.crop_ratio, "crop_ratio", 0.0, 1.0, low_open=True)


@dataclass
class PolicyConfig:
    """What every policy kind has: its kind, the receding horizon and the image encoder.

    The model predicts Tp = ``horizon`` actions from the last To = ``n_obs_steps`` observations; the
    runner executes Ta = ``n_action_steps`` of them (Diffusion Policy's To=2, Tp=16, Ta=8)."""

    KIND: ClassVar[str] = ""

    kind: str = ""
    n_obs_steps: int = 2
    horizon: int = 16
    n_action_steps: int = 8
    encoder: EncoderConfig = field(default_factory=EncoderConfig)

    def __post_init__(self):
        if isinstance(self.encoder, dict):
            self.encoder = _build(EncoderConfig, self.encoder, "encoder")
        _lists(self)
        if self.kind != self.KIND:
            raise ConfigError(
                "kind",
                f"is {self.KIND!r} for {type(self).__name__}, got {self.kind!r} "
                f"(choose the kind with policy=<kind>)",
            )
        check_int(self.n_obs_steps, "n_obs_steps", 1)
        check_int(self.horizon, "horizon", 1)
        check_int(self.n_action_steps, "n_action_steps", 1)
        check(
            self.n_action_steps <= self.horizon,
            "n_action_steps",
            f"must be at most horizon ({self.horizon}), got {self.n_action_steps}",
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (checkpoints' config.json); ``policy_config_from_dict`` reverses it."""
        return dataclasses.asdict(self)


@dataclass
class _UNetConfig(PolicyConfig):
    """The FiLM-conditioned 1-D temporal U-Net both diffusion kinds denoise with (policies/models/unet1d.py)."""

    down_dims: list[int] = field(default_factory=lambda: [64, 128, 256])
    kernel_size: int = 3
    n_groups: int = 8
    step_embed_dim: int = 64

    def __post_init__(self):
        super().__post_init__()
        check(len(self.down_dims) > 0, "down_dims", "must list at least one channel count")
        for i, dims in enumerate(self.down_dims):
            check_int(dims, f"down_dims[{i}]", 1)
        check_int(self.n_groups, "n_groups", 1)
        bad = [d for d in self.down_dims if d % self.n_groups]
        check(not bad, "down_dims", f"{bad} not divisible by n_groups={self.n_groups}")
        check_int(self.kernel_size, "kernel_size", 1)
        check(self.kernel_size % 2 == 1, "kernel_size", f"must be odd, got {self.kernel_size}")
        check_int(self.step_embed_dim, "step_embed_dim", 4)
        check(self.step_embed_dim % 2 == 0, "step_embed_dim", f"must be even, got {self.step_embed_dim}")
        multiple = 2 ** (len(self.down_dims) - 1)
        check(
            self.horizon % multiple == 0,
            "horizon",
            f"{self.horizon} must be divisible by {multiple} (2 ** (len(down_dims) - 1)) for down_dims "
            f"{list(self.down_dims)}",
        )


@dataclass
class DiffusionConfig(_UNetConfig):
    """Diffusion Policy (Chi et al., 2023): DDPM training (diffusers, cosine schedule, predicted actions
    clipped to [-1, 1]), DDIM sampling with "trailing" spacing (10 of 100 steps: 99, 89, ..., 9)."""

    KIND: ClassVar[str] = "diffusion"

    kind: str = "diffusion"
    num_train_timesteps: int = 100
    num_inference_steps: int = 10  # may be changed after loading (policy.num_inference_steps)
    prediction_type: str = "epsilon"  # epsilon | sample
    beta_schedule: str = "squaredcos_cap_v2"
    clip_sample: bool = True
    timestep_spacing: str = "trailing"  # leading | trailing | linspace

    def __post_init__(self):
        super().__post_init__()
        check_choice(self.prediction_type, PREDICTION_TYPES, "prediction_type")
        check_int(self.num_train_timesteps, "num_train_timesteps", 2)
        check_int(self.num_inference_steps, "num_inference_steps", 1)
        check(
            self.num_inference_steps <= self.num_train_timesteps,
            "num_inference_steps",
            f"must be in [1, num_train_timesteps={self.num_train_timesteps}], got {self.num_inference_steps}",
        )
        check_choice(self.timestep_spacing, TIMESTEP_SPACINGS, "timestep_spacing")


@dataclass
class GCDiffusionConfig(_UNetConfig):
    """Goal-conditioned diffusion (BESO, Reuss et al., 2023): EDM preconditioning with noise levels
    sigma in [sigma_min, sigma_max] (log-normal in training), a Karras-schedule sampler of
    ``num_inference_steps`` steps, goal dropout for classifier-free guidance with ``cfg_weight``."""

    KIND: ClassVar[str] = "gc_diffusion"

    kind: str = "gc_diffusion"
    sigma_data: float = 0.5
    sigma_min: float = 0.002
    sigma_max: float = 10.0
    rho: float = 7.0
    noise_distribution: str = "lognormal"  # lognormal | loguniform
    num_inference_steps: int = 3  # these three may be changed after loading
    sampler: str = "ddim"  # ddim | dpmpp_2m
    cfg_weight: float = 0.0  # guidance: D = D_uncond + (1 + w) (D_cond - D_uncond); 0 = plain conditional
    goal_dropout: float = 0.1

    def __post_init__(self):
        super().__post_init__()
        check_number(self.sigma_min, "sigma_min", 0.0, low_open=True)
        check_number(self.sigma_max, "sigma_max", self.sigma_min, low_open=True)
        check_number(self.sigma_data, "sigma_data", 0.0, low_open=True)
        check_number(self.rho, "rho", 0.0, low_open=True)
        check_choice(self.noise_distribution, NOISE_DISTRIBUTIONS, "noise_distribution")
        check_int(self.num_inference_steps, "num_inference_steps", 1)
        check_choice(self.sampler, SAMPLERS, "sampler")
        check_number(self.cfg_weight, "cfg_weight")
        check_number(self.goal_dropout, "goal_dropout", 0.0, 1.0, high_open=True)


@dataclass
class MLPConfig(PolicyConfig):
    """The deterministic baseline: observation features (+ goal) -> MLP (Mish) -> an action chunk, MSE."""

    KIND: ClassVar[str] = "mlp"

    kind: str = "mlp"
    hidden_dims: list[int] = field(default_factory=lambda: [256, 256, 256])
    dropout: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        for i, width in enumerate(self.hidden_dims):
            check_int(width, f"hidden_dims[{i}]", 1)
        check_number(self.dropout, "dropout", 0.0, 1.0, high_open=True)


POLICY_CONFIGS: dict[str, type[PolicyConfig]] = {
    cls.KIND: cls for cls in (DiffusionConfig, GCDiffusionConfig, MLPConfig)
}


def policy_config(kind: str, **settings) -> PolicyConfig:
    """The config of policy ``kind`` with ``settings`` changed (``encoder`` may be a dict of its settings).
    ValueError for an unknown kind or setting, ConfigError for a rejected value."""
    if kind not in POLICY_CONFIGS:
        raise ValueError(f"unknown policy kind {kind!r}; expected one of {sorted(POLICY_CONFIGS)}")
    return _build(POLICY_CONFIGS[kind], {"kind": kind, **settings}, "")


def policy_config_from_dict(values: dict[str, Any]) -> PolicyConfig:
    """A config from ``to_dict()``'s form (``kind`` says which)."""
    if not isinstance(values, dict) or "kind" not in values:
        raise ValueError(f"a policy config needs its kind, got {values!r}")
    return policy_config(**values)


def _build(cls: type, values: dict[str, Any], where: str):
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        what = f"policy kind {values.get('kind')!r}" if issubclass(cls, PolicyConfig) else where
        raise ValueError(f"unknown setting(s) {unknown} for {what}; known: {names}")
    values = {key: list(value) if isinstance(value, tuple) else value for key, value in values.items()}
    try:
        return cls(**values)
    except ConfigError as err:
        raise err.under(where) from None


def _lists(config) -> None:
    """Tuples given in code become lists, so a config compares and serializes like one read from JSON."""
    for f in dataclasses.fields(config):
        if isinstance(getattr(config, f.name), tuple):
            setattr(config, f.name, list(getattr(config, f.name)))
