"""A round's request thresholds, fixed from the deployed policy's held-out calibration rollouts.

Before a policy is deployed for a round, it runs alone (no humans) on ``episodes`` held-out starts with
the fleet's signal settings; its successful episodes are the nominal ones, and each signal's threshold
(the sampling spread ``uncertainty``, and the learned ``risk`` when the checkpoint carries safety models)
is their split-conformal (1 - target_false_alarm) quantile per episode (policies/safety/calibration.py):
at most that share of the policy's nominal episodes would ask for help at all. The fleet allocator keeps
the thresholds for the whole round (``Allocator.fix_thresholds``). A better policy strays less often into
what its nominal episodes never reach, so it asks for less help; a threshold recalibrated within the
round to a constant request rate (ThriftyDAgger's, the C.U.R. baseline's here) asks for the same help
however good the policy gets.

The same rollouts, written into an episode store (``rollout_signals(store=...)``, label robot), are the
logged episodes a policy's safety models learn from before the fleet has any (sim/round_safety.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from configs.schema import check, check_int
from fleet.allocation.core import THRESHOLD_SIGNALS
from policies.safety.calibration import ConformalThreshold

# Calibration starts: past the demos' (seed + episode) and evaluation's (10000 on), before the fleet's
# (seed + 50000 on); each round draws its own.
CALIBRATION_SEED_OFFSET = 30_000
ROUND_SEED_STRIDE = 100


@dataclass
class RoundThresholdsConfig:
    """``calibration`` in configs/demo.yaml: the uncertainty and risk thresholds of each round, from the
    deployed policy's held-out rollouts. episodes 0: the allocator's own (fixed or rate-calibrated)."""

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
    nominal_episodes: int  # successful calibration episodes the thresholds were fitted on
    episodes: int
    success_rate: float
    risk: float | None = None  # None: the policy reports no learned risk (no safety models)

    def to_dict(self) -> dict:
        return {
            "uncertainty": self.uncertainty,
            "risk": self.risk,
            "nominal_episodes": self.nominal_episodes,
            "episodes": self.episodes,
            "success_rate": self.success_rate,
        }


# One calibration episode: its success and each signal's per-step values (a bare array: uncertainty).
Rollout = tuple[bool, "np.ndarray | dict[str, np.ndarray]"]


def rollout_signals(
    checkpoint: str | Path,
    task: str,
    episodes: int,
    seed: int,
    num_samples: int,
    env_kwargs: dict | None = None,
    store=None,
    device: str = "auto",
) -> list[tuple[bool, dict[str, np.ndarray]]]:
    """(success, per-step signals) of each of `episodes` autonomous rollouts from seeds seed, seed+1 ...:
    "uncertainty" always, "risk" when the checkpoint has a risk model. With `store` (an EpisodeStore open
    for writing) every episode is also recorded there as robot steps, with its constraint violations."""
    from fleet.labels import ControlLabel
    from policies.runner import PolicyRunner
    from sim.tasks import make_env

    runner = PolicyRunner.from_checkpoint(checkpoint, num_samples=num_samples, device=device)
    env = make_env(task, seed=seed, **dict(env_kwargs or {}))
    results = []
    try:
        for episode in range(episodes):
            obs, info = env.reset(seed=seed + episode)
            runner.reset()
            scores: dict[str, list[float]] = {name: [] for name in THRESHOLD_SIGNALS}
            logged = store.begin_episode("calibration", task, runner.version) if store is not None else None
            while True:
                action = runner.act(obs)
                scores["uncertainty"].append(runner.uncertainty)
                scores["risk"].append(float(runner.signals.get("risk", np.nan)))
                step_obs = obs
                obs, _, terminated, truncated, info = env.step(action)
                if logged is not None:
                    violation = float(bool(info.get("constraint_violation")))
                    logged.append(
                        step_obs, action, ControlLabel.ROBOT, signals={"constraint_violation": violation}
                    )
                if terminated or truncated or info.get("blocked"):
                    break
            success = bool(info.get("success"))
            if logged is not None:
                outcome = "success" if success else "violation" if info.get("blocked") else "timeout"
                logged.commit(success, outcome)
            values = {name: np.asarray(v, np.float64) for name, v in scores.items()}
            if np.isnan(values["risk"]).all():
                del values["risk"]  # no risk model
            results.append((success, values))
    finally:
        env.close()
    return results


def fit_round_thresholds(rollouts: list[Rollout], target_false_alarm: float) -> RoundThresholds:
    """Each signal's conformal threshold over the nominal rollouts; with none successful, 0: a policy
    that never succeeds alone has no nominal behaviour to trust, so every robot asks (as many as there
    are humans get one). Risk gets a threshold only if every rollout reported it."""
    signals = [scores if isinstance(scores, dict) else {"uncertainty": scores} for _, scores in rollouts]
    nominal = [values for (success, _), values in zip(rollouts, signals, strict=True) if success]

    def threshold(name: str) -> float:
        episodes = [values[name] for values in nominal]
        return ConformalThreshold.fit(episodes, target_false_alarm).threshold() if episodes else 0.0

    has_risk = bool(signals) and all("risk" in values for values in signals)
    return RoundThresholds(
        threshold("uncertainty"),
        len(nominal),
        len(rollouts),
        float(np.mean([success for success, _ in rollouts])) if rollouts else 0.0,
        risk=threshold("risk") if has_risk else None,
    )


def round_thresholds(
    config: RoundThresholdsConfig,
    checkpoint: str | Path,
    task: str,
    seed: int,
    round_index: int,
    num_samples: int,
    env_kwargs: dict | None = None,
    device: str = "auto",
) -> RoundThresholds:
    """Calibration rollouts of `checkpoint` (round `round_index`'s own starts) and their thresholds."""
    start = seed + CALIBRATION_SEED_OFFSET + ROUND_SEED_STRIDE * round_index
    rollouts = rollout_signals(
        checkpoint, task, config.episodes, start, num_samples, env_kwargs, device=device
    )
    return fit_round_thresholds(rollouts, config.target_false_alarm)
