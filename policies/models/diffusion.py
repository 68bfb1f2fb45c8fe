"""Diffusion Policy (Chi et al. 2023): DDPM training, DDIM sampling, a FiLM-conditioned 1-D U-Net.

The denoiser sees the noisy normalized action chunk (B, Tp, A), the diffusion step, and a global
condition = concat(observation features of the To steps, normalized goal if goal_dim > 0).
Schedulers are diffusers' DDPMScheduler (training noise) and DDIMScheduler (sampling), built once
with the same betas; with clip_sample, predicted clean actions are clipped to [-1, 1], the range the
"limits" normalizer maps actions to. "trailing" DDIM spacing starts sampling at the noisiest training
timestep. Settings and their defaults: ``DiffusionConfig`` (policies/models/configs.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler

from policies.models.base import StepwiseSampling
from policies.models.configs import DiffusionConfig
from policies.models.encoders import PolicyBase, ShapeMeta, chunk_loss
from policies.models.unet1d import ConditionalUnet1D


class DiffusionPolicy(StepwiseSampling, PolicyBase):
    kind = "diffusion"
    config_class = DiffusionConfig
    config: DiffusionConfig

    def __init__(self, shape_meta: ShapeMeta, config: DiffusionConfig | None = None):
        super().__init__(shape_meta, config)
        config = self.config
        self.model = ConditionalUnet1D.for_policy(self)
        self.prediction_type = config.prediction_type
        scheduler_args = dict(
            num_train_timesteps=config.num_train_timesteps,
            beta_schedule=config.beta_schedule,
            clip_sample=config.clip_sample,
            prediction_type=config.prediction_type,
        )
        try:
            self.noise_scheduler = DDPMScheduler(**scheduler_args)
            self.sampler = DDIMScheduler(
                **scheduler_args, set_alpha_to_one=True, timestep_spacing=config.timestep_spacing
            )
        except (NotImplementedError, ValueError) as err:
            raise ValueError(
                f"beta_schedule: {config.beta_schedule!r} is not one diffusers knows ({err})"
            ) from None
        self.num_inference_steps = config.num_inference_steps

    # ------------------------------------------------------------------------------ settings
    def _schedule(self, steps: int) -> None:
        if not 1 <= steps <= self.noise_scheduler.config.num_train_timesteps:
            raise ValueError(
                f"num_inference_steps must be in [1, {self.noise_scheduler.config.num_train_timesteps}],"
                f" got {steps}"
            )
        self.sampler.set_timesteps(steps)
        self._timesteps = [int(t) for t in self.sampler.timesteps]

    # ------------------------------------------------------------------------------ training
    def compute_loss(self, batch: dict) -> torch.Tensor:
        """Per-sample DDPM loss (B,): MSE of the predicted noise (or clean actions) in normalized space."""
        cond = self._condition(batch["obs"], batch.get("goal"))
        action = batch["action"]
        self._check_action(action, cond.shape[0])
        naction = self.normalizer.normalize("action", action)
        noise = torch.randn_like(naction)
        t = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (naction.shape[0],), device=naction.device
        )
        noisy = self.noise_scheduler.add_noise(naction, noise, t)
        pred = self.model(noisy, t, cond)
        target = noise if self.prediction_type == "epsilon" else naction
        return chunk_loss(F.mse_loss(pred, target, reduction="none"), batch)

    # ------------------------------------------------------------------------------ inference
    def _predict(self, obs, goal, num_samples, generator) -> torch.Tensor:
        """(B, num_samples, Tp, action_dim) unnormalized actions; all samples in one batched DDIM run."""
        cond = self._condition(obs, goal)
        batch = cond.shape[0]
        if num_samples > 1:
            cond = cond.repeat_interleave(num_samples, dim=0)
        x = torch.randn(
            (batch * num_samples, self.horizon, self.action_dim),
            device=cond.device,
            dtype=cond.dtype,
            generator=generator,
        )
        for t in self._timesteps:
            out = self.model(x, float(t), cond)
            x = self.sampler.step(out, t, x, return_dict=False)[0]
        return self.normalizer.unnormalize("action", x).reshape(
            batch, num_samples, self.horizon, self.action_dim
        )
