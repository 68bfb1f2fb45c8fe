"""`flotilla demo` (``DemoConfig``; configs/demo.yaml): the whole fleet learning loop in one command, no outside services.

1. collect scripted demonstrations and train an initial policy on them (`initial_policy`);
2. start the fleet server in-process on a free 127.0.0.1 port (store and registry under `out`) and
   publish the initial policy to its registry;
3. R rounds: the sim fleet (N robots, M scripted operators over gRPC) runs on the deployed policy,
   humans intervene, every step is logged; then retrain on all stores (demos + fleet, weighted by
   control label as `train.weighting` says), fit the new policy's safety models (its learned risk,
   sim/round_safety.py; the initial policy's from pilot rollouts of its own), publish, and the robots
   hot-swap to the new version before the next round (2 and 3 are `fleet_rounds`);
4. print a table row per round, write metrics.json and PNG curves into `out`.

benchmarks/fleet.py runs the same two functions, one initial policy per seed shared by every
allocation rule it compares.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from configs.schema import (
    MISSING,
    TaskConfig,
    check,
    check_choice,
    check_int,
    named_error,
    register_job,
    typed,
)
from fleet.client import publish_checkpoint
from fleet.server import ServerConfig, ServerThread
from fleet.store import EpisodeStore
from policies.action_space import ActionSpace
from policies.config import TrainConfig
from policies.device import check_device
from policies.fleet_policies import RegistryPolicies
from policies.models.configs import PolicyConfig
from policies.threads import set_torch_threads
from sim.collect import collect_demos
from sim.experts.base import imperfection_knobs
from sim.fleet_sim import SimFleet, lockstep_tick
from sim.metrics import RoundMetrics, cumulative, table_header, table_row, totals_line
from sim.round_safety import RoundSafetyConfig, fit_round_safety, pilot_store, record_pilot
from sim.round_thresholds import RoundThresholdsConfig, round_thresholds

log = logging.getLogger(__name__)

ROLES = ("robot", "operator", "trainer", "admin")
LOCKSTEP_TICK_HZ = 1e-6
# The fleet's episodes start from seeds this far past the demos' (robot i: + 100000 * i), so no robot
# replays a demonstration's start and goal (evaluation, sim/evaluate.py, uses 10000 on).
FLEET_SEED_OFFSET = 50_000


@dataclass
class DemosConfig:
    """Step 1: scripted demonstrations and the initial policy trained on them."""

    # Few demos on purpose: a weak first policy leaves the humans something to fix (10 reach demos: ~35%
    # success alone; the same model reaches ~70% on 200 demos).
    episodes: int = 10
    operator: dict[str, Any] = field(default_factory=imperfection_knobs)  # sim/experts/base.py
    train_steps: int = 1000  # the initial policy's training steps: 10 demos are 70 steps (~900 epochs)

    def __post_init__(self):
        check_int(self.episodes, "episodes", 1)
        check_int(self.train_steps, "train_steps", 1)


@dataclass
class FleetOperatorConfig:
    """The simulated human operators (scripted experts over gRPC)."""

    extra_steps: int = 2  # steps past t_T an operator drives before handing back
    # No reaction delay: the operator's action lands a control step after the frame it answers anyway
    # (the round trip), and the scripted operator, unlike a person, does not lead for it; each step of
    # delay more pairs the logged observation with an action meant for an older one. Retraining on
    # such labels (reach, delta actions) gave 34% success with delay 1, 72% with 0, 90% with the
    # labels re-paired to the frames they answered.
    expert: dict[str, Any] = field(default_factory=lambda: imperfection_knobs(action_noise=0.05))

    def __post_init__(self):
        check_int(self.extra_steps, "extra_steps", 0)


@dataclass
class DemoFleetConfig:
    """The simulated fleet of each round."""

    robots: int = 4
    operators: int = 2
    episodes_per_robot: int = 24  # 96 episodes a round: enough takeovers to learn from, +-5 points of noise
    max_round_steps: int = 3000  # cap on a round's control steps (open episodes end as "round_end")
    control_hz: float = 20  # robot steps per second of wall time at most (the allocator ticks once per step)
    num_samples: int = 4  # action samples per plan: their spread is the uncertainty signal
    operator: FleetOperatorConfig = field(default_factory=FleetOperatorConfig)

    def __post_init__(self):
        check_int(self.robots, "robots", 1)
        check_int(self.operators, "operators", 0)
        for key in ("episodes_per_robot", "max_round_steps", "num_samples"):
            check_int(getattr(self, key), key, 1)
        check(self.control_hz > 0, "control_hz", f"must be positive, got {self.control_hz!r}")


def _demo_server() -> dict[str, Any]:
    return {
        "pre_intervention_steps": 5,
        "frame_hz": 100,
        "allocation": {
            "rule": "flotilla",
            "t_T": 6,
            "t_R": 10,
            "uncertainty_threshold": None,  # calibrated to the request rate alpha
            # Calibrated like uncertainty (the round's calibration fixes it when the policy has a risk model;
            # a policy without one reports a constant 0, whose calibrated threshold never fires).
            "risk_threshold": None,
            # About 5% of autonomous steps ask for help, calibrated over the last ~half round: the uncertainty
            # (spread of action samples) hardly tells failing robots from good ones here, and a longer window
            # let it drift up with each retrained policy, so humans took over ever more episodes.
            "alpha": 0.05,
            "window": 1000,
            "min_samples": 50,
            "seed": 0,
        },
    }


def _demo_train() -> TrainConfig:
    """`flotilla train`'s settings for every (re)training, where the demo's differ; the task, policy and seed
    are the demo's, and data, out and version are set by the demo for each training."""
    return TrainConfig(
        task="${task}",
        policy="${policy}",
        seed="${seed}",
        # Retraining steps. The data grows by ~1000 human steps a round; on 3 rounds of it, 2000 steps
        # gave 40% success and 4000 gave 88% (reach).
        steps=4000,
        warmup_steps=20,
        val_ratio=0.0,
        val_every=100000,
        checkpoint_every=100000,
        # Learn from humans only (HG-DAgger, as Fleet-DAgger does): with 2 humans for 4 robots and a weak
        # first policy, most robot steps are failures nobody corrected, and Sirius, which imitates them
        # alongside the demos, trained worse policies than the demos alone (8% vs 28% success, reach).
        weighting="hg_dagger",
        # Reach is all precision at the goal (2 cm): steps keep errors small near it; targets plateaued at
        # ~40% even on 200 demos (steps: 70%).
        action_space=ActionSpace(kind="delta"),
        threads=1,  # on a busy 2-core machine 1 thread trained 60x faster than 2 (measured)
        tensorboard=False,
    )


