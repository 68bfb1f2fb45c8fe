"""The safety filter: score the K chunks a policy sampled, execute one the safety model allows, else hold.

At every plan the runner (policies/runner.py) hands the filter its K candidate chunks. The filter
embeds the observation as the policy does (policies/safety/models.py: ``policy_features``), scores
every candidate with each safety model of the checkpoint, and picks:

- ``mode="off"``: candidate 0, as without a filter (the signals are still computed and reported);
- ``mode="density"``: a single-step density filter, the score is novelty = -log p(s, a) (the flow);
- ``mode="ldm"``: the score is the LDM's G(s, a), the lowest density the robot can be forced to later.

Of the candidates whose score is <= the threshold it executes the lowest-scoring one
(``choose="lowest"``, the default) or the first in sampling order (``choose="first"``, the policy's own
choice among the safe ones). If none passes it returns None: the runner holds (zero motion, gripper
unchanged) for Ta steps, then plans again; the hold is reported (``filter``: hold) with ``risk``
raised to 1 so the fleet routes a human.

Per plan it reports (``signals``): every signal of the executed candidate (or of candidate 0 on a hold),
``density`` (-G with an LDM, else log p: high = familiar, the proto's meaning), ``agree`` (every
signal at once: the smallest standardized one, once calibrated), and the decision
(``filter``: off | pass | switched | hold).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from policies.safety.config import FilterConfig
from policies.safety.models import SafetyConfig, SafetySuite, chunk_summary, policy_features

# Which signal each filter mode bounds.
MODE_SIGNAL = {"density": "novelty", "ldm": "ldm"}
OFF, PASS, SWITCHED, HOLD = "off", "pass", "switched", "hold"


class SafetyFilterError(ValueError):
    """The filter asked for cannot run on this checkpoint (no such safety model, no bound)."""


@dataclass
class Plan:
    """What the filter saw at one plan (kept for benchmarks and logs)."""

    state: torch.Tensor  # (Ds,)
    candidates: torch.Tensor  # (K, Da) chunk summaries
    scores: dict[str, torch.Tensor]  # signal -> (K,)
    choice: int | None


def pick(scores: torch.Tensor, threshold: float, choose: str) -> int | None:
    """The candidate to execute among `scores` (K,), None when every score is above `threshold`."""
    safe = torch.nonzero(scores <= threshold).flatten()
    if safe.numel() == 0:
        return None
    if choose == "first":
        return int(safe[0])
    return int(safe[torch.argmin(scores[safe])])


class SafetyFilter:
    def __init__(self, policy: nn.Module, suite: SafetySuite | None, config: FilterConfig | None = None):
        self.policy, self.suite = policy, suite
        self.config = config or FilterConfig()
        self.action_steps = (suite.config if suite else SafetyConfig()).action_steps
        if suite is not None:  # score where the policy's features are
            device = next(iter(policy.parameters())).device
            for module in suite.modules().values():
                module.to(device)
        self.threshold = None
        if self.config.mode != "off":
            signal = MODE_SIGNAL[self.config.mode]
            if suite is None or signal not in suite.score_names():
                raise SafetyFilterError(
                    f"filter mode {self.config.mode!r} needs the checkpoint's {signal} model; it has "
                    f"{suite.score_names() if suite else 'no safety models'}"
                )
            self.threshold = self.config.threshold
            if self.threshold is None:
                self.threshold = suite.filter_thresholds.get(signal)
            if self.threshold is None:
                raise SafetyFilterError(
                    f"no threshold for the {self.config.mode} filter: set one or calibrate it"
                )
        self.signals: dict[str, float | str] = {}
        self.last: Plan | None = None

    def features(self, obs: dict[str, torch.Tensor], goal: torch.Tensor | None) -> torch.Tensor:
        """(B, Ds): what the safety models see of an observation (the policy's embedding)."""
        return policy_features(self.policy, obs, goal)

    @torch.inference_mode()
    def review(
        self,
        obs: dict[str, torch.Tensor],
        goal: torch.Tensor | None,
        executed: torch.Tensor,
        uncertainty: float = 0.0,
        features: torch.Tensor | None = None,
    ) -> int | None:
        """`executed`: (K, Ta, A) unnormalized candidate chunks; `uncertainty`: their sampling spread (for
        "agree"); `features`: ``self.features(obs, goal)`` if already computed (a CUDA graph's). The index
        to execute, or None: hold."""
        state = (self.features(obs, goal) if features is None else features)[0].clone()
        candidates = chunk_summary(self.policy, executed, self.action_steps)
        scores = (
            {}
            if self.suite is None
            else {k: v[0] for k, v in self.suite.score(state[None], candidates[None]).items()}
        )
        choice, decision = 0, OFF
        if self.config.mode != "off":
            choice = pick(scores[MODE_SIGNAL[self.config.mode]], self.threshold, self.config.choose)
            decision = HOLD if choice is None else PASS if choice == 0 else SWITCHED
        shown = 0 if choice is None else choice
        signals: dict[str, float | str] = {name: float(value[shown]) for name, value in scores.items()}
        if "ldm" in scores:
            signals["density"] = -signals["ldm"]
        elif "novelty" in scores:
            signals["density"] = -signals["novelty"]
        if self.suite is not None and self.suite.nominal:
            signals["agree"] = float(self.suite.agree({**signals, "uncertainty": uncertainty}))
        if decision == HOLD:
            signals["risk"] = 1.0
        signals["filter"] = decision
        self.signals = signals
        self.last = Plan(state, candidates, scores, choice)
        return choice
