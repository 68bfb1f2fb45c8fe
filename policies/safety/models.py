"""Learned failure signals and the Lyapunov density model, over a policy's own embedding.

Every model sees the policy's embedding of what it observed (``policy_features``: the encoder's
features of the To observed steps and the normalized goal, what the denoiser is conditioned on) and,
where it scores an action, the first ``action_steps`` actions of a candidate chunk in the policy's
normalized action space, flattened (``chunk_summary``). The unit of time is the chunk: a transition
goes from one plan to the next.

- ``FlowDensity``: a masked autoregressive flow (zuko) with an exact log p(s, a), fitted by maximum
  likelihood on the policy's training data (the demos): the density of "where its data is".
  Novelty = -log p(s, a) (FAIL-Detect's strongest single signal for diffusion policies).
- ``RND``: random network distillation on s: a predictor regresses a frozen random network on the
  training data; its error grows off the data.
- ``RiskClassifier``: P(constraint violation or failure within ``risk_horizon`` steps | s, a), trained on
  logged rollouts (Recovery-RL's constraint critic, trained here by plain classification on outcomes).
- ``LDM`` (Kang, Nair, Levine, ICML 2022): G(s, a) is the lowest log-density, negated, the robot can
  be forced to from (s, a) by the dynamics, acting as well as it can afterwards: the fixed point of
  G(s, a) = (1 - gamma) E(s, a) + gamma max(E(s, a), min_a' G(s', a')) with E = -log p(s, a)
  (gamma -> 1 gives the undiscounted max/min). Learned by fitted backups over logged transitions with
  a Polyak-averaged target network; min over a' is taken over the K chunks the policy sampled at s'
  (the actions the filter could choose there). A transition that ends in a constraint violation backs
  up ``violation_energy`` instead of min G(s', .), so the LDM also looks ahead to violations.

``SafetySuite`` holds them with their input standardization and the conformal thresholds
(policies/safety/calibration.py), and saves to / loads from a checkpoint folder as
``safety.safetensors`` + ``safety.json`` (no pickle). A checkpoint without them loads and runs as
before (``load_safety`` returns None).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import zuko
from safetensors.torch import save_file
from torch import nn

from policies.safety.calibration import SAFETY_JSON, ConformalThreshold
from policies.safety.config import SafetyConfig

SAFETY_FILE = "safety.safetensors"
SAFETY_FORMAT = 1
# The signal each model gives; every signal is higher = more likely to fail.
MODEL_SIGNAL = {"flow": "novelty", "rnd": "rnd", "risk": "risk", "ldm": "ldm"}


# ============================================================================================ inputs
def module_device(module: nn.Module) -> torch.device:
    """Where a module's weights are (the CPU for one without any)."""
    weight = next(iter(module.parameters()), None)
    return weight.device if weight is not None else torch.device("cpu")


def policy_features(
    policy: nn.Module, obs: dict[str, torch.Tensor], goal: torch.Tensor | None
) -> torch.Tensor:
    """(B, Ds): the policy's embedding of the observed window and the normalized goal (member 0 of an
    ensemble)."""
    base = policy.members[0] if hasattr(policy, "members") else policy
    features = base.encode_obs(obs)
    if base.goal_dim:
        features = torch.cat([features, base.normalizer.normalize("goal", goal)], dim=-1)
    return features


def chunk_summary(policy: nn.Module, executed: torch.Tensor, action_steps: int) -> torch.Tensor:
    """(..., Ta, A) unnormalized executed actions -> (..., action_steps * A) normalized, flattened."""
    base = policy.members[0] if hasattr(policy, "members") else policy
    normalized = base.normalizer.normalize("action", executed[..., :action_steps, :])
    return normalized.flatten(-2)


# ============================================================================================ models
STD_FLOOR = 0.05
# The flow is fitted to data blurred by this much noise (in standardized units): without it a flow on
# a few thousand points puts spikes on them and its log-density off the data is meaningless.
FLOW_NOISE = 0.05


class Standardize(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def fit(self, x: torch.Tensor) -> Standardize:
        self.mean.copy_(x.mean(0))
        # Inputs live in the policy's normalized space (about [-1, 1]): a floor keeps a dimension that is
        # constant in the data (push never opens the gripper) from turning any change into a huge score.
        self.std.copy_(x.std(0).clamp_min(STD_FLOOR))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(d_in, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, d_out)
    )


