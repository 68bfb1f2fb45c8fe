"""Push expert: push the block along the line from the block to the goal with the closed fingers.

Every step it re-plans from the observation: the push direction ``d`` points from the block to the
goal, and the tool's position relative to the block is split into ``along`` (along d; negative is
behind the block) and ``across`` (perpendicular). Then, in order:

1. block at the goal: hold still;
2. tool low, behind the block and on the line: push forward along d, steering back onto the line;
3. tool low and clear behind the block: slide (at push height) to the pre-push point behind it;
4. tool low, touching the back of the block but off the line: back off along -d (re-approach);
5. tool low anywhere else (beside, in front, on top): rise straight up;
6. tool high: travel above the pre-push point, then descend onto it.

With ``approach="around"`` steps 5 and 6 change: the tool instead moves out to a circle around the
block and slides along it at push height to the back of the block. Which way round is the operator's
choice when the tool starts in front of the block, drawn at random per episode (and at every
takeover), as people do. This makes the demonstrations multimodal: the mean of the two ways round
runs the tool into the block, which is what separates a regression policy from a generative one.
"""

from __future__ import annotations

import numpy as np

from sim.conventions import GRIPPER_CLOSED
from sim.experts.base import ScriptedOperator
from sim.tasks.panda_env import FINGERTIP_BELOW_TCP_M, MAX_EE_STEP_M, ee_delta_to_action
from sim.tasks.push import BLOCK_HALF_M

# The block reaches at most this far from its centre in the plane (a corner, at 45 degrees yaw).
_BLOCK_REACH_M = BLOCK_HALF_M * np.sqrt(2.0) + 0.001
# Closed fingers, seen from above: about +-13 mm along world x and +-27 mm along world y.
_TOOL_HALF_XY = np.array([0.013, 0.027])
PUSH_HEIGHT_M = 0.04  # TCP height while pushing: fingertips ~29 mm above the table
TRAVEL_HEIGHT_M = 0.10  # TCP height for moving around the block: fingertips clear its top
_LOW_M = TRAVEL_HEIGHT_M - 0.02  # below this the tool counts as "low" (could hit the block)
_PUSH_BAND_M = 0.012  # |z - PUSH_HEIGHT_M| within which the tool may push
_STANDOFF_MARGIN_M = 0.012  # gap between tool and block at the pre-push point
_ON_LINE_M = 0.015  # |across| within which the tool pushes
_MAX_PUSH_STEP_M = 0.02
_DONE_M = 0.008
# Fraction of the remaining error corrected per step (capped at full speed). Well below 1 so that an
# operator who reacts a few steps late (reaction_delay) still converges instead of overshooting
# into the table or oscillating about its waypoint.
# Height moves get a lower gain: a late reaction there runs the fingers into the table.
_GAIN = 0.3
_Z_GAIN = 0.2
# approach="around": the circle the tool slides along clears the block's corners and the tool's
# longest half-size with margin; inside the front sector the episode's side decides the way round.
_AROUND_RADIUS_M = _BLOCK_REACH_M + float(_TOOL_HALF_XY.max()) + _STANDOFF_MARGIN_M
_AROUND_SPEED_M = 0.02
_FRONT_SECTOR_RAD = np.deg2rad(60.0)
APPROACHES = ("over", "around")


class PushExpert(ScriptedOperator):
    def __init__(self, *args, approach: str = "over", **kwargs):
        if approach not in APPROACHES:
            raise ValueError(f"push expert approach must be one of {APPROACHES}, got {approach!r}")
        self.approach = approach
        super().__init__(*args, **kwargs)

    def reset(self, seed: int | None = None) -> None:
        super().reset(seed)
        # +1: round the block's left (+normal) side. Drawn only when used, so that the "over" operator's
        # noise and detours stay exactly what they were.
        self.side = (1.0 if self.rng.random() < 0.5 else -1.0) if self.approach == "around" else 1.0

    def policy(self, obs: dict) -> np.ndarray:
        tool = np.asarray(obs["ee_pos"], dtype=np.float64)
        block = np.asarray(obs["object_pos"][:2], dtype=np.float64)
        to_goal = np.asarray(obs["goal"], dtype=np.float64) - block
        distance = float(np.linalg.norm(to_goal))
        if distance < _DONE_M:
            return np.array([0.0, 0.0, 0.0, GRIPPER_CLOSED])

        d = to_goal / distance
        normal = np.array([-d[1], d[0]])
        rel = tool[:2] - block
        along, across = float(rel @ d), float(rel @ normal)
        tool_along = float(_TOOL_HALF_XY @ np.abs(d))  # tool half-size along the push direction
        tool_across = float(_TOOL_HALF_XY @ np.abs(normal))
        clear_behind = -(_BLOCK_REACH_M + tool_along)  # `along` below this cannot touch the block
        pre_push = block + d * (clear_behind - _STANDOFF_MARGIN_M)
        to_push_height = _Z_GAIN * (PUSH_HEIGHT_M - tool[2])

        low = tool[2] < _LOW_M
        at_push_height = abs(tool[2] - PUSH_HEIGHT_M) < _PUSH_BAND_M
        touching_height = tool[2] - FINGERTIP_BELOW_TCP_M < 2 * BLOCK_HALF_M
        if at_push_height and clear_behind - 0.03 < along < -BLOCK_HALF_M and abs(across) < _ON_LINE_M:
            # Close any gap to the block's back face, then carry it the remaining distance.
            gap = max(0.0, -along - (BLOCK_HALF_M + tool_along))
            step = min(distance + gap, _MAX_PUSH_STEP_M)
            delta = np.append(d * step - normal * (_GAIN * across), to_push_height)
        elif low and along < clear_behind:
            delta = np.append(_GAIN * (pre_push - tool[:2]), to_push_height)
        elif low and touching_height and along < 0.0 and abs(across) < _BLOCK_REACH_M + tool_across:
            delta = np.append(-d * MAX_EE_STEP_M, 0.0)  # touching the back but off the line: back off
        elif self.approach == "around":
            delta = self._around(rel, d, normal, tool[2])
        elif low:
            delta = np.array([0.0, 0.0, _Z_GAIN * (TRAVEL_HEIGHT_M - tool[2])])
        else:
            error = pre_push - tool[:2]
            height = TRAVEL_HEIGHT_M if np.linalg.norm(error) > 0.015 else PUSH_HEIGHT_M
            delta = np.append(_GAIN * error, _Z_GAIN * (height - tool[2]))
        return np.append(ee_delta_to_action(delta), GRIPPER_CLOSED)

    def _around(self, rel: np.ndarray, d: np.ndarray, normal: np.ndarray, height: float) -> np.ndarray:
        """Out to the circle round the block, then along it towards the back, descending to push height."""
        radius = float(np.linalg.norm(rel))
        if radius < 1e-6:
            rel, radius = normal * self.side * 1e-6, 1e-6
        outward = rel / radius
        angle = float(np.arctan2(rel @ normal, rel @ d))  # 0: in front of the block (goal side), +-pi: behind
        way_round = self.side if abs(angle) < _FRONT_SECTOR_RAD else np.sign(angle)
        tangent = way_round * (-np.sin(angle) * d + np.cos(angle) * normal)  # towards the back on that side
        radial = outward * _GAIN * (_AROUND_RADIUS_M - radius)
        if radius < _AROUND_RADIUS_M - 0.01:
            # Inside the circle: get out first, at the current height (below travel height this
            # means sliding away beside the block, never over its top edge).
            return np.append(radial, 0.0)
        return np.append(radial + tangent * _AROUND_SPEED_M, _Z_GAIN * (PUSH_HEIGHT_M - height))
