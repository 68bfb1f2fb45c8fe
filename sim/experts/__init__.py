"""Scripted operators: one expert per task, the stand-in for a human teleoperator.

`make_expert("push", seed=0, reaction_delay=2, action_noise=0.05, detour_prob=0.02)`.
Every expert is closed-loop on the observation alone, so it can take over mid-episode.
"""

from __future__ import annotations

import importlib

EXPERTS: dict[str, str] = {
    "reach": "sim.experts.reach:ReachExpert",
    "push": "sim.experts.push:PushExpert",
    "pick_place": "sim.experts.pick_place:PickPlaceExpert",
    "lift": "sim.experts.lift:LiftExpert",
}


def make_expert(name: str, **kwargs):
    if name not in EXPERTS:
        raise ValueError(f"no scripted expert for task {name!r}; known: {', '.join(EXPERTS)}")
    module_name, cls_name = EXPERTS[name].split(":")
    return getattr(importlib.import_module(module_name), cls_name)(**kwargs)
