"""`flotilla collect`: scripted-operator demonstrations into an episode store (label `demo`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from configs.schema import MISSING, ConfigError, TaskConfig, check, check_int, register_job
from fleet.io.common import CONTROL_HZ_KEY
from fleet.labels import ControlLabel
from fleet.store import EpisodeStore, StepError, StoreError
from sim.conventions import CONTROL_HZ
from sim.experts import make_expert
from sim.experts.base import imperfection_knobs
from sim.tasks import make_env


@dataclass
class CollectConfig:
    """`flotilla collect` (configs/collect.yaml holds what differs from these defaults)."""

    task: TaskConfig = MISSING  # the group: task=reach|push|pick_place|lift
    # How many demonstrations to commit (failed attempts are retried unless keep_failures).
    episodes: int = 100
    # Episode store to write; an existing store is appended to (its schema must match) unless overwrite.
    out: str = "data/${task.name}_demos.zarr"
    overwrite: bool = False
    keep_failures: bool = False
    # Episode i is collected from seed + i.
    seed: int = 0
    # Record camera images (uint8, image_size x image_size) from these cameras.
    cameras: bool = False
    camera_names: list[str] = field(default_factory=lambda: ["front"])
    image_size: int = 96
    robot_id: str = "sim-0"
    progress: bool = True
    # The scripted operator's knobs (sim/experts/base.py: human-like imperfection; zero is a perfect
    # operator); +operator.approach=around goes round the block (push).
    operator: dict[str, Any] = field(default_factory=imperfection_knobs)

    def __post_init__(self):
        check_int(self.episodes, "episodes", 1)
        check(
            isinstance(self.image_size, int) and 16 <= self.image_size <= 512,
            "image_size",
            f"must be an integer in [16, 512], got {self.image_size!r}",
        )


register_job("collect", CollectConfig)


@dataclass
class CollectResult:
    committed: int
    attempted: int
    successes: int
    steps: int


def run_episode(env, operator, seed: int) -> tuple[list[tuple[dict, np.ndarray]], dict]:
    """One episode of `operator` acting in `env`; returns the (observation, action) pairs and the last info."""
    obs, _ = env.reset(seed=seed)
    operator.reset(seed=seed)
    return run_until_done(env, operator, obs)


def run_until_done(env, operator, obs: dict) -> tuple[list[tuple[dict, np.ndarray]], dict]:
    """Let `operator` act from `obs` until success, a violation or the step limit; (steps, last info)."""
    steps = []
    while True:
        action = operator.act(obs)
        steps.append((obs, action))
        obs, _, terminated, truncated, info = env.step(action)
        if terminated or truncated or info["blocked"]:
            return steps, info


def collect_demos(
    store: EpisodeStore,
    task: str,
    episodes: int,
    seed: int = 0,
    env_kwargs: Mapping | None = None,
    cameras: Sequence[str] = (),
    operator_kwargs: Mapping | None = None,
    keep_failures: bool = False,
    robot_id: str = "sim-0",
    progress: bool = True,
) -> CollectResult:
    """Record `episodes` scripted demonstrations into `store`.

    Failed attempts are dropped unless `keep_failures`, so `episodes` counts what lands in the store;
    attempts stop at 2 * episodes + 10 so a broken expert cannot loop forever. Episode i uses seed
    `seed + attempt`, so a collection is reproducible.
    """
    env = make_env(task, seed=seed, cameras=tuple(cameras), **dict(env_kwargs or {}))
    operator = make_expert(task, seed=seed, **dict(operator_kwargs or {}))
    result = CollectResult(0, 0, 0, 0)
    bar = tqdm(total=episodes, desc=f"collect {task}", unit="ep", disable=not progress)
    try:
        while result.committed < episodes and result.attempted < 2 * episodes + 10:
            steps, info = run_episode(env, operator, seed + result.attempted)
            result.attempted += 1
            success = bool(info["success"])
            result.successes += success
            if not success and not keep_failures:
                continue
            # The control rate goes with the episode: exports (LeRobot's fps) read it from there.
            episode = store.begin_episode(
                robot_id, task, policy_version="scripted", extra={CONTROL_HZ_KEY: CONTROL_HZ}
            )
            for obs, action in steps:
                episode.append(obs, action, ControlLabel.DEMO)
            outcome = "success" if success else ("violation" if info["constraint_violation"] else "timeout")
            episode.commit(success, outcome)
            result.committed += 1
            result.steps += len(steps)
            bar.update(1)
            bar.set_postfix(expert_success=f"{result.successes / result.attempted:.0%}")
    finally:
        bar.close()
        env.close()
    return result


def run(cfg: CollectConfig) -> None:
    try:  # the operator's knobs, checked before any episode runs
        make_expert(cfg.task.name, seed=cfg.seed, **cfg.operator)
    except (TypeError, ValueError) as err:
        raise ConfigError("operator", str(err)) from None
    out = Path(cfg.out)
    try:
        _collect_into(out, cfg)
    except (StoreError, StepError) as err:
        raise ConfigError("out", f"{out}: {err}") from None


def _collect_into(out: Path, cfg: CollectConfig) -> None:
    store = EpisodeStore.create(out, overwrite=True) if cfg.overwrite else EpisodeStore.open(out, mode="a")
    cameras = list(cfg.camera_names) if cfg.cameras else []
    with store:
        result = collect_demos(
            store,
            cfg.task.name,
            cfg.episodes,
            seed=cfg.seed,
            env_kwargs={"max_steps": cfg.task.max_steps, "image_size": cfg.image_size, **cfg.task.env},
            cameras=cameras,
            operator_kwargs=cfg.operator,
            keep_failures=cfg.keep_failures,
            robot_id=cfg.robot_id,
            progress=cfg.progress,
        )
        print(
            f"collected {result.committed} {cfg.task.name} episodes ({result.steps} steps) into {out}; "
            f"expert success {result.successes}/{result.attempted}; store now holds {store.num_episodes} episodes"
        )
