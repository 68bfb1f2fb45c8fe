"""Typed configs: each default written once, checks that name the key, one-line errors from every job."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from configs.schema import ConfigError, TaskConfig, error_line, typed
from flotilla import cli
from policies.action_space import ActionSpace
from policies.config import TrainConfig
from policies.models.configs import (
    POLICY_CONFIGS,
    DiffusionConfig,
    EncoderConfig,
    GCDiffusionConfig,
    MLPConfig,
    policy_config,
    policy_config_from_dict,
)
from sim.demo import train_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"
# Every job with a typed config registered as base_<job>, new ones included.
JOB_CONFIGS = {name: cli._load(job.config) for name, job in cli.JOBS.items() if job.config and job.structured}
# What a job's config needs on the command line before its checks pass (inputs that must exist are left
# out: their jobs' YAMLs are only composed).
TYPED_WITH = {
    "train": [],
    "collect": [],
    "demo": [],
    "console": [],
    "eval": ["checkpoint=x"],
    "info": ["path=x"],
}


def composed(job: str, *overrides: str):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name=job, overrides=list(overrides))


def flotilla(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flotilla.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


# ============================================================================================ one line per error
@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["train", "steps=0"], "flotilla train: steps: must be an integer >= 1, got 0"),
        (
            ["train", "policy=gc_diffusion", "policy.encoder.crop_ratio=1.5"],
            "flotilla train: policy.encoder.crop_ratio: must be a number in (0.0, 1.0], got 1.5",
        ),
        (["train", "data=/"], "flotilla train: data: / is not an episode store (no zarr.json)"),
        (
            ["eval", "checkpoint=/", "episodes=3"],
            "flotilla eval: checkpoint: /: not a checkpoint (config.json is missing)",
        ),
        (["collect", "image_size=8"], "flotilla collect: image_size: must be an integer in [16, 512], got 8"),
        (["demo", "fleet.num_samples=0"], "flotilla demo: fleet.num_samples: must be an integer >= 1, got 0"),
        (["info", "/"], "flotilla info: path: / is not an episode store (no zarr.json)"),
        (
            ["serve", "writer_queue_size=0"],
            "flotilla serve: writer_queue_size: must be a positive integer, got 0",
        ),
    ],
)
def test_a_bad_value_in_any_job_is_one_line_naming_the_key(args, line):
    result = flotilla(*args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == line
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("args", "start"),
    [
        (
            ["train", "steps=many"],
            "flotilla train: steps: Value 'many' of type 'str' could not be converted to Integer",
        ),
        (["train", "policy.down_dimz=[8]"], "flotilla train: policy.down_dimz: "),
        (
            ["import", "x", "format=diffusion_policy", "out=y", "cameras.img=front"],
            "flotilla import: cameras.img: no such entry: add one with +cameras.img=VALUE",
        ),
        (["train", "policy=transformer"], "flotilla train: policy: no config 'transformer'"),
        (["demo", "train.weighting=best"], "flotilla demo: train.weighting: must be one of sirius, uniform"),
        (
            ["demo", "server.allocation.rule=nope"],
            "flotilla demo: server.allocation.rule: unknown rule 'nope'",
        ),
        (
            ["collect", "task=fly"],
            "flotilla collect: task: no config 'fly' (configs/task/fly.yaml); options: ",
        ),
    ],
)
def test_composition_errors_are_one_line_too(args, start):
    result = flotilla(*args)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith(start), result.stderr


def test_cfg_job_prints_the_whole_composed_config():
    result = flotilla("train", "policy=mlp", "--cfg", "job")
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    assert shown["policy"] == dataclasses.asdict(MLPConfig())  # every default of the kind, none in the YAML
    assert shown["steps"] == TrainConfig.steps and shown["memory"]["strategy"] == "keep_all"
    assert shown["task"]["obs_keys"] == ["ee_pos", "ee_to_object", "object_to_goal"]
    demo = yaml.safe_load(flotilla("demo", "--cfg", "job").stdout)
    assert demo["policy"]["down_dims"] == [16, 32, 64] and demo["policy"]["encoder"] == dataclasses.asdict(
        EncoderConfig()
    )
    assert demo["train"]["steps"] == 4000 and demo["train"]["weighting"] == "hg_dagger"
    assert demo["server"]["allocation"]["rule"] == "flotilla"


# ============================================================================================ defaults written once
def _leaves(tree, prefix=()):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _leaves(value, (*prefix, key))
    else:
        yield prefix, tree


def _default(job: str, text: dict, path: tuple[str, ...]):
    """The dataclasses' default for a setting of configs/<job>.yaml (the group's kind for policy.*)."""
    if path[0] == "policy":
        kind = next(
            entry["policy"] for entry in text["defaults"] if isinstance(entry, dict) and "policy" in entry
        )
        node, path = POLICY_CONFIGS[kind]().to_dict(), path[1:]
    else:
        node = OmegaConf.to_container(OmegaConf.structured(JOB_CONFIGS[job]))
    for key in path:
        node = node.get(key, "<none>") if isinstance(node, dict) else "<none>"
    return node


@pytest.mark.parametrize("job", sorted(JOB_CONFIGS))
def test_job_yamls_hold_only_what_differs_from_the_dataclass(job):
    text = yaml.safe_load((CONFIG_DIR / f"{job}.yaml").read_text())
    assert text["defaults"][0] == f"base_{job}"
    for path, value in _leaves({key: value for key, value in text.items() if key != "defaults"}):
        assert _default(job, text, path) != value, (
            f"{job}.yaml repeats the default {'.'.join(path)}={value!r}"
        )
    config = composed(job, *TYPED_WITH.get(job, []))
    if job in TYPED_WITH:
        typed(config)


@pytest.mark.parametrize("kind", sorted(POLICY_CONFIGS))
def test_policy_group_files_name_their_dataclass_and_set_nothing(kind):
    text = yaml.safe_load((CONFIG_DIR / "policy" / f"{kind}.yaml").read_text())
    assert text == {"defaults": [f"base_{kind}", "_self_"]}
    cfg = typed(composed("train", f"policy={kind}"))
    assert cfg.policy == POLICY_CONFIGS[kind]() and cfg.policy.kind == kind


def test_composed_configs_are_the_dataclasses():
    cfg = typed(
        composed("train", "task=reach", "policy=gc_diffusion", "policy.horizon=8", "data=[a.zarr,b.zarr]")
    )
    assert isinstance(cfg, TrainConfig) and isinstance(cfg.policy, GCDiffusionConfig)
    assert (
        isinstance(cfg.task, TaskConfig) and cfg.task.name == "reach" and cfg.out == "runs/reach_gc_diffusion"
    )
    assert cfg.policy.horizon == 8 and cfg.data == ["a.zarr", "b.zarr"]
    assert cfg.action_space == ActionSpace(kind="target")
    assert typed(composed("train", "data=one.zarr")).data == ["one.zarr"]  # one path or a list
    assert typed(composed("eval", "checkpoint=x")).video_path == "eval_push.mp4"
    assert typed(composed("collect", "+operator.approach=around")).operator["approach"] == "around"


# ============================================================================================ checks name the key
def test_checks_live_in_the_dataclasses_and_name_the_key():
    with pytest.raises(ConfigError, match=r"^horizon: 10 must be divisible by 4"):
        DiffusionConfig(horizon=10)
    with pytest.raises(ConfigError, match=r"^n_action_steps: must be at most horizon \(8\), got 9"):
        MLPConfig(horizon=8, n_action_steps=9)
    with pytest.raises(ConfigError, match=r"^sampler: must be one of ddim, dpmpp_2m, got 'heun'"):
        GCDiffusionConfig(sampler="heun")
    with pytest.raises(ConfigError, match=r"^encoder.crop_ratio: must be a number in \(0.0, 1.0\], got 0"):
        policy_config("mlp", encoder={"crop_ratio": 0})
    with pytest.raises(ConfigError, match=r"^kind: is 'mlp' for MLPConfig, got 'diffusion'"):
        MLPConfig(kind="diffusion")
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['hidden'\] for policy kind 'mlp'"):
        policy_config("mlp", hidden=[3])
    with pytest.raises(ConfigError) as err:
        typed(composed("train", "policy.encoder.channels=[8,0]"))
    assert err.value.key == "policy.encoder.channels[1]" and "got 0" in err.value.problem
    with pytest.raises(ConfigError, match=r"^init_from: set resume .* or init_from .*, not both"):
        typed(composed("train", "resume=a", "init_from=b"))
    with pytest.raises(ConfigError, match=r"^task.obs_keys: task 'x' names no observation keys"):
        TrainConfig(task=TaskConfig(name="x", max_steps=5), policy=MLPConfig())
    with pytest.raises(ConfigError, match=r"^action_space.kind: unknown action space 'velocity'"):
        typed(composed("train", "action_space.kind=velocity"))
    with pytest.raises(ConfigError, match=r"^checkpoint: missing: give checkpoint=PATH"):
        typed(composed("eval"))
    assert error_line(ConfigError("a.b", "bad\nvalue")) == "a.b: bad value"


def test_policy_configs_round_trip_through_json_form():
    config = policy_config("gc_diffusion", down_dims=(8, 16), horizon=8, encoder={"channels": (4,)})
    assert config.down_dims == [8, 16] and config.encoder.channels == [4]  # tuples become lists
    assert policy_config_from_dict(config.to_dict()) == config


# ============================================================================================ the demo's training
def test_the_demo_builds_its_training_config_from_train_config():
    cfg = typed(composed("demo", "seed=3", "train.steps=50", "policy.horizon=8"))
    trained = train_config(cfg, ["a.zarr", "b.zarr"], Path("out/r1"), "reach-r1", init_from=Path("prev/ckpt"))
    assert isinstance(trained, TrainConfig)
    assert (
        trained.task == cfg.task and trained.policy == cfg.policy and trained.policy.down_dims == [16, 32, 64]
    )
    assert trained.seed == 3 and trained.steps == 50 and trained.data == ["a.zarr", "b.zarr"]
    assert trained.out == "out/r1" and trained.version == "reach-r1" and trained.init_from == "prev/ckpt"
    assert trained.weighting == "hg_dagger" and trained.action_space.kind == "delta" and trained.threads == 1
    # What the demo leaves alone is TrainConfig's default, written once (policies/config.py).
    assert (trained.batch_size, trained.lr, trained.ema_decay) == (
        TrainConfig.batch_size,
        TrainConfig.lr,
        TrainConfig.ema_decay,
    )
    assert train_config(cfg, ["a.zarr"], Path("o"), "v", steps=7).steps == 7
