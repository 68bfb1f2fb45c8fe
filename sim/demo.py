"""`flotilla demo` (configs/demo.yaml): the whole fleet learning loop in one command, no outside services.

1. collect scripted demonstrations and train an initial policy on them (`initial_policy`);
2. start the fleet server in-process on a free 127.0.0.1 port (store and registry under `out`) and
   publish the initial policy to its registry;
3. R rounds: the sim fleet (N robots, M scripted operators over gRPC) runs on the deployed policy,
   humans intervene, every step is logged; then retrain on all stores (demos + fleet, weighted by
   control label as `train.weighting` says), publish, and the robots hot-swap to the new version
   before the next round (2 and 3 are `fleet_rounds`);
4. print a table row per round, write metrics.json and PNG curves into `out`.

benchmarks/fleet.py runs the same two functions, one initial policy per seed shared by every
allocation rule it compares.
"""

from __future__ import annotations

import json
import logging
import secrets
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

import configs
from fleet.client import publish_checkpoint
from fleet.server import ServerConfig, ServerThread
from fleet.store import EpisodeStore
from policies.fleet_policies import RegistryPolicies
from policies.threads import set_torch_threads
from sim.collect import collect_demos
from sim.fleet_sim import SimFleet, lockstep_tick
from sim.metrics import RoundMetrics, cumulative, table_header, table_row, totals_line

log = logging.getLogger(__name__)

TRAIN_CONFIG = Path(configs.__file__).resolve().parent / "train.yaml"
ROLES = ("robot", "operator", "trainer", "admin")
LOCKSTEP_TICK_HZ = 1e-6
# The fleet's episodes start from seeds this far past the demos' (robot i: + 100000 * i), so no robot
# replays a demonstration's start and goal (evaluation, policies/evaluate.py, uses 10000 on).
FLEET_SEED_OFFSET = 50_000


def train_config(cfg, data: list[str], out: Path, version: str, steps: int | None = None,
                 init_from: Path | None = None):
    """configs/train.yaml with the demo's task, policy and `train` overrides (no hydra needed)."""
    base = OmegaConf.load(TRAIN_CONFIG)
    base.pop("defaults", None)
    merged = OmegaConf.merge(base, {"task": cfg.task, "policy": cfg.policy, "seed": cfg.seed}, cfg.train,
                             {"data": data, "out": str(out), "version": version},
                             {"steps": steps} if steps else {},
                             {"init_from": str(init_from)} if init_from else {})
    OmegaConf.resolve(merged)
    return merged


def train_version(cfg, data: list[Path], out: Path, version: str, steps: int | None = None,
                  init_from: Path | None = None) -> tuple[Path, float]:
    """Train `version` on the stores `data` (for `steps`, default train.steps; fine-tuning the checkpoint
    `init_from` if given); returns (checkpoint folder, training wall time)."""
    from policies.train import train  # torch is imported only here

    started = time.monotonic()
    config = train_config(cfg, [str(path) for path in data], version_dir(out, version), version, steps, init_from)
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
            raise RuntimeError(f"the episode writer committed {stats.episodes_committed} of {episodes} episodes")
        time.sleep(0.05)


def server_config(cfg, out: Path, tokens: dict[str, str]) -> ServerConfig:
    values = OmegaConf.to_container(cfg.server, resolve=True)
    # The fleet ticks the allocator itself after every step (sim.fleet_sim.lockstep_tick): one tick is one
    # robot step however loaded the machine is, so the server's own timer is set never to fire.
    values["allocation"]["tick_hz"] = LOCKSTEP_TICK_HZ
    return ServerConfig.from_dict({**values, "host": "127.0.0.1", "port": 0, "metrics_port": None,
                                   "tokens": {role: [token] for role, token in tokens.items()},
                                   "store": str(out / "fleet.zarr"), "registry_dir": str(out / "registry")})


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
    started = time.monotonic()
    task = cfg.task.name
    demos = out / "demos.zarr"
    with EpisodeStore.create(demos) as store:
        result = collect_demos(store, task, cfg.demos.episodes, seed=cfg.seed, env_kwargs=env_kwargs(cfg),
                               operator_kwargs=OmegaConf.to_container(cfg.demos.operator), progress=cfg.progress)
    print(f"collected {result.committed} scripted {task} demos ({result.steps} steps)", flush=True)
    timings = {"collect_s": time.monotonic() - started}
    checkpoint, timings["initial_train_s"] = train_version(cfg, [demos], out, f"{task}-r0", cfg.demos.train_steps)
    return demos, checkpoint, timings


