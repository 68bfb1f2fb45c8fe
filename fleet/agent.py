"""The robot agent: one robot's control-tick decision, logging and policy hot-swap.

Written once for every robot: the simulated fleet (sim/fleet_sim.py) and the ROS 2 node both drive it.
It imports no torch, no policies/ and no sim/: the policy is any object with `reset()`,
`act(obs, goal) -> action`, `version` and `uncertainty` (the `Policy` protocol), and a new version is built by the
caller's `load_policy(version) -> policy` (which may fetch it from the registry and load torch weights).

    agent = RobotAgent(client, policy, load_policy=loader, gripper_index=3).start()
    agent.begin_episode(goal)
    while True:
        tick = agent.step(obs, info)            # never waits on the network
        if tick.reset: ...reset the env, agent.begin_episode(new_goal)
        else: obs, info = env.step(tick.action)
        ... agent.end_episode(success, "success" | "timeout" | ...) when the env says so

What the robot does at a tick follows the server's latest Command (`client.state`):
    not connected / no word yet / e-stop / HOLD  -> hold (zero motion, gripper unchanged), label ROBOT
    the env reports a constraint violation       -> hold (the robot is blocked until a human reset)
    TELEOP with a fresh operator action          -> apply it, label INTERVENTION with the operator's id
    TELEOP without one                           -> hold, label INTERVENTION (the human is in control)
    AUTONOMOUS                                   -> the policy's action, label ROBOT
    a reset ordered (human reset)                -> end the episode (outcome "reset"); the caller resets
A disconnected robot holds rather than keep acting on a teleop command that may be stale; the client
SDK keeps every unacked step and resends it after reconnecting (with backoff), so nothing is lost.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from fleet import wire
from fleet.client import RobotClient
from fleet.labels import ControlLabel
from fleet.proto import flotilla_pb2 as pb

log = logging.getLogger(__name__)

RESET_OUTCOME = "reset"


class Policy(Protocol):
    version: str
    # The signal the fleet allocates humans on, for the latest act() (0.0 when the policy cannot tell);
    # policies.runner.PolicyRunner reports its samples' spread.
    uncertainty: float
    # Optional: a dict whose "risk" and "density" (floats) the agent reports too (the runner's safety
    # models, policies/safety); absent or without them, both are 0.

    def reset(self) -> None: ...

    def act(self, obs: Mapping[str, np.ndarray], goal: np.ndarray | None = None) -> np.ndarray: ...


# Why the robot did what it did at a tick (AgentStep.control).
POLICY, OPERATOR, HOLD_TELEOP, HOLD_SERVER, HOLD_ESTOP, HOLD_OFFLINE, HOLD_VIOLATION = (
    "policy",
    "operator",
    "hold_teleop",
    "hold_server",
    "hold_estop",
    "hold_offline",
    "hold_violation",
)


# The safety signals a policy may report (policies/safety/filter.py) that travel in Signals.
SAFETY_SIGNALS = ("risk", "density", "novelty", "rnd", "ldm", "agree")


def safety_signals(reported: Mapping) -> dict:
    """The Signals fields of a policy's per-plan report (unknown names and decisions are left out)."""
    signals = {key: float(reported[key]) for key in SAFETY_SIGNALS if key in reported}
    decision = wire.safety_filter_to_wire(reported.get("filter"))
    if decision is not None:
        signals["safety_filter"] = decision
    return signals


@dataclass(frozen=True)
class AgentStep:
    """The outcome of one control tick."""

    action: np.ndarray | None  # what to apply (None when `reset`)
    label: ControlLabel
    control: str  # one of POLICY, OPERATOR, HOLD_* (why this action)
    operator_id: str = ""
    reset: bool = False  # a human reset was ordered: the episode ended, reset the env and begin another
    seq: int = 0  # the logged step's sequence number (0 when nothing was logged)
    operator_action_seq: int = 0  # with OPERATOR: the OperatorAction.seq applied

    @property
    def holding(self) -> bool:
        return self.control.startswith("hold")


def observation_spec(obs: Mapping[str, Any], exclude: tuple[str, ...] = ("goal",)) -> dict:
    """The hello's observation spec (key -> (shape, dtype)) from a sample observation.

    The goal travels separately (Step.goal), so it is left out by default.
    """
    return {
        key: (np.asarray(value).shape, np.asarray(value).dtype.name)
        for key, value in obs.items()
        if key not in exclude
    }


