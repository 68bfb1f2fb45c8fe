"""`flotilla train`: weighted behavior cloning of a policy on one or more episode stores.

    flotilla train data=[runs/demos.zarr,runs/round1.zarr] policy=diffusion task=push
    torchrun --nproc_per_node=2 -m policies.train data=[...]     # DDP: NCCL on GPUs, gloo on the CPU

Samples are weighted by control label (policies/data/weighting.py, Sirius by default); the data can
be cut to a step budget by a memory strategy (policies/data/memory.py). Held-out episodes give a
validation loss; an EMA copy of the weights is what gets deployed. Checkpoints (policies/checkpoint.py)
land in `out/checkpoints/latest` every `checkpoint_every` steps and at the end, with everything
resuming needs (`resume=out/checkpoints/latest`). Scalars go to tensorboard under `out/tb`.

Settings: ``TrainConfig`` (policies/config.py; configs/train.yaml holds what differs). `ensemble=E`
(E >= 2) trains E members of the policy in one run and one checkpoint (policies/models/ensemble.py):
each member on its own bootstrap of the training windows (every batch carries each window's index),
so their disagreement can serve as the uncertainty signal. The trainer drives any ``Policy``
(policies/models/base.py) alike: its forward is its per-sample loss, ensemble or not.

Devices (policies/device.py): `device=auto|cpu|cuda|cuda:N`; the training windows are gathered on that
device a batch at a time (policies/data/batches.py, no per-sample Python); bf16 autocast on CUDA
(`precision`), fp32 weights, optimizer and EMA; TF32 on CUDA; `compile=true` for torch.compile. Under
torchrun every process trains on `batch_size` samples, so the effective batch is batch_size x processes
and `lr` applies to that effective batch as given (scale it yourself if you scale the processes).
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from configs.schema import ConfigError, typed
from fleet.store import StoreError
from policies.checkpoint import (
    TRAINER_FILE,
    TRAINER_JSON,
    CheckpointError,
    config_ensemble_size,
    load_checkpoint,
    load_state_strict,
    load_tensors,
    read_config,
    save_checkpoint,
)
from policies.config import TrainConfig
from policies.data.batches import DeviceBatches, DeviceSteps
from policies.data.windows import EpisodeData, WindowDataset, load_episodes, split_episodes
from policies.device import (
    TRAIN_BYTES_PER_PARAM,
    autocast,
    check_compiler,
    check_fits,
    enable_tf32,
    is_out_of_memory,
    out_of_memory,
    process_device,
    resolve_precision,
)
from policies.models.base import Policy
from policies.models.factory import ShapeMeta, build_policy
from policies.threads import set_torch_threads


def final_checkpoint(out: str | os.PathLike) -> Path:
    """Where a run with `out` keeps its latest checkpoint (and the one it ends with)."""
    return Path(out) / "checkpoints" / "latest"


class EMA:
    """Exponential moving average of weights with Diffusion Policy's warm-up (decay grows with steps)."""

    def __init__(self, model: nn.Module, power: float = 0.75, max_decay: float = 0.9999):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.power, self.max_decay, self.updates = power, max_decay, 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = min(self.max_decay, 1 - (1 + self.updates) ** -self.power)
        # One multi-tensor op instead of a kernel per parameter (hundreds on a GPU); the same numbers.
        torch._foreach_lerp_(
            list(self.model.parameters()), [p.detach() for p in model.parameters()], 1 - decay
        )
        for ema_buffer, buffer in zip(self.model.buffers(), model.buffers(), strict=True):
            ema_buffer.copy_(buffer)


def shape_meta_for(data: EpisodeData, obs_keys: list[str]) -> ShapeMeta:
    goal = data.steps.get("goal")
    return ShapeMeta(
        obs={key: tuple(data.steps[key].shape[1:]) for key in obs_keys},
        action_dim=int(data.steps["action"].shape[-1]),
        goal_dim=0 if goal is None else int(goal.shape[-1]),
    )


