"""Settings of the safety models (``SafetyConfig``) and of `flotilla safety` (``SafetyJobConfig``), torch-free.

Each default is written here once; configs/safety.yaml lists ``base_safety`` first and holds only what
differs. Checks raise ``ConfigError`` naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from configs.schema import check, check_choice, check_int, check_number, register_job, unset
from policies.device import check_device

MODELS = ("flow", "rnd", "risk", "ldm")
FILTER_MODES = ("off", "density", "ldm")
FILTER_CHOICES = ("first", "lowest")


@dataclass
class FilterConfig:
    """The runner's safety filter (policies/safety/filter.py)."""

    mode: str = "off"  # off | density | ldm
    # The bound on the mode's score; None: the checkpoint's calibrated one (safety.json).
    threshold: float | None = None
    # Which candidate under the bound runs: the lowest-scoring (the one the model is surest of) or the
    # first in sampling order. With `first` the filter ran whichever candidate sat just under the bound,
    # where the model underestimates most: on a round-0 delta-action push policy `lowest` cut violations
    # 59% (first: 37%) and cost no success (benchmarks/README.md, safety_filter).
    choose: str = "lowest"  # lowest | first

    def __post_init__(self):
        check_choice(self.mode, FILTER_MODES, "mode")
        check_choice(self.choose, FILTER_CHOICES, "choose")
        if self.threshold is not None:
            check_number(self.threshold, "threshold")


@dataclass
class SafetyConfig:
    """How the safety models are built and trained (saved with them in safety.json)."""

    action_steps: int = 4  # executed actions of a chunk that the action-scoring models see
    hidden: int = 128
    flow_transforms: int = 3
    flow_steps: int = 3000
    rnd_features: int = 32
    rnd_steps: int = 2000
    risk_horizon: int = 40  # env steps: "violation or failure within k steps"
    risk_steps: int = 2000
    ldm_steps: int = 3000
    ldm_gamma: float = 0.9
    ldm_tau: float = 0.01  # Polyak rate of the LDM's target network
    batch_size: int = 256
    lr: float = 1.0e-3
    weight_decay: float = 1.0e-4
    seed: int = 0

    def __post_init__(self):
        for key in ("action_steps", "hidden", "flow_transforms", "flow_steps", "rnd_features", "rnd_steps"):
            check_int(getattr(self, key), key, 1)
        for key in ("risk_horizon", "risk_steps", "ldm_steps", "batch_size"):
            check_int(getattr(self, key), key, 1)
        check_number(self.ldm_gamma, "ldm_gamma", 0.0, 1.0, low_open=True)
        check_number(self.ldm_tau, "ldm_tau", 0.0, 1.0, low_open=True)
        check_number(self.lr, "lr", 0.0, low_open=True)
        check_number(self.weight_decay, "weight_decay", 0.0)
        check_int(self.seed, "seed")


# The filter's bound: the share of nominal plans whose executed chunk it would refuse. At 2% the LDM filter's
# effect on a policy that breaks constraints depended on the training of its safety models (-34% to -77%
# violations over six trainings); at 5% every one of the six at least halved them (-61% to -95%) with no
# loss of success (benchmarks/README.md, safety_filter).
FILTER_FALSE_ALARM = 0.05


@dataclass
class SafetyJobConfig:
    """`flotilla safety`: train a checkpoint's safety models on its demos and logged episodes, calibrate
    their thresholds on held-out successful episodes, and save them into the checkpoint folder."""

    checkpoint: str | None = None  # a folder written by `flotilla train`
    # Episode stores with the policy's own episodes (robot steps, outcomes): fleet stores or rollouts.
    data: Any = None
    # The stores the policy was trained on (the density's data); None: those its checkpoint names.
    demos: Any = None
    models: list[str] = field(default_factory=lambda: list(MODELS))
    model: SafetyConfig = field(default_factory=SafetyConfig)
    num_samples: int = 8  # candidate chunks sampled at each next state (the LDM's min over a')
    calibration_ratio: float = 0.3  # share of the successful episodes held out to calibrate
    target_false_alarm: float = 0.05  # alarm thresholds: share of nominal episodes that alarm
    filter_false_alarm: float = FILTER_FALSE_ALARM  # filter bounds: share of nominal plans refused
    time_varying: bool = True
    bin_steps: int = 10
    threads: int = 1
    # Where the policy embeds and samples and the safety models train (policies/device.py): auto (CUDA
    # when present) | cpu | cuda | cuda:N. The saved models are device-free, like the policy's weights.
    device: str = "auto"

    def __post_init__(self):
        check(
            bool(self.checkpoint),
            "checkpoint",
            "missing: give checkpoint=PATH (a folder written by `flotilla train`)",
        )
        for key in ("data", "demos"):
            value = getattr(self, key)
            if value is None or unset(value):
                continue
            paths = [value] if isinstance(value, str) else value
            check(
                isinstance(paths, list | tuple) and all(isinstance(p, str) and p for p in paths),
                key,
                f"must be an episode store path or a list of them, got {value!r}",
            )
            setattr(self, key, [str(p) for p in paths])
        check(
            isinstance(self.models, list | tuple) and "flow" in self.models,
            "models",
            f"must list flow, got {self.models!r}",
        )
        for name in self.models:
            check_choice(name, MODELS, "models")
        check_int(self.num_samples, "num_samples", 1)
        check_number(self.calibration_ratio, "calibration_ratio", 0.0, 1.0, low_open=True, high_open=True)
        check_number(self.target_false_alarm, "target_false_alarm", 0.0, 1.0, low_open=True, high_open=True)
        check_number(self.filter_false_alarm, "filter_false_alarm", 0.0, 1.0, low_open=True, high_open=True)
        check_int(self.bin_steps, "bin_steps", 1)
        check_int(self.threads, "threads", 0)
        check_device(self.device)


register_job("safety", SafetyJobConfig)
