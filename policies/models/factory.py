"""Build a policy from its config: ``build_policy(config, shape_meta)`` (a ``PolicyConfig``), or
``build_policy(kind, shape_meta, **settings)`` (the kind's defaults with ``settings`` changed);
``ensemble=E`` (E >= 2) builds a ``PolicyEnsemble`` of E such policies (policies/models/ensemble.py)."""

from __future__ import annotations

import dataclasses

import torch

from policies.models.base import Policy
from policies.models.configs import POLICY_CONFIGS, PolicyConfig, policy_config
from policies.models.diffusion import DiffusionPolicy
from policies.models.encoders import ShapeMeta
from policies.models.ensemble import PolicyEnsemble, ensemble_size
from policies.models.gc_diffusion import GCDiffusionPolicy
from policies.models.mlp import MLPPolicy

POLICIES: dict[str, type[Policy]] = {cls.kind: cls for cls in (DiffusionPolicy, GCDiffusionPolicy, MLPPolicy)}
assert set(POLICIES) == set(POLICY_CONFIGS), "every policy kind has a config and a model"

__all__ = ["POLICIES", "PolicyEnsemble", "ShapeMeta", "build_policy", "ensemble_size", "policy_kwargs"]


def policy_kwargs(kind: str) -> list[str]:
    """The settings ``build_policy(kind, ...)`` accepts: the fields of the kind's config."""
    if kind not in POLICY_CONFIGS:
        raise ValueError(f"unknown policy kind {kind!r}; expected one of {sorted(POLICY_CONFIGS)}")
    return [f.name for f in dataclasses.fields(POLICY_CONFIGS[kind]) if f.name != "kind"]


def build_policy(
    config: PolicyConfig | str,
    shape_meta: ShapeMeta | dict,
    ensemble: int = 1,
    bootstrap_seed: int = 0,
    **settings,
) -> Policy:
    """A freshly initialized policy (normalizer unfitted). ValueError for an unknown kind or setting, a
    value the config rejects (ConfigError, naming the key) or a bad ``ensemble`` size.

    ``ensemble`` E >= 2: a ``PolicyEnsemble`` of E members of this config, member i initialized under
    its own seed (base + i, the base drawn from torch's global generator, so ``torch.manual_seed`` still
    makes the whole ensemble reproducible); ``bootstrap_seed`` picks the members' bootstrap samples."""
    size = ensemble_size(ensemble)
    if isinstance(config, str):
        config = policy_config(config, **settings)
    elif settings:
        config = policy_config(config.kind, **{**config.to_dict(), **settings})
    if not isinstance(config, PolicyConfig):
        raise ValueError(f"build_policy takes a PolicyConfig or a kind, got {type(config).__name__}")
    meta = ShapeMeta.from_dict(shape_meta) if isinstance(shape_meta, dict) else shape_meta
    if not isinstance(meta, ShapeMeta):
        raise ValueError(f"shape_meta must be a ShapeMeta or its dict, got {type(shape_meta).__name__}")
    if size == 1:
        return POLICIES[config.kind](meta, config)
    base = int(torch.randint(0, 2**31 - size, ()))
    members = []
    for i in range(size):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(base + i)
            members.append(POLICIES[config.kind](meta, config))
    return PolicyEnsemble(members, bootstrap_seed=bootstrap_seed)
