"""Training a policy's safety models and calibrating them: from its demos and logged rollouts.

    demos = demo_data(checkpoint_dir, stores)             # (s, a) where the policy's data is
    suite = fit_suite(policy, demos, rollouts, SafetyConfig())
    calibrate(suite, nominal_rollouts, target_false_alarm=0.05, filter_false_alarm=0.05)
    suite.save(checkpoint_dir)                            # safety.safetensors + safety.json beside the policy

What each model learns from (policies/safety/models.py): the flow and RND from the demos the policy was
trained on (the density of its data); the risk classifier from rollouts with outcomes, demos as
negatives; the LDM from the transitions of both, with the flow's energies and, at every next state,
the K chunks the policy sampled there. ``Rollout`` is one episode as a runner with a ``SafetyFilter``
saw it (its ``last`` plan at every plan step) plus its outcome; benchmarks/signals.py records them in
simulation, and logged fleet episodes give the same fields.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from policies.checkpoint import read_config
from policies.data.windows import WindowDataset, load_episodes
from policies.safety.calibration import ConformalThreshold
from policies.safety.config import FILTER_FALSE_ALARM
from policies.safety.models import (
    SafetyConfig,
    SafetySuite,
    Transitions,
    chunk_summary,
    fit_flow,
    fit_ldm,
    fit_risk,
    fit_rnd,
    module_device,
    policy_features,
    risk_labels,
)

FILTER_SIGNALS = ("novelty", "ldm")
AGREE = "agree"  # every signal at once (SafetySuite.agree)


@dataclass
class Rollout:
    """One episode: what the policy saw and proposed at each plan, and how the episode ended."""

    plan_steps: list[int] = field(default_factory=list)  # env step of each plan
    states: list[torch.Tensor] = field(default_factory=list)  # (Ds,) per plan
    candidates: list[torch.Tensor] = field(default_factory=list)  # (K, Da) per plan
    choices: list[int] = field(default_factory=list)  # executed candidate per plan (-1: held)
    uncertainty: list[float] = field(default_factory=list)  # sampling spread per plan
    length: int = 0
    success: bool = False
    violation_step: int | None = None  # the step whose outcome was a constraint violation
    condition: str = ""  # e.g. normal | perturbed | ood_goal

    @property
    def failed(self) -> bool:
        return not self.success

    @property
    def failure_step(self) -> float:
        """When the failure happened: the violation, or the end of a failed episode (inf: success)."""
        if self.violation_step is not None:
            return float(self.violation_step)
        return math.inf if self.success else float(self.length)

    def per_step(self, plan_values) -> np.ndarray:
        """Per-plan values held until the next plan -> one value per env step (length)."""
        values = np.asarray(plan_values, np.float64)
        index = np.searchsorted(np.asarray(self.plan_steps), np.arange(self.length), side="right") - 1
        return values[np.clip(index, 0, len(values) - 1)]


@dataclass
class DemoData:
    states: torch.Tensor  # (N, Ds)
    actions: torch.Tensor  # (N, Da): the demo's chunk summary at each step
    transitions: tuple[torch.Tensor, ...]  # (x, next_state, next_candidates, done) every Ta steps


@torch.inference_mode()
def demo_data(
    policy: nn.Module, checkpoint_dir, cfg: SafetyConfig, num_samples: int = 8, stores=None, batch: int = 512
) -> DemoData:
    """Embed the policy's training demos (the stores its checkpoint names unless `stores` is given), on
    the policy's device."""
    from policies.action_space import ActionSpace

    config = read_config(checkpoint_dir)
    stores = stores or config.get("training", {}).get("stores", [])
    if not stores:
        raise ValueError(f"{checkpoint_dir}: the checkpoint names no training stores; pass stores=")
    action_space = ActionSpace.from_dict(config.get("action_space"))
    obs_keys = list(policy.shape_meta.obs)
    extra = [action_space.position_key] if action_space.kind == "target" else []
    data = load_episodes(stores, obs_keys, extra_keys=extra)
    if action_space.kind == "target":
        data.steps["action"] = action_space.to_policy(
            data.steps["action"], data.steps[action_space.position_key]
        )
    episodes = np.arange(data.num_episodes)
    windows = WindowDataset(data, episodes, obs_keys, policy.n_obs_steps, policy.horizon)
    loader = torch.utils.data.DataLoader(windows, batch_size=batch, shuffle=False)
    start, ta = policy.n_obs_steps - 1, policy.n_action_steps
    device = module_device(policy)
    states, actions = [], []
    for item in loader:
        item = _to_device(item, device)
        states.append(policy_features(policy, item["obs"], item.get("goal")))
        actions.append(chunk_summary(policy, item["action"][:, start : start + ta], cfg.action_steps))
    states, actions = torch.cat(states), torch.cat(actions)
    # Chunk-level transitions: anchors every Ta steps of each episode, the policy's K chunks at the next.
    anchors, nexts, done = [], [], []
    offset = 0
    for episode in episodes:
        first, last = data.bounds(int(episode))
        count = last - first  # windows are anchored at every step (demos have no skipped steps)
        plan = np.arange(0, count, ta)
        anchors.append(offset + plan)
        nexts.append(offset + np.minimum(plan + ta, count - 1))
        done.append(plan + ta >= count)
        offset += count
    anchors, nexts, done = np.concatenate(anchors), np.concatenate(nexts), np.concatenate(done)
    candidates = []
    for chunk in np.array_split(nexts, max(1, len(nexts) // 64)):
        items = [windows[int(i)] for i in chunk]
        obs = {key: torch.stack([it["obs"][key] for it in items]).to(device) for key in obs_keys}
        goal = torch.stack([it["goal"] for it in items]).to(device) if "goal" in items[0] else None
        samples = policy.predict_action(obs, goal, num_samples=num_samples)  # (B, K, Tp, A)
        candidates.append(chunk_summary(policy, samples[:, :, start : start + ta], cfg.action_steps))
    x = torch.cat([states[anchors], actions[anchors]], -1)
    return DemoData(
        states, actions, (x, states[nexts], torch.cat(candidates), torch.as_tensor(done, device=device))
    )


def _to_device(value, device: torch.device):
    """A batch (tensors in nested dicts) on ``device``."""
    if isinstance(value, dict):
        return {key: _to_device(item, device) for key, item in value.items()}
    return value.to(device) if isinstance(value, torch.Tensor) else value


def rollout_transitions(rollouts: list[Rollout]) -> tuple[torch.Tensor, ...]:
    """(x, next_state, next_candidates, done, violation) over consecutive executed plans."""
    xs, next_states, next_candidates, done, violation = [], [], [], [], []
    for r in rollouts:
        executed = [i for i, c in enumerate(r.choices) if c >= 0]
        for n, i in enumerate(executed):
            xs.append(torch.cat([r.states[i], r.candidates[i][r.choices[i]]]))
            last = n + 1 == len(executed)
            j = i if last else executed[n + 1]
            next_states.append(r.states[j])
            next_candidates.append(r.candidates[j])
            done.append(last)
            violation.append(last and r.violation_step is not None)
    return (
        torch.stack(xs),
        torch.stack(next_states),
        torch.stack(next_candidates),
        torch.tensor(done),
        torch.tensor(violation),
    )


def compress_energy(energy: torch.Tensor, knee: float) -> torch.Tensor:
    """E below `knee` (the demos' 99th percentile) as is, above it log-compressed: a flow's -log p off
    its data runs to 1e4-1e5 nats, which would swamp the LDM's regression, and only the order matters
    there (the filter compares G with a threshold calibrated on the same scale)."""
    return torch.where(energy > knee, knee + torch.log1p((energy - knee).clamp_min(0)), energy)


def _joint(states: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """(N, Ds), (N, K, Da) -> (N, K, Ds + Da)."""
    return torch.cat([states[:, None].expand(-1, candidates.shape[1], -1), candidates], -1)


def fit_suite(
    policy: nn.Module,
    demos: DemoData,
    rollouts: list[Rollout],
    cfg: SafetyConfig,
    models=("flow", "rnd", "risk", "ldm"),
) -> SafetySuite:
    """Train the safety models (see the module docstring); rollouts are needed for risk and the LDM. They
    train on the demos' device (the policy's); rollouts recorded elsewhere are moved there."""
    device = demos.states.device
    suite = SafetySuite(cfg, demos.states.shape[1], demos.actions.shape[1])
    suite.flow = fit_flow(torch.cat([demos.states, demos.actions], -1), cfg)
    if "rnd" in models:
        suite.rnd = fit_rnd(demos.states, cfg)
    if not rollouts:
        return suite
    if "risk" in models:
        xs, labels = [torch.cat([demos.states, demos.actions], -1)], [torch.zeros(len(demos.states))]
        for r in rollouts:
            executed = [i for i, c in enumerate(r.choices) if c >= 0]
            xs.append(
                torch.stack([torch.cat([r.states[i], r.candidates[i][r.choices[i]]]) for i in executed]).to(
                    device
                )
            )
            steps = np.asarray(r.plan_steps)[executed]
            labels.append(torch.from_numpy(risk_labels(steps, r.failure_step, cfg.risk_horizon)))
        suite.risk = fit_risk(torch.cat(xs), torch.cat(labels), cfg)
    if "ldm" in models:
        dx, dns, dnc, ddone = demos.transitions
        rx, rns, rnc, rdone, rviolation = (t.to(device) for t in rollout_transitions(rollouts))
        x = torch.cat([dx, rx])
        next_x = torch.cat([_joint(dns, dnc), _joint(rns, rnc)])
        done = torch.cat([ddone, rdone])
        violation = torch.cat([torch.zeros_like(ddone), rviolation])
        with torch.no_grad():
            knee = float(
                torch.quantile(-suite.flow.log_prob(torch.cat([demos.states, demos.actions], -1)), 0.99)
            )
            energy = compress_energy(-suite.flow.log_prob(x), knee)
            # What a violation backs up: worse than anything the robot met.
            suite.violation_energy = float(energy.max()) + 1.0
        suite.ldm = fit_ldm(Transitions(x, energy, next_x, done, violation), cfg, suite.violation_energy)
    return suite


@torch.no_grad()
def rollout_scores(suite: SafetySuite | None, rollout: Rollout) -> dict[str, np.ndarray]:
    """Per plan, each signal of the executed candidate (candidate 0 on a hold) and the sampling spread."""
    out = {"uncertainty": np.asarray(rollout.uncertainty, np.float64)}
    if suite is None:
        return out
    states = torch.stack(rollout.states)
    candidates = torch.stack(rollout.candidates)
    scores = suite.score(states, candidates)  # signal -> (P, K)
    shown = [max(c, 0) for c in rollout.choices]
    for name, values in scores.items():
        out[name] = values[torch.arange(len(shown)), shown].cpu().numpy().astype(np.float64)
    if suite.nominal:
        out[AGREE] = suite.agree(out)
    return out


def calibrate(
    suite: SafetySuite,
    nominal: list[Rollout],
    target_false_alarm: float = 0.05,
    filter_false_alarm: float = FILTER_FALSE_ALARM,
    time_varying: bool = True,
    bin_steps: int = 10,
) -> SafetySuite:
    """Fit the suite's alarm thresholds (per episode, on nominal rollouts; "agree" too, after each
    signal's nominal mean and spread) and the filter's bounds (per step: the share of nominal plans
    whose executed chunk the filter would have refused)."""
    suite.nominal = {}
    # The functional band takes its shape and its quantile from two halves of the episodes: with a single
    # calibration episode the thresholds are constant over the episode.
    time_varying = time_varying and len(nominal) >= 2
    per_rollout = [rollout_scores(suite, r) for r in nominal]
    for name in per_rollout[0]:
        plans = np.concatenate([s[name] for s in per_rollout])
        suite.nominal[name] = (float(plans.mean()), float(plans.std()) + 1e-9)
    for s in per_rollout:
        s[AGREE] = suite.agree(s)
    for name in per_rollout[0]:
        episodes = [r.per_step(s[name]) for r, s in zip(nominal, per_rollout, strict=True)]
        suite.thresholds[name] = ConformalThreshold.fit(
            episodes, target_false_alarm, time_varying=time_varying, bin_steps=bin_steps
        )
    for name in FILTER_SIGNALS:
        if name in per_rollout[0]:
            plans = np.concatenate([s[name] for s in per_rollout])
            suite.filter_thresholds[name] = ConformalThreshold.fit(
                [plans], filter_false_alarm, unit="step"
            ).thresholds[0]
    return suite
