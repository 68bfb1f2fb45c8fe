"""Each deployed policy's safety models in the fleet loop, fitted as `flotilla safety` fits them.

Before a policy is published to the fleet (`flotilla demo`, benchmarks/fleet.py) its checkpoint gets safety
models (policies/safety/train.py:fit_checkpoint): the flow learns the density of the demos, the risk
classifier ("violation or failure within k steps", Recovery-RL style) the policy's logged episodes so
far. So the robots' agents report a learned ``risk`` (and ``density``) to the fleet server, C.U.R.'s R has
something to rank by, and Flotilla's rule can rank by it (fleet/allocation/flotilla.py).

The initial policy has no fleet episodes yet: it first runs ``pilot_episodes`` autonomous rollouts
(recorded into ``pilot.zarr`` beside the demos, seeds of their own), and every later policy learns from
the pilot plus the fleet's store. Only the models the allocator reads are fitted by default, with fewer
steps than `flotilla safety`'s (the flow is required; risk is the signal): see RoundSafetyConfig.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from configs.schema import check, check_int
from policies.safety.config import MODELS, SafetyConfig, SafetyJobConfig

PILOT_STORE = "pilot.zarr"  # beside the demos' store
# Pilot starts: past calibration's (seed + 30000 + 100 * round), before the fleet's (seed + 50000 on).
PILOT_SEED_OFFSET = 40_000


def _fleet_models() -> SafetyConfig:
    # `flotilla safety`'s defaults train each model 2000-3000 steps; the fleet loop refits every round, so
    # 1000 each: on push (30 demos + a 16-episode pilot, 1 torch thread, load ~5.6 on 2 cores) the flow and
    # risk took 26 s per policy, and that risk ranked 16 held-out episodes' failures perfectly (AUROC 1.0 of
    # its per-episode maximum; the sampling spread: 0.67).
    return SafetyConfig(flow_steps=1000, risk_steps=1000)


@dataclass
class RoundSafetyConfig:
    """``safety`` in configs/demo.yaml: fit safety models into every policy before the fleet runs it."""

    fit: bool = True  # false: policies carry no safety models (the robots report risk 0)
    pilot_episodes: int = 16  # autonomous rollouts of the initial policy for its risk model
    models: list[str] = field(default_factory=lambda: ["flow", "risk"])  # of MODELS; the flow is required
    model: SafetyConfig = field(default_factory=_fleet_models)
    # Candidate chunks per plan in the logged episodes (the LDM's min over a'; risk reads only the executed
    # one): as many as the fleet's robots sample, so the uncertainty threshold saved in safety.json, which
    # the server may apply (allocation.policy_thresholds), is on their scale (with 1 it would be 0).
    num_samples: int = 4

    def __post_init__(self):
        check_int(self.pilot_episodes, "pilot_episodes", 0)
        check_int(self.num_samples, "num_samples", 1)
        check(
            isinstance(self.models, list | tuple) and "flow" in self.models,
            "models",
            f"must list flow, got {self.models!r}",
        )
        for name in self.models:
            check(name in MODELS, "models", f"unknown safety model {name!r}; models: {', '.join(MODELS)}")


def pilot_store(demos: Path) -> Path:
    """Where the initial policy's pilot rollouts are (beside the demos)."""
    return Path(demos).with_name(PILOT_STORE)


def record_pilot(
    config: RoundSafetyConfig,
    checkpoint: Path,
    demos: Path,
    task: str,
    seed: int,
    num_samples: int,
    env_kwargs: dict | None = None,
    device: str = "auto",
) -> Path:
    """The initial policy's pilot rollouts, written into pilot_store(demos)."""
    from fleet.store import EpisodeStore
    from sim.round_thresholds import rollout_signals

    path = pilot_store(demos)
    if path.exists():  # a pilot of an earlier run (e.g. one stopped before its safety models were saved)
        shutil.rmtree(path)
    with EpisodeStore.create(path) as store:
        rollout_signals(
            checkpoint,
            task,
            config.pilot_episodes,
            seed + PILOT_SEED_OFFSET,
            num_samples,
            env_kwargs,
            store=store,
            device=device,
        )
    return path


def fit_round_safety(
    config: RoundSafetyConfig, checkpoint: Path, demos: Path, logged: list[Path], device: str = "auto"
) -> dict:
    """`flotilla safety checkpoint=<checkpoint> data=<logged> demos=[<demos>]` with the config's models;
    the stores in `logged` that do not exist yet are left out. Returns its summary and the time taken."""
    from policies.safety.train import fit_checkpoint

    started = time.monotonic()
    data = [str(path) for path in logged if Path(path).exists()]
    job = SafetyJobConfig(
        checkpoint=str(checkpoint),
        data=data or None,
        demos=[str(demos)],
        models=list(config.models),
        model=config.model,
        num_samples=config.num_samples,
        # The suite's own alarm thresholds: the server applies them when the policy is published
        # (allocation.policy_thresholds) until the round's calibration (sim/round_thresholds.py) replaces
        # them; constant ones also fit the few successful pilot episodes a weak policy has.
        time_varying=False,
        device=device,
    )
    summary = fit_checkpoint(job)
    seconds = time.monotonic() - started
    print(
        f"safety models {summary['models']} for {Path(checkpoint).parent.parent.name}: "
        f"{summary['train_episodes']} logged episodes ({summary['failed_train_episodes']} failed), "
        f"{seconds:.0f} s",
        flush=True,
    )
    return {**{k: summary[k] for k in ("train_episodes", "failed_train_episodes")}, "safety_s": seconds}
