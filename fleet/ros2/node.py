"""The ROS 2 robot node's logic, without ROS: parameters, sensors, safety and the lifecycle around RobotAgent.

The rclpy node (ros_ws/src/flotilla_ros/flotilla_ros/robot_node.py) and the DDS transport (fleet/ros2/dds.py)
only move messages in and out of a `RobotNodeLogic`; everything that decides what the robot does is here
and unit-tested (tests/test_ros_node.py).

A control tick (`tick()`, on the node's timer):
    not active                        -> nothing
    a sensor missing or stale (deadman, older than `max_sensor_age_s` by arrival time) -> hold
    otherwise the agent decides (policy / operator / its own holds; a latched protective stop is
    reported to it as a constraint violation, so the fleet sends a human), then
    hold when the agent holds or the protective stop is latched, and the limits are applied last
    (action box, joint position and velocity limits, workspace box) whatever produced the action.
A node that sees another publisher on its command topic (a second node for the same robot, a teleop node)
publishes nothing and does not step its agent while it is there; both stop rather than take turns.
Dry-run (the default) computes and logs every command but publishes nothing and logs no episode to the
fleet (the robot's session is open, so it shows up in the fleet): a new robot is checked before it moves.

A hold in "delta" action mode (the sim's convention: actions are motions) is zero motion with the gripper
unchanged (the agent's hold); in "absolute" mode (actions are joint positions) it is the measured joints.

Lifecycle (ROS 2 managed node states): unconfigured -configure-> inactive -activate-> active
-deactivate-> inactive -cleanup-> unconfigured; shutdown from any state -> finalized. Configure loads the
policy and opens the fleet session; activate begins an episode; deactivate publishes one hold and ends
the episode ("stopped"); cleanup and shutdown flush and close the session (a clean stop).
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from configs.schema import ConfigError, check, check_choice, check_int, check_number
from fleet.ros2 import messages as m

log = logging.getLogger(__name__)

NODE_NAME = "flotilla_robot"  # the node's name in the launch files; private topics (~/...) live under it
# output -> the ROS message type published on command_topic
OUTPUT_TYPES = {
    "float64_multi_array": "std_msgs/msg/Float64MultiArray",  # a ros2_control forward command controller
    "joint_trajectory": "trajectory_msgs/msg/JointTrajectory",  # a joint_trajectory_controller
    "twist_stamped": "geometry_msgs/msg/TwistStamped",  # MoveIt Servo (Cartesian policies)
}
OUTPUTS = tuple(OUTPUT_TYPES)
# The command topic's other publishers are counted this often (a graph query: ~0.5 ms over DDS with a
# handful of writers, more on a busy graph; a rival is seen within this long).
RIVALS_EVERY_S = 0.5
ACTION_MODES = ("delta", "absolute")
EE_POSE_SOURCES = ("none", "fk", "tf")
# fk_dh's convention: "modified" (Craig: Rx(alpha_{i-1}) Tx(a_{i-1}) Rz(theta_i) Tz(d_i); Franka publishes
# these) or "standard" (Denavit-Hartenberg: Rz(theta_i) Tz(d_i) Tx(a_i) Rx(alpha_i); Universal Robots, KUKA).
DH_CONVENTIONS = ("modified", "standard")


@dataclass
class RosRobotConfig:
    """One robot node's parameters (config/*.yaml in the ROS package documents each)."""

    robot_id: str = "robot_0"
    task: str = "reach"  # the fleet's task name (episodes are grouped and trained by it)
    fleet: str = "127.0.0.1:50051"  # the fleet server's address
    token_file: str = ""  # a file holding this robot's token (never the token itself in a parameter)
    root_cert_file: str = ""  # PEM of the server's CA: TLS (required beyond loopback)
    checkpoint: str = "latest"  # "latest" (the registry's, sha256-verified) or a local checkpoint folder
    cache_dir: str = "~/.cache/flotilla/checkpoints"
    device: str = "auto"  # where the policy runs: auto (CUDA when present) | cpu | cuda | cuda:N
    action_dim: int = 4
    goal: list[float] = field(default_factory=list)  # the task goal sent with every episode ([]: none)
    joint_names: list[str] = field(default_factory=list)  # observation "joint_pos", in this order
    gripper_joints: list[str] = field(
        default_factory=list
    )  # observation "gripper": gripper_offset + gripper_scale * their sum (the finger opening, m)
    # A Franka Hand's two finger joints sum to the opening (scale 1, offset 0); a one-joint gripper maps
    # its joint linearly, e.g. a Robotiq 2F-85's finger_joint, 0 (open, 85 mm) .. 0.8 rad (closed):
    # scale -0.10625, offset 0.085.
    gripper_scale: float = 1.0
    gripper_offset: float = 0.0
    joint_states_topic: str = "/joint_states"
    camera_names: list[str] = field(default_factory=list)  # observation "<name>_rgb"
    camera_topics: list[str] = field(
        default_factory=list
    )  # one per camera; ".../compressed": CompressedImage
    image_size: int = 96  # images are resized to image_size x image_size (the policy's input)
    ee_pose: str = "none"  # "fk" (fk_dh below) or "tf" (a TF lookup) -> observations "ee_pos", "ee_quat"
    fk_dh: list[float] = field(default_factory=list)  # DH rows [a, d, alpha, theta_offset] per joint
    fk_convention: str = "modified"  # fk_dh's rows: "modified" (Craig) or "standard" (DH_CONVENTIONS)
    # The TCP in the last DH frame: [x, y, z] (m), or [x, y, z, roll, pitch, yaw] (rad, URDF's rpy) when the
    # tool is turned on the flange (a Franka Hand: yaw -pi/4); ee_quat is the TCP frame's orientation.
    fk_tcp: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    base_frame: str = "base_link"  # TF: target frame; TwistStamped's frame
    ee_frame: str = "tcp"  # TF: the end effector's frame
    output: str = "float64_multi_array"  # or "joint_trajectory", "twist_stamped"
    # delta actions are no joint positions: by default they go to a bridge's topic, not to a controller's
    command_topic: str = "/flotilla/commands"
    gripper_topic: str = ""  # Float64MultiArray [gripper command] ("" : none)
    action_mode: str = "delta"  # "delta": actions are motions (hold = zero); "absolute": joint positions
    gripper_index: int = -1  # the action's gripper dimension (kept during holds); -1: the last one
    ee_step_m: float = 0.03  # delta mode: metres per action unit per tick (sim/conventions MAX_EE_STEP_M)
    rate_hz: float = 10.0
    max_sensor_age_s: float = 0.25  # deadman: hold when a sensor's latest message is older than this
    dry_run: bool = True  # compute and log, publish nothing: set false to let the robot move
    protective_stop_topic: str = "~/protective_stop"  # std_msgs/Bool: true stops, and the node latches it
    max_episode_steps: int = 0  # end an episode ("timeout") after this many ticks (0: never)
    trajectory_time_s: float = 0.0  # JointTrajectory: time_from_start (0: one control period)
    action_low: list[float] = field(default_factory=list)  # per-dimension action box ([]: none)
    action_high: list[float] = field(default_factory=list)
    joint_lower: list[float] = field(default_factory=list)  # absolute mode: joint position limits
    joint_upper: list[float] = field(default_factory=list)
    max_joint_velocity: float = 0.0  # absolute mode: rad/s from the measured joints (0: none)
    workspace_low: list[float] = field(default_factory=list)  # delta mode: TCP box, m ([]: none)
    workspace_high: list[float] = field(default_factory=list)

    def __post_init__(self):
        check(
            re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", str(self.robot_id)) is not None,
            "robot_id",
            f"is the robot's ROS namespace too: a letter, then letters, digits or _ (got {self.robot_id!r})",
        )
        check_int(self.action_dim, "action_dim", 1)
        check(
            bool(self.joint_names), "joint_names", "must list the robot's joints (the policy observes them)"
        )
        check(
            len(self.camera_topics) == len(self.camera_names),
            "camera_topics",
            f"needs one topic per camera name ({len(self.camera_names)}), got {len(self.camera_topics)}",
        )
        for topic in self.camera_topics:
            check(
                not topic.endswith("/compressedDepth"),
                "camera_topics",
                f"{topic}: compressedDepth (depth images) is not supported; name the camera's colour topic",
            )
        check_int(self.image_size, "image_size", 8)
        check_choice(self.ee_pose, EE_POSE_SOURCES, "ee_pose")
        if self.ee_pose == "fk":
            check(
                len(self.fk_dh) == 4 * len(self.joint_names),
                "fk_dh",
                f"needs 4 numbers [a, d, alpha, theta_offset] per joint ({4 * len(self.joint_names)}), got {len(self.fk_dh)}",
            )
        check_choice(self.fk_convention, DH_CONVENTIONS, "fk_convention")
        check(len(self.fk_tcp) in (3, 6), "fk_tcp", f"needs 3 or 6 numbers, got {len(self.fk_tcp)}")
        check_choice(self.output, OUTPUTS, "output")
        check_choice(self.action_mode, ACTION_MODES, "action_mode")
        if self.output == "joint_trajectory":
            check(self.action_mode == "absolute", "output", "joint_trajectory needs action_mode absolute")
        if self.output == "twist_stamped":
            check(self.action_mode == "delta", "output", "twist_stamped needs action_mode delta")
        if self.action_mode == "absolute":
            check(
                self.action_dim >= len(self.joint_names),
                "action_dim",
                f"absolute actions need one value per joint ({len(self.joint_names)}), got {self.action_dim}",
            )
        check(-self.action_dim <= self.gripper_index < self.action_dim, "gripper_index", "outside the action")
        check_number(self.ee_step_m, "ee_step_m", 0.0, low_open=True)
        check_number(self.rate_hz, "rate_hz", 0.0, 1000.0, low_open=True)
        check_number(self.max_sensor_age_s, "max_sensor_age_s", 0.0, low_open=True)
        for key in ("gripper_scale", "gripper_offset"):
            check_number(getattr(self, key), key, -1e3, 1e3)  # also refuses NaN and inf
        check(isinstance(self.dry_run, bool), "dry_run", f"must be true or false, got {self.dry_run!r}")
        check_int(self.max_episode_steps, "max_episode_steps", 0)
        check_number(self.trajectory_time_s, "trajectory_time_s", 0.0)
        check_number(self.max_joint_velocity, "max_joint_velocity", 0.0)
        for low, high, size in (
            ("action_low", "action_high", self.action_dim),
            ("joint_lower", "joint_upper", len(self.joint_names)),
            ("workspace_low", "workspace_high", 3),
        ):
            lows, highs = getattr(self, low), getattr(self, high)
            check(len(lows) == len(highs), high, f"has {len(highs)} values, {low} has {len(lows)}")
            check(not lows or len(lows) == size, low, f"needs {size} values (or none), got {len(lows)}")
            check(all(a <= b for a, b in zip(lows, highs, strict=True)), high, f"is below {low} somewhere")
        if self.workspace_low:
            check(self.ee_pose != "none", "workspace_low", "a workspace box needs ee_pose (fk or tf)")

    @property
    def period_s(self) -> float:
        return 1.0 / self.rate_hz

    def observation_spec(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """What the robot's steps hold (the fleet hello's spec), in the sim tasks' names and dtypes."""
        spec = {"joint_pos": ((len(self.joint_names),), "float32")}
        if self.gripper_joints:
            spec["gripper"] = ((1,), "float32")
        if self.ee_pose != "none":
            spec["ee_pos"], spec["ee_quat"] = ((3,), "float32"), ((4,), "float32")
        for name in self.camera_names:
            spec[f"{name}_rgb"] = ((self.image_size, self.image_size, 3), "uint8")
        return spec


PARAMETER_TYPES = {"str": "string", "int": "integer", "float": "double", "bool": "bool"}
PARAMETER_TYPES |= {"list[str]": "string_array", "list[float]": "double_array"}


def parameter_types() -> dict[str, str]:
    """Each parameter's ROS type ("string", "double_array", ...), declared by the rclpy node: an empty list
    default cannot tell ROS its type, and a typed declaration refuses a wrong value in the YAML."""
    return {f.name: PARAMETER_TYPES[str(f.type)] for f in fields(RosRobotConfig)}


def config_from_params(params: Mapping[str, Any]) -> RosRobotConfig:
    """A config from ROS parameters (or a YAML's ros__parameters); ConfigError names an unknown key."""
    known = {f.name for f in fields(RosRobotConfig)}
    for key in params:
        if key not in known:
            raise ConfigError(key, f"unknown parameter (known: {', '.join(sorted(known))})")
    values = {key: list(value) if isinstance(value, tuple) else value for key, value in params.items()}
    return RosRobotConfig(**values)


def read_token(path: str) -> str:
    """The robot's token from its file (one line); a clear error when it is missing or empty."""
    if not path:
        raise ConfigError("token_file", "must name a file holding this robot's token")
    file = Path(path).expanduser()
    try:
        token = file.read_text().strip()
    except OSError as err:
        raise ConfigError("token_file", f"cannot read {file}: {err.strerror}") from None
    check(bool(token), "token_file", f"{file} is empty")
    return token


# -- forward kinematics (the "fk" end-effector pose) ----------------------------------------------------


def dh_forward_kinematics(
    q, dh, tcp=(0.0, 0.0, 0.0), convention: str = "modified"
) -> tuple[np.ndarray, np.ndarray]:
    """TCP position (m) and orientation (xyzw) from joint angles and DH rows [a, d, alpha, theta_offset]
    as robot makers publish them: "modified" (Craig) rows [a_{i-1}, d_i, alpha_{i-1}, offset_i] (Franka's
    Panda docs) or "standard" rows [a_i, d_i, alpha_i, offset_i] (Universal Robots' DH tables)."""
    if convention not in DH_CONVENTIONS:
        raise ValueError(f"DH convention {convention!r}: use one of {', '.join(DH_CONVENTIONS)}")
    transform = np.eye(4)
    for angle, (a, d, alpha, offset) in zip(
        np.asarray(q, float), np.asarray(dh, float).reshape(-1, 4), strict=True
    ):
        theta = angle + offset
        ca, sa, ct, st = math.cos(alpha), math.sin(alpha), math.cos(theta), math.sin(theta)
        if convention == "modified":
            link = [[ct, -st, 0, a], [st * ca, ct * ca, -sa, -sa * d], [st * sa, ct * sa, ca, ca * d]]
        else:
            link = [[ct, -st * ca, st * sa, a * ct], [st, ct * ca, -ct * sa, a * st], [0, sa, ca, d]]
        transform = transform @ np.array([*link, [0, 0, 0, 1]])
    tcp = np.asarray(tcp, float)
    position = transform[:3, :3] @ tcp[:3] + transform[:3, 3]
    rotation = transform[:3, :3] @ rpy_to_rotation(*tcp[3:6]) if tcp.size == 6 else transform[:3, :3]
    return position, rotation_to_quaternion(rotation)


def rpy_to_rotation(roll: float, pitch: float, yaw: float) -> np.ndarray:
    """URDF's rpy (fixed axes x, y, z): Rz(yaw) Ry(pitch) Rx(roll)."""
    cr, sr, cp, sp, cy, sy = (f(v) for v in (roll, pitch, yaw) for f in (math.cos, math.sin))
    return np.array(
        [
            [cy * cp, cy * sp * sr - sy * cr, cy * sp * cr + sy * sr],
            [sy * cp, sy * sp * sr + cy * cr, sy * sp * cr - cy * sr],
            [-sp, cp * sr, cp * cr],
        ]
    )


def rotation_to_quaternion(r: np.ndarray) -> np.ndarray:
    """xyzw, w >= 0."""
    w = math.sqrt(max(0.0, 1 + r[0, 0] + r[1, 1] + r[2, 2])) / 2
    x = math.copysign(math.sqrt(max(0.0, 1 + r[0, 0] - r[1, 1] - r[2, 2])) / 2, r[2, 1] - r[1, 2])
    y = math.copysign(math.sqrt(max(0.0, 1 - r[0, 0] + r[1, 1] - r[2, 2])) / 2, r[0, 2] - r[2, 0])
    z = math.copysign(math.sqrt(max(0.0, 1 - r[0, 0] - r[1, 1] + r[2, 2])) / 2, r[1, 0] - r[0, 1])
    return np.array([x, y, z, w])


# -- sensors ----------------------------------------------------------------------------------------------


@dataclass
class _Latest:
    value: Any
    received: float  # the node's clock (monotonic) when it arrived: the deadman judges this, not the stamp
    stamp: float


class Sensors:
    """The latest joint positions and camera frames (converted on arrival, on the subscription's thread).

    Joints are kept by name: a JointState may list them in any order, carry other joints (a gripper,
    wheels) and hold only some of them (a gripper's driver publishing apart from the arm's); each joint
    is as fresh as the last message that named it. A message that cannot be read (names and positions
    disagree, an unknown encoding) is refused, and a hold says why while the sensor has no fresh value."""

    def __init__(self, config: RosRobotConfig, clock: Callable[[], float] = time.monotonic):
        self.config, self.clock = config, clock
        self._lock = threading.Lock()
        self._latest: dict[str, _Latest] = {}  # "joint:<name>" / "<camera>_rgb" -> its latest value
        self._problems: dict[str, str] = {}  # sensor -> why its last message was refused
        self._cameras = {
            topic: name for name, topic in zip(config.camera_names, config.camera_topics, strict=True)
        }
        self._joints = [*config.joint_names, *config.gripper_joints]
        self._joint_state_names: list[str] = []  # the last JointState's joints (to say which one lacks)

    def on_joint_state(self, msg) -> None:
        received = self.clock()
        try:
            by_name = m.joint_state_positions(msg)
        except ValueError as err:
            self._refuse("joints", str(err))
            raise
        ours = [name for name in self._joints if name in by_name]
        if not ours:  # another robot's or device's joints on the same topic
            self._refuse("joints", f"JointState names none of this robot's joints (it has {sorted(by_name)})")
            return
        unknown = [name for name in ours if not math.isfinite(by_name[name])]
        if unknown:  # a driver's "no reading": never a position to act on or hold at
            self._refuse("joints", f"JointState position of {unknown[0]!r} is {by_name[unknown[0]]}")
            raise ValueError(self._problems["joints"])
        stamp = m.stamp_seconds(msg)
        with self._lock:
            self._joint_state_names = sorted(by_name)
            for name in ours:
                self._latest[f"joint:{name}"] = _Latest(by_name[name], received, stamp)
            self._problems.pop("joints", None)

    def on_image(self, camera: str, msg) -> None:
        """A camera's Image or CompressedImage (told apart by CompressedImage's `format`)."""
        try:
            rgb = m.compressed_image_to_rgb(msg) if hasattr(msg, "format") else m.image_to_rgb(msg)
        except ValueError as err:
            self._refuse(f"{camera}_rgb", str(err))
            raise
        size = self.config.image_size
        if rgb.shape[:2] != (size, size):
            rgb = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA)
        with self._lock:
            self._latest[f"{camera}_rgb"] = _Latest(rgb, self.clock(), m.stamp_seconds(msg))
            self._problems.pop(f"{camera}_rgb", None)

    def _refuse(self, key: str, why: str) -> None:
        with self._lock:
            self._problems[key] = why

    def latest(self, key: str) -> _Latest | None:
        """A camera's latest frame, or for "joints" ((positions, gripper positions or None), the oldest
        arrival and stamp among them) once every joint has been measured."""
        with self._lock:
            if key != "joints":
                return self._latest.get(key)
            joints = [self._latest.get(f"joint:{name}") for name in self._joints]
        if any(item is None for item in joints):
            return None
        values = np.array([item.value for item in joints], np.float64)
        n = len(self.config.joint_names)
        gripper = values[n:] if self.config.gripper_joints else None
        received = min(item.received for item in joints)
        return _Latest((values[:n], gripper), received, min(item.stamp for item in joints))

    def _missing(self, key: str) -> str:
        if key == "joints":
            with self._lock:
                never = [name for name in self._joints if f"joint:{name}" not in self._latest]
                seen = self._joint_state_names
            if never and seen:
                return f"no joint {never[0]!r} measured yet (the last JointState has {seen})"
            return "no joints yet"
        return f"no {key} yet"

    def assemble(self, ee_pose=None) -> tuple[dict[str, np.ndarray] | None, str]:
        """(observation, "") or (None, why not): a sensor missing or older than max_sensor_age_s (and
        why its last message was refused, if it was)."""
        now = self.clock()
        keys = ["joints"] + [f"{name}_rgb" for name in self.config.camera_names]
        latest = {key: self.latest(key) for key in keys}
        for key, item in latest.items():
            problem = ""
            if item is None:
                problem = self._missing(key)
            elif (age := now - item.received) > self.config.max_sensor_age_s:
                problem = f"{key} is stale ({age:.3f} s old, limit {self.config.max_sensor_age_s} s)"
            if problem:
                with self._lock:
                    refused = self._problems.get(key)
                return None, f"{problem}; its last message was refused: {refused}" if refused else problem
        positions, gripper = latest["joints"].value
        obs = {"joint_pos": positions.astype(np.float32)}
        if gripper is not None:
            opening = self.config.gripper_offset + self.config.gripper_scale * gripper.sum()
            obs["gripper"] = np.array([opening], np.float32)
        if self.config.ee_pose == "fk":
            cfg = self.config
            ee_pose = dh_forward_kinematics(positions, cfg.fk_dh, cfg.fk_tcp, cfg.fk_convention)
        if self.config.ee_pose != "none":
            if ee_pose is None:
                return None, "no end-effector pose (TF lookup failed)"
            obs["ee_pos"] = np.asarray(ee_pose[0], np.float32)
            obs["ee_quat"] = np.asarray(ee_pose[1], np.float32)
        for name in self.config.camera_names:
            obs[f"{name}_rgb"] = latest[f"{name}_rgb"].value
        return obs, ""