@dataclass
class DemoConfig:
    """`flotilla demo`: an embedded fleet server (free 127.0.0.1 port, fresh tokens) + scripted demos +
    initial training, then `rounds` rounds of deploy -> interventions -> log -> retrain on all stores ->
    publish -> hot-swap. Everything lands in `out`."""

    task: TaskConfig = MISSING  # the group (configs/demo.yaml: reach)
    policy: PolicyConfig = MISSING  # the group (configs/demo.yaml: a small diffusion policy)
    out: str = "runs/demo"
    overwrite: bool = True
    seed: int = 0
    threads: int = 1  # torch threads of the fleet's policies: more than the free cores stalls them
    # Where everything runs (policies/device.py): training (this replaces train.device), the fleet's policies,
    # the calibration and pilot rollouts and the safety models. auto: CUDA when present | cpu | cuda | cuda:N.
    device: str = "auto"
    progress: bool = True
    log_level: str = "WARNING"  # INFO shows every takeover, release and policy swap
    rounds: int = 4  # measured: 7% -> 35% -> 45% -> 53% autonomous success (reach), ~8.5 min
    demos: DemosConfig = field(default_factory=DemosConfig)
    fleet: DemoFleetConfig = field(default_factory=DemoFleetConfig)
    # The embedded server: settings of fleet/server/config.py:ServerConfig (host, port, tokens, store and
    # registry are set by the demo; the fleet ticks the allocator once per robot step).
    server: dict[str, Any] = field(default_factory=_demo_server)
    # Each round's uncertainty threshold, fixed from the deployed policy's held-out rollouts
    # (sim/round_thresholds.py), so the fleet asks for less help as the policy improves; episodes=0
    # leaves the allocator's own thresholds (rate-calibrated: the C.U.R. baseline's).
    calibration: RoundThresholdsConfig = field(default_factory=RoundThresholdsConfig)
    # Safety models (`flotilla safety`) fitted into every policy before it is deployed, so the robots
    # report a learned risk (sim/round_safety.py).
    safety: RoundSafetyConfig = field(default_factory=RoundSafetyConfig)
    # Retrain each round by fine-tuning the deployed policy on all the data (train.steps more steps), rather
    # than from scratch: a fixed step budget over data that grows each round otherwise trains every new
    # policy less than the last (push: the initial policy's ~260 epochs of demos fell to ~130 by round 3).
    warm_start: bool = True
    train: TrainConfig = field(default_factory=_demo_train)
    # Serve the operator console (teleop/) beside the fleet and print its URL and this run's operator
    # token, so a person can take over a robot while the scripted operators handle the rest.
    console: bool = True
    console_port: int = 0  # 0: a free port (printed)

    def __post_init__(self):
        check_int(self.rounds, "rounds", 1)
        check_int(self.threads, "threads", 0)
        check_int(self.console_port, "console_port", 0)
        check_device(self.device)
        check_choice(self.log_level, ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"), "log_level")
        try:  # what the demo does not set itself must make a valid server
            ServerConfig.from_dict(self.server)
        except (TypeError, ValueError) as err:
            raise named_error(str(err), ServerConfig, "server") from None


register_job("demo", DemoConfig)


def demo_config(cfg) -> DemoConfig:
    """``cfg`` as a DemoConfig (the composed configs/demo.yaml, e.g. from benchmarks/fleet.py, or one already)."""
    return cfg if isinstance(cfg, DemoConfig) else typed(cfg)


def train_config(
    cfg: DemoConfig,
    data: list[str],
    out: Path,
    version: str,
    steps: int | None = None,
    init_from: Path | None = None,
) -> TrainConfig:
    """The demo's `train` settings for one training: the stores `data`, checkpoints under `out`."""
    return dataclasses.replace(
        cfg.train,
        data=list(data),
        out=str(out),
        version=version,
        steps=steps or cfg.train.steps,
        init_from=str(init_from) if init_from else None,
        device=cfg.device,
    )


def train_version(
    cfg, data: list[Path], out: Path, version: str, steps: int | None = None, init_from: Path | None = None
) -> tuple[Path, float]:
    """Train `version` on the stores `data` (for `steps`, default train.steps; fine-tuning the checkpoint
    `init_from` if given); returns (checkpoint folder, training wall time)."""
    from policies.train import train  # torch is imported only here

    started = time.monotonic()
    config = train_config(
        cfg, [str(path) for path in data], version_dir(out, version), version, steps, init_from
    )
    start = f", from {Path(init_from).parent.parent.name}" if init_from else ""
    print(f"training {version} on {len(data)} store(s) ({config.steps} steps{start})...", flush=True)
    checkpoint = train(config)
    set_torch_threads(cfg.threads)  # train() set its own count; more threads than cores stalls the robots
    return checkpoint, time.monotonic() - started


def version_dir(out: Path, version: str) -> Path:
    """The training run folder of policy `version` in a demo folder `out`."""
    return out / "train" / version


def wait_committed(server: ServerThread, episodes: int, timeout: float = 60.0) -> None:
    """Wait until the server's episode writer has committed (or discarded, if empty) `episodes` episodes."""
    stats = server.server.writer.stats
    deadline = time.monotonic() + timeout
    while stats.episodes_committed + stats.episodes_discarded < episodes:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"the episode writer committed {stats.episodes_committed} of {episodes} episodes"
            )
        time.sleep(0.05)


