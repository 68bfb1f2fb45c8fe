"""Checkpoints: safetensors weights plus a JSON config; loading never executes code from the files.

A checkpoint is a folder:
    config.json           format, policy kind and constructor config, ensemble size, shape meta,
                          horizons, normalizer statistics, policy version, training-data summary, step
    model.safetensors     the weights to deploy (the EMA weights when training keeps them)
    trainer.safetensors   (optional) what resuming needs: raw weights, EMA weights, optimizer tensors
    trainer.json          (optional) optimizer hyper-parameters, step, epoch

Everything is read with `json` and `safetensors`, so a malicious checkpoint can at worst hold wrong
numbers: a missing file, a damaged file, a different architecture or a shape mismatch each raise
CheckpointError naming what is wrong.

An ensemble (policies/models/ensemble.py) is one checkpoint like any policy: config.json's `ensemble`
is its size E (1, or the key absent in older checkpoints: a single policy), `kind` and
`policy_config` are its members', the shared normalizer statistics are in config.json as usual, and
model.safetensors holds `members.<i>.*` for i < E.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from policies.action_space import DELTA, ActionSpace
from policies.models.factory import ShapeMeta, build_policy, ensemble_size

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
TRAINER_FILE = "trainer.safetensors"
TRAINER_JSON = "trainer.json"
_NORMALIZER_PREFIX = "normalizer."


class CheckpointError(Exception):
    """A checkpoint cannot be loaded; the message names the file and the problem."""


@dataclass
class Checkpoint:
    policy: nn.Module
    version: str
    config: dict

    @property
    def shape_meta(self) -> ShapeMeta:
        return ShapeMeta.from_dict(self.config["shape_meta"])

    @property
    def action_space(self) -> ActionSpace:
        return ActionSpace.from_dict(self.config.get("action_space"))


def save_checkpoint(directory: str | os.PathLike, policy: nn.Module, shape_meta: ShapeMeta, version: str,
                    action_space: ActionSpace = DELTA, training: dict | None = None, step: int = 0,
                    trainer_state: dict[str, torch.Tensor] | None = None, trainer_meta: dict | None = None) -> Path:
    """Write a checkpoint folder atomically (a half-written checkpoint is never visible under its name)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in policy.state_dict().items()}
    normalizer = {name[len(_NORMALIZER_PREFIX):]: tensor.tolist() for name, tensor in state.items()
                  if name.startswith(_NORMALIZER_PREFIX)}
    weights = {name: tensor for name, tensor in state.items() if not name.startswith(_NORMALIZER_PREFIX)}
    config = {
        "format": FORMAT_VERSION,
        "kind": policy.kind,
        "policy_config": policy.config(),
        "ensemble": getattr(policy, "ensemble_size", 1),
        "shape_meta": shape_meta.to_dict(),
        "n_obs_steps": policy.n_obs_steps,
        "horizon": policy.horizon,
        "n_action_steps": policy.n_action_steps,
        "normalizer": normalizer,
        "action_space": action_space.to_dict(),
        "version": version,
        "training": training or {},
        "step": step,
    }
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        save_file(weights, str(staging / MODEL_FILE))
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        if trainer_state is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in trainer_state.items()}, str(staging / TRAINER_FILE))
            (staging / TRAINER_JSON).write_text(json.dumps(trainer_meta or {}, indent=2))
        if directory.exists():
            shutil.rmtree(directory)
        staging.rename(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def read_config(directory: str | os.PathLike) -> dict:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: not a checkpoint ({CONFIG_FILE} is missing)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: damaged JSON ({err})") from None
    required = ("format", "kind", "policy_config", "shape_meta", "normalizer", "version")
    missing = [key for key in required if key not in config] if isinstance(config, dict) else list(required)
    if missing:
        raise CheckpointError(f"{path}: missing field(s) {missing}")
    if config["format"] != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {config['format']}, this code reads {FORMAT_VERSION}")
    return config


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: damaged safetensors file ({err})") from None


def load_checkpoint(directory: str | os.PathLike, map_location: str = "cpu") -> Checkpoint:
    """Rebuild the policy a checkpoint describes and load its weights (no pickle, no code)."""
    directory = Path(directory)
    config = read_config(directory)
    size = config_ensemble_size(config, directory / CONFIG_FILE)
    try:
        policy = build_policy(config["kind"], ShapeMeta.from_dict(config["shape_meta"]), ensemble=size,
                              **config["policy_config"])
    except (TypeError, ValueError, KeyError) as err:
        raise CheckpointError(f"{directory}: cannot rebuild policy {config['kind']!r} ({err})") from None
    state = load_tensors(directory / MODEL_FILE)
    held = len({name.split(".")[1] for name in state if name.startswith("members.")})
    if held != (size if size > 1 else 0):
        raise CheckpointError(f"{directory / MODEL_FILE} does not match the policy: {CONFIG_FILE} says ensemble "
                              f"{size} but the weights hold {held or 'no'} ensemble member(s)")
    state.update({_NORMALIZER_PREFIX + name: torch.tensor(values)
                  for name, values in config["normalizer"].items()})
    load_state_strict(policy, state, directory / MODEL_FILE)
    policy.to(map_location).eval()
    return Checkpoint(policy=policy, version=str(config["version"]), config=config)


def config_ensemble_size(config: dict, source: Any) -> int:
    """The ensemble size a checkpoint config records (1 when the key is absent: older checkpoints)."""
    try:
        return ensemble_size(config.get("ensemble", 1))
    except ValueError as err:
        raise CheckpointError(f"{source}: {err}") from None


def load_state_strict(module: nn.Module, state: dict[str, torch.Tensor], source: Any) -> None:
    """load_state_dict with every mismatch reported by name."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{name}: {tuple(state[name].shape)} vs {tuple(tensor.shape)}"
              for name, tensor in expected.items() if name in state and state[name].shape != tensor.shape]
    if missing or unexpected or shapes:
        problems = []
        if missing:
            problems.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            problems.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if shapes:
            problems.append(f"shape mismatch {shapes[:5]}")
        raise CheckpointError(f"{source} does not match the policy: {'; '.join(problems)}")
    module.load_state_dict(state)
