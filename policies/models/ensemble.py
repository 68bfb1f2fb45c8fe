"""An ensemble of E policies of one kind: its members' disagreement is the uncertainty signal.

ThriftyDAgger and Fleet-DAgger allocate humans on the variance of an ensemble's actions. A
``PolicyEnsemble`` holds E members built from one config (``build_policy(config, meta, ensemble=E)``)
and keeps every policy's contract (``Policy``, policies/models/base.py), so the trainer, checkpoints and the
runner treat it like one policy:

Members and weights
    ``members`` (an ``nn.ModuleList``) start from different seeds. They share one ``normalizer`` (the
    ensemble's), so the state dict is ``normalizer.*`` (the statistics a checkpoint keeps in
    config.json, as for a single policy) plus ``members.<i>.*``. ``kind``, ``config``, ``shape_meta``
    and the horizons are the members'; ``ensemble_size`` is E.

Training (bagging)
    ``compute_loss(batch)`` is the mean over members of each member's per-sample loss times its
    bootstrap weight. With ``batch["index"]`` (the trainer adds each sample's dataset index) the
    weights are fixed Poisson(1) counts drawn from a hash of (``bootstrap_seed``, member, index): every
    member trains on its own bootstrap resample of the data, the same in every epoch and after a
    resume, so members agree where the data is dense and disagree where it is thin. Without an
    index (another caller) each batch gets fresh Poisson(1) weights (online bagging). In eval mode
    all weights are 1, so validation losses compare with a single policy's.

Inference
    ``predict_action(obs, goal, num_samples=K)`` returns (B, K, Tp, A) unnormalized like every policy;
    sample k comes from member k mod E (member i draws its samples in one batched pass). Sample 0 is
    always member 0's, and that is what a runner executes: the executed action does not depend on K,
    and it is never an average (the mean of a diffusion ensemble's multimodal samples can be an
    action none of them would take). With K >= E every member contributes, so the spread of the K
    samples is the members' disagreement (plus each diffusion member's own sampling spread); a
    deterministic mlp ensemble, whose members each repeat one chunk, gets an uncertainty signal only
    this way. The generator, when given, is used by the members in turn, so member 0's noise is the
    one a single policy would draw.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from policies.models.base import Policy
from policies.models.configs import PolicyConfig
from policies.models.normalizer import LinearNormalizer

__all__ = ["PolicyEnsemble", "ensemble_size"]

# P(N <= n) for N ~ Poisson(1), n = 0, 1, ...: the inverse CDF turns a uniform draw into a bootstrap count.
_POISSON1_CDF = np.cumsum([math.exp(-1) / math.factorial(n) for n in range(16)])
_MASK64 = (1 << 64) - 1


def ensemble_size(value, key: str = "ensemble") -> int:
    """``value`` as an ensemble size (an int >= 1; 1 = a single policy), else ValueError naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(
            f"{key} must be an integer >= 1 (1 = a single policy, E >= 2 = an ensemble of E members), "
            f"got {value!r}"
        )
    return int(value)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finalizer on uint64 arrays (wrapping arithmetic): a well-mixed hash of each value."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def bootstrap_counts(seed: int, member: int, index: np.ndarray) -> np.ndarray:
    """Poisson(1) counts (float32) for sample ``index`` in member ``member``'s bootstrap, a pure function
    of (seed, member, index)."""
    key = _splitmix64(np.asarray([(int(seed) * 1_000_003 + int(member)) & _MASK64], dtype=np.uint64))
    bits = _splitmix64(np.asarray(index, dtype=np.int64).astype(np.uint64) ^ key)
    uniform = (bits >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return np.searchsorted(_POISSON1_CDF, uniform, side="right").astype(np.float32)


class PolicyEnsemble(Policy):
    """E policies of one kind and config sharing one normalizer; see the module docstring."""

    def __init__(self, members: list[Policy], bootstrap_seed: int = 0):
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {len(members)}")
        first = members[0]
        for i, member in enumerate(members[1:], 1):
            if (
                member.kind != first.kind
                or member.config != first.config
                or member.shape_meta != first.shape_meta
            ):
                raise ValueError(f"ensemble member {i} differs from member 0 (kind, config or shape meta)")
        self.kind = first.kind
        self.shape_meta = first.shape_meta
        self.n_obs_steps, self.horizon, self.n_action_steps = (
            first.n_obs_steps,
            first.horizon,
            first.n_action_steps,
        )
        self.action_dim, self.goal_dim = first.action_dim, first.goal_dim
        self.bootstrap_seed = int(bootstrap_seed)
        self.normalizer: LinearNormalizer = first.normalizer
        for member in members:
            # Every member uses the ensemble's normalizer without registering it as its own submodule,
            # so the statistics appear once in the state dict (as "normalizer.*", like a single policy).
            del member._modules["normalizer"]
            object.__setattr__(member, "normalizer", self.normalizer)
        self.members = nn.ModuleList(members)

    @property
    def ensemble_size(self) -> int:
        return len(self.members)

    # ------------------------------------------------------------------------------ policy contract
    @property
    def config(self) -> PolicyConfig:
        return self.members[0].config

    def compute_loss(self, batch: dict) -> torch.Tensor:
        """Per-sample loss (B,): the members' mean, each member's loss weighted by its bootstrap counts."""
        losses = torch.stack([member.compute_loss(batch) for member in self.members])  # (E, B)
        if not self.training:
            return losses.mean(dim=0)
        return (losses * self._bootstrap_weights(batch, losses)).mean(dim=0)

    def _bootstrap_weights(self, batch: dict, losses: torch.Tensor) -> torch.Tensor:
        index = batch.get("index")
        if index is None:
            return torch.poisson(torch.ones_like(losses))
        index = torch.as_tensor(index).detach().cpu().numpy()  # (the trainer's batches carry it on the CPU)
        counts = torch.from_numpy(
            np.stack([bootstrap_counts(self.bootstrap_seed, i, index) for i in range(len(self.members))])
        )
        if losses.device.type == "cuda":  # pinned: the copy is queued, the training step does not wait on it
            counts = counts.pin_memory()
        return counts.to(device=losses.device, dtype=losses.dtype, non_blocking=True)

    def _predict(self, obs, goal, num_samples, generator) -> torch.Tensor:
        """(B, num_samples, Tp, action_dim) unnormalized; sample k from member k mod E (sample 0: member 0)."""
        size = len(self.members)
        out = None
        for i, member in enumerate(self.members[:num_samples]):
            samples = member.predict_action(
                obs, goal, num_samples=len(range(i, num_samples, size)), generator=generator
            )
            if out is None:
                out = samples.new_empty((samples.shape[0], num_samples, *samples.shape[2:]))
            out[:, i::size] = samples
        return out