def server_config(cfg: DemoConfig, out: Path, tokens: dict[str, str]) -> ServerConfig:
    values = copy.deepcopy(cfg.server)
    # The fleet ticks the allocator itself after every step (sim.fleet_sim.lockstep_tick): one tick is one
    # robot step however loaded the machine is, so the server's own timer is set never to fire.
    values.setdefault("allocation", {})["tick_hz"] = LOCKSTEP_TICK_HZ
    return ServerConfig.from_dict(
        {
            **values,
            "host": "127.0.0.1",
            "port": 0,
            "metrics_port": None,
            "tokens": {role: [token] for role, token in tokens.items()},
            "store": str(out / "fleet.zarr"),
            "registry_dir": str(out / "registry"),
        }
    )


def fresh_folder(out: Path, overwrite: bool) -> Path:
    if out.exists():
        if not overwrite:
            raise SystemExit(f"flotilla demo: {out} exists; pass overwrite=true or another out=")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    return out


def initial_policy(cfg, out: Path) -> tuple[Path, Path, dict]:
    """Step 1, no server needed: scripted demos into `out`/demos.zarr and the policy <task>-r0 trained on
    them (demos.train_steps). Returns (demos store, checkpoint, timings)."""
    cfg = demo_config(cfg)
    started = time.monotonic()
    task = cfg.task.name
    demos = out / "demos.zarr"
    with EpisodeStore.create(demos) as store:
        result = collect_demos(
            store,
            task,
            cfg.demos.episodes,
            seed=cfg.seed,
            env_kwargs=env_kwargs(cfg),
            operator_kwargs=cfg.demos.operator,
            progress=cfg.progress,
        )
    print(f"collected {result.committed} scripted {task} demos ({result.steps} steps)", flush=True)
    timings = {"collect_s": time.monotonic() - started}
    checkpoint, timings["initial_train_s"] = train_version(
        cfg, [demos], out, f"{task}-r0", cfg.demos.train_steps
    )
    if cfg.safety.fit:
        timings.update(initial_safety(cfg, checkpoint, demos))
    return demos, checkpoint, timings


