"""A round's request thresholds, fixed from the deployed policy's held-out calibration rollouts.

Before a policy is deployed for a round, it runs alone (no humans) on ``episodes`` held-out starts with
the fleet's signal settings; its successful episodes are the nominal ones, and the uncertainty
threshold is their split-conformal (1 - target_false_alarm) quantile per episode
(policies/safety/calibration.py): at most that share of the policy's nominal episodes would ask for
help at all. The fleet allocator keeps the threshold for the whole round
(``Allocator.fix_thresholds``). A better policy strays less often into what its nominal episodes never
reach, so it asks for less help; a threshold recalibrated within the round to a constant request rate
(ThriftyDAgger's, the C.U.R. baseline's here) asks for the same help however good the policy gets.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from configs.schema import check, check_int
from policies.safety.calibration import ConformalThreshold

# Calibration starts: past the demos' (seed + episode) and evaluation's (10000 on), before the fleet's
# (seed + 50000 on); each round draws its own.
CALIBRATION_SEED_OFFSET = 30_000
ROUND_SEED_STRIDE = 100


@dataclass
class RoundThresholdsConfig:
    """``calibration`` in configs/demo.yaml: the uncertainty threshold of each round, from the deployed
    policy's held-out rollouts. episodes 0: the allocator's own thresholds (fixed or rate-calibrated)."""

    episodes: int = 16  # held-out rollouts of each deployed policy (push: ~1 s each at 1 thread)
    # Share of the policy's nominal (successful) episodes allowed to ask for help at least once.
    target_false_alarm: float = 0.2

    def __post_init__(self):
        check_int(self.episodes, "episodes", 0)
        check(
            0.0 < self.target_false_alarm < 1.0,
            "target_false_alarm",
            f"must be in (0, 1), got {self.target_false_alarm!r}",
        )


@dataclass(frozen=True)
class RoundThresholds:
    uncertainty: float
    nominal_episodes: int  # successful calibration episodes the threshold was fitted on
    episodes: int
    success_rate: float

    def to_dict(self) -> dict:
        return {
            "uncertainty": self.uncertainty,
            "nominal_episodes": self.nominal_episodes,
            "episodes": self.episodes,
            "success_rate": self.success_rate,
        }


def rollout_signals(
    checkpoint: str | Path,
    task: str,
    episodes: int,
    seed: int,
    num_samples: int,
    env_kwargs: dict | None = None,
) -> list[tuple[bool, np.ndarray]]:
    """(success, per-step uncertainty) of each of `episodes` autonomous rollouts from seeds seed, seed+1 ..."""
    from policies.runner import PolicyRunner
    from sim.tasks import make_env

    runner = PolicyRunner.from_checkpoint(checkpoint, num_samples=num_samples)
    env = make_env(task, seed=seed, **dict(env_kwargs or {}))
    results = []
    try:
        for episode in range(episodes):
            obs, info = env.reset(seed=seed + episode)
            runner.reset()
            scores = []
            while True:
                action = runner.act(obs)
                scores.append(runner.uncertainty)
                obs, _, terminated, truncated, info = env.step(action)
                if terminated or truncated or info.get("blocked"):
                    break
            results.append((bool(info.get("success")), np.asarray(scores, np.float64)))
    finally:
        env.close()
    return results


def fit_round_thresholds(
    rollouts: list[tuple[bool, np.ndarray]], target_false_alarm: float
) -> RoundThresholds:
    """The conformal threshold over the nominal rollouts; with none successful, 0: a policy that never
    succeeds alone has no nominal behaviour to trust, so every robot asks (as many as there are humans
    get one)."""
    nominal = [scores for success, scores in rollouts if success]
    threshold = ConformalThreshold.fit(nominal, target_false_alarm).threshold() if nominal else 0.0
    return RoundThresholds(
        threshold,
        len(nominal),
        len(rollouts),
        float(np.mean([success for success, _ in rollouts])) if rollouts else 0.0,
    )


def round_thresholds(
    config: RoundThresholdsConfig,
    checkpoint: str | Path,
    task: str,
    seed: int,
    round_index: int,
    num_samples: int,
    env_kwargs: dict | None = None,
) -> RoundThresholds:
    """Calibration rollouts of `checkpoint` (round `round_index`'s own starts) and their threshold."""
    start = seed + CALIBRATION_SEED_OFFSET + ROUND_SEED_STRIDE * round_index
    rollouts = rollout_signals(checkpoint, task, config.episodes, start, num_samples, env_kwargs)
    return fit_round_thresholds(rollouts, config.target_false_alarm)