def normalizer_data(data: EpisodeData, episodes: np.ndarray, shape_meta: ShapeMeta) -> dict[str, np.ndarray]:
    """Low-dim arrays of the training episodes, for fitting the normalizer (images are scaled by the encoder)."""
    rows = np.concatenate([np.arange(*data.bounds(int(e))) for e in episodes])
    keys = [k for k, shape in shape_meta.obs.items() if len(shape) != 3] + ["action"]
    keys += ["goal"] if shape_meta.goal_dim else []
    return {key: data.steps[key][rows] for key in keys}


def weighted_loss(loss_fn, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted mean loss, unweighted mean loss) of a batch; loss_fn maps a batch to per-sample losses."""
    per_sample = loss_fn(batch)
    weights = batch["weight"].to(per_sample.dtype)
    return (per_sample * weights).sum() / weights.sum().clamp_min(1e-8), per_sample.mean()


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """The optimizer's state as flat tensors (safetensors) plus its JSON-able parameter groups."""
    state = optimizer.state_dict()
    tensors = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            tensors[f"optim.{index}.{name}"] = torch.as_tensor(value).clone()
    return tensors, state["param_groups"]


def restore_optimizer(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]
) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _distributed(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world size, this process's device). Under torchrun on CUDA each process takes
    cuda:LOCAL_RANK (policies/device.py:process_device) and NCCL; on the CPU gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = process_device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (torch.distributed.get_rank() if world > 1 else 0), world, device


def train(cfg: TrainConfig) -> Path:
    """Train per `cfg` (a TrainConfig, or the composed configs/train.yaml); returns the final checkpoint folder."""
    if not isinstance(cfg, TrainConfig):
        cfg = typed(cfg)
    rank, world, device = _distributed(cfg.device)
    if cfg.compile:
        check_compiler(device)
    precision = resolve_precision(cfg.precision, device)
    enable_tf32(device)
    torch.manual_seed(cfg.seed + rank)
    set_torch_threads(cfg.threads)
    out = Path(cfg.out)
    obs_keys = list(cfg.task.obs_keys) + [f"{name}_rgb" for name in (cfg.camera_names if cfg.cameras else [])]

    action_space = cfg.action_space
    try:
        data = load_episodes(
            cfg.data,
            obs_keys,
            cfg.memory.strategy,
            cfg.memory.budget_steps,
            cfg.memory.keep_demos,
            extra_keys=[action_space.position_key] if action_space.kind == "target" else [],
        )
    except (StoreError, ValueError) as err:  # not a store, or not one this config can train on
        raise ConfigError("data", str(err)) from None
    if action_space.kind == "target":
        data.steps["action"] = action_space.to_policy(
            data.steps["action"], data.steps[action_space.position_key]
        )
    train_eps, val_eps = split_episodes(data.num_episodes, cfg.val_ratio, cfg.seed)
    horizons = dict(n_obs_steps=cfg.policy.n_obs_steps, horizon=cfg.policy.horizon)
    train_set = WindowDataset(data, train_eps, obs_keys, weighting=cfg.weighting, **horizons)
    steps_on_device = DeviceSteps(data, [*obs_keys, "action", "goal"], device)
    # Every batch carries its samples' indices: an ensemble draws its members' bootstraps from them.
    train_batches = DeviceBatches(train_set, steps_on_device, with_index=True)
    val_batches = (
        DeviceBatches(
            WindowDataset(data, val_eps, obs_keys, weighting=cfg.weighting, **horizons), steps_on_device
        )
        if len(val_eps)
        else None
    )
    shape_meta = shape_meta_for(data, obs_keys)

    policy: Policy = build_policy(cfg.policy, shape_meta, ensemble=cfg.ensemble, bootstrap_seed=cfg.seed)
    if cfg.init_from:
        _init_from(Path(cfg.init_from), policy)
    else:
        policy.normalizer.fit(normalizer_data(data, train_eps, shape_meta))
    params = sum(p.numel() for p in policy.parameters())
    check_fits(
        params * TRAIN_BYTES_PER_PARAM,
        device,
        f"training {cfg.policy.kind} ({params / 1e6:,.1f}M parameters: weights, gradients, AdamW, EMA)",
        hint="train a smaller policy (policy.down_dims) or on another device",
    )
    policy.to(device)
    optimizer = torch.optim.AdamW(
        policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type == "cuda"
    )
    ema = EMA(policy, max_decay=cfg.ema_decay) if cfg.ema else None
    step = 0
    if cfg.resume:
        step = _resume(Path(cfg.resume), policy, ema, optimizer)

    model = policy
    if world > 1:
        # No device_ids: the batches are on the device already, and with device_ids DDP would copy every
        # input there, batch["index"] too, which an ensemble reads on the host (a GPU sync every step).
        model = nn.parallel.DistributedDataParallel(policy)
    if cfg.compile:
        model = torch.compile(model, mode=cfg.compile_mode)
    drop_last = len(train_set) >= cfg.batch_size * world
    # A resumed run starts its schedule at the saved step (stepping the schedule forward before any
    # optimizer step made torch warn that the order was wrong).
    resumed_at = step
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _lr_factor(resumed_at + s, cfg.warmup_steps, cfg.steps)
    )

    writer = _tensorboard(out / "tb") if rank == 0 and cfg.tensorboard else None
    training_summary = {
        **data.summary(),
        "weighting": cfg.weighting,
        "init_from": cfg.init_from,
        "memory": dataclasses.asdict(cfg.memory),
        "train_episodes": len(train_eps),
        "val_episodes": len(val_eps),
        "device": str(device),
        "precision": precision,
        "processes": world,
    }
    bar = tqdm(
        total=cfg.steps,
        initial=step,
        desc=f"train {cfg.policy.kind}",
        unit="step",
        disable=rank != 0 or not cfg.progress,
        file=sys.stdout,
    )
    started, samples, epoch = time.perf_counter(), 0, 0
    final = final_checkpoint(out)
    while step < cfg.steps:
        for batch in train_batches.epoch(
            cfg.batch_size, epoch, drop_last=drop_last, seed=cfg.seed, rank=rank, world=world
        ):
            if cfg.compile:  # a new step: reduce-overhead's CUDA graphs may reuse the last step's outputs
                torch.compiler.cudagraph_mark_step_begin()
            loss, raw = train_step(
                model, batch, optimizer, cfg.grad_clip, autocast(device, precision), ema, policy
            )
            schedule.step()
            step += 1
            samples += len(batch["action"]) * world
            bar.update(1)
            if rank == 0 and step % cfg.log_every == 0:
                rate = samples / (time.perf_counter() - started)
                bar.set_postfix(loss=f"{loss.item():.4f}", samples_s=f"{rate:.0f}")
                if writer:
                    writer.add_scalar("train/weighted_loss", loss.item(), step)
                    writer.add_scalar("train/loss", raw.item(), step)
                    writer.add_scalar("train/lr", schedule.get_last_lr()[0], step)
                    writer.add_scalar("train/samples_per_s", rate, step)
            if rank == 0 and val_batches is not None and (step % cfg.val_every == 0 or step == cfg.steps):
                with autocast(device, precision):
                    val = validation_loss(ema.model if ema else policy, val_batches, cfg.batch_size)
                bar.set_postfix(loss=f"{loss.item():.4f}", val=f"{val:.4f}")
                if writer:
                    writer.add_scalar("val/loss", val, step)
            if rank == 0 and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
                _save(
                    final,
                    policy,
                    ema,
                    optimizer,
                    shape_meta,
                    action_space,
                    cfg,
                    training_summary,
                    step,
                    epoch,
                )
            if step >= cfg.steps:
                break
        epoch += 1
    bar.close()
    if writer:
        writer.close()
    if rank == 0:
        elapsed = time.perf_counter() - started
        print(
            f"trained {cfg.policy.kind} for {step} steps ({samples / max(elapsed, 1e-9):.0f} samples/s); "
            f"checkpoint: {final}"
        )
    if world > 1:
        # Free the DDP wrapper while every rank is still here: its reducer holds the gloo group, and a gloo
        # group destroyed after its peers have exited hangs in its destructor (seen: rank 0 stuck at exit).
        del model
        gc.collect()
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return final


