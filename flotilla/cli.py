"""`flotilla <job> [hydra overrides]`.

Every job is a hydra app whose config is ``configs/<job>.yaml``; the job's code lives in the part
of the project that owns it (``sim/`` collects, ``fleet/`` inspects stores, ...). This module only
knows the table of jobs, so ``flotilla --help`` works without importing torch or pybullet.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from pathlib import Path

import configs


@dataclass(frozen=True)
class Job:
    target: str  # "module:function", the function takes the composed DictConfig
    summary: str
    # A bare (non key=value) argument is taken as this config key, e.g. `flotilla info PATH`.
    positional: str | None = None


JOBS: dict[str, Job] = {
    "collect": Job("sim.collect:run", "collect scripted-operator demonstrations into an episode store"),
    "info": Job("fleet.store.inspect:run", "summarize an episode store: episodes, steps, labels, keys, size", "path"),
    "train": Job("policies.train:run", "train a policy (diffusion, gc_diffusion, mlp) by weighted BC on episode stores"),
    "eval": Job("policies.evaluate:run", "evaluate a checkpoint in simulation: success rate, length, violations"),
    "fleet": Job("sim.fleet_sim:run", "run simulated robots and scripted operators against a fleet server"),
    "demo": Job("sim.demo:run", "the whole fleet learning loop in one process: train, deploy, intervene, retrain"),
    "serve": Job("fleet.server.app:run", "run the fleet server (gRPC robots/operators/registry, metrics) until Ctrl-C"),
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


def _to_overrides(job: Job, args: list[str]) -> list[str]:
    out = []
    for arg in args:
        if job.positional and "=" not in arg and not arg.startswith("-"):
            # Quote so hydra keeps paths with odd characters as one string.
            out.append(f"{job.positional}='{arg}'")
        else:
            out.append(arg)
    return out


def run_job(name: str, args: list[str]) -> None:
    """Run job `name` as a hydra app with command-line style `args`."""
    import hydra

    job = JOBS[name]
    module_name, func_name = job.target.split(":")
    func = getattr(importlib.import_module(module_name), func_name)

    app = hydra.main(config_path=str(CONFIG_DIR), config_name=name, version_base="1.3")(func)
    saved_argv = sys.argv
    sys.argv = [f"flotilla {name}", *_to_overrides(job, args)]
    try:
        app()
    finally:
        sys.argv = saved_argv


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