class FlowDensity(nn.Module):
    """log p(x) of standardized x by a MAF (the Jacobian of the standardization is included)."""

    def __init__(self, dim: int, hidden: int, transforms: int):
        super().__init__()
        self.scale = Standardize(dim)
        self.flow = zuko.flows.MAF(features=dim, transforms=transforms, hidden_features=(hidden, hidden))

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return self.flow().log_prob(self.scale(x)) - self.scale.std.log().sum()


class RND(nn.Module):
    def __init__(self, dim: int, hidden: int, out: int):
        super().__init__()
        self.scale = Standardize(dim)
        self.target = mlp(dim, hidden, out).requires_grad_(False)
        self.predictor = mlp(dim, hidden, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample prediction error (B,)."""
        z = self.scale(x)
        return (self.predictor(z) - self.target(z)).pow(2).mean(-1)


class ScoreNet(nn.Module):
    """A standardized-input MLP with one output: the risk classifier's logit, the LDM's G."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.scale = Standardize(dim)
        self.net = mlp(dim, hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.scale(x)).squeeze(-1)


# ============================================================================================ training
def _train(module: nn.Module, loss_fn, n: int, steps: int, cfg: SafetyConfig, after_step=None) -> list[float]:
    """Minimize loss_fn(indices) over random minibatches of range(n); returns the loss every 100 steps."""
    params = [p for p in module.parameters() if p.requires_grad]
    device = module_device(module)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    history = []
    module.train()
    for step in range(steps):
        # Drawn on the CPU (the same minibatches on every device), used where the data is.
        index = torch.randint(0, n, (min(cfg.batch_size, n),), generator=generator).to(device)
        loss = loss_fn(index)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if after_step is not None:
            after_step()
        if step % 100 == 0 or step == steps - 1:
            history.append(float(loss.detach()))
    module.eval()
    return history


def fit_flow(x: torch.Tensor, cfg: SafetyConfig) -> FlowDensity:
    torch.manual_seed(cfg.seed)
    flow = FlowDensity(x.shape[1], cfg.hidden, cfg.flow_transforms).to(x.device)
    flow.scale.fit(x)
    noise = FLOW_NOISE * flow.scale.std

    def loss(i: torch.Tensor) -> torch.Tensor:
        return -flow.log_prob(x[i] + noise * torch.randn_like(x[i])).mean()

    _train(flow, loss, len(x), cfg.flow_steps, cfg)
    return flow


def fit_rnd(x: torch.Tensor, cfg: SafetyConfig) -> RND:
    torch.manual_seed(cfg.seed + 1)
    rnd = RND(x.shape[1], cfg.hidden, cfg.rnd_features).to(x.device)
    rnd.scale.fit(x)
    _train(rnd, lambda i: rnd(x[i]).mean(), len(x), cfg.rnd_steps, cfg)
    return rnd


def fit_risk(x: torch.Tensor, label: torch.Tensor, cfg: SafetyConfig) -> ScoreNet:
    """A classifier of label (1: violation or failure within k steps) with positives reweighted to
    balance the classes."""
    torch.manual_seed(cfg.seed + 2)
    net = ScoreNet(x.shape[1], cfg.hidden).to(x.device)
    net.scale.fit(x)
    label = label.to(x.device, torch.float32)
    positive = float(label.mean())
    weight = torch.tensor((1 - positive) / max(positive, 1e-3), device=x.device)
    loss = nn.BCEWithLogitsLoss(pos_weight=weight)
    _train(net, lambda i: loss(net(x[i]), label[i]), len(x), cfg.risk_steps, cfg)
    return net


@dataclass
class Transitions:
    """Chunk-level transitions for the LDM's backup.

    ``x``: (N, D) the (state, action) input; ``energy``: (N,) E(s, a) = -log p(s, a);
    ``next_x``: (N, K, D) the inputs (s', a'_k) for the K candidates the policy sampled at s';
    ``done``: (N,) no next state (the episode ended); ``violation``: (N,) the chunk ended in a constraint
    violation (its backup is ``violation_energy``).
    """

    x: torch.Tensor
    energy: torch.Tensor
    next_x: torch.Tensor
    done: torch.Tensor
    violation: torch.Tensor = field(default=None)

    def __post_init__(self):
        if self.violation is None:
            self.violation = torch.zeros_like(self.done)


def ldm_target(
    energy: torch.Tensor,
    next_min: torch.Tensor,
    done: torch.Tensor,
    violation: torch.Tensor,
    gamma: float,
    violation_energy: float,
) -> torch.Tensor:
    """(1 - gamma) E + gamma max(E, min_a' G(s', a')), with E alone at the end of an episode and
    ``violation_energy`` for what follows a violation."""
    future = torch.where(violation, torch.full_like(energy, violation_energy), next_min)
    future = torch.where(done & ~violation, energy, future)
    return (1 - gamma) * energy + gamma * torch.maximum(energy, future)


def fit_ldm(data: Transitions, cfg: SafetyConfig, violation_energy: float) -> ScoreNet:
    """Fitted backups of the LDM with a Polyak-averaged target network (see the module docstring)."""
    torch.manual_seed(cfg.seed + 3)
    net = ScoreNet(data.x.shape[1], cfg.hidden).to(data.x.device)
    net.scale.fit(data.x)
    with torch.no_grad():  # start at G = E, a lower bound of the fixed point; backups raise it
        net.net[-1].bias.fill_(float(data.energy.mean()))
    target = ScoreNet(data.x.shape[1], cfg.hidden).to(data.x.device)
    target.load_state_dict(net.state_dict())
    target.requires_grad_(False).eval()
    done, violation = data.done.bool(), data.violation.bool()

    def loss(i: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            next_min = target(data.next_x[i]).min(dim=-1).values
            y = ldm_target(data.energy[i], next_min, done[i], violation[i], cfg.ldm_gamma, violation_energy)
        return nn.functional.smooth_l1_loss(net(data.x[i]), y)

    @torch.no_grad()
    def polyak():
        for t, p in zip(target.parameters(), net.parameters(), strict=True):
            t.lerp_(p, cfg.ldm_tau)

    _train(net, loss, len(data.x), cfg.ldm_steps, cfg, after_step=polyak)
    return net


# ============================================================================================ the suite
@dataclass
class SafetySuite:
    """The safety models of one policy, their thresholds, and their checkpoint I/O."""

    config: SafetyConfig
    state_dim: int
    action_dim: int  # of the chunk summary
    flow: FlowDensity | None = None
    rnd: RND | None = None
    risk: ScoreNet | None = None
    ldm: ScoreNet | None = None
    violation_energy: float = 0.0
    thresholds: dict[str, ConformalThreshold] = field(default_factory=dict)  # signal -> threshold
    # The safety filter's bound per signal it can filter on ("novelty", "ldm"), calibrated on nominal data.
    filter_thresholds: dict[str, float] = field(default_factory=dict)
    # Mean and spread of each signal over nominal plans: the scale on which signals are combined.
    nominal: dict[str, tuple[float, float]] = field(default_factory=dict)

    def agree(self, values: dict) -> np.ndarray:
        """FIPER-style agreement: the smallest of the signals' standardized values (each by its nominal
        mean and spread), so it is high only when every signal is; the signals missing from `values`
        are left out."""
        parts = [
            (np.asarray(values[n], np.float64) - m) / s for n, (m, s) in self.nominal.items() if n in values
        ]
        return np.min(parts, axis=0)

    def modules(self) -> dict[str, nn.Module]:
        return {
            name: module
            for name, module in (
                ("flow", self.flow),
                ("rnd", self.rnd),
                ("risk", self.risk),
                ("ldm", self.ldm),
            )
            if module is not None
        }

    def score_names(self) -> list[str]:
        """The signals ``score`` returns."""
        return [signal for name, signal in MODEL_SIGNAL.items() if name in self.modules()]

    @torch.no_grad()
    def score(self, state: torch.Tensor, action: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each signal for states (B, Ds) and chunk summaries (B, ..., Da): (B, ...) per signal, on the
        models' device (the inputs are moved there: a runner's filter moves the models to its policy's
        device, rollouts may have been recorded elsewhere)."""
        modules = list(self.modules().values())
        device = module_device(modules[0]) if modules else state.device
        state, action = state.to(device, torch.float32), action.to(device, torch.float32)
        # fp32 log-densities under a caller's bf16 autocast too
        with torch.autocast("cuda" if device.type == "cuda" else "cpu", enabled=False):
            return self._score(state, action)

    def _score(self, state: torch.Tensor, action: torch.Tensor) -> dict[str, torch.Tensor]:
        extra = action.shape[1:-1]
        s = state.reshape(state.shape[0], *([1] * len(extra)), -1).expand(*action.shape[:-1], -1)
        x = torch.cat([s, action], dim=-1)
        out = {}
        if self.flow is not None:
            out["novelty"] = -self.flow.log_prob(x.reshape(-1, x.shape[-1])).reshape(x.shape[:-1])
        if self.rnd is not None:
            out["rnd"] = self.rnd(state).reshape(state.shape[0], *([1] * len(extra))).expand(x.shape[:-1])
        if self.risk is not None:
            out["risk"] = torch.sigmoid(self.risk(x))
        if self.ldm is not None:
            out["ldm"] = self.ldm(x)
        return out

    # ---------------------------------------------------------------------------------------- I/O
    def save(self, directory: str | Path) -> None:
        """Write safety.safetensors + safety.json into a checkpoint folder."""
        directory = Path(directory)
        tensors = {
            f"{name}.{key}": value.detach().cpu().contiguous()
            for name, module in self.modules().items()
            for key, value in module.state_dict().items()
        }
        meta = {
            "format": SAFETY_FORMAT,
            "config": asdict(self.config),
            "state_dim": self.state_dim,
            "action_dim": self.action_dim,
            "models": sorted(self.modules()),
            "violation_energy": self.violation_energy,
            "thresholds": {name: t.to_dict() for name, t in self.thresholds.items()},
            "filter_thresholds": self.filter_thresholds,
            "nominal": {name: list(stats) for name, stats in self.nominal.items()},
        }
        save_file(tensors, str(directory / SAFETY_FILE))
        (directory / SAFETY_JSON).write_text(json.dumps(meta, indent=2))


def build_modules(config: SafetyConfig, state_dim: int, action_dim: int, names) -> dict[str, nn.Module]:
    joint = state_dim + action_dim
    builders = {
        "flow": lambda: FlowDensity(joint, config.hidden, config.flow_transforms),
        "rnd": lambda: RND(state_dim, config.hidden, config.rnd_features),
        "risk": lambda: ScoreNet(joint, config.hidden),
        "ldm": lambda: ScoreNet(joint, config.hidden),
    }
    unknown = sorted(set(names) - set(builders))
    if unknown:
        raise ValueError(f"unknown safety model(s) {unknown}; known: {sorted(builders)}")
    return {name: builders[name]().eval() for name in names}


def load_safety(directory: str | Path) -> SafetySuite | None:
    """The safety models saved in a checkpoint folder, or None when it has none (older checkpoints)."""
    from policies.checkpoint import CheckpointError, load_state_strict, load_tensors

    directory = Path(directory)
    path = directory / SAFETY_JSON
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
        if meta.get("format") != SAFETY_FORMAT:
            raise CheckpointError(
                f"{path}: safety format {meta.get('format')}, this code reads {SAFETY_FORMAT}"
            )
        config = SafetyConfig(**meta["config"])
        modules = build_modules(config, int(meta["state_dim"]), int(meta["action_dim"]), meta["models"])
        thresholds = {name: ConformalThreshold.from_dict(t) for name, t in meta.get("thresholds", {}).items()}
        filter_thresholds = {str(k): float(v) for k, v in meta.get("filter_thresholds", {}).items()}
        nominal = {str(k): (float(v[0]), float(v[1])) for k, v in meta.get("nominal", {}).items()}
        violation_energy = float(meta.get("violation_energy", 0.0))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"{path}: bad safety model description ({err})") from None
    tensors = load_tensors(directory / SAFETY_FILE)
    for name, module in modules.items():
        prefix = name + "."
        load_state_strict(
            module,
            {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)},
            directory / SAFETY_FILE,
        )
    stray = sorted({k.split(".")[0] for k in tensors} - set(modules))
    if stray:
        raise CheckpointError(
            f"{directory / SAFETY_FILE}: weights for model(s) {stray} that {SAFETY_JSON} does not list"
        )
    return SafetySuite(
        config,
        int(meta["state_dim"]),
        int(meta["action_dim"]),
        violation_energy=violation_energy,
        thresholds=thresholds,
        filter_thresholds=filter_thresholds,
        nominal=nominal,
        **modules,
    )


def risk_labels(steps: np.ndarray, failure_step: float, horizon: int) -> np.ndarray:
    """1 where a failure (violation, or the end of a failed episode) comes within `horizon` steps."""
    if math.isinf(failure_step):
        return np.zeros(len(steps), np.float32)
    return ((failure_step - np.asarray(steps)) <= horizon).astype(np.float32)
