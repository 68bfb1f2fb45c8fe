"""Task registry: `make_env("push", seed=0, cameras=("front",))`.

Targets are imported lazily so that asking for a pybullet task never imports robosuite/mujoco.
Every task follows sim/conventions.py.
"""

from __future__ import annotations

import importlib

TASKS: dict[str, str] = {
    "reach": "sim.tasks.reach:ReachEnv",
    "push": "sim.tasks.push:PushEnv",
    "pick_place": "sim.tasks.pick_place:PickPlaceEnv",
    "lift": "sim.robosuite.lift:RobosuiteLiftEnv",
}


def task_class(name: str):
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    module_name, cls_name = TASKS[name].split(":")
    return getattr(importlib.import_module(module_name), cls_name)


def make_env(name: str, **kwargs):
    """Build the gymnasium env for task `name`; kwargs go to its constructor."""
    return task_class(name)(**kwargs)
