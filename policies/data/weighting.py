"""Per-step sample weights by control label: which human corrections the trainer listens to most.

Schemes (all return weights with mean 1 over the training set, so learning rates carry over):
- sirius (default; Liu et al., 2022): interventions carry 50% of the weighted mass
  (w = 0.5 / share of interventions), pre-intervention steps 0.2% (w = 0.002 / share: the robot was
  about to fail there), and demo and autonomous robot steps share the remaining 49.8%, one weight
  for both. (Read literally, "demos weight 1, robot steps the remainder" leaves robot steps a
  negative weight whenever demos are over half the data, as they are in the first rounds of a
  fleet; giving demos and robot steps one weight keeps every mass target in every round.)
- uniform: plain behavior cloning on everything.
- hg_dagger: learn only from humans (demos and interventions); robot steps weight 0.
- iwr (Mandlekar et al., 2020): interventions balanced 50/50 against everything else.
"""

from __future__ import annotations

import numpy as np

from fleet.labels import ControlLabel

SCHEMES = ("sirius", "uniform", "hg_dagger", "iwr")
INTERVENTION_MASS = 0.5
PRE_INTERVENTION_MASS = 0.002


def sample_weights(labels: np.ndarray, scheme: str = "sirius") -> np.ndarray:
    """Weights (float32, mean 1) for steps with these ControlLabel codes."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown weighting scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    labels = np.asarray(labels)
    total = labels.size
    if total == 0:
        return np.zeros(0, np.float32)
    masks = {label: labels == label for label in ControlLabel}
    counts = {label: int(mask.sum()) for label, mask in masks.items()}
    weights = np.ones(total, np.float64)
    intervention, pre, robot, demo = (ControlLabel.INTERVENTION, ControlLabel.PRE_INTERVENTION,
                                      ControlLabel.ROBOT, ControlLabel.DEMO)

    if scheme == "sirius":
        remainder = float(total)
        if counts[intervention]:
            weights[masks[intervention]] = INTERVENTION_MASS * total / counts[intervention]
            remainder -= INTERVENTION_MASS * total
        if counts[pre]:
            weights[masks[pre]] = PRE_INTERVENTION_MASS * total / counts[pre]
            remainder -= PRE_INTERVENTION_MASS * total
        autonomous = masks[demo] | masks[robot]
        if autonomous.any():
            weights[autonomous] = remainder / autonomous.sum()
    elif scheme == "hg_dagger":
        weights[masks[robot] | masks[pre]] = 0.0
    elif scheme == "iwr" and 0 < counts[intervention] < total:
        weights[masks[intervention]] = 0.5 * total / counts[intervention]
        weights[~masks[intervention]] = 0.5 * total / (total - counts[intervention])

    mean = weights.mean()
    if mean <= 0:
        raise ValueError(f"weighting {scheme!r} gives every step weight 0 (no human-labelled steps to learn from)")
    return (weights / mean).astype(np.float32)
