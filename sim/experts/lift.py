"""Lift expert (robosuite Lift, sim/robosuite/lift.py): grasp the cube from above and carry it to the
goal in the air, reading the phase off the observation at every step."""

from __future__ import annotations

import numpy as np

from sim.conventions import ACTION_DIM, GRIPPER_CLOSED, GRIPPER_OPEN, MAX_EE_STEP_M
from sim.experts.base import ScriptedOperator


class LiftExpert(ScriptedOperator):
    """Scripted Lift operator, closed-loop on the observation alone.

    Every step it reads the phase off the state: holding the cube -> carry it to the goal; tool at
    the grasp pose -> close; above the cube with the gripper open -> descend; otherwise rise to the
    hover height over the cube, open and line up. So it can take over from any state.
    """

    def __init__(
        self,
        *args,
        hover_height: float = 0.08,
        grasp_offset: float = 0.005,
        xy_tolerance: float = 0.01,
        z_tolerance: float = 0.008,
        gain: float = 0.25,
        descend_gain: float = 0.15,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.hover_height = float(hover_height)
        self.grasp_offset = float(grasp_offset)
        self.xy_tolerance = float(xy_tolerance)
        self.z_tolerance = float(z_tolerance)
        # Fraction of the remaining error closed per step. Vertical moves near the cube use the
        # smaller descend_gain: a low gain keeps the approach free of overshoot (so off the table)
        # even when the operator reacts a few steps late (reaction_delay).
        self.gain = float(gain)
        self.descend_gain = float(descend_gain)

    # Finger openings (m). The cube is 4.0-4.4 cm wide and may sit at any yaw (the tool cannot turn),
    # so fingers closed on it read between its width and its diagonal (~6.2 cm); fully open is ~8 cm.
    _HOLD_MAX_WIDTH = 0.07
    _HOLD_MIN_WIDTH = 0.02
    _OPEN_ENOUGH_WIDTH = 0.072

    def _move(self, target: np.ndarray, ee: np.ndarray, z_gain: float | None = None) -> np.ndarray:
        gains = np.array([self.gain, self.gain, self.gain if z_gain is None else z_gain])
        return np.clip(gains * (target - ee) / MAX_EE_STEP_M, -1.0, 1.0)

    def policy(self, obs: dict) -> np.ndarray:
        ee = np.asarray(obs["ee_pos"], dtype=np.float64)
        cube = np.asarray(obs["object_pos"], dtype=np.float64)
        goal = np.asarray(obs["goal"], dtype=np.float64)
        width = float(np.asarray(obs["gripper"]).reshape(-1)[0])
        grasp = cube + np.array([0.0, 0.0, self.grasp_offset])
        xy_error = float(np.linalg.norm(grasp[:2] - ee[:2]))
        z_error = float(grasp[2] - ee[2])
        action = np.zeros(ACTION_DIM)

        cube_in_hand = xy_error < 0.02 and abs(z_error) < 0.02
        height = -z_error  # of the tool above its grasp point
        # Lined up enough to go down: loose high up (xy keeps converging on the way), tight near the
        # cube, where a finger landing on a corner of a turned cube would knock it.
        descend_tolerance = self.xy_tolerance * (2.0 if height > 0.03 else 1.5)
        if cube_in_hand and self._HOLD_MIN_WIDTH < width < self._HOLD_MAX_WIDTH:
            # Holding: carry the cube (not the tool) to the goal.
            action[:3] = self._move(goal - cube + ee, ee)
            action[3] = GRIPPER_CLOSED
        elif (
            xy_error < self.xy_tolerance and abs(z_error) < self.z_tolerance and width > self._HOLD_MIN_WIDTH
        ):
            # At the grasp pose: close, holding still.
            action[:3] = self._move(grasp, ee, self.descend_gain)
            action[3] = GRIPPER_CLOSED
        elif xy_error < descend_tolerance and width > self._OPEN_ENOUGH_WIDTH and height > -0.01:
            # Lined up above the cube with the fingers open: descend.
            action[:3] = self._move(grasp, ee, self.descend_gain)
            action[3] = GRIPPER_OPEN
        elif xy_error < 2.5 * self.xy_tolerance and width > self._OPEN_ENOUGH_WIDTH:
            # Nearly lined up (the operator's own jitter): hold the height, no lower than the grasp
            # point, and re-centre; rising each time would never settle.
            target = np.array([grasp[0], grasp[1], max(ee[2], grasp[2])])
            action[:3] = self._move(target, ee, self.descend_gain)
            action[3] = GRIPPER_OPEN
        else:
            # Go to the hover height over the cube, opening on the way; from low down and off to
            # the side, rise before moving sideways so as not to sweep the cube away.
            hover = grasp + np.array([0.0, 0.0, self.hover_height])
            if height < self.hover_height - 0.02 and xy_error > 2.5 * self.xy_tolerance:
                hover[:2] = ee[:2]
            action[:3] = self._move(hover, ee, self.descend_gain)
            action[3] = GRIPPER_OPEN
        return action
