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

Whatever the scheme, the trainer leaves out the steps `takeover_holds` finds: the zero-motion steps
that open a human takeover, before the operator's first command has reached the robot (the robot
holds still meanwhile; a person's reaction time adds more). They carry the intervention label but no
human decision, and learning them at intervention weight teaches the policy to stand still exactly
where it was failing (measured on the fleet demo: 30% of all intervention steps were such holds).
"""

from __future__ import annotations

import numpy as np

from fleet.labels import ControlLabel

SCHEMES = ("sirius", "uniform", "hg_dagger", "iwr")
INTERVENTION_MASS = 0.5
PRE_INTERVENTION_MASS = 0.002


def takeover_holds(
    labels: np.ndarray,
    actions: np.ndarray,
    episode_ends: np.ndarray | None = None,
    gripper_index: int | None = -1,
) -> np.ndarray:
    """Mask of the zero-motion steps at the start of each run of INTERVENTION steps (a takeover).

    Motion is every action dimension but `gripper_index` (the robot agent keeps the gripper during a
    hold; None: no gripper). Only leading steps count: a human who stops mid-takeover decided to.
    Runs restart at `episode_ends` (cumulative), so a takeover carried into the next episode counts anew.
    """
    labels = np.asarray(labels)
    actions = np.asarray(actions)
    motion = np.ones(actions.shape[-1], bool)
    if gripper_index is not None:
        motion[gripper_index] = False
    still = np.all(actions[:, motion] == 0, axis=-1)
    intervention = labels == ControlLabel.INTERVENTION
    starts = np.zeros(len(labels), bool)
    starts[np.asarray(episode_ends if episode_ends is not None else [], np.int64)[:-1]] = True
    holds = np.zeros(len(labels), bool)
    holding = False
    for t in range(len(labels)):  # episodes are short; a plain scan reads best
        new_run = intervention[t] and (t == 0 or starts[t] or not intervention[t - 1])
        holding = intervention[t] and still[t] and (new_run or holding)
        holds[t] = holding
    return holds


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
    intervention, pre, robot, demo = (
        ControlLabel.INTERVENTION,
        ControlLabel.PRE_INTERVENTION,
        ControlLabel.ROBOT,
        ControlLabel.DEMO,
    )

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
        raise ValueError(
            f"weighting {scheme!r} gives every step weight 0 (no human-labelled steps to learn from)"
        )
    return (weights / mean).astype(np.float32)
