"""`flotilla eval checkpoint=PATH task=push episodes=50 [video=true]`: a policy's success in simulation.

The rollout lives with the tasks (sim/), so policies/ never imports the simulation: it takes any
checkpoint PolicyRunner loads and runs it in a task env. Evaluation seeds start at 10000 by default, away from the seeds demos are collected with, so the
policy is scored on starts and goals it has not seen.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from configs.schema import ConfigError
from policies.checkpoint import CheckpointError
from policies.config import EvalConfig
from policies.runner import PolicyRunner
from policies.safety.config import FilterConfig
from policies.safety.filter import SafetyFilterError
from policies.threads import set_torch_threads
from sim.tasks import make_env

VIDEO_CAMERA = "front"


def evaluate(
    checkpoint: str | Path,
    task: str,
    episodes: int,
    seed: int = 10_000,
    max_steps: int | None = None,
    env_kwargs: dict | None = None,
    num_samples: int = 1,
    video_path: Path | None = None,
    video_episodes: int = 3,
    progress: bool = True,
    noise_seed: int | None = None,
    device: str = "auto",
    cuda_graphs: bool = False,
    safety_filter: FilterConfig | None = None,
) -> dict:
    runner = PolicyRunner.from_checkpoint(
        checkpoint,
        num_samples=num_samples,
        noise_seed=noise_seed,
        device=device,
        cuda_graphs=cuda_graphs,
        safety_filter=safety_filter,
    )
    cameras = [key[: -len("_rgb")] for key in runner.obs_keys if key.endswith("_rgb")]
    if video_path is not None and VIDEO_CAMERA not in cameras:
        cameras.append(VIDEO_CAMERA)
    kwargs = dict(env_kwargs or {})
    if max_steps is not None:
        kwargs["max_steps"] = max_steps
    image_size = policy_image_size(runner.policy.shape_meta.obs, kwargs.get("image_size"))
    if image_size is not None:
        kwargs["image_size"] = image_size
    env = make_env(task, seed=seed, cameras=tuple(cameras), **kwargs)
    successes, lengths, violations, uncertainties, frames, held = [], [], 0, [], [], 0
    try:
        for episode in tqdm(range(episodes), desc=f"eval {task}", unit="ep", disable=not progress):
            obs, info = env.reset(seed=seed + episode)
            runner.reset()
            steps = 0
            while True:
                action = runner.act(obs)
                uncertainties.append(runner.uncertainty)
                held += runner.signals.get("filter") == "hold"
                if video_path is not None and episode < video_episodes:
                    frames.append(obs[f"{VIDEO_CAMERA}_rgb"])
                obs, _, terminated, truncated, info = env.step(action)
                steps += 1
                if terminated or truncated or info["blocked"]:
                    break
            successes.append(bool(info["success"]))
            lengths.append(steps)
            violations += bool(info["constraint_violation"])
    finally:
        env.close()
    if video_path is not None and frames:
        write_video(video_path, frames)
    return {
        "checkpoint": str(checkpoint),
        "policy_version": runner.version,
        "task": task,
        "episodes": episodes,
        "success_rate": float(np.mean(successes)),
        "mean_episode_length": float(np.mean(lengths)),
        "constraint_violations": violations,
        "mean_uncertainty": float(np.mean(uncertainties)) if num_samples > 1 else None,
        "safety_filter": None if safety_filter is None else safety_filter.mode,
        "held_steps": held,  # steps the safety filter held the robot (no candidate passed)
        "video": str(video_path) if video_path is not None and frames else None,
    }


def policy_image_size(obs_shapes: dict[str, tuple[int, ...]], asked: int | None) -> int | None:
    """The camera size the sim must render for this policy: the size it was trained on (the sim's default
    may differ, e.g. a checkpoint trained on 24x24 demos), or None for a policy without cameras. A size
    asked for (``task.env.image_size``) that the policy cannot take is a config error naming both."""
    sizes = {key: shape[:2] for key, shape in obs_shapes.items() if len(shape) == 3}
    if not sizes:
        return None
    distinct = set(sizes.values())
    trained = next(iter(distinct))
    if len(distinct) > 1 or trained[0] != trained[1]:
        seen = ", ".join(f"{key} {h}x{w}" for key, (h, w) in sizes.items())
        raise ConfigError("checkpoint", f"the policy sees {seen}; the sim renders square cameras of one size")
    if asked is not None and int(asked) != trained[0]:
        raise ConfigError(
            "task.env.image_size",
            f"{asked}, but the policy was trained on {trained[0]}x{trained[0]} camera images (leave it unset)",
        )
    return trained[0]


def write_video(path: Path, frames: list[np.ndarray], fps: int = 10, scale: int = 3) -> None:
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width * scale, height * scale))
    if not writer.isOpened():
        raise RuntimeError(f"opencv cannot write mp4 to {path}")
    for frame in frames:
        big = cv2.resize(frame, (width * scale, height * scale), interpolation=cv2.INTER_NEAREST)
        writer.write(cv2.cvtColor(big, cv2.COLOR_RGB2BGR))
    writer.release()


def run(cfg: EvalConfig) -> None:
    """`flotilla eval` (settings: policies/config.py:EvalConfig)."""
    set_torch_threads(cfg.threads)
    try:
        result = evaluate(
            cfg.checkpoint,
            cfg.task.name,
            cfg.episodes,
            seed=cfg.seed,
            max_steps=cfg.task.max_steps,
            env_kwargs=cfg.task.env,
            num_samples=cfg.num_samples,
            video_path=Path(cfg.video_path) if cfg.video else None,
            progress=cfg.progress,
            noise_seed=cfg.noise_seed,
            device=cfg.device,
            cuda_graphs=cfg.cuda_graphs,
            safety_filter=cfg.safety_filter,
        )
    except CheckpointError as err:
        raise ConfigError("checkpoint", str(err)) from None
    except SafetyFilterError as err:
        raise ConfigError("safety_filter", str(err)) from None
    print(json.dumps(result, indent=2))