# -- limits (applied last) ----------------------------------------------------------------------------------


def apply_limits(action: np.ndarray, obs: Mapping[str, np.ndarray], config: RosRobotConfig) -> np.ndarray:
    """The action box, then (absolute) joint limits and the velocity limit from the measured joints, or
    (delta) the TCP workspace box: whoever produced the action (policy, operator), nothing leaves beyond them."""
    action = np.asarray(action, np.float64).copy()
    if config.action_low:
        action = np.clip(action, config.action_low, config.action_high)
    n = len(config.joint_names)
    if config.action_mode == "absolute":
        if config.joint_lower:
            action[:n] = np.clip(action[:n], config.joint_lower, config.joint_upper)
        if config.max_joint_velocity > 0:
            reach = config.max_joint_velocity * config.period_s
            measured = np.asarray(obs["joint_pos"], np.float64)
            action[:n] = np.clip(action[:n], measured - reach, measured + reach)
    elif config.workspace_low:
        ee = np.asarray(obs["ee_pos"], np.float64)
        target = np.clip(ee + action[:3] * config.ee_step_m, config.workspace_low, config.workspace_high)
        action[:3] = (target - ee) / config.ee_step_m
    return action


def hold_action(config: RosRobotConfig, joints, last_action) -> np.ndarray | None:
    """Holding still: delta actions -> zero motion, the gripper's last command kept (opening could drop a
    load); absolute -> the measured joints, the other dimensions (a gripper) as last sent, or None when
    the joints were never measured (no position is safe to send then)."""
    action = np.zeros(config.action_dim)
    if config.action_mode == "absolute":
        if joints is None:
            return None
        if last_action is not None:
            action[:] = last_action
        action[: len(config.joint_names)] = joints
    elif last_action is not None:
        action[config.gripper_index] = last_action[config.gripper_index]
    return action


