"""The inference runner: a policy behind the robot agent's small interface (reset, act, version).

`PolicyRunner.from_checkpoint(path)` builds one from a checkpoint folder.

Receding-horizon execution: keep the last To observations, and when the queue of planned actions
runs dry, predict a chunk of Tp actions from them and queue the Ta actions that start at the
current step (index To-1 of the chunk). Batch 1, `torch.inference_mode`, numpy in and out.

Uncertainty (the signal the fleet allocates humans on): with `num_samples` K > 1 each plan draws K
action chunks in one batched pass; their spread, the standard deviation across samples of the
normalized executed actions averaged over steps and dimensions and divided by the normalized action
range (2), is reported for every action of that chunk.

Safety (policies/safety/): a checkpoint with safety models (safety.json) gets them loaded; each plan
then scores the K candidates, reports per-plan ``signals`` (novelty, rnd, risk, ldm, density and the
filter's decision) and, with ``safety_filter=FilterConfig(mode="ldm" | "density")``, executes a
candidate the filter allows instead of sample 0, or holds (zero motion, gripper kept) for Ta steps
when none passes, then plans again.
A checkpoint without safety models runs exactly as before.

Device: ``device`` (auto | cpu | cuda | cuda:N, policies/device.py) moves the policy there (None: leave it
where it is, e.g. weights several runners share); observations go in as numpy and actions come out as
numpy whatever the device. ``cuda_graphs=True`` on a CUDA device replays each plan from a CUDA graph
(policies/cuda_graphs.py: one launch instead of hundreds at batch 1); elsewhere it changes nothing.

Ensembles (ThriftyDAgger / Fleet-DAgger style; `ensemble=E` in configs/train.yaml, see
policies/models/ensemble.py): sample k comes from member k mod E, and with K > 1 the runner draws at
least E samples so every member contributes. The uncertainty is the same normalized spread, now of
the members' actions, so thresholds stay comparable with sampling spread; a deterministic mlp
ensemble gets a nonzero signal this way (a single mlp reports 0). The executed chunk is sample 0,
member 0's, whatever K is.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from policies.action_space import DELTA, ActionSpace
from policies.checkpoint import load_checkpoint
from policies.cuda_graphs import GraphedPlanner
from policies.device import resolve_device
from policies.safety.filter import FilterConfig, SafetyFilter
from policies.safety.models import SafetySuite, load_safety


class PolicyRunner:
    def __init__(
        self,
        policy: nn.Module,
        version: str = "",
        num_samples: int = 1,
        n_action_steps: int | None = None,
        action_space: ActionSpace = DELTA,
        noise_seed: int | None = None,
        device: str | torch.device | None = None,
        cuda_graphs: bool = False,
        safety: SafetySuite | None = None,
        safety_filter: FilterConfig | None = None,
    ):
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if device is not None:
            policy = policy.to(resolve_device(device))
        self.policy = policy.eval()
        weight = next(iter(policy.parameters()), None)  # (a stand-in policy may have none: the CPU)
        self.device = weight.device if weight is not None else torch.device("cpu")
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self._graph = None  # built at the first plan
        self.version = version
        self.action_space = action_space
        # The same initial noise for every plan makes consecutive chunks agree with each other
        # (measured on push, 50 demos, 20 episodes: diffusion 8 -> 11 successes, gc 7 -> 9).
        self.noise_seed = noise_seed
        ensemble = getattr(policy, "ensemble_size", 1)
        self.num_samples = max(num_samples, ensemble) if num_samples > 1 else 1  # every member gets a say
        self.n_obs_steps = policy.n_obs_steps
        self.n_action_steps = n_action_steps or policy.n_action_steps
        if not 1 <= self.n_action_steps <= policy.horizon - policy.n_obs_steps + 1:
            raise ValueError(
                f"n_action_steps {self.n_action_steps} does not fit in horizon {policy.horizon} "
                f"after {policy.n_obs_steps} observed steps"
            )
        self.obs_keys = list(policy.shape_meta.obs)
        self.uses_goal = policy.shape_meta.goal_dim > 0
        self.uncertainty = 0.0
        # Safety models (policies/safety/filter.py): per-plan signals, and the filter over the K candidates.
        self.safety = (
            SafetyFilter(policy, safety, safety_filter)
            if safety is not None or safety_filter is not None
            else None
        )
        self.signals: dict[str, float | str] = {}
        self.reset()

    @classmethod
    def from_checkpoint(
        cls,
        directory,
        num_samples: int = 1,
        n_action_steps: int | None = None,
        noise_seed: int | None = None,
        device: str | torch.device = "auto",
        cuda_graphs: bool = False,
        safety_filter: FilterConfig | None = None,
    ) -> PolicyRunner:
        checkpoint = load_checkpoint(directory, map_location=resolve_device(device))
        return cls(
            checkpoint.policy,
            checkpoint.version,
            num_samples,
            n_action_steps,
            checkpoint.action_space,
            noise_seed,
            cuda_graphs=cuda_graphs,
            safety=load_safety(directory),  # None for a checkpoint without safety models
            safety_filter=safety_filter,
        )

    @property
    def graph_replays(self) -> int:
        """Plans served by the CUDA graph so far (0 without one)."""
        return self._graph.replays if self._graph is not None else 0

    def reset(self) -> None:
        self._history: deque = deque(maxlen=self.n_obs_steps)
        self._actions: deque = deque()
        self.uncertainty = 0.0
        self._last_action: np.ndarray | None = None
        self._held = 0  # steps left to hold after the safety filter passed no candidate

    def act(self, obs: Mapping[str, np.ndarray], goal: np.ndarray | None = None) -> np.ndarray:
        """The action for this step (float32, unnormalized)."""
        missing = [key for key in self.obs_keys if key not in obs]
        if missing:
            raise KeyError(f"observation lacks key(s) {missing} the policy needs")
        frame = {key: np.asarray(obs[key]) for key in self.obs_keys}
        if not self._history:
            self._history.extend([frame] * self.n_obs_steps)  # pad the start by repeating the first frame
        else:
            self._history.append(frame)
        if not self._actions and not self._held:
            self._plan(obs.get("goal") if goal is None else goal)
            if not self._actions:  # the safety filter let no candidate through: hold for a chunk's time
                self._held = self.n_action_steps
        if self._held:
            self._held -= 1
            return self._held_action()
        self._last_action = self.action_space.to_robot(
            self._actions.popleft(), obs.get(self.action_space.position_key)
        )
        return self._last_action

    def _held_action(self) -> np.ndarray:
        """Zero motion; the gripper (the last action dimension) keeps its last command."""
        held = np.zeros(self.policy.action_dim, np.float32)
        if self._last_action is not None:
            held[-1] = self._last_action[-1]
        return held

    @torch.inference_mode()
    def _plan(self, goal: np.ndarray | None) -> None:
        obs = {
            key: torch.from_numpy(np.stack([frame[key] for frame in self._history]))[None].to(self.device)
            for key in self.obs_keys
        }
        goal_tensor = None
        if self.uses_goal:
            if goal is None:
                raise ValueError(
                    "this policy is goal-conditioned: pass a goal (or an observation with 'goal')"
                )
            goal_tensor = torch.as_tensor(np.asarray(goal, dtype=np.float32))[None].to(self.device)
        if self.cuda_graphs:
            if self._graph is None:  # the safety models' input too: one replay, no eager encoder pass
                features = self.safety.features if self.safety is not None else None
                self._graph = GraphedPlanner(self.policy, self.num_samples, self.device, features=features)
            samples = self._graph(obs, goal_tensor, self.noise_seed)[0]  # (K, Tp, A)
        else:
            noise = (
                {}
                if self.noise_seed is None
                else {"generator": torch.Generator(self.device).manual_seed(self.noise_seed)}
            )
            samples = self.policy.predict_action(obs, goal_tensor, num_samples=self.num_samples, **noise)[0]
        start = self.n_obs_steps - 1
        executed = samples[:, start : start + self.n_action_steps]
        if self.num_samples > 1:
            normalized = self.policy.normalizer.normalize("action", executed)
            self.uncertainty = float(normalized.std(dim=0).mean() / 2.0)
        choice = 0
        if self.safety is not None:
            features = self._graph.features if self._graph is not None else None
            choice = self.safety.review(obs, goal_tensor, executed, self.uncertainty, features)
            self.signals = self.safety.signals
            if choice is None:
                return
        self._actions.extend(executed[choice].float().cpu().numpy().astype(np.float32))