def initial_safety(cfg, checkpoint: Path, demos: Path) -> dict:
    """The initial policy's safety models: its pilot rollouts (pilot.zarr beside the demos), then
    `flotilla safety` on them (sim/round_safety.py). Returns the times taken."""
    cfg = demo_config(cfg)
    started = time.monotonic()
    pilot = record_pilot(
        cfg.safety,
        checkpoint,
        demos,
        cfg.task.name,
        cfg.seed,
        cfg.fleet.num_samples,
        env_kwargs(cfg),
        device=cfg.device,
    )
    timings = {"pilot_s": time.monotonic() - started}
    return {**timings, **fit_round_safety(cfg.safety, checkpoint, demos, [pilot], device=cfg.device)}


def fleet_rounds(
    cfg, out: Path, demos: Path, initial: Path, on_round: Callable[[RoundMetrics], None] | None = None
) -> tuple[list[RoundMetrics], dict]:
    """Steps 2-3: an embedded server (store and registry in `out`) deploys `initial` (<task>-r0), then
    cfg.rounds rounds of the fleet with retraining on demos + fleet data between them.
    Returns each round's metrics and the retraining times."""
    cfg = demo_config(cfg)
    task = cfg.task.name
    tokens = {role: secrets.token_hex(16) for role in ROLES}  # this run's own; nothing outside can call in
    rounds: list[RoundMetrics] = []
    timings: dict[str, list[float]] = {"retrain_s": []}
    config = server_config(cfg, out, tokens)
    with ServerThread(config) as server:
        print(
            f"fleet server on {server.address} (store {out / 'fleet.zarr'}, "
            f"allocation {config.allocation.rule})",
            flush=True,
        )
        console = start_console(server.address, tokens["operator"], cfg.console_port) if cfg.console else None
        version = f"{task}-r0"
        publish_checkpoint(server.address, tokens["trainer"], initial, version)
        checkpoint = initial  # the deployed policy; with warm_start each retraining fine-tunes it
        loader = RegistryPolicies(
            server.address, tokens["robot"], out / "policy_cache", cfg.fleet.num_samples, device=cfg.device
        )
        fleet = SimFleet(
            server.address,
            tokens,
            task,
            cfg.fleet.robots,
            cfg.fleet.operators,
            policy=version,
            load_policy=loader,
            control_hz=cfg.fleet.control_hz,
            env_kwargs=env_kwargs(cfg),
            expert_kwargs=cfg.fleet.operator.expert,
            operator_extra_steps=cfg.fleet.operator.extra_steps,
            seed=cfg.seed + FLEET_SEED_OFFSET,
            server_tick=lockstep_tick(server),
        )
        with fleet:
            if not fleet.wait_connected():
                raise RuntimeError("the embedded fleet server did not answer the robots")
            for index in range(cfg.rounds):
                if cfg.calibration.episodes:
                    timings.setdefault("thresholds", []).append(
                        fix_round_thresholds(cfg, server, checkpoint, index)
                    )
                metrics = fleet.run_round(cfg.fleet.episodes_per_robot, max_steps=cfg.fleet.max_round_steps)
                rounds.append(metrics)
                if on_round is not None:
                    on_round(metrics)
                if index + 1 == cfg.rounds:
                    break
                fleet.flush()
                wait_committed(server, len(fleet.finished))
                version = f"{task}-r{index + 1}"
                checkpoint, seconds = train_version(
                    cfg,
                    [demos, out / "fleet.zarr"],
                    out,
                    version,
                    init_from=checkpoint if cfg.warm_start else None,
                )
                timings["retrain_s"].append(seconds)
                if cfg.safety.fit:  # from the demos, the pilot and every fleet episode so far
                    logged = [pilot_store(demos), out / "fleet.zarr"]
                    fitted = fit_round_safety(cfg.safety, checkpoint, demos, logged, device=cfg.device)
                    timings.setdefault("safety_s", []).append(fitted["safety_s"])
                publish_checkpoint(server.address, tokens["trainer"], checkpoint, version)
                if not fleet.wait_for_policy(version):
                    raise RuntimeError(f"robots did not load {version}")
            fleet.flush()
        if console is not None:
            console.stop()
    return rounds, timings