# -- outputs (a small plugin table: name -> builder) ---------------------------------------------------------


def _float64_multi_array(action, obs, config, kit, now):
    return m.float64_multi_array(
        action[: len(config.joint_names)] if config.action_mode == "absolute" else action, kit
    )


def _joint_trajectory(action, obs, config, kit, now):
    seconds = config.trajectory_time_s or config.period_s
    return m.joint_trajectory(config.joint_names, action[: len(config.joint_names)], seconds, kit=kit)


def _twist_stamped(action, obs, config, kit, now):
    linear = np.asarray(action[:3]) * config.ee_step_m * config.rate_hz  # metres per tick -> m/s
    return m.twist_stamped(linear, np.zeros(3), now, config.base_frame, kit)


OUTPUT_BUILDERS: dict[str, Callable] = {
    "float64_multi_array": _float64_multi_array,
    "joint_trajectory": _joint_trajectory,
    "twist_stamped": _twist_stamped,
}


# -- the node -----------------------------------------------------------------------------------------------

UNCONFIGURED, INACTIVE, ACTIVE, FINALIZED = "unconfigured", "inactive", "active", "finalized"
TRANSITIONS = {
    "configure": (UNCONFIGURED, INACTIVE),
    "activate": (INACTIVE, ACTIVE),
    "deactivate": (ACTIVE, INACTIVE),
    "cleanup": (INACTIVE, UNCONFIGURED),
}


