"""The settings of `flotilla train` (``TrainConfig``) and `flotilla eval` (``EvalConfig``), torch-free.

Each default is written here once; configs/train.yaml and configs/eval.yaml list ``base_train`` /
``base_eval`` first and hold only what differs, and the ``policy`` group (configs/policy/<kind>.yaml)
puts a ``PolicyConfig`` of the chosen kind (policies/models/configs.py) under ``policy``. Importing
this module registers all of them with hydra's ConfigStore. Checks live in ``__post_init__`` and raise
``ConfigError`` naming the key, so `flotilla train steps=0` is one line, before any data is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from configs.schema import (
    MISSING,
    ConfigError,
    TaskConfig,
    check,
    check_choice,
    check_int,
    check_number,
    register,
    register_job,
    unset,
)
from policies.action_space import ActionSpace
from policies.data.memory import STRATEGIES
from policies.data.weighting import SCHEMES
from policies.device import check_device, check_precision
from policies.models.configs import POLICY_CONFIGS, PolicyConfig
from policies.safety.config import FilterConfig

__all__ = ["EvalConfig", "MemoryConfig", "TrainConfig"]

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")  # torch.compile's modes


@dataclass
class MemoryConfig:
    """Which episodes training keeps under a step budget (policies/data/memory.py)."""

    strategy: str = "keep_all"  # keep_all | fifo | lfi | mfi
    budget_steps: int | None = None  # None: no budget
    keep_demos: bool = True

    def __post_init__(self):
        check_choice(self.strategy, STRATEGIES, "strategy")
        check_int(self.budget_steps, "budget_steps", 1, none_ok=True)


@dataclass
class TrainConfig:
    """`flotilla train`: weighted behavior cloning of ``policy`` on the episode stores ``data``."""

    task: TaskConfig = MISSING  # the group: its obs_keys are what the policy observes
    policy: PolicyConfig = MISSING  # the group: policy=diffusion|gc_diffusion|mlp
    # One or more episode stores, oldest first: data=[a.zarr,b.zarr] (or one path).
    data: Any = "data/${task.name}_demos.zarr"
    out: str = "runs/${task.name}_${policy.kind}"
    # Train on camera images too (<name>_rgb keys must be in the stores).
    cameras: bool = False
    camera_names: list[str] = field(default_factory=lambda: ["front"])
    # Sample weights by control label: sirius | uniform | hg_dagger | iwr (policies/data/weighting.py).
    weighting: str = "sirius"
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    # Ensemble size: 1 = one policy; E >= 2 trains E members of the policy (different seeds, each on its
    # own bootstrap of the data) in one checkpoint; the runner's uncertainty is then their disagreement.
    ensemble: int = 1
    steps: int = 3000
    batch_size: int = 64
    lr: float = 1.0e-3
    weight_decay: float = 1.0e-6
    warmup_steps: int = 100
    grad_clip: float = 1.0
    ema: bool = True
    ema_decay: float = 0.999
    val_ratio: float = 0.1  # share of episodes held out for the validation loss
    val_every: int = 500
    checkpoint_every: int = 1000
    log_every: int = 20
    # A checkpoint folder to resume from (it must hold trainer state).
    resume: str | None = None
    # Fine-tune instead: start from this checkpoint's weights and normalizer (same policy kind and
    # architecture), with a fresh optimizer, schedule and step count (the fleet loop's retraining).
    init_from: str | None = None
    # Version string of the trained policy; default <kind>-<out name>-step<N>.
    version: str | None = None
    seed: int = 0
    threads: int = 2  # torch threads (policies/threads.py)
    # Where to train (policies/device.py): auto (CUDA when present) | cpu | cuda | cuda:N. Under torchrun
    # on CUDA each process takes cuda:LOCAL_RANK (NCCL); on the CPU the processes use gloo.
    device: str = "auto"
    # Forward-pass precision: auto (bf16 autocast on CUDA, fp32 on the CPU) | fp32 | bf16. Weights,
    # gradients, optimizer state and the EMA stay fp32 whatever this says.
    precision: str = "auto"
    # torch.compile the training step's model (its first steps compile for a while; see README, GPUs).
    compile: bool = False
    # torch.compile's mode (with compile=true): default | reduce-overhead (CUDA graphs for the forward and
    # backward on a GPU: for small nets whose step is kernel launches) | max-autotune (longer compile,
    # tuned kernels). On the CPU reduce-overhead compiles like default (CUDA graphs need CUDA).
    compile_mode: str = "default"
    tensorboard: bool = True
    progress: bool = True
    # What the policy predicts (policies/action_space.py): `target` = absolute end-effector positions,
    # turned into steps from the measured position at run time; `delta` = the robot's actions as stored.
    action_space: ActionSpace = field(default_factory=lambda: ActionSpace(kind="target"))

    def __post_init__(self):
        if not unset(self.data):
            paths = [self.data] if isinstance(self.data, str) else self.data
            check(
                isinstance(paths, list | tuple)
                and len(paths) > 0
                and all(isinstance(p, str) and p for p in paths),
                "data",
                f"must be an episode store path or a non-empty list of them, got {self.data!r}",
            )
            self.data = [str(p) for p in paths]
        if isinstance(self.task, TaskConfig):
            keys = self.task.obs_keys
            check(
                len(keys) > 0 and all(isinstance(key, str) and key for key in keys),
                "task.obs_keys",
                f"task {self.task.name!r} names no observation keys to train on, got {keys!r}",
            )
        check_choice(self.weighting, SCHEMES, "weighting")
        check_int(self.ensemble, "ensemble", 1)
        for key in ("steps", "batch_size", "val_every", "checkpoint_every", "log_every"):
            check_int(getattr(self, key), key, 1)
        check_int(self.warmup_steps, "warmup_steps", 0)
        check_int(self.threads, "threads", 0)
        check_device(self.device)
        check_precision(self.precision)
        check(isinstance(self.compile, bool), "compile", f"must be true or false, got {self.compile!r}")
        check_choice(self.compile_mode, COMPILE_MODES, "compile_mode")
        check_number(self.lr, "lr", 0.0)
        check_number(self.weight_decay, "weight_decay", 0.0)
        check_number(self.grad_clip, "grad_clip", 0.0, low_open=True)
        check_number(self.ema_decay, "ema_decay", 0.0, 1.0)
        check_number(self.val_ratio, "val_ratio", 0.0, 1.0, high_open=True)
        if self.resume and self.init_from:
            raise ConfigError(
                "init_from",
                "set resume (continue a run) or init_from (fine-tune a trained policy), "
                f"not both (resume={self.resume}, init_from={self.init_from})",
            )


@dataclass
class EvalConfig:
    """`flotilla eval`: a checkpoint's success in simulation."""

    task: TaskConfig = MISSING
    # A checkpoint folder written by `flotilla train` (e.g. runs/push/checkpoints/latest).
    checkpoint: str | None = None
    episodes: int = 50
    # Episode i starts from seed + i; 10000 keeps evaluation off the demo-collection seeds.
    seed: int = 10000
    # K action samples per plan; K > 1 also reports the uncertainty signal.
    num_samples: int = 1
    # A seed here gives every plan the same initial diffusion noise (consecutive chunks agree); None: fresh.
    noise_seed: int | None = None
    video: bool = False
    video_path: str = "eval_${task.name}.mp4"
    threads: int = 2
    device: str = "auto"  # where the policy runs: auto | cpu | cuda | cuda:N (policies/device.py)
    cuda_graphs: bool = False  # replay each plan from a CUDA graph (policies/cuda_graphs.py; CUDA only)
    # The safety filter over the K samples (safety_filter.mode=ldm|density; the checkpoint needs safety models).
    safety_filter: FilterConfig = field(default_factory=FilterConfig)
    progress: bool = True

    def __post_init__(self):
        check(
            bool(self.checkpoint),
            "checkpoint",
            "missing: give checkpoint=PATH (a folder written by `flotilla train`)",
        )
        check_int(self.episodes, "episodes", 1)
        check_int(self.num_samples, "num_samples", 1)
        check_int(self.threads, "threads", 0)
        check_device(self.device)


register_job("train", TrainConfig)
register_job("eval", EvalConfig)
for _kind, _cls in POLICY_CONFIGS.items():
    register(_cls, f"base_{_kind}", group="policy")  # the first default of configs/policy/<kind>.yaml
