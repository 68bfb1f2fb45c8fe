"""A 1-D temporal convolutional U-Net over action sequences with FiLM conditioning.

Input (B, T, A) noisy actions, a (continuous or integer) noise level per sample and a global condition
vector (B, C). Each residual block is [Conv1d -> GroupNorm -> Mish] x 2 with a FiLM modulation
(per-channel scale and bias computed from [step embedding, condition]) after the first conv block, and
a 1x1 conv skip when the channel count changes. Down path: two residual blocks per level then a
stride-2 conv (not after the last level); two middle blocks; the up path mirrors it with skip
concatenations (of the deeper levels' outputs) and nearest-neighbour upsampling followed by a conv. T must be divisible by 2 ** (len(down_dims) - 1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class SinusoidalEmbedding(nn.Module):
    """Scalar per sample -> [sin(t * f_i), cos(t * f_i)], frequencies geometric from 1 to 1/10000."""

    def __init__(self, dim: int):
        super().__init__()
        if dim < 4 or dim % 2:
            raise ValueError(f"step embedding dimension must be even and >= 4, got {dim}")
        half = dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / (half - 1))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = t.to(self.freqs.dtype).unsqueeze(-1) * self.freqs
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


class Conv1d(nn.Conv1d):
    """nn.Conv1d (zero padding, no dilation or groups) with a faster path for tiny inputs.

    At batch 1 on CPU, PyTorch runs such a convolution through its slow im2col kernel (about 4x slower
    than a plain matrix product for the 256-channel, length-4 layers here). When batch * length is
    small the convolution is computed as one ``F.linear`` over unfolded windows instead: the same
    weights and the same result (up to float rounding), differentiable, just dispatched differently.
    """

    _MAX_ROWS = 32  # batch * output length at or below which the matmul path is used
    _MIN_REDUCTION = 256  # in_channels * kernel_size at or above which it pays off

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if (
            self.groups != 1
            or self.dilation != (1,)
            or self.padding_mode != "zeros"
            or isinstance(self.padding, str)
        ):
            raise ValueError("Conv1d here supports only zero padding, no dilation and groups=1")
        self._use_matmul = self.in_channels * self.kernel_size[0] >= self._MIN_REDUCTION

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (k,), (stride,), (pad,) = self.kernel_size, self.stride, self.padding
        batch, length = x.shape[0], x.shape[-1]
        out_len = (length + 2 * pad - k) // stride + 1
        if not self._use_matmul or batch * out_len > self._MAX_ROWS:
            return super().forward(x)
        if pad:
            x = F.pad(x, (pad, pad))
        cols = x.unfold(2, k, stride).transpose(1, 2).reshape(batch * out_len, self.in_channels * k)
        out = F.linear(cols, self.weight.view(self.out_channels, -1), self.bias)
        return out.view(batch, out_len, self.out_channels).transpose(1, 2)


class ConvNormMish(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, kernel_size: int, n_groups: int):
        super().__init__(
            Conv1d(c_in, c_out, kernel_size, padding=kernel_size // 2),
            nn.GroupNorm(n_groups, c_out),
            nn.Mish(),
        )


class FiLMResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, cond_dim: int, kernel_size: int, n_groups: int):
        super().__init__()
        self.block1 = ConvNormMish(c_in, c_out, kernel_size, n_groups)
        self.block2 = ConvNormMish(c_out, c_out, kernel_size, n_groups)
        self.film = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, 2 * c_out))
        self.skip = Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, bias = self.film(cond).unsqueeze(-1).chunk(2, dim=1)
        h = self.block1(x) * (1.0 + scale) + bias
        return self.block2(h) + self.skip(x)


class ConditionalUnet1D(nn.Module):
    def __init__(
        self,
        input_dim: int,
        global_cond_dim: int,
        down_dims: tuple[int, ...] = (64, 128, 256),
        kernel_size: int = 5,
        n_groups: int = 8,
        step_embed_dim: int = 64,
    ):
        super().__init__()
        down_dims = tuple(int(d) for d in down_dims)
        if not down_dims:
            raise ValueError("down_dims must list at least one channel count")
        bad = [d for d in down_dims if d % n_groups]
        if bad:
            raise ValueError(f"down_dims {down_dims}: {bad} not divisible by n_groups={n_groups}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.down_dims = down_dims
        self.step_embed = nn.Sequential(
            SinusoidalEmbedding(step_embed_dim),
            nn.Linear(step_embed_dim, 4 * step_embed_dim),
            nn.Mish(),
            nn.Linear(4 * step_embed_dim, step_embed_dim),
        )
        cond_dim = step_embed_dim + global_cond_dim
        chans = (input_dim, *down_dims)
        levels = len(down_dims)

        def block(c_in, c_out):
            return FiLMResBlock(c_in, c_out, cond_dim, kernel_size, n_groups)

        self.down = nn.ModuleList()
        for i in range(levels):
            last = i == levels - 1
            self.down.append(
                nn.ModuleList(
                    [
                        block(chans[i], chans[i + 1]),
                        block(chans[i + 1], chans[i + 1]),
                        nn.Identity() if last else Conv1d(chans[i + 1], chans[i + 1], 3, stride=2, padding=1),
                    ]
                )
            )
        self.mid = nn.ModuleList([block(down_dims[-1], down_dims[-1]), block(down_dims[-1], down_dims[-1])])
        self.up = nn.ModuleList()
        for i in reversed(range(1, levels)):  # each up level undoes one downsampling
            self.up.append(
                nn.ModuleList(
                    [
                        block(2 * chans[i + 1], chans[i]),
                        block(chans[i], chans[i]),
                        nn.Sequential(
                            nn.Upsample(scale_factor=2, mode="nearest"),
                            Conv1d(chans[i], chans[i], 3, padding=1),
                        ),
                    ]
                )
            )
        self.final = nn.Sequential(
            ConvNormMish(down_dims[0], down_dims[0], kernel_size, n_groups),
            Conv1d(down_dims[0], input_dim, 1),
        )

    @property
    def length_multiple(self) -> int:
        return 2 ** (len(self.down_dims) - 1)

    @classmethod
    def for_policy(cls, policy) -> ConditionalUnet1D:
        """The denoiser of a diffusion-style policy: actions conditioned on its observation features and
        goal, shaped by its config (down_dims, kernel_size, n_groups, step_embed_dim)."""
        config = policy.config
        return cls(
            policy.action_dim,
            policy.obs_feature_dim + policy.goal_dim,
            tuple(config.down_dims),
            config.kernel_size,
            config.n_groups,
            config.step_embed_dim,
        )

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        global_cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """sample (B, T, A), timestep scalar or (B,), global_cond (B, C) -> (B, T, A)."""
        batch = sample.shape[0]
        if not torch.is_tensor(timestep):  # a fill, not a host-to-device copy: CUDA graphs can capture it
            timestep = torch.full((batch,), float(timestep), device=sample.device, dtype=torch.float32)
        if timestep.ndim == 0:
            timestep = timestep.expand(batch)
        cond = self.step_embed(timestep)
        if global_cond is not None:
            cond = torch.cat([cond, global_cond], dim=-1)
        x = sample.transpose(1, 2)
        skips = []
        for res1, res2, downsample in self.down:
            x = res2(res1(x, cond), cond)
            skips.append(x)
            x = downsample(x)
        for res in self.mid:
            x = res(x, cond)
        for res1, res2, upsample in self.up:
            x = torch.cat([x, skips.pop()], dim=1)
            x = upsample(res2(res1(x, cond), cond))
        return self.final(x).transpose(1, 2)