def start_console(address: str, operator_token: str, port: int):
    """The operator console on 127.0.0.1 for this run (a daemon thread that ends with the demo)."""
    # Imported here: sim/ does not depend on teleop/ otherwise (the console extra may be missing).
    try:
        from teleop.app import ConsoleThread
        from teleop.config import ConsoleConfig
    except ImportError as err:
        print(f"no operator console ({err}; pip install '.[console]')", flush=True)
        return None
    console = ConsoleThread(ConsoleConfig(server=address, port=port)).start()
    print(
        f"operator console: {console.url}  (sign in with any operator id and this run's operator token "
        f"{operator_token}; the scripted operators handle the robots you do not take)",
        flush=True,
    )
    return console


def fix_round_thresholds(cfg: DemoConfig, server: ServerThread, checkpoint: Path, index: int) -> dict:
    """Calibrate the deployed policy on held-out rollouts and fix the allocator's uncertainty and risk
    thresholds for the round (sim/round_thresholds.py; risk only when the policy has a risk model);
    returns what was fixed, with the calibration time."""
    started = time.monotonic()
    fixed = round_thresholds(
        cfg.calibration,
        checkpoint,
        cfg.task.name,
        cfg.seed,
        index,
        cfg.fleet.num_samples,
        env_kwargs(cfg),
        device=cfg.device,
    )
    server.call(server.server.fleet.allocator.fix_thresholds, fixed.uncertainty, fixed.risk)
    risk = "" if fixed.risk is None else f", risk {fixed.risk:.4g}"
    print(
        f"round {index + 1} thresholds: uncertainty {fixed.uncertainty:.4f}{risk} from "
        f"{fixed.nominal_episodes} nominal of {fixed.episodes} held-out rollouts",
        flush=True,
    )
    return {**fixed.to_dict(), "calibration_s": time.monotonic() - started}


