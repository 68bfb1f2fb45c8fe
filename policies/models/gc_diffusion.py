"""Goal-conditioned score diffusion policy in the style of BESO (Reuss et al. 2023), EDM parameterization.

Denoiser (Karras et al. 2022 preconditioning), x the noisy normalized action chunk at noise level sigma:
    D(x; sigma, cond) = c_skip * x + c_out * F(c_in * x, c_noise, cond)
    c_skip = sd^2 / (sigma^2 + sd^2),  c_out = sigma * sd / sqrt(sigma^2 + sd^2),
    c_in = 1 / sqrt(sigma^2 + sd^2),   c_noise = ln(sigma) / 4   (fed to the U-Net's sinusoidal step
    embedding as 100 * c_noise, so its range is comparable to integer DDPM steps)
F is the FiLM U-Net of unet1d.py; cond = concat(observation features of the To steps, goal embedding).
Training loss (per sample) is EDM's weighted denoising loss written on F's output:
    || F(...) - (a - c_skip * x) / c_out ||^2,  a the clean normalized actions, x = a + sigma * n.

Settings and their defaults: ``GCDiffusionConfig`` (policies/models/configs.py). Why these defaults:

Noise levels (actions normalized to [-1, 1], so the data std is about 0.5, hence sigma_data 0.5):
    sigma_max 10, not the 80 BESO/EDM use for images: at 10 the signal to noise ratio is already 0.05,
    and a smaller sigma_max leaves the 3-step schedule's middle level lower. Training sigmas:
    "lognormal" (ln sigma ~ N(-1.2, 1.2^2), EDM's choice, clipped to [sigma_min, sigma_max]) or
    "loguniform" on [sigma_min, sigma_max]. On a small overfitting check
    (tests/test_policy_models.py) lognormal reached a lower 3-step sampling error for the same
    training steps than loguniform, which spends a third of its samples on sigma < 0.05.

Sampling: Karras schedule sigma_i = (smax^(1/rho) + i/(n-1) * (smin^(1/rho) - smax^(1/rho)))^rho,
i = 0..n-1, followed by 0, so n steps = n denoiser calls (3 steps: 10, 0.48, 0.002, 0).
Samplers: "ddim" (the deterministic first-order step x' = D + (sigma'/sigma) (x - D), i.e. DDIM
/ Euler on the probability-flow ODE) or "dpmpp_2m" (DPM-Solver++(2M), second-order multistep in
log-sigma, first-order on the first and last step).

Classifier-free guidance: during training the (normalized) goal is replaced with probability
``goal_dropout`` by a learned null goal vector. At inference with ``cfg_weight`` w != 0 the
conditional and unconditional denoisers run in one batched forward and combine as
    D = D_uncond + (1 + w) * (D_cond - D_uncond)
so w = 0 is the plain conditional model (no extra cost) and w > 0 pushes harder toward the goal.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from policies.models.base import StepwiseSampling
from policies.models.configs import SAMPLERS, GCDiffusionConfig
from policies.models.encoders import PolicyBase, ShapeMeta, chunk_loss
from policies.models.unet1d import ConditionalUnet1D

_TIME_SCALE = 100.0
_LOGNORMAL_MEAN, _LOGNORMAL_STD = -1.2, 1.2


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> list[float]:
    """n noise levels from sigma_max down to sigma_min (Karras et al. 2022, eq. 5), then a final 0."""
    if n == 1:
        return [float(sigma_max), 0.0]
    hi, lo = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
    return [float((hi + i / (n - 1) * (lo - hi)) ** rho) for i in range(n)] + [0.0]


class GCDiffusionPolicy(StepwiseSampling, PolicyBase):
    kind = "gc_diffusion"
    config_class = GCDiffusionConfig
    config: GCDiffusionConfig

    def __init__(self, shape_meta: ShapeMeta, config: GCDiffusionConfig | None = None):
        meta = ShapeMeta.from_dict(shape_meta) if isinstance(shape_meta, dict) else shape_meta
        if getattr(meta, "goal_dim", 0) <= 0:
            raise ValueError(
                "gc_diffusion needs a goal: build it with shape_meta.goal_dim > 0 "
                "(use kind 'diffusion' for a policy without a goal)"
            )
        super().__init__(meta, config)
        config = self.config
        self.model = ConditionalUnet1D.for_policy(self)
        self.null_goal = nn.Parameter(torch.zeros(self.goal_dim))
        self.sigma_data, self.sigma_min, self.sigma_max = (
            config.sigma_data,
            config.sigma_min,
            config.sigma_max,
        )
        self.rho, self.noise_distribution = config.rho, config.noise_distribution
        self.goal_dropout = config.goal_dropout
        self.cfg_weight = config.cfg_weight
        self.sampler = config.sampler
        self.num_inference_steps = config.num_inference_steps

    # ------------------------------------------------------------------------------ settings (changeable after loading)
    def _schedule(self, steps: int) -> None:
        if steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {steps}")
        self._sigmas = karras_sigmas(steps, self.sigma_min, self.sigma_max, self.rho)
        # per-step scalars (c_skip, c_out, c_in, time input), computed once
        self._coeffs = [self._preconditioning(s) for s in self._sigmas[:-1]]

    @property
    def sampler(self) -> str:
        return self._sampler

    @sampler.setter
    def sampler(self, name: str) -> None:
        if name not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {name!r}")
        self._sampler = self.config.sampler = name

    @property
    def cfg_weight(self) -> float:
        return self._cfg_weight

    @cfg_weight.setter
    def cfg_weight(self, weight: float) -> None:
        self._cfg_weight = self.config.cfg_weight = float(weight)

    @property
    def sigmas(self) -> list[float]:
        """The sampling noise levels, ending with 0."""
        return list(self._sigmas)

    # ------------------------------------------------------------------------------ denoiser
    def _preconditioning(self, sigma):
        """c_skip, c_out, c_in, network time input for sigma (float or tensor)."""
        sd2 = self.sigma_data**2
        if torch.is_tensor(sigma):
            root = (sigma**2 + sd2).sqrt()
            return sd2 / root**2, sigma * self.sigma_data / root, 1.0 / root, _TIME_SCALE * sigma.log() / 4.0
        root = math.sqrt(sigma**2 + sd2)
        return sd2 / root**2, sigma * self.sigma_data / root, 1.0 / root, _TIME_SCALE * math.log(sigma) / 4.0

    def _sample_sigmas(self, n: int, device) -> torch.Tensor:
        if self.noise_distribution == "loguniform":
            u = torch.rand(n, device=device)
            return torch.exp(
                math.log(self.sigma_min) + u * (math.log(self.sigma_max) - math.log(self.sigma_min))
            )
        log_sigma = _LOGNORMAL_MEAN + _LOGNORMAL_STD * torch.randn(n, device=device)
        return log_sigma.exp().clamp(self.sigma_min, self.sigma_max)

    # ------------------------------------------------------------------------------ training
    def compute_loss(self, batch: dict) -> torch.Tensor:
        """Per-sample EDM loss (B,) in normalized action space, with goal dropout for guidance."""
        if batch.get("goal") is None:
            raise ValueError("gc_diffusion training batches need batch['goal']")
        features, ngoal = self._features(batch["obs"], batch["goal"])
        b = features.shape[0]
        action = batch["action"]
        self._check_action(action, b)
        if self.training:  # (always in the graph while training, so DDP sees null_goal used)
            drop = torch.rand(b, 1, device=ngoal.device) < self.goal_dropout
            ngoal = torch.where(drop, self.null_goal.to(ngoal.dtype).expand_as(ngoal), ngoal)
        cond = torch.cat([features, ngoal], dim=-1)
        naction = self.normalizer.normalize("action", action)
        sigma = self._sample_sigmas(b, naction.device)
        c_skip, c_out, c_in, t_in = self._preconditioning(sigma)
        noisy = naction + sigma.view(b, 1, 1) * torch.randn_like(naction)
        out = self.model(noisy * c_in.view(b, 1, 1), t_in, cond)
        target = (naction - c_skip.view(b, 1, 1) * noisy) / c_out.view(b, 1, 1)
        return chunk_loss((out - target).square(), batch)

    # ------------------------------------------------------------------------------ inference
    def _denoise(self, x: torch.Tensor, step: int, cond: torch.Tensor, guided: bool) -> torch.Tensor:
        c_skip, c_out, c_in, t_in = self._coeffs[step]
        if not guided:
            return c_skip * x + c_out * self.model(x * c_in, t_in, cond)
        pair = x.repeat(2, 1, 1)  # [conditional half; unconditional half], matching cond's layout
        d_cond, d_uncond = (c_skip * pair + c_out * self.model(pair * c_in, t_in, cond)).chunk(2, dim=0)
        return d_uncond + (1.0 + self._cfg_weight) * (d_cond - d_uncond)

    def _predict(self, obs, goal, num_samples, generator) -> torch.Tensor:
        """(B, num_samples, Tp, action_dim) unnormalized actions; samples (and the guidance pair) batched."""
        features, ngoal = self._features(obs, goal)
        batch = features.shape[0]
        cond = torch.cat([features, ngoal], dim=-1)
        guided = self._cfg_weight != 0.0
        if guided:
            uncond = torch.cat([features, self.null_goal.to(ngoal.dtype).expand_as(ngoal)], dim=-1)
            cond = torch.cat([cond, uncond], dim=0)
        if num_samples > 1:
            cond = cond.repeat_interleave(num_samples, dim=0)
        n = batch * num_samples
        sigmas = self._sigmas
        x = (
            torch.randn(
                (n, self.horizon, self.action_dim), device=cond.device, dtype=cond.dtype, generator=generator
            )
            * sigmas[0]
        )
        previous = None
        for i in range(len(sigmas) - 1):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            denoised = self._denoise(x, i, cond, guided)
            if self._sampler == "dpmpp_2m" and previous is not None and sigma_next > 0:
                h = math.log(sigma / sigma_next)
                r = math.log(sigmas[i - 1] / sigma) / h
                corrected = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * previous
            else:
                corrected = denoised
            ratio = sigma_next / sigma
            x = ratio * x + (1.0 - ratio) * corrected
            previous = denoised
        return self.normalizer.unnormalize("action", x).reshape(
            batch, num_samples, self.horizon, self.action_dim
        )