class TransitionError(RuntimeError):
    """A lifecycle transition asked for in a state that does not allow it."""


@dataclass(frozen=True)
class Tick:
    """What one control tick did: the commands (topic, message) computed, whether they went out, and why."""

    commands: tuple[tuple[str, Any], ...] = ()
    published: bool = False
    control: str = ""  # the agent's reason (fleet.agent POLICY, OPERATOR, HOLD_*), or "stale", "stopped"
    reason: str = ""
    action: np.ndarray | None = None  # after the limits


def policy_mismatch(policy, config: RosRobotConfig) -> str:
    """Why a loaded policy cannot drive this robot ("" when it can): an observation it needs that the robot
    does not make or makes in another shape, another action or goal size, another metres-per-unit step.
    A scripted policy (no `policy.shape_meta`) is taken as it is."""
    meta = getattr(getattr(policy, "policy", None), "shape_meta", None)
    if meta is None:
        return ""
    spec = {key: tuple(shape) for key, (shape, _dtype) in config.observation_spec().items()}
    problems = []
    for key, shape in meta.obs.items():
        if key not in spec:
            problems.append(
                f"it observes {key} {tuple(shape)}, which this robot does not (it has {list(spec)})"
            )
        elif tuple(shape) != spec[key]:
            problems.append(f"{key} is {tuple(shape)} in the checkpoint, {spec[key]} on this robot")
    if meta.action_dim != config.action_dim:
        problems.append(f"its actions have {meta.action_dim} values, action_dim is {config.action_dim}")
    if meta.goal_dim and meta.goal_dim != len(config.goal):
        problems.append(f"its goal has {meta.goal_dim} values, goal has {len(config.goal)}")
    space = getattr(policy, "action_space", None)
    if space is not None and space.kind != "delta" and config.action_mode == "delta":
        if not math.isclose(space.step_m, config.ee_step_m):
            problems.append(
                f"it was trained with {space.step_m} m per action unit, ee_step_m is {config.ee_step_m}"
            )
    return "; ".join(problems)


