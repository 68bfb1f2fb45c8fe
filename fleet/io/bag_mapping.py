"""The mapping of `flotilla import-bag`: which rosbag2 topic becomes which step key, and how to resample.

A small YAML file, e.g. for a UR arm teleoperated through MoveIt Servo with a wrist camera:

    rate_hz: 10                # the control rate the steps are resampled to
    time: header               # header (a message's header.stamp; receive time if none or zero) | receive
    max_staleness_s: 0.15      # a step whose newest input is older than this is a gap (per source too)
    max_gap_s: 0.5             # a gap longer than this splits the episode
    episodes: {cut: pause, pause_s: 2.0}   # bag | topic | pause (see EpisodeCut)
    observation:
      joint_pos: {topic: /joint_states, joints: [shoulder_pan_joint, shoulder_lift_joint, elbow_joint,
                                                 wrist_1_joint, wrist_2_joint, wrist_3_joint]}
      wrist_rgb: {topic: /wrist_camera/image_raw/compressed, size: [96, 96]}
    action: {topic: /servo_node/delta_twist_cmds}       # or a list of sources, concatenated

What a source yields depends on its topic's message type (checked against the bag, fleet/io/rosbag.py):
sensor_msgs/JointState -> `field` (position, velocity or effort) of `joints` in that order (a
trajectory_msgs/JointTrajectory: its first point's positions, velocities, accelerations or effort);
CompressedImage / Image -> an RGB image resized to `size` (only on `<camera>_rgb` keys);
Float64MultiArray / Float32MultiArray -> its data; anything else -> its numeric fields in order (without
the header; TwistStamped gives linear xyz then angular xyz), or those of the sub-message `field` names
(`field: pose.position`). Every setting's default is written once, in the dataclasses below.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from configs.schema import ConfigError, check, check_choice, check_int, check_number
from fleet.io.common import CAMERA_SUFFIX
from fleet.store.episode_store import KEY_PATTERN, RESERVED_KEYS

TIMES = ("header", "receive")
CUTS = ("bag", "topic", "pause")


@dataclass(frozen=True)
class Source:
    """One topic's contribution to a step key."""

    topic: str
    # A dotted path into the message (per-joint types: which values; default: the whole message).
    field: str | None = None
    joints: list[str] | None = None  # JointState, JointTrajectory: the joint names, in the key's order
    size: list[int] | None = dataclasses.field(
        default_factory=lambda: [96, 96]
    )  # images: [height, width]; null: as recorded
    max_staleness_s: float | None = None  # None: the mapping's max_staleness_s

    def __post_init__(self):
        check(
            isinstance(self.topic, str) and self.topic.startswith("/"),
            "topic",
            f"must be a topic name like /joint_states, got {self.topic!r}",
        )
        check(
            self.field is None or (isinstance(self.field, str) and self.field),
            "field",
            f"must be a field name, got {self.field!r}",
        )
        if self.joints is not None:
            check(
                isinstance(self.joints, list)
                and self.joints
                and all(isinstance(j, str) and j for j in self.joints),
                "joints",
                f"must be a non-empty list of joint names, got {self.joints!r}",
            )
            check(len(set(self.joints)) == len(self.joints), "joints", f"names a joint twice: {self.joints}")
        if self.size is not None:
            check(
                isinstance(self.size, list)
                and len(self.size) == 2
                and all(isinstance(s, int) and not isinstance(s, bool) and 8 <= s <= 2048 for s in self.size),
                "size",
                f"must be [height, width] in pixels (8..2048) or null, got {self.size!r}",
            )
        if self.max_staleness_s is not None:
            check_number(self.max_staleness_s, "max_staleness_s", 0.0, low_open=True)