def run_demo(cfg: DemoConfig) -> list[RoundMetrics]:
    from policies.device import resolve_device

    cfg = demo_config(cfg)
    resolve_device(cfg.device)  # device=cuda without a GPU is a one-line error before anything starts
    out = fresh_folder(Path(cfg.out), cfg.overwrite)
    started = time.monotonic()
    demos, initial, timings = initial_policy(cfg, out)

    def show(metrics: RoundMetrics) -> None:
        print(table_header(), table_row(metrics), sep="\n", flush=True)

    rounds, more = fleet_rounds(cfg, out, demos, initial, on_round=show)
    timings.update(more, total_s=time.monotonic() - started)
    write_results(out, cfg, rounds, timings)
    print("\nall rounds:", table_header(), *map(table_row, rounds), sep="\n")
    print(totals_line(cumulative([m.to_dict() for m in rounds])))
    print(
        f"done in {timings['total_s']:.0f} s; results in {out} (metrics.json, curves.png, stores, checkpoints)"
    )
    return rounds


def env_kwargs(cfg: DemoConfig) -> dict:
    return {"max_steps": cfg.task.max_steps, **cfg.task.env}


def write_results(out: Path, cfg: DemoConfig, rounds: list[RoundMetrics], timings: dict) -> None:
    per_round = [m.to_dict() for m in rounds]
    report = {
        "config": dataclasses.asdict(cfg),
        "rounds": per_round,
        "totals": cumulative(per_round),
        "timings": timings,
    }
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    plot_curves(rounds, out / "curves.png")


def plot_curves(rounds: list[RoundMetrics], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [m.round for m in rounds]
    panels = [
        ("autonomous success rate", [m.autonomous_success_rate for m in rounds]),
        ("ROHE", [m.rohe for m in rounds]),
        ("human action steps", [m.human_action_steps for m in rounds]),
        ("idle robot-steps", [m.idle_steps for m in rounds]),
        ("cumulative autonomous successes", np.cumsum([m.autonomous_successes for m in rounds])),
        ("cumulative human action steps", np.cumsum([m.human_action_steps for m in rounds])),
    ]
    figure, axes = plt.subplots(3, 2, figsize=(9, 8.5), constrained_layout=True)
    for axis, (title, values) in zip(axes.flat, panels, strict=True):
        axis.plot(x, values, marker="o")
        axis.set_title(title)
        axis.set_xlabel("round")
        axis.set_xticks(x)
        axis.grid(alpha=0.3)
    figure.suptitle(
        f"Flotilla fleet learning: {rounds[0].robots if rounds else 0} robots, "
        f"{rounds[0].operators if rounds else 0} operators"
    )
    figure.savefig(path, dpi=100)
    plt.close(figure)


def run(cfg: DemoConfig) -> None:
    logging.getLogger().setLevel(cfg.log_level)  # hydra set up INFO logging; a table reads better alone
    set_torch_threads(cfg.threads)
    run_demo(cfg)