def fitting(policy, config: RosRobotConfig, version: str = ""):
    """`policy` when it fits this robot, else ConfigError("checkpoint", why) (one line)."""
    problem = policy_mismatch(policy, config)
    name = version or str(getattr(policy, "version", "")) or config.checkpoint
    check(not problem, "checkpoint", f"{name} does not fit robot {config.robot_id}: {problem}")
    return policy


def first_policy(config: RosRobotConfig, registry):
    """The policy configure starts with: the registry's latest (fetched, sha256-verified) or a local
    checkpoint folder. Whatever keeps it from loading (the server's refusal of a damaged version, a file
    that does not match its sha256, a damaged local folder, no server) is one ConfigError line."""
    import grpc

    from fleet.client.registry import CheckpointError as FetchError
    from policies.checkpoint import CheckpointError
    from policies.runner import PolicyRunner

    try:
        if config.checkpoint == "latest":
            return registry("")
        folder = Path(config.checkpoint).expanduser()
        check(folder.is_dir(), "checkpoint", f"{folder} is not a checkpoint folder (or say 'latest')")
        return PolicyRunner.from_checkpoint(folder, device=config.device)
    except grpc.RpcError as err:
        problem = f"the registry at {config.fleet} refused 'latest': {err.code().name}: {err.details()}"
    except (FetchError, CheckpointError) as err:
        problem = str(err)
    raise ConfigError("checkpoint", " ".join(problem.split())) from None