def train_step(
    model: nn.Module,
    batch: dict,
    optimizer: torch.optim.Optimizer,
    grad_clip: float,
    precision_context,
    ema: EMA | None = None,
    policy: nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step of ``model`` (the policy, or its DDP / torch.compile wrapper) on ``batch`` in
    ``precision_context`` (policies/device.py:autocast), then the EMA of ``policy`` (default: model).
    Returns (weighted loss, loss) as device tensors: nothing here waits for the device (reading a loss
    does; the loop reads them every log_every steps)."""
    model.train()
    with precision_context:
        loss, raw = weighted_loss(model, batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    if ema is not None:
        ema.update(model if policy is None else policy)
    return loss, raw


@torch.no_grad()
def validation_loss(policy: nn.Module, batches: DeviceBatches, batch_size: int) -> float:
    policy.eval()
    device = batches.steps.device
    total, count = torch.zeros((), device=device), 0
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)  # the same diffusion noise every time, so validation losses compare
        for batch in batches.epoch(batch_size, shuffle=False):
            loss, _ = weighted_loss(policy.compute_loss, batch)
            total += loss.float() * len(batch["action"])
            count += len(batch["action"])
    return total.item() / max(count, 1)


def _lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _save(
    directory, policy, ema, optimizer, shape_meta, action_space, cfg, training_summary, step, epoch
) -> None:
    tensors, groups = optimizer_tensors(optimizer)
    tensors.update({f"model.{k}": v for k, v in policy.state_dict().items()})
    if ema is not None:
        tensors.update({f"ema.{k}": v for k, v in ema.model.state_dict().items()})
    version = cfg.version or f"{cfg.policy.kind}-{Path(cfg.out).name}-step{step}"
    save_checkpoint(
        directory,
        ema.model if ema else policy,
        shape_meta,
        version,
        action_space,
        training=training_summary,
        step=step,
        trainer_state=tensors,
        trainer_meta={
            "param_groups": groups,
            "step": step,
            "epoch": epoch,
            "ema_updates": ema.updates if ema else 0,
        },
    )


def _init_from(directory: Path, policy) -> None:
    """Start from a trained policy's weights and normalizer (its input and action scaling go with its
    weights); the optimizer, schedule and step count start afresh."""
    previous = load_checkpoint(directory).policy
    if previous.kind != policy.kind:
        raise CheckpointError(f"{directory}: a {previous.kind} checkpoint cannot start a {policy.kind} run")
    load_state_strict(policy, previous.state_dict(), directory)


def _resume(directory: Path, policy, ema, optimizer) -> int:
    config = read_config(directory)
    kind = config["policy"]["kind"]
    if kind != policy.kind:
        raise CheckpointError(f"{directory}: a {kind} checkpoint cannot resume a {policy.kind} run")
    size, wanted = config_ensemble_size(config, directory), policy.ensemble_size
    if size != wanted:
        raise CheckpointError(
            f"{directory}: a checkpoint of ensemble {size} cannot resume a run with ensemble={wanted}"
        )
    meta_path = directory / TRAINER_JSON
    if not meta_path.is_file():
        raise CheckpointError(f"{directory}: has no trainer state to resume from ({TRAINER_JSON} is missing)")
    meta = json.loads(meta_path.read_text())
    tensors = load_tensors(directory / TRAINER_FILE)
    load_state_strict(policy, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, directory)
    if ema is not None:
        load_state_strict(
            ema.model, {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}, directory
        )
        ema.updates = int(meta.get("ema_updates", 0))
    restore_optimizer(optimizer, tensors, meta["param_groups"])
    return int(meta["step"])


def _tensorboard(directory: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional: training works without it
        return None
    return SummaryWriter(str(directory))


def run(cfg: TrainConfig) -> None:
    """`flotilla train`: a checkpoint that cannot resume or start this run is a bad `resume` / `init_from`."""
    try:
        train(cfg)
    except CheckpointError as err:
        raise ConfigError("resume" if cfg.resume else "init_from", str(err)) from None
    except RuntimeError as err:  # CUDA out of memory: one line saying what to change
        if not is_out_of_memory(err):
            raise
        raise out_of_memory(
            err,
            process_device(cfg.device),
            f"training at batch_size={cfg.batch_size}",
            hint="lower batch_size",
        ) from None


if __name__ == "__main__":  # torchrun -m policies.train key=value ...
    from flotilla.cli import run_job

    run_job("train", sys.argv[1:])
