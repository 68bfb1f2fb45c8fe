"""Build a policy by kind: ``build_policy(kind, shape_meta, **config)`` (config as returned by ``config()``)."""

from __future__ import annotations

from torch import nn

from policies.models.diffusion import DiffusionPolicy
from policies.models.encoders import ShapeMeta, accepted_kwargs
from policies.models.gc_diffusion import GCDiffusionPolicy
from policies.models.mlp import MLPPolicy

POLICIES: dict[str, type[nn.Module]] = {cls.kind: cls for cls in (DiffusionPolicy, GCDiffusionPolicy, MLPPolicy)}

__all__ = ["POLICIES", "ShapeMeta", "build_policy", "policy_kwargs"]


def policy_kwargs(kind: str) -> list[str]:
    """The keyword arguments ``build_policy`` accepts for ``kind``."""
    if kind not in POLICIES:
        raise ValueError(f"unknown policy kind {kind!r}; expected one of {sorted(POLICIES)}")
    return accepted_kwargs(POLICIES[kind])


def build_policy(kind: str, shape_meta: ShapeMeta | dict, **kwargs) -> nn.Module:
    """A freshly initialized policy of ``kind`` (normalizer unfitted). ValueError for an unknown kind,
    unknown keyword arguments or values the policy rejects."""
    accepted = policy_kwargs(kind)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"unknown argument(s) {unknown} for policy kind {kind!r}; accepted: {accepted}")
    meta = ShapeMeta.from_dict(shape_meta) if isinstance(shape_meta, dict) else shape_meta
    if not isinstance(meta, ShapeMeta):
        raise ValueError(f"shape_meta must be a ShapeMeta or its dict, got {type(shape_meta).__name__}")
    try:
        return POLICIES[kind](meta, **kwargs)
    except TypeError as err:
        raise ValueError(f"bad arguments for policy kind {kind!r}: {err}") from None
