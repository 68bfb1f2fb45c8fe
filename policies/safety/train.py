"""`flotilla safety checkpoint=PATH data=[fleet.zarr]`: a policy's safety models from its logged episodes.

    flotilla safety checkpoint=runs/push/checkpoints/latest data=[runs/demo/fleet.zarr] [model.ldm_steps=3000]

The step after `flotilla train` in the fleet loop: the flow and RND learn the density of the
policy's training demos (the stores its checkpoint names, or ``demos=``); the risk classifier and the
LDM learn from the policy's own episodes in ``data``. In a logged episode the policy's part is its
prefix up to the first intervention: an episode a human had to take over counts as a failure at the
takeover (the robot needed help there), otherwise the episode's success and its first constraint
violation (``signal_constraint_violation``) decide. Each prefix is cut into plans every Ta steps; the
logged chunk is the executed candidate and ``num_samples`` - 1 more are sampled from the policy there
(the LDM's min over a'). A share of the successful episodes (``calibration_ratio``) is held out to
calibrate the alarm thresholds and the filter's bounds (policies/safety/calibration.py); everything
is saved into the checkpoint folder (safety.safetensors + safety.json). Settings: ``SafetyJobConfig``.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from configs.schema import ConfigError
from fleet.labels import ControlLabel
from fleet.store import EpisodeStore, StoreError
from policies.action_space import ActionSpace
from policies.checkpoint import CheckpointError, load_checkpoint
from policies.device import resolve_device
from policies.safety.config import SafetyJobConfig
from policies.safety.fit import Rollout, calibrate, demo_data, fit_suite
from policies.safety.models import chunk_summary, module_device, policy_features
from policies.threads import set_torch_threads

VIOLATION_KEY = "signal_constraint_violation"


@torch.inference_mode()
def logged_rollouts(
    policy, action_space: ActionSpace, stores, action_steps: int, num_samples: int
) -> list[Rollout]:
    """The policy's part of every non-demo episode in `stores`, as Rollouts (see the module docstring)."""
    obs_keys = list(policy.shape_meta.obs)
    keys = [*obs_keys, "action", "label", VIOLATION_KEY]
    keys += ["goal"] if policy.shape_meta.goal_dim else []
    keys += [action_space.position_key] if action_space.kind == "target" else []
    to, ta = policy.n_obs_steps, policy.n_action_steps
    device = module_device(policy)
    rollouts = []
    for path in stores:
        store = EpisodeStore.open(path)
        missing = [key for key in dict.fromkeys(keys) if key not in (store.schema or {})]
        if missing:
            raise ValueError(f"{path} has no step key(s) {missing}")
        success = store.meta_column("success")
        for index in range(store.num_episodes):
            episode = store.episode(index, keys=list(dict.fromkeys(keys)))
            labels = episode["label"]
            if np.all(labels == ControlLabel.DEMO):
                continue
            human = np.flatnonzero(labels == ControlLabel.INTERVENTION)
            end = int(human[0]) if human.size else len(labels)
            if end < 1:
                continue
            actions = episode["action"][:end]
            if action_space.kind == "target":
                actions = action_space.to_policy(actions, episode[action_space.position_key][:end])
            plans = np.arange(0, end, ta)
            obs_index = np.clip(plans[:, None] + np.arange(-to + 1, 1), 0, end - 1)
            obs = {key: torch.from_numpy(episode[key][obs_index]).to(device) for key in obs_keys}
            goal = torch.from_numpy(episode["goal"][plans]).to(device) if policy.shape_meta.goal_dim else None
            logged = torch.from_numpy(actions[np.clip(plans[:, None] + np.arange(ta), 0, end - 1)]).to(device)
            candidates = chunk_summary(policy, logged, action_steps)[:, None]
            if num_samples > 1:
                start = to - 1
                samples = policy.predict_action(obs, goal, num_samples=num_samples - 1)[
                    :, :, start : start + ta
                ]
                candidates = torch.cat([candidates, chunk_summary(policy, samples, action_steps)], 1)
            states = policy_features(policy, obs, goal)
            violations = np.flatnonzero(episode[VIOLATION_KEY][:end] > 0)
            rollouts.append(
                Rollout(
                    plan_steps=plans.tolist(),
                    states=list(states),
                    candidates=list(candidates),
                    choices=[0] * len(plans),
                    # The runner's sampling spread, over the sampled candidates (0 with one sample).
                    uncertainty=(
                        (candidates[:, 1:].std(1).mean(-1) / 2.0).nan_to_num().tolist()
                        if num_samples > 2
                        else [0.0] * len(plans)  # no spread of fewer than 2 samples (and no warning)
                    ),
                    length=end,
                    success=bool(success[index]) and not human.size and not violations.size,
                    violation_step=int(violations[0]) if violations.size else None,
                    condition="logged",
                )
            )
    return rollouts


def fit_checkpoint(cfg: SafetyJobConfig) -> dict:
    """Train, calibrate and save; returns a summary (episodes used, thresholds)."""
    set_torch_threads(cfg.threads)
    torch.manual_seed(cfg.model.seed)
    checkpoint = load_checkpoint(cfg.checkpoint, map_location=resolve_device(cfg.device))
    policy = checkpoint.policy
    rollouts = (
        logged_rollouts(policy, checkpoint.action_space, cfg.data, cfg.model.action_steps, cfg.num_samples)
        if cfg.data
        else []
    )
    rng = np.random.default_rng(cfg.model.seed)
    successes = [i for i, r in enumerate(rollouts) if r.success]
    held = set(rng.permutation(successes)[: int(round(cfg.calibration_ratio * len(successes)))].tolist())
    train = [r for i, r in enumerate(rollouts) if i not in held]
    nominal = [rollouts[i] for i in sorted(held)]
    demos = demo_data(policy, cfg.checkpoint, cfg.model, cfg.num_samples, stores=cfg.demos)
    suite = fit_suite(policy, demos, train, cfg.model, models=cfg.models)
    if nominal:
        calibrate(
            suite,
            nominal,
            cfg.target_false_alarm,
            cfg.filter_false_alarm,
            time_varying=cfg.time_varying,
            bin_steps=cfg.bin_steps,
        )
    suite.save(cfg.checkpoint)
    return {
        "checkpoint": cfg.checkpoint,
        "models": sorted(suite.modules()),
        "demo_steps": len(demos.states),
        "train_episodes": len(train),
        "failed_train_episodes": sum(r.failed for r in train),
        "calibration_episodes": len(nominal),
        "filter_thresholds": suite.filter_thresholds,
    }


def run(cfg: SafetyJobConfig) -> None:
    """`flotilla safety` (settings: policies/safety/config.py:SafetyJobConfig)."""
    try:
        summary = fit_checkpoint(cfg)
    except ConfigError:  # a bad setting names itself (device: cuda requested but ...)
        raise
    except CheckpointError as err:
        raise ConfigError("checkpoint", str(err)) from None
    except (StoreError, ValueError) as err:
        raise ConfigError("data", str(err)) from None
    print(
        f"safety models {summary['models']} trained on {summary['demo_steps']} demo steps and "
        f"{summary['train_episodes']} logged episodes ({summary['failed_train_episodes']} failed), "
        f"calibrated on {summary['calibration_episodes']}; saved into {summary['checkpoint']}"
    )
    if not summary["calibration_episodes"]:  # nothing to set the bounds from: the filter will refuse to run
        print(
            "warning: no successful episode to calibrate on, so no request or filter thresholds were set; "
            "eval/deploy need explicit thresholds (safety_filter.threshold=...) until you rerun with data "
            "that holds successful episodes",
            file=sys.stderr,
        )