def default_agent(config: RosRobotConfig, policy=None):
    """The fleet agent for `config`: its token from token_file, the policy from the registry ("latest",
    fetched and sha256-verified by the client SDK before loading) or a local checkpoint, later versions
    hot-swapped by the agent between episodes. `policy` overrides the checkpoint (tests, scripted robots)."""
    from fleet.agent import RobotAgent
    from fleet.client import RobotClient
    from policies.fleet_policies import RegistryPolicies  # torch is imported when a policy is loaded

    token = read_token(config.token_file)
    try:
        certificates = (
            Path(config.root_cert_file).expanduser().read_bytes() if config.root_cert_file else None
        )
    except OSError as err:
        raise ConfigError("root_cert_file", f"cannot read {config.root_cert_file}: {err.strerror}") from None
    registry = RegistryPolicies(
        config.fleet,
        token,
        Path(config.cache_dir).expanduser(),
        root_certificates=certificates,
        device=config.device,
    )
    policy = first_policy(config, registry) if policy is None else policy
    fitting(policy, config)  # refused here, at configure, not by the first tick
    client = RobotClient(
        config.fleet,
        token,
        config.robot_id,
        config.task,
        config.observation_spec(),
        config.action_dim,
        goal_dim=len(config.goal),
        policy_version=str(getattr(policy, "version", "")),
        root_certificates=certificates,
    )
    camera = f"{config.camera_names[0]}_rgb" if config.camera_names else None
    return RobotAgent(
        client,
        policy,
        load_policy=lambda version: fitting(registry(version), config, version),  # a misfit is not swapped in
        gripper_index=config.gripper_index,
        camera_key=camera,
        # the episode logs what the limits let through (the node applies them again, last: idempotent)
        action_filter=lambda obs, action: apply_limits(action, obs, config),
        hold_fn=lambda obs, last: hold_action(config, obs["joint_pos"], last),
    )


