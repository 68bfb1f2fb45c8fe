"""Checkpoints: safetensors weights plus a JSON config; loading never executes code from the files.

A checkpoint is a folder:
    config.json           format (2), the typed policy config (``PolicyConfig.to_dict()``: kind, horizons,
                          architecture, encoder, inference settings), ensemble size, shape meta,
                          normalizer statistics, action space, policy version, training-data summary, step
    model.safetensors     the weights to deploy (the EMA weights when training keeps them)
    trainer.safetensors   (optional) what resuming needs: raw weights, EMA weights, optimizer tensors
    trainer.json          (optional) optimizer hyper-parameters, step, epoch

Everything is read with `json` and `safetensors`, so a malicious checkpoint can at worst hold wrong
numbers: a missing file, a damaged file, a different architecture or a shape mismatch each raise
CheckpointError naming what is wrong.

An ensemble (policies/models/ensemble.py) is one checkpoint like any policy: config.json's `ensemble`
is its size E (1, or the key absent in older checkpoints: a single policy), `policy` is its
members' config, the shared normalizer statistics are in config.json as usual, and
model.safetensors holds `members.<i>.*` for i < E.

Older formats keep loading: format 1 (written before the typed configs) kept the policy's constructor
arguments flat in `policy_config` beside `kind`, the encoder's as `image_*`; ``read_config`` returns
every format in format 2's shape (with `format` as written). tests/fixtures/checkpoints_v1 holds some, and
tests/fixtures/checkpoints_v2 format-2 ones written by release 0c2d448.
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
from policies.device import INFER_BYTES_PER_PARAM, DeviceError, check_fits, parameter_count
from policies.models.configs import PolicyConfig, policy_config_from_dict
from policies.models.factory import ShapeMeta, build_policy, ensemble_size

FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
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
    def policy_config(self) -> PolicyConfig:
        return self.policy.config

    @property
    def shape_meta(self) -> ShapeMeta:
        return ShapeMeta.from_dict(self.config["shape_meta"])

    @property
    def action_space(self) -> ActionSpace:
        return ActionSpace.from_dict(self.config.get("action_space"))


def save_checkpoint(
    directory: str | os.PathLike,
    policy: nn.Module,
    shape_meta: ShapeMeta,
    version: str,
    action_space: ActionSpace = DELTA,
    training: dict | None = None,
    step: int = 0,
    trainer_state: dict[str, torch.Tensor] | None = None,
    trainer_meta: dict | None = None,
) -> Path:
    """Write a checkpoint folder atomically (a half-written checkpoint is never visible under its name)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in policy.state_dict().items()}
    normalizer = {
        name[len(_NORMALIZER_PREFIX) :]: tensor.tolist()
        for name, tensor in state.items()
        if name.startswith(_NORMALIZER_PREFIX)
    }
    weights = {name: tensor for name, tensor in state.items() if not name.startswith(_NORMALIZER_PREFIX)}
    config = {
        "format": FORMAT_VERSION,
        "policy": policy.config.to_dict(),
        "ensemble": policy.ensemble_size,
        "shape_meta": shape_meta.to_dict(),
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
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in trainer_state.items()},
                str(staging / TRAINER_FILE),
            )
            (staging / TRAINER_JSON).write_text(json.dumps(trainer_meta or {}, indent=2))
        if directory.exists():
            shutil.rmtree(directory)
        staging.rename(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def read_config(directory: str | os.PathLike) -> dict:
    """config.json of a checkpoint, in format 2's shape whatever format it was written in."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: not a checkpoint ({CONFIG_FILE} is missing)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: damaged JSON ({err})") from None
    if not isinstance(config, dict) or "format" not in config:
        raise CheckpointError(f"{path}: missing field(s) ['format']")
    if config["format"] not in READABLE_FORMATS:
        raise CheckpointError(
            f"{path}: checkpoint format {config['format']}, this code reads {list(READABLE_FORMATS)}"
        )
    if config["format"] == 1:
        config = _upgrade_format1(config, path)
    missing = [key for key in ("policy", "shape_meta", "normalizer", "version") if key not in config]
    if missing:
        raise CheckpointError(f"{path}: missing field(s) {missing}")
    if not isinstance(config["policy"], dict) or "kind" not in config["policy"]:
        raise CheckpointError(f"{path}: the policy config names no kind")
    return config


# Format 1 kept the image encoder's constructor arguments among the policy's, under these names.
_FORMAT1_ENCODER = {
    "image_feature_dim": "feature_dim",
    "image_channels": "channels",
    "image_blocks_per_stage": "blocks_per_stage",
    "num_keypoints": "num_keypoints",
    "crop_ratio": "crop_ratio",
}


def _upgrade_format1(config: dict, path: Path) -> dict:
    """A format-1 config.json in format 2's shape: `kind` + flat `policy_config` -> the typed `policy`."""
    missing = [key for key in ("kind", "policy_config") if key not in config]
    if missing or not isinstance(config.get("policy_config"), dict):
        raise CheckpointError(f"{path}: missing field(s) {missing or ['policy_config']}")
    flat = dict(config["policy_config"])
    encoder = {new: flat.pop(old) for old, new in _FORMAT1_ENCODER.items() if old in flat}
    rest = {
        key: value
        for key, value in config.items()
        if key not in ("kind", "policy_config", "n_obs_steps", "horizon", "n_action_steps")
    }
    return {**rest, "policy": {"kind": config["kind"], **flat, "encoder": encoder}}


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: damaged safetensors file ({err})") from None


def load_checkpoint(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Rebuild the policy a checkpoint describes and load its weights (no pickle, no code) onto
    ``map_location`` (weights are stored device-free). A policy whose weights cannot fit in what that
    device has free is refused before anything is allocated."""
    directory = Path(directory)
    config = read_config(directory)
    size = config_ensemble_size(config, directory / CONFIG_FILE)
    kind = config["policy"]["kind"]
    device = torch.device(map_location)
    try:
        policy_config = policy_config_from_dict(config["policy"])
        shape_meta = ShapeMeta.from_dict(config["shape_meta"])
        params = size * parameter_count(lambda: build_policy(policy_config, shape_meta))
        check_fits(params * INFER_BYTES_PER_PARAM, device, f"its policy ({params / 1e6:,.1f}M parameters)")
        policy = build_policy(policy_config, shape_meta, ensemble=size)
    except DeviceError as err:
        raise CheckpointError(f"{directory}: {err.problem}") from None
    except (TypeError, ValueError, KeyError) as err:
        raise CheckpointError(f"{directory}: cannot rebuild policy {kind!r} ({err})") from None
    state = load_tensors(directory / MODEL_FILE)
    held = len({name.split(".")[1] for name in state if name.startswith("members.")})
    if held != (size if size > 1 else 0):
        raise CheckpointError(
            f"{directory / MODEL_FILE} does not match the policy: {CONFIG_FILE} says ensemble "
            f"{size} but the weights hold {held or 'no'} ensemble member(s)"
        )
    state.update(
        {_NORMALIZER_PREFIX + name: torch.tensor(values) for name, values in config["normalizer"].items()}
    )
    load_state_strict(policy, state, directory / MODEL_FILE)
    policy.to(device).eval()
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
    shapes = [
        f"{name}: {tuple(state[name].shape)} vs {tuple(tensor.shape)}"
        for name, tensor in expected.items()
        if name in state and state[name].shape != tensor.shape
    ]
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
