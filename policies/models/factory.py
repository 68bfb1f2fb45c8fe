"""Build a policy by kind: ``build_policy(kind, shape_meta, **config)`` (config as returned by ``config()``);
``ensemble=E`` (E >= 2) builds a ``PolicyEnsemble`` of E such policies (policies/models/ensemble.py)."""

from __future__ import annotations

import torch
from torch import nn

from policies.models.diffusion import DiffusionPolicy
from policies.models.encoders import ShapeMeta, accepted_kwargs
from policies.models.ensemble import PolicyEnsemble, ensemble_size
from policies.models.gc_diffusion import GCDiffusionPolicy
from policies.models.mlp import MLPPolicy

POLICIES: dict[str, type[nn.Module]] = {cls.kind: cls for cls in (DiffusionPolicy, GCDiffusionPolicy, MLPPolicy)}

__all__ = ["POLICIES", "PolicyEnsemble", "ShapeMeta", "build_policy", "ensemble_size", "policy_kwargs"]


def policy_kwargs(kind: str) -> list[str]:
    """The keyword arguments ``build_policy`` accepts for ``kind``."""
    if kind not in POLICIES:
        raise ValueError(f"unknown policy kind {kind!r}; expected one of {sorted(POLICIES)}")
    return accepted_kwargs(POLICIES[kind])


def build_policy(kind: str, shape_meta: ShapeMeta | dict, ensemble: int = 1, **kwargs) -> nn.Module:
    """A freshly initialized policy of ``kind`` (normalizer unfitted). ValueError for an unknown kind,
    unknown keyword arguments, values the policy rejects or a bad ``ensemble`` size.

    ``ensemble`` E >= 2: a ``PolicyEnsemble`` of E members of this kind and config, member i initialized
    under its own seed (base + i, the base drawn from torch's global generator, so ``torch.manual_seed``
    still makes the whole ensemble reproducible)."""
    size = ensemble_size(ensemble)
    accepted = policy_kwargs(kind)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"unknown argument(s) {unknown} for policy kind {kind!r}; accepted: {accepted}")
    meta = ShapeMeta.from_dict(shape_meta) if isinstance(shape_meta, dict) else shape_meta
    if not isinstance(meta, ShapeMeta):
        raise ValueError(f"shape_meta must be a ShapeMeta or its dict, got {type(shape_meta).__name__}")
    if size == 1:
        return _build_one(kind, meta, kwargs)
    base = int(torch.randint(0, 2**31 - size, ()))
    members = []
    for i in range(size):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(base + i)
            members.append(_build_one(kind, meta, kwargs))
    return PolicyEnsemble(members)


def _build_one(kind: str, meta: ShapeMeta, kwargs: dict) -> nn.Module:
    try:
        return POLICIES[kind](meta, **kwargs)
    except TypeError as err:
        raise ValueError(f"bad arguments for policy kind {kind!r}: {err}") from None