def fleet_rounds(cfg, out: Path, demos: Path, initial: Path,
                 on_round: Callable[[RoundMetrics], None] | None = None) -> tuple[list[RoundMetrics], dict]:
    """Steps 2-3: an embedded server (store and registry in `out`) deploys `initial` (<task>-r0), then
    cfg.rounds rounds of the fleet with retraining on demos + fleet data between them.
    Returns each round's metrics and the retraining times."""
    task = cfg.task.name
    tokens = {role: secrets.token_hex(16) for role in ROLES}  # this run's own; nothing outside can call in
    rounds: list[RoundMetrics] = []
    timings: dict[str, list[float]] = {"retrain_s": []}
    with ServerThread(server_config(cfg, out, tokens)) as server:
        print(f"fleet server on {server.address} (store {out / 'fleet.zarr'}, "
              f"allocation {cfg.server.allocation.rule})", flush=True)
        version = f"{task}-r0"
        publish_checkpoint(server.address, tokens["trainer"], initial, version)
        checkpoint = initial  # the deployed policy; with warm_start each retraining fine-tunes it
        loader = RegistryPolicies(server.address, tokens["robot"], out / "policy_cache", cfg.fleet.num_samples)
        fleet = SimFleet(server.address, tokens, task, cfg.fleet.robots, cfg.fleet.operators, policy=version,
                         load_policy=loader, control_hz=cfg.fleet.control_hz, env_kwargs=env_kwargs(cfg),
                         expert_kwargs=OmegaConf.to_container(cfg.fleet.operator.expert),
                         operator_extra_steps=cfg.fleet.operator.extra_steps, seed=cfg.seed + FLEET_SEED_OFFSET,
                         server_tick=lockstep_tick(server))
        with fleet:
            if not fleet.wait_connected():
                raise RuntimeError("the embedded fleet server did not answer the robots")
            for index in range(cfg.rounds):
                metrics = fleet.run_round(cfg.fleet.episodes_per_robot, max_steps=cfg.fleet.max_round_steps)
                rounds.append(metrics)
                if on_round is not None:
                    on_round(metrics)
                if index + 1 == cfg.rounds:
                    break
                fleet.flush()
                wait_committed(server, len(fleet.finished))
                version = f"{task}-r{index + 1}"
                checkpoint, seconds = train_version(cfg, [demos, out / "fleet.zarr"], out, version,
                                                    init_from=checkpoint if cfg.warm_start else None)
                timings["retrain_s"].append(seconds)
                publish_checkpoint(server.address, tokens["trainer"], checkpoint, version)
                if not fleet.wait_for_policy(version):
                    raise RuntimeError(f"robots did not load {version}")
            fleet.flush()
    return rounds, timings


def run_demo(cfg) -> list[RoundMetrics]:
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
    print(f"done in {timings['total_s']:.0f} s; results in {out} (metrics.json, curves.png, stores, checkpoints)")
    return rounds


def env_kwargs(cfg) -> dict:
    return {"max_steps": cfg.task.max_steps, **cfg.task.env}


def write_results(out: Path, cfg, rounds: list[RoundMetrics], timings: dict) -> None:
    per_round = [m.to_dict() for m in rounds]
    report = {"config": OmegaConf.to_container(cfg, resolve=True), "rounds": per_round,
              "totals": cumulative(per_round), "timings": timings}
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    plot_curves(rounds, out / "curves.png")


def plot_curves(rounds: list[RoundMetrics], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [m.round for m in rounds]
    panels = [("autonomous success rate", [m.autonomous_success_rate for m in rounds]),
              ("ROHE", [m.rohe for m in rounds]),
              ("human action steps", [m.human_action_steps for m in rounds]),
              ("idle robot-steps", [m.idle_steps for m in rounds]),
              ("cumulative autonomous successes", np.cumsum([m.autonomous_successes for m in rounds])),
              ("cumulative human action steps", np.cumsum([m.human_action_steps for m in rounds]))]
    figure, axes = plt.subplots(3, 2, figsize=(9, 8.5), constrained_layout=True)
    for axis, (title, values) in zip(axes.flat, panels, strict=True):
        axis.plot(x, values, marker="o")
        axis.set_title(title)
        axis.set_xlabel("round")
        axis.set_xticks(x)
        axis.grid(alpha=0.3)
    figure.suptitle(f"Flotilla fleet learning: {rounds[0].robots if rounds else 0} robots, "
                    f"{rounds[0].operators if rounds else 0} operators")
    figure.savefig(path, dpi=100)
    plt.close(figure)


def run(cfg) -> None:
    logging.getLogger().setLevel(cfg.log_level)  # hydra set up INFO logging; a table reads better alone
    set_torch_threads(cfg.threads)
    run_demo(cfg)
