"""`flotilla <job> [hydra overrides]`.

Every job is a hydra app whose config is ``configs/<job>.yaml``; the job's code lives in the part
of the project that owns it (``sim/`` collects, ``fleet/`` inspects stores, ...). This module only
knows the table of jobs, so ``flotilla --help`` works without importing torch or pybullet.

A job's settings are a typed dataclass (the table's ``config``, registered with hydra's ConfigStore as
``base_<job>`` and listed first in the YAML's defaults): the composed config is turned into it
(``configs.schema.typed``: every ``__post_init__`` check runs) before the job's code is even imported,
and the job gets the dataclass. A bad setting, on the command line or found by the job (a path that is
not an episode store), is one line on stderr, ``flotilla <job>: <key>: <problem>``, and exit code 2;
``HYDRA_FULL_ERROR=1`` shows the traceback instead.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import configs


@dataclass(frozen=True)
class Job:
    target: str  # "module:function"; it takes the typed config (or, with `typed` False, the DictConfig)
    summary: str
    # The job's config dataclass, "module:Class" (a light module: no torch), registered as base_<job>.
    config: str | None = None
    # A bare (non key=value) argument is taken as this config key, e.g. `flotilla info PATH`.
    positional: str | None = None
    positional_list: bool = False  # every bare argument goes into the list `positional` (PATH...)
    typed: bool = True  # whether `target` takes the dataclass (False: checked, then given the DictConfig)
    structured: bool = True  # `config` is registered as base_<job>; False: checked with config.from_dict


JOBS: dict[str, Job] = {
    "collect": Job(
        "sim.collect:run",
        "collect scripted-operator demonstrations into an episode store",
        "sim.collect:CollectConfig",
    ),
    "info": Job(
        "fleet.store.inspect:run",
        "summarize an episode store: episodes, steps, labels, keys, size",
        "fleet.store.inspect:InfoConfig",
        positional="path",
    ),
    "export": Job(
        "fleet.io.jobs:export",
        "export an episode store to Diffusion Policy (zarr format 2) or LeRobotDataset v3.0",
        "fleet.io.jobs:ExportConfig",
        positional="path",
    ),
    "import": Job(
        "fleet.io.jobs:import_",
        "import a Diffusion Policy or LeRobotDataset v3.0 dataset into a new episode store",
        "fleet.io.jobs:ImportConfig",
        positional="path",
    ),
    "view": Job(
        "fleet.io.jobs:view",
        "one episode as an mp4 and a plot, control labels coloured",
        "fleet.io.jobs:ViewConfig",
        positional="path",
    ),
    "import-bag": Job(
        "fleet.io.rosbag:run",
        "import rosbag2 recordings (mcap, sqlite3) into a new episode store by a topic mapping",
        "fleet.io.rosbag:ImportBagConfig",
        positional="paths",
        positional_list=True,
    ),
    "train": Job(
        "policies.train:run",
        "train a policy (diffusion, gc_diffusion, mlp) by weighted BC on episode stores",
        "policies.config:TrainConfig",
    ),
    "eval": Job(
        "sim.evaluate:run",
        "evaluate a checkpoint in simulation: success rate, length, violations",
        "policies.config:EvalConfig",
    ),
    "safety": Job(
        "policies.safety.train:run",
        "train a checkpoint's safety models (density, RND, risk, LDM) and calibrate their thresholds",
        "policies.safety.config:SafetyJobConfig",
    ),
    "fleet": Job("sim.fleet_sim:run", "run simulated robots and scripted operators against a fleet server"),
    "demo": Job(
        "sim.demo:run",
        "the whole fleet learning loop in one process: train, deploy, intervene, retrain",
        "sim.demo:DemoConfig",
    ),
    "robot": Job(
        "fleet.ros2.runner:run",
        "a robot on ROS 2 topics over DDS without a ROS install (the ROS package's parameter file)",
        "fleet.ros2.runner:RobotJobConfig",
        positional="params",
    ),
    "console": Job(
        "teleop.app:run",
        "the teleoperator web console: an operator client of a fleet server, served to browsers",
        "teleop.config:ConsoleConfig",
    ),
    # ServerConfig (its allocation block per rule) is not an omegaconf schema: it is built from the composed
    # config to check it (ServerConfig.from_dict), and serve gets the DictConfig.
    "serve": Job(
        "fleet.server.app:run",
        "run the fleet server (gRPC robots/operators/registry, metrics) until Ctrl-C",
        "fleet.server.config:ServerConfig",
        typed=False,
        structured=False,
    ),
}

CONFIG_DIR = Path(configs.__file__).resolve().parent


def usage() -> str:
    width = max(len(name) for name in JOBS)
    lines = [
        "usage: flotilla <job> [key=value ...]   (hydra overrides; `flotilla <job> --help` shows the config)",
        "",
        "jobs:",
    ]
    lines += [f"  {name:<{width}}  {job.summary}" for name, job in JOBS.items()]
    return "\n".join(lines)


# Hydra's flags that take a value (`--cfg job`): their value is not a positional argument.
_VALUE_FLAGS = {
    "--cfg",
    "-c",
    "--package",
    "-p",
    "--config-path",
    "-cp",
    "--config-name",
    "-cn",
    "--config-dir",
    "-cd",
    "--experimental-rerun",
    "--info",
    "-i",
    "--shell-completion",
    "-sc",
}


def _to_overrides(job: Job, args: list[str]) -> list[str]:
    out, bare = [], []
    for i, arg in enumerate(args):
        flag_value = i > 0 and args[i - 1] in _VALUE_FLAGS
        if job.positional and "=" not in arg and not arg.startswith("-") and not flag_value:
            # Quote so hydra keeps paths with odd characters as one string.
            bare.append(f"'{arg}'")
            if not job.positional_list:
                out.append(f"{job.positional}={bare[-1]}")
        else:
            out.append(arg)
    if job.positional_list and bare:
        out.append(f"{job.positional}=[{','.join(bare)}]")
    return out


def _load(target: str):
    module_name, name = target.split(":")
    return getattr(importlib.import_module(module_name), name)


def run_job(name: str, args: list[str]) -> None:
    """Run job `name` as a hydra app with command-line style `args`; a config error exits with code 2
    after one line on stderr (see the module docstring)."""
    import hydra

    from configs.schema import config_errors, error_line

    job = JOBS[name]
    schema = _schema(job, name)
    full_error = os.environ.get("HYDRA_FULL_ERROR") == "1"

    def refuse(err: BaseException):
        if full_error:
            raise err
        print(f"flotilla {name}: {error_line(err)}", file=sys.stderr)
        raise SystemExit(2) from None

    def task(cfg) -> None:
        try:
            config = _checked(job, schema, cfg)
            _load(job.target)(config if job.typed else cfg)
        except config_errors() as err:  # caught here, before hydra reports a failed job on its own
            refuse(err)
        except BrokenPipeError:
            _reader_gone()

    app = hydra.main(config_path=str(CONFIG_DIR), config_name=name, version_base="1.3")(task)
    saved_argv, saved_full_error = sys.argv, os.environ.get("HYDRA_FULL_ERROR")
    sys.argv = [f"flotilla {name}", f"hydra.job.name={name}", *_to_overrides(job, args)]
    os.environ["HYDRA_FULL_ERROR"] = "1"  # hydra raises composition errors instead of printing them
    try:
        app()
    except config_errors() as err:  # the config could not be composed (an unknown key, a bad type or group)
        refuse(err)
    except BrokenPipeError:  # hydra printing --help or --cfg
        _reader_gone()
    finally:
        sys.argv = saved_argv
        if saved_full_error is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = saved_full_error


def _reader_gone():
    """Stdout's reader went away (`flotilla info X | head`): stop quietly, as a shell tool does."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the flush at exit would raise again
    raise SystemExit(141)  # 128 + SIGPIPE: what a shell tool ended by the closed pipe reports


def _schema(job: Job, name: str):
    """The job's config class (imported before hydra composes, so its ConfigStore node exists)."""
    if not job.config:
        return None
    from configs.schema import register_job

    schema = _load(job.config)
    if job.structured:
        register_job(name, schema)
    return schema


def _checked(job: Job, schema, cfg):
    """The typed config for a composed one (its checks run); the DictConfig itself for an untyped job."""
    from configs.schema import ConfigError, named_error, typed

    if schema is None:
        return cfg
    if job.structured:
        return typed(cfg)
    from omegaconf import OmegaConf

    try:
        return schema.from_dict(OmegaConf.to_container(cfg, resolve=True))
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise named_error(str(err), schema) from None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in JOBS:
        print(f"flotilla: unknown job {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    run_job(name, rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