class RobotAgent:
    """See the module docstring. All methods are for the robot's control thread, except that the
    optional policy loader runs in a background thread (loading never holds up a control tick).

    `teleop_timeout_s`: an operator action older than this is stale (hold instead of repeating it).
    `gripper_index`: the action dimension holding the gripper command, kept during a hold (None: none).
    `camera_key`: observation image sent JPEG-encoded as the operators' live view (not logged).
    `signals_fn(obs, info) -> {"risk": .., "density": ..}`: extra signals (risk/density are 0 without it).
    `retry_load_s`: wait before trying a policy version again after its load failed.
    `action_filter(obs, action) -> action`: the robot's limits (the ROS node's clamps), applied to the
    policy's and the operator's actions before logging, so the episode holds what the robot was sent.
    `hold_fn(obs, last_action) -> action`: what holding still is for this robot (default: zero motion, the
    gripper unchanged: delta actions; a robot whose actions are joint positions holds its measured joints).
    """

    def __init__(
        self,
        client: RobotClient,
        policy: Policy,
        *,
        load_policy: Callable[[str], Policy] | None = None,
        gripper_index: int | None = -1,
        teleop_timeout_s: float = 0.3,
        camera_key: str | None = None,
        goal_key: str = "goal",
        signals_fn: Callable[[Mapping, Mapping], Mapping[str, float]] | None = None,
        retry_load_s: float = 5.0,
        action_filter: Callable[[Mapping, np.ndarray], np.ndarray] | None = None,
        hold_fn: Callable[[Mapping, np.ndarray], np.ndarray] | None = None,
    ):
        self.client = client
        self.policy = policy
        self.robot_id = client.hello.robot_id
        self._load_policy = load_policy
        self._gripper_index = gripper_index
        self.teleop_timeout_s = teleop_timeout_s
        self._camera_key = camera_key
        self._goal_key = goal_key
        self._signals_fn = signals_fn
        self._retry_load_s = retry_load_s
        self._action_filter = action_filter
        self._hold_fn = hold_fn
        self._logged_keys = list(client.hello.observation_spec)
        self._action_dim = client.hello.action_dim
        self._last_action = np.zeros(self._action_dim, np.float32)
        self.episode_id = 0
        self.t = 0
        self.in_episode = False
        self._goal: np.ndarray | None = None
        self._was_autonomous = False
        # Policy hot-swap: a loader thread fills _loaded; begin_episode swaps it in.
        self._swap_lock = threading.Lock()
        self._loading: str | None = None
        self._loaded: tuple[str, Policy] | None = None
        self._failed: dict[str, float] = {}  # version -> when its load failed
        client.policy_version = self.version

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> RobotAgent:
        self.client.start()
        return self

    def close(self, timeout: float = 5.0) -> None:
        """End an open episode as "shutdown", flush what the server has not acked (up to `timeout`)."""
        if self.in_episode:
            self.end_episode(False, "shutdown")
        self.client.close(timeout)

    @property
    def version(self) -> str:
        return str(getattr(self.policy, "version", "") or "")

    @property
    def error(self):
        """Why the client stopped for good (a status retrying cannot fix), or None."""
        return self.client.error

    # -- episodes ----------------------------------------------------------------------------------

    def begin_episode(self, goal=None) -> int:
        """Start a new episode (swapping in a newly loaded policy first); returns its id."""
        if self.in_episode:
            raise RuntimeError(
                f"robot {self.robot_id}: episode {self.episode_id} is still open; end it first"
            )
        self._swap_if_loaded()
        self.episode_id += 1
        self.t = 0
        self.in_episode = True
        self._goal = None if goal is None else np.asarray(goal, np.float32)
        self._was_autonomous = False
        self.policy.reset()
        self.client.start_episode(self.episode_id, goal=self._goal, policy_version=self.version)
        return self.episode_id

    def end_episode(self, success: bool, outcome: str = "") -> None:
        if not self.in_episode:
            return
        self.client.end_episode(
            self.episode_id, bool(success), outcome or ("success" if success else "failure")
        )
        self.in_episode = False

    # -- the control tick ----------------------------------------------------------------------------

    def step(self, obs: Mapping[str, np.ndarray], info: Mapping[str, Any] | None = None) -> AgentStep:
        """Decide this tick's action from the server's latest command, log the step, return the action."""
        if not self.in_episode:
            raise RuntimeError(f"robot {self.robot_id}: call begin_episode() before step()")
        info = info or {}
        state = self.client.state
        self._maybe_load(state.policy_version)
        if self.client.take_reset():
            self.end_episode(False, RESET_OUTCOME)
            return AgentStep(None, ControlLabel.ROBOT, HOLD_SERVER, reset=True)

        goal = self._goal if self._goal is not None else obs.get(self._goal_key)
        violation = bool(info.get("constraint_violation", False))
        label, operator_id = ControlLabel.ROBOT, ""
        autonomous, action_seq = False, 0
        if not self.client.connected or state.mode == pb.MODE_UNSPECIFIED:
            action, control = self._hold(obs), HOLD_OFFLINE
        elif state.estop:
            action, control = self._hold(obs), HOLD_ESTOP
        elif violation:
            action, control = self._hold(obs), HOLD_VIOLATION
        elif state.mode == pb.MODE_TELEOP:
            label, operator_id = ControlLabel.INTERVENTION, state.operator_id
            self._shadow(obs, goal)  # keeps the uncertainty signal current, so the allocator can hand back
            if state.action is not None and time.monotonic() - state.action_time <= self.teleop_timeout_s:
                action, control = np.asarray(state.action, np.float32).reshape(self._action_dim), OPERATOR
                action_seq = state.action_seq
            else:
                action, control = self._hold(obs), HOLD_TELEOP
        elif state.mode == pb.MODE_AUTONOMOUS:
            if not self._was_autonomous:
                self.policy.reset()  # plans made before a human or a hold took over are stale
            action, control, autonomous = np.asarray(self.policy.act(obs, goal), np.float32), POLICY, True
        else:
            action, control = self._hold(obs), HOLD_SERVER
        self._was_autonomous = autonomous
        if self._action_filter is not None and control in (POLICY, OPERATOR):
            action = np.asarray(self._action_filter(obs, action), np.float32).reshape(self._action_dim)

        signals = {
            "uncertainty": float(self.policy.uncertainty),
            "risk": 0.0,
            "density": 0.0,
            "constraint_violation": violation,
        }
        # A policy with safety models (policies/safety) also reports its scores and the filter's decision
        # for its latest plan (under teleop the shadow plan's, so the allocator sees when help is no longer
        # needed); they are logged with the step.
        signals.update(safety_signals(getattr(self.policy, "signals", None) or {}))
        if self._signals_fn is not None:
            signals.update(self._signals_fn(obs, info))
        camera = obs.get(self._camera_key) if self._camera_key else None
        seq = self.client.step(
            self.episode_id,
            self.t,
            {key: obs[key] for key in self._logged_keys},
            action,
            label,
            signals=signals,
            goal=goal,
            camera=camera,
            operator_id=operator_id,
            operator_action_seq=action_seq,
        )
        self.t += 1
        self._last_action = action
        return AgentStep(action, label, control, operator_id, seq=seq, operator_action_seq=action_seq)

    def _hold(self, obs: Mapping[str, np.ndarray]) -> np.ndarray:
        """Zero motion; the gripper keeps its last command (opening it could drop what it holds)."""
        if self._hold_fn is not None:
            return np.asarray(self._hold_fn(obs, self._last_action), np.float32).reshape(self._action_dim)
        action = np.zeros(self._action_dim, np.float32)
        if self._gripper_index is not None:
            action[self._gripper_index] = self._last_action[self._gripper_index]
        return action

    def _shadow(self, obs, goal) -> None:
        try:
            self.policy.act(obs, goal)
        except Exception:  # the signal is a nicety under teleop; the human's control must not fail
            log.exception("robot %s: policy failed in shadow mode", self.robot_id)

    # -- policy hot-swap -----------------------------------------------------------------------------

    def poll_policy(self) -> str | None:
        """Between episodes (when `step` is not being called): start loading the server's latest version
        if it is new. Returns the version the next `begin_episode` will swap in, None if none is loaded."""
        self._maybe_load(self.client.state.policy_version)
        with self._swap_lock:
            return self._loaded[0] if self._loaded else None

    def _maybe_load(self, version: str) -> None:
        if not version or version == self.version or self._load_policy is None:
            return
        with self._swap_lock:
            if version in (self._loading, self._loaded[0] if self._loaded else None):
                return
            failed_at = self._failed.get(version)
            if failed_at is not None and time.monotonic() - failed_at < self._retry_load_s:
                return
            if self._loading is not None:
                return  # one load at a time; the newer version is picked up after it
            self._loading = version
        threading.Thread(
            target=self._load, args=(version,), name=f"load-{self.robot_id}", daemon=True
        ).start()

    def _load(self, version: str) -> None:
        try:
            policy = self._load_policy(version)
        except Exception:
            log.exception(
                "robot %s: loading policy version %s failed; keeping %s", self.robot_id, version, self.version
            )
            with self._swap_lock:
                self._failed[version] = time.monotonic()
                self._loading = None
            return
        with self._swap_lock:
            self._loaded, self._loading = (version, policy), None
        log.info("robot %s: policy %s loaded; it takes over at the next episode", self.robot_id, version)

    def _swap_if_loaded(self) -> None:
        with self._swap_lock:
            loaded, self._loaded = self._loaded, None
        if loaded is None:
            return
        version, policy = loaded
        if getattr(policy, "version", "") != version:
            # The fleet knows a policy by its registry version: report that one (else every command would
            # look like news and the version would be loaded again and again).
            log.info(
                "robot %s: policy calls itself %r; reporting registry version %r",
                self.robot_id,
                getattr(policy, "version", ""),
                version,
            )
            policy.version = version
        old = self.version
        self.policy = policy
        self.client.policy_version = self.version
        log.info("robot %s: swapped policy %s -> %s", self.robot_id, old, self.version)