class RobotNodeLogic:
    """One robot node without ROS (see the module docstring). Sensor callbacks may come from any thread;
    `tick` and the lifecycle methods from the node's control thread (the rclpy layer serializes them)."""

    def __init__(
        self,
        config: RosRobotConfig,
        make_agent: Callable[[RosRobotConfig], Any] = default_agent,
        kit: m.MessageKit = m.ROSBAGS,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        ee_pose: Callable[[], tuple | None] | None = None,
        rivals: Callable[[], int] | None = None,
    ):
        self.config, self.kit, self.clock, self.wall_clock = config, kit, clock, wall_clock
        self._make_agent, self._ee_pose = make_agent, ee_pose
        self._rivals = rivals  # how many others publish on command_topic (the transport's count)
        self._rival_count, self._rivals_counted = 0, -math.inf
        self.sensors = Sensors(config, clock)
        self.state = UNCONFIGURED
        self.agent = None
        self.stopped = ""  # why the protective stop is latched ("" when it is not)
        self._episode_steps = 0
        self._last_action: np.ndarray | None = None
        self._output = OUTPUT_BUILDERS[config.output]

    # -- lifecycle
    def _check(self, name: str) -> str:
        """The state `name` leads to; TransitionError when the current state does not allow it."""
        source, target = TRANSITIONS[name]
        if self.state != source:
            raise TransitionError(f"cannot {name} a node that is {self.state} (only from {source})")
        return target

    def configure(self) -> None:
        """Load the policy and open the fleet session (the state changes only if that worked)."""
        target = self._check("configure")
        self.agent = self._make_agent(self.config).start()
        self.state = target

    def activate(self) -> None:
        self.state = self._check("activate")
        self._episode_steps = 0

    def deactivate(self) -> Tick:
        """Hold once (a controller keeps its last command otherwise) and end the episode ("stopped")."""
        self.state = self._check("deactivate")
        tick = self._hold_tick("deactivated")
        if self.agent.in_episode:
            self.agent.end_episode(False, "stopped")
        return tick

    def cleanup(self, timeout: float = 5.0) -> None:
        self.state = self._check("cleanup")
        agent, self.agent = self.agent, None
        agent.close(timeout)

    def shutdown(self, timeout: float = 5.0) -> Tick | None:
        """From any state: hold if moving, end the episode, flush the fleet session; then finalized."""
        tick = self.deactivate() if self.state == ACTIVE else None
        if self.state == INACTIVE:
            self.cleanup(timeout)
        self.state = FINALIZED
        return tick

    # -- inputs
    def on_protective_stop(self, msg) -> None:
        """std_msgs/Bool: true latches the stop; false does not clear it (clear_protective_stop does)."""
        if bool(msg.data) and not self.stopped:
            self.stopped = "protective stop"
            log.warning("robot %s: protective stop latched", self.config.robot_id)

    def clear_protective_stop(self) -> None:
        self.stopped = ""
        log.info("robot %s: protective stop cleared", self.config.robot_id)

    # -- the control tick
    def tick(self) -> Tick:
        if self.state != ACTIVE:
            return Tick(reason=f"node is {self.state}")
        obs, problem = self.sensors.assemble(
            self._ee_pose() if self.config.ee_pose == "tf" and self._ee_pose else None
        )
        if obs is None:
            return self._hold_tick(problem, "stale")
        if rival := self._rival():  # neither steps nor logs: what it would send is not what the robot does
            return Tick(control="rival", reason=rival)
        agent = self.agent
        if self.config.dry_run:
            action = np.asarray(agent.policy.act(obs, self._goal()), np.float64)
            return self._command(apply_limits(action, obs, self.config), obs, "dry_run", "dry run")
        if not agent.in_episode:
            agent.begin_episode(self._goal())
            self._episode_steps = 0
        step = agent.step(obs, {"constraint_violation": bool(self.stopped)})
        if step.reset:  # a human reset the robot: the next tick begins the next episode
            return self._hold_tick("reset by the fleet", step.control, obs)
        self._episode_steps += 1
        if self.config.max_episode_steps and self._episode_steps >= self.config.max_episode_steps:
            agent.end_episode(False, "timeout")
        if self.stopped or step.holding:
            return self._hold_tick(self.stopped or step.control, step.control, obs, step.action)
        return self._command(apply_limits(step.action, obs, self.config), obs, step.control)

    def _rival(self) -> str:
        """Why not to publish when another node publishes on command_topic (a second node started for this
        robot, a teleop node): two sources would take turns moving it. Both stop, and say so."""
        if self.config.dry_run or self._rivals is None:
            return ""
        if self.clock() - self._rivals_counted >= RIVALS_EVERY_S:
            self._rival_count, self._rivals_counted = self._rivals(), self.clock()
        if not (others := self._rival_count):
            return ""
        return (
            f"not publishing: {others} other publisher(s) on {self.config.command_topic} "
            f"(another node for robot {self.config.robot_id}?)"
        )

    def failed(self, error: BaseException) -> Tick:
        """After tick() raised (a policy's error, a message it could not build): hold, saying why, as for
        a stale sensor, rather than leave the controller on its last command; nothing when not active."""
        if self.state != ACTIVE:
            return Tick(reason=f"node is {self.state}")
        return self._hold_tick(f"tick failed: {type(error).__name__}: {error}", "hold")

    def _goal(self):
        return np.asarray(self.config.goal, np.float32) if self.config.goal else None

    def _hold_tick(self, reason: str, control: str = "hold", obs=None, agent_hold=None) -> Tick:
        """The agent's hold (delta actions) or hold_action from the latest joints (always for absolute
        actions: a position hold is never taken on trust); nothing when there are no joints to hold."""
        if agent_hold is None or self.config.action_mode == "absolute":
            latest = self.sensors.latest("joints")
            agent_hold = hold_action(self.config, latest.value[0] if latest else None, self._last_action)
            if agent_hold is None:
                return Tick(control=control, reason=reason)
        return self._command(np.asarray(agent_hold, np.float64), obs, control, reason)

    def _command(self, action, obs, control: str, reason: str = "") -> Tick:
        if not np.all(np.isfinite(action)):
            if control == "hold":  # the hold itself (from the last joints) is not finite: send nothing
                return Tick(control=control, reason=f"{reason}; no finite hold to send")
            return self._hold_tick(f"non-finite action from {control}: {action.tolist()}", "hold")
        now = self.wall_clock()
        commands = [(self.config.command_topic, self._output(action, obs, self.config, self.kit, now))]
        if self.config.gripper_topic:
            commands.append(
                (
                    self.config.gripper_topic,
                    m.float64_multi_array([action[self.config.gripper_index]], self.kit),
                )
            )
        self._last_action = action
        rival = self._rival()
        publish = not self.config.dry_run and not rival
        reason = rival or reason
        if not publish:
            log.debug("robot %s dry run: %s %s", self.config.robot_id, control, np.round(action, 4).tolist())
        return Tick(tuple(commands), publish, control, reason, action)
