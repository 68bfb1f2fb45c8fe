"""Conformal thresholds for failure signals: alarm on a target share of nominal behaviour, no more.

Every signal here is oriented so that higher means "more likely to fail" (novelty, risk, LDM value,
uncertainty). A threshold is fitted on calibration scores from *nominal* episodes (the deployed
policy's successful autonomous rollouts, held out from the data the signal was trained on) so that
fresh nominal behaviour raises an alarm at most at the target rate alpha (split conformal prediction;
the guarantee needs calibration and fresh episodes to be exchangeable, and n >= 1/alpha - 1 episodes).

Two units of "false alarm":

- ``unit="episode"`` (FAIL-Detect's): an episode alarms if its score crosses the threshold at any step;
  alpha is the share of nominal episodes that alarm at least once. This is what a fleet pays for: a
  false alarm is one needless human request per episode.
- ``unit="step"``: alpha is the share of nominal steps above the threshold.

Time-varying thresholds (``time_varying=True``) follow the episode's phase in bins of ``bin_steps``
steps, because signals drift within an episode (a push policy is more uncertain at contact than in
free motion). For ``unit="episode"`` the band is the conformal functional band FAIL-Detect uses:
half of the calibration episodes give each bin's mean and spread, the other half the conformal
quantile ``q`` of each episode's worst standardized score, and ``threshold(t) = mean_b + q * spread_b``.
For ``unit="step"`` each bin gets its own conformal quantile. Steps past the last bin with enough
calibration data use the last such bin.

How a round's thresholds are fixed (what the fleet allocator uses): when a policy is trained, its
nominal held-out rollouts (successful autonomous episodes of the policy itself, e.g. from
`python -m benchmarks.signals` or the round's own successful autonomous episodes that no human
touched) are scored with each signal, one ``ConformalThreshold`` per signal is fitted at the target
false-alarm rate, and the thresholds are saved with the checkpoint (``to_dict`` -> JSON; see
policies/safety/models.py: ``SafetySuite``). For the whole round that policy is deployed, the
thresholds stay fixed: a better policy fails less, so fewer of its episodes cross them and the fleet
asks for less help (a rule that recalibrates to a constant request rate within the round cannot
fall). Nothing in this module imports torch, so the fleet server may use it.

    cal = ConformalThreshold.fit(scores_per_episode, target_false_alarm=0.05, time_varying=True)
    cal.threshold(t); cal.alarm(score, t); cal.first_alarm(episode_scores)
    cal.false_alarm_rate(fresh_nominal_episodes)       # ~= 0.05
    ConformalThreshold.from_dict(json.loads(json.dumps(cal.to_dict())))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

UNITS = ("episode", "step")
# The file beside a checkpoint that holds its safety models' settings and these thresholds (models.py
# writes it; named here so that the fleet server can read the thresholds without importing torch).
SAFETY_JSON = "safety.json"
# A time bin needs this many calibration episodes reaching it to get its own statistics; later bins
# (steps that only a few long episodes reach) use the last bin that had them.
MIN_BIN_EPISODES = 10
_SPREAD_FLOOR = 1e-6  # a constant bin does not make the standardized scores infinite


def conformal_quantile(values: np.ndarray, alpha: float) -> float:
    """The split-conformal (1 - alpha) quantile: the ceil((n + 1)(1 - alpha))-th smallest value.

    A fresh exchangeable value exceeds it with probability <= alpha. With too few values for that rank
    (n < 1/alpha - 1) the largest is returned, and the guarantee is weaker than alpha.
    """
    values = np.sort(np.asarray(values, np.float64).ravel())
    if values.size == 0:
        raise ValueError("no calibration values")
    rank = math.ceil((values.size + 1) * (1.0 - alpha))
    return float(values[min(rank, values.size) - 1])


def _as_episodes(scores) -> list[np.ndarray]:
    if isinstance(scores, np.ndarray) and scores.ndim == 1:
        scores = [scores]
    episodes = [np.asarray(s, np.float64).ravel() for s in scores]
    episodes = [e for e in episodes if e.size]
    if not episodes:
        raise ValueError("no calibration scores: give one array of per-step scores per nominal episode")
    if any(not np.all(np.isfinite(e)) for e in episodes):
        raise ValueError("calibration scores must be finite (a NaN or inf score was given)")
    return episodes


def _bin_values(episodes: list[np.ndarray], bin_steps: int) -> list[np.ndarray]:
    """Per time bin, the scores of every episode in that bin (bins of `bin_steps` steps), for the bins
    that at least MIN_BIN_EPISODES episodes reach (at least the first)."""
    reaching = [
        sum(e.size > b * bin_steps for e in episodes)
        for b in range(math.ceil(max(e.size for e in episodes) / bin_steps))
    ]
    usable = max(1, sum(1 for count in reaching if count >= min(MIN_BIN_EPISODES, len(episodes))))
    return [
        np.concatenate([e[b * bin_steps : (b + 1) * bin_steps] for e in episodes if e.size > b * bin_steps])
        for b in range(usable)
    ]


@dataclass
class ConformalThreshold:
    """A fitted threshold (constant or per time bin) for one signal; see the module docstring."""

    thresholds: list[float]  # one per time bin (one value: constant)
    target_false_alarm: float
    unit: str = "episode"
    bin_steps: int = 0  # 0: constant threshold
    calibration_episodes: int = 0

    @classmethod
    def fit(
        cls,
        scores: Sequence[np.ndarray] | np.ndarray,
        target_false_alarm: float = 0.05,
        unit: str = "episode",
        time_varying: bool = False,
        bin_steps: int = 10,
    ) -> ConformalThreshold:
        """Fit on nominal episodes' per-step scores (a list of 1-D arrays, one per episode)."""
        if not 0.0 < target_false_alarm < 1.0:
            raise ValueError(f"target_false_alarm must be in (0, 1), got {target_false_alarm}")
        if unit not in UNITS:
            raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
        if time_varying and (not isinstance(bin_steps, int) or bin_steps < 1):
            raise ValueError(f"bin_steps must be an integer >= 1, got {bin_steps!r}")
        episodes = _as_episodes(scores)
        alpha = target_false_alarm
        if not time_varying:
            values = [e.max() for e in episodes] if unit == "episode" else np.concatenate(episodes)
            thresholds = [conformal_quantile(values, alpha)]
            bin_steps = 0
        elif unit == "step":
            thresholds = [conformal_quantile(v, alpha) for v in _bin_values(episodes, bin_steps)]
        else:
            thresholds = _functional_band(episodes, alpha, bin_steps)
        return cls([float(t) for t in thresholds], float(alpha), unit, int(bin_steps), len(episodes))

    # ------------------------------------------------------------------------------------ use
    def threshold(self, t: int = 0) -> float:
        """The threshold at step `t` of an episode."""
        if self.bin_steps <= 0:
            return self.thresholds[0]
        return self.thresholds[min(max(int(t), 0) // self.bin_steps, len(self.thresholds) - 1)]

    def thresholds_for(self, length: int) -> np.ndarray:
        """Thresholds for steps 0 .. length-1."""
        return np.array([self.threshold(t) for t in range(length)])

    def alarm(self, score: float, t: int = 0) -> bool:
        return bool(score > self.threshold(t))

    def first_alarm(self, episode_scores: np.ndarray) -> int | None:
        """The first step whose score crosses the threshold, None if none does."""
        scores = np.asarray(episode_scores, np.float64).ravel()
        above = np.flatnonzero(scores > self.thresholds_for(scores.size))
        return int(above[0]) if above.size else None

    def false_alarm_rate(self, nominal_scores: Sequence[np.ndarray]) -> float:
        """The achieved rate on (fresh) nominal episodes, in this threshold's unit."""
        episodes = _as_episodes(nominal_scores)
        if self.unit == "episode":
            return float(np.mean([self.first_alarm(e) is not None for e in episodes]))
        above = sum(int(np.sum(e > self.thresholds_for(e.size))) for e in episodes)
        return above / sum(e.size for e in episodes)

    # ------------------------------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        return {
            "thresholds": list(self.thresholds),
            "target_false_alarm": self.target_false_alarm,
            "unit": self.unit,
            "bin_steps": self.bin_steps,
            "calibration_episodes": self.calibration_episodes,
        }

    @classmethod
    def from_dict(cls, data: dict) -> ConformalThreshold:
        try:
            thresholds = [float(t) for t in data["thresholds"]]
            result = cls(
                thresholds,
                float(data["target_false_alarm"]),
                str(data.get("unit", "episode")),
                int(data.get("bin_steps", 0)),
                int(data.get("calibration_episodes", 0)),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"bad conformal threshold {data!r}: {err}") from None
        if not thresholds or result.unit not in UNITS or result.bin_steps < 0:
            raise ValueError(f"bad conformal threshold {data!r}: thresholds, unit or bin_steps out of range")
        return result


def _functional_band(episodes: list[np.ndarray], alpha: float, bin_steps: int) -> list[float]:
    """mean_b + q * spread_b per bin: statistics from even episodes, the conformal q from odd ones."""
    if len(episodes) < 2:
        raise ValueError("a time-varying episode threshold needs at least 2 calibration episodes")
    shape_half, rank_half = episodes[0::2], episodes[1::2]
    per_bin = _bin_values(shape_half, bin_steps)
    usable = len(per_bin)
    mean = np.array([v.mean() for v in per_bin])
    overall = np.concatenate(shape_half).std()
    spread = np.maximum(np.array([v.std() for v in per_bin]), _SPREAD_FLOOR + 0.05 * overall)

    def worst(e: np.ndarray) -> float:
        b = np.minimum(np.arange(e.size) // bin_steps, usable - 1)
        return float(np.max((e - mean[b]) / spread[b]))

    q = conformal_quantile([worst(e) for e in rank_half], alpha)
    return list(mean + q * spread)
