"""Shared plumbing for robosuite-backed tasks: a quiet lazy import, the controller setup that
matches sim/conventions.py, a proportional Panda gripper and scoped seeding.

Nothing here imports robosuite at module import time, so `import sim.tasks` stays robosuite-free.
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np

from sim.conventions import MAX_EE_STEP_M

# robosuite logs through this logger and announces missing optional extras (private macros,
# robosuite_models, mink) at import time.
_ROBOSUITE_LOGGER = "robosuite_logs"

# Fraction of the OSC_POSITION delta set-point the end effector actually covers in one 10 Hz
# control step at robosuite's default gains (kp=150, critically damped): the PD loop lags its goal.
# Measured at steady state: an output limit of 0.05 m moves the tool ~0.0225 m per step. The arm
# output limit is divided by this so that an action of 1.0 moves the tool ~MAX_EE_STEP_M per step.
OSC_TRACKING_RATIO = 0.45
# OSC_POSITION's output limit: the delta set-point (m) that an input of 1.0 asks for.
OSC_OUTPUT_LIMIT_M = MAX_EE_STEP_M / OSC_TRACKING_RATIO

# robosuite's gripper factory registers a gripper class under its class name.
PROPORTIONAL_GRIPPER = "FlotillaPandaGripper"


class _BelowLevel(logging.Filter):
    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level


_quiet_filter = _BelowLevel(logging.WARNING)
_robosuite = None


def import_robosuite():
    """Import robosuite once, dropping its import-time warnings and its INFO chatter afterwards.

    robosuite (re)sets its logger's level when its logging module loads, so a logger filter, which
    survives that, is the clean way in: errors still get through; after import, warnings do too.
    """
    global _robosuite
    if _robosuite is not None:
        return _robosuite
    logger = logging.getLogger(_ROBOSUITE_LOGGER)
    logger.addFilter(_quiet_filter)
    _quiet_filter.level = logging.ERROR
    try:
        import robosuite
        from robosuite.models.grippers import register_gripper
        from robosuite.models.grippers.panda_gripper import PandaGripper
    finally:
        _quiet_filter.level = logging.WARNING

    class FlotillaPandaGripper(PandaGripper):
        """The Panda gripper with a proportional command: -1 fully open, +1 fully closed.

        robosuite's PandaGripper treats the command as a sign and ramps the finger set-point by 0.2
        per control step (a second from open to closed at 10 Hz); the conventions ask for a
        command that sets the opening directly.
        """

        def format_action(self, action):
            command = float(np.clip(np.asarray(action, dtype=np.float64).reshape(-1)[0], -1.0, 1.0))
            # Same finger sign pattern robosuite's PandaGripper uses: [-1, 1] * command.
            self.current_action = np.array([-command, command])
            return self.current_action

    register_gripper(FlotillaPandaGripper)
    _robosuite = robosuite
    return robosuite


def osc_position_controller_config(robot: str = "Panda") -> dict:
    """robosuite 1.5 composite controller config: the robot's default (BASIC) composite with its arm
    swapped for OSC_POSITION (orientation held at its reset value, i.e. pointing down) whose output
    limit makes a unit action move the tool about MAX_EE_STEP_M per control step."""
    import_robosuite()
    from robosuite.controllers import load_composite_controller_config, load_part_controller_config

    config = load_composite_controller_config(robot=robot)
    arm = load_part_controller_config(default_controller="OSC_POSITION")
    arm["output_max"] = [OSC_OUTPUT_LIMIT_M] * 3
    arm["output_min"] = [-OSC_OUTPUT_LIMIT_M] * 3
    arm["gripper"] = {"type": "GRIP"}
    config["body_parts"]["right"] = arm
    return config


@contextlib.contextmanager
def seeded_global_numpy(seed: int | None):
    """Seed numpy's global RNG for the duration of the block, then restore it.

    robosuite draws its reset randomness (cube size and placement, joint noise) from the global
    np.random; scoping it makes a task seed reproducible without disturbing anyone else's stream.
    """
    if seed is None:
        yield
        return
    saved = np.random.get_state()
    np.random.seed(int(seed) % (2**32))
    try:
        yield
    finally:
        np.random.set_state(saved)
