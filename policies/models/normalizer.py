"""Per-key affine normalization held inside a policy: y = x * scale + offset, per last dimension.

Statistics are registered buffers (``stats.<key>.scale``, ``stats.<key>.offset`` and a 0-d
``stats.<key>.fitted`` flag), so they travel with ``state_dict()`` and safetensors, and a policy
built from its config (which pre-registers its keys with identity statistics, unfitted) accepts a
saved state dict with strict key matching.

Modes of ``fit``:
    "limits"    each dimension's [min, max] maps to [-1, 1]; a constant dimension (range < eps) gets
                scale 1 and maps its value to 0 (no division by zero).
    "gaussian"  each dimension gets zero mean and unit std; a constant dimension gets scale 1 and
                maps to 0.

Images are not normalized here (their encoder scales uint8 to [0, 1]): ``fit`` skips uint8 data
and anything named in ``exclude``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch import nn

_MODES = ("limits", "gaussian")


class _KeyStats(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("scale", torch.ones(dim))
        self.register_buffer("offset", torch.zeros(dim))
        self.register_buffer("fitted", torch.zeros(()))


def _as_2d(key: str, value) -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(value) if not isinstance(value, torch.Tensor) else value)
    tensor = tensor.detach().to(device="cpu", dtype=torch.float64)
    if tensor.ndim == 0:
        raise ValueError(f"normalizer data for {key!r} is a scalar; expected (..., D)")
    tensor = tensor.reshape(-1, tensor.shape[-1])
    if tensor.shape[0] == 0:
        raise ValueError(f"normalizer data for {key!r} is empty")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"normalizer data for {key!r} holds NaN or inf")
    return tensor


def _after_load(module: LinearNormalizer, incompatible_keys) -> None:
    module._refresh_fitted()


class LinearNormalizer(nn.Module):
    """Affine per-dimension normalizer for named low-dim arrays (obs keys, "action", "goal")."""

    def __init__(self, dims: Mapping[str, int] | None = None):
        """``dims`` pre-registers keys (identity statistics, unfitted) so the state dict layout is known
        before fitting; ``fit`` can also add new keys."""
        super().__init__()
        self.stats = nn.ModuleDict()
        self._fitted: set[str] = set()
        for key, dim in (dims or {}).items():
            self._add_key(key, int(dim))
        # Runs after this module and its children loaded (also when a parent policy loads its state).
        self.register_load_state_dict_post_hook(_after_load)

    # ----------------------------------------------------------------------------------- keys
    def _add_key(self, key: str, dim: int) -> _KeyStats:
        if not key or "." in key:
            raise ValueError(f"normalizer key {key!r} must be non-empty and contain no '.'")
        if dim <= 0:
            raise ValueError(f"normalizer key {key!r}: dimension must be positive, got {dim}")
        ref = next(iter(self.buffers()), None)
        stats = _KeyStats(dim)
        if ref is not None:
            stats = stats.to(ref.device)
        self.stats[key] = stats
        return stats

    def keys(self) -> list[str]:
        """Keys with registered statistics (fitted or not)."""
        return list(self.stats.keys())

    def fitted_keys(self) -> list[str]:
        return [key for key in self.stats if key in self._fitted]

    def is_fitted(self, key: str) -> bool:
        return key in self._fitted

    def __contains__(self, key: str) -> bool:
        return key in self._fitted

    def _get(self, key: str) -> _KeyStats:
        if key not in self._fitted:
            known = self.fitted_keys()
            raise KeyError(
                f"normalizer has no fitted statistics for {key!r} (fitted keys: {known}); "
                "call fit() or set_normalizer() first"
            )
        return self.stats[key]

    # ----------------------------------------------------------------------------------- fit
    @torch.no_grad()
    def fit(
        self,
        data: Mapping[str, np.ndarray | torch.Tensor],
        mode: str = "limits",
        eps: float = 1e-4,
        exclude: Iterable[str] = (),
    ) -> LinearNormalizer:
        """Fit each key of ``data`` (shape (..., D); statistics are per last dimension, over all the
        leading dimensions). uint8 arrays (images) and keys in ``exclude`` are skipped."""
        if mode not in _MODES:
            raise ValueError(f"unknown normalizer mode {mode!r}; expected one of {_MODES}")
        exclude = set(exclude)
        for key, value in data.items():
            if key in exclude or (getattr(value, "dtype", None) in (np.uint8, torch.uint8)):
                continue
            x = _as_2d(key, value)
            if mode == "limits":
                lo, hi = x.min(dim=0).values, x.max(dim=0).values
                span = hi - lo
                constant = span < eps
                scale = torch.where(constant, torch.ones_like(span), 2.0 / span.clamp_min(eps))
                offset = torch.where(constant, -lo, -1.0 - scale * lo)
            else:
                mean, std = x.mean(dim=0), x.std(dim=0, unbiased=False)
                constant = std < eps
                scale = torch.where(constant, torch.ones_like(std), 1.0 / std.clamp_min(eps))
                offset = -mean * scale
            self.set_stats(key, scale, offset)
        return self

    @torch.no_grad()
    def set_stats(self, key: str, scale, offset) -> None:
        """Set a key's statistics directly (y = x * scale + offset)."""
        scale = torch.as_tensor(scale, dtype=torch.float64).reshape(-1)
        offset = torch.as_tensor(offset, dtype=torch.float64).reshape(-1)
        if scale.shape != offset.shape:
            raise ValueError(
                f"normalizer {key!r}: scale {tuple(scale.shape)} and offset {tuple(offset.shape)} differ"
            )
        if (scale == 0).any() or not torch.isfinite(scale).all() or not torch.isfinite(offset).all():
            raise ValueError(f"normalizer {key!r}: scale must be finite and non-zero, offset finite")
        stats = self.stats[key] if key in self.stats else self._add_key(key, scale.numel())
        if stats.scale.numel() != scale.numel():
            raise ValueError(
                f"normalizer {key!r}: registered with dimension {stats.scale.numel()}, "
                f"data has dimension {scale.numel()}"
            )
        stats.scale.copy_(scale.to(stats.scale))
        stats.offset.copy_(offset.to(stats.offset))
        stats.fitted.fill_(1.0)
        self._fitted.add(key)

    @torch.no_grad()
    def load_from(self, other: LinearNormalizer, keys: Iterable[str] | None = None) -> None:
        """Copy fitted statistics from another normalizer (all its fitted keys, or ``keys``)."""
        for key in other.fitted_keys() if keys is None else keys:
            stats = other._get(key)
            self.set_stats(key, stats.scale.detach().cpu(), stats.offset.detach().cpu())

    # ----------------------------------------------------------------------------------- apply
    def normalize(self, key: str, x: torch.Tensor) -> torch.Tensor:
        stats = self._get(key)
        return x.to(stats.scale.dtype) * stats.scale + stats.offset

    def unnormalize(self, key: str, x: torch.Tensor) -> torch.Tensor:
        stats = self._get(key)
        return (x.to(stats.scale.dtype) - stats.offset) / stats.scale

    # ----------------------------------------------------------------------------------- (de)serialize
    def to_dict(self) -> dict[str, dict[str, list[float]]]:
        """JSON-friendly fitted statistics: {key: {"scale": [...], "offset": [...]}}."""
        return {
            key: {"scale": self.stats[key].scale.tolist(), "offset": self.stats[key].offset.tolist()}
            for key in self.fitted_keys()
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Mapping[str, list[float]]]) -> LinearNormalizer:
        normalizer = cls()
        for key, stats in data.items():
            normalizer.set_stats(key, stats["scale"], stats["offset"])
        return normalizer

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # Create statistics for keys present in the incoming state dict but not registered here, so a
        # bare LinearNormalizer() can load a saved one; then refresh the fitted set from the flags.
        head = prefix + "stats."
        for name, tensor in state_dict.items():
            if name.startswith(head) and name.endswith(".scale"):
                key = name[len(head) : -len(".scale")]
                if "." not in key and key not in self.stats:
                    self._add_key(key, tensor.numel())
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _refresh_fitted(self) -> None:
        self._fitted = {key for key, stats in self.stats.items() if float(stats.fitted) > 0.5}

    def extra_repr(self) -> str:
        return ", ".join(
            f"{key}: {self.stats[key].scale.numel()}{'' if key in self._fitted else ' (unfitted)'}"
            for key in self.stats
        )