@dataclass(frozen=True)
class EpisodeCut:
    """How a bag's recording is cut into episodes (each bag is cut on its own; episodes never span bags).

    - bag: the whole bag is one episode.
    - topic: a marker topic: std_msgs/Bool (true starts an episode, false ends it), std_msgs/String (`start`
      / `stop` values; others are ignored), or any other type (each message ends one episode and starts the
      next). Steps outside an episode are dropped.
    - pause: an episode ends where `topic` (default: the action's first topic) is silent, or only carries
      values within `still` of zero, for at least `pause_s`; the paused steps are dropped.
    A gap longer than the mapping's max_gap_s splits an episode in every mode.
    """

    cut: str = "bag"
    topic: str | None = None
    start: str = "start"
    stop: str = "stop"
    pause_s: float = 2.0
    still: float = 0.0

    def __post_init__(self):
        check_choice(self.cut, CUTS, "cut")
        check(
            self.cut != "topic" or bool(self.topic),
            "topic",
            "cut=topic needs the marker topic (episodes.topic: /episode)",
        )
        check(
            self.topic is None or (isinstance(self.topic, str) and self.topic.startswith("/")),
            "topic",
            f"must be a topic name, got {self.topic!r}",
        )
        check_number(self.pause_s, "pause_s", 0.0, low_open=True)
        check_number(self.still, "still", 0.0)


@dataclass(frozen=True)
class BagMapping:
    observation: dict[str, list[Source]]
    action: list[Source]
    rate_hz: float = 10.0
    time: str = "header"
    max_staleness_s: float = 0.1
    max_gap_s: float = 0.5
    min_episode_steps: int = 1  # shorter pieces (after cuts and splits) are dropped
    episodes: EpisodeCut = dataclasses.field(default_factory=EpisodeCut)

    def __post_init__(self):
        check_number(self.rate_hz, "rate_hz", 0.0, 1000.0, low_open=True)
        check_choice(self.time, TIMES, "time")
        check_number(self.max_staleness_s, "max_staleness_s", 0.0, low_open=True)
        check_number(self.max_gap_s, "max_gap_s", 0.0)
        check_int(self.min_episode_steps, "min_episode_steps", 1)
        check(bool(self.observation), "observation", "maps no topic: give at least one observation key")
        for key, sources in self.observation.items():
            check(
                KEY_PATTERN.fullmatch(key) is not None,
                f"observation.{key}",
                f"a key must match {KEY_PATTERN.pattern}",
            )
            check(
                key not in RESERVED_KEYS and not key.startswith("signal_"),
                f"observation.{key}",
                f"is reserved ({', '.join(RESERVED_KEYS)}, signal_*)",
            )
            if key.endswith(CAMERA_SUFFIX):
                check(len(sources) == 1, f"observation.{key}", "an image key takes one topic")

    def keys(self) -> dict[str, list[Source]]:
        """Every step key and its sources, the action last."""
        return {**self.observation, "action": self.action}

    def staleness_s(self, source: Source) -> float:
        return self.max_staleness_s if source.max_staleness_s is None else source.max_staleness_s


def load_mapping(path: str | Path) -> BagMapping:
    """Read and check a mapping YAML; a problem is a ConfigError naming its key (``observation.wrist_rgb.size``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("", f"{path} is not a file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError("", f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    return mapping_from_dict(raw)


def mapping_from_dict(raw: Any) -> BagMapping:
    check(isinstance(raw, dict), "", f"a mapping is a YAML dictionary, got {type(raw).__name__}")
    raw = dict(raw)
    for key in ("observation", "action"):
        check(key in raw, key, "missing")
    observation = raw.pop("observation")
    check(isinstance(observation, dict), "observation", "must map step keys to topics")
    sources = {str(key): _sources(value, f"observation.{key}") for key, value in observation.items()}
    action = _sources(raw.pop("action"), "action")
    episodes = _build(EpisodeCut, raw.pop("episodes", None) or {}, "episodes")
    return _build(BagMapping, {**raw, "observation": sources, "action": action, "episodes": episodes}, "")


def _sources(value: Any, key: str) -> list[Source]:
    items = value if isinstance(value, list) else [value]
    check(bool(items), key, "needs at least one source ({topic: ...})")
    return [_build(Source, item, key if len(items) == 1 else f"{key}[{i}]") for i, item in enumerate(items)]


def _build(cls: type, values: Any, key: str):
    """``cls(**values)``, refusing settings it does not have; errors carry their key under ``key``."""
    check(isinstance(values, dict), key, f"must be a dictionary of settings, got {values!r}")
    names = [f.name for f in dataclasses.fields(cls)]
    for name in values:
        if name not in names:
            raise ConfigError(
                f"{key}.{name}" if key else str(name), f"no such setting (settings: {', '.join(names)})"
            )
    required = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    for name in required:
        check(name in values, f"{key}.{name}" if key else name, "missing")
    try:
        return cls(**values)
    except ConfigError as err:
        raise err.under(key) from None
