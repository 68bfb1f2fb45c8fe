"""Robot sessions: the hello's declared spec, step checks against it, and the RobotService handler.

Everything a step carries is checked here, on the request path, before it is queued for the writer:
a bad step ends that robot's stream with a status naming the problem, never the writer or the server.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass

import grpc
import numpy as np

from fleet import codec
from fleet.proto import flotilla_pb2 as pb
from fleet.proto import flotilla_pb2_grpc as pb_grpc
from fleet.server.streams import FleetError, SessionService
from fleet.store import FieldSpec, Schema, StepError, check_schema
from fleet.store.episode_store import RESERVED_KEYS, SIGNAL_PREFIX
from fleet.text import clip

# Every Signals field, logged per step as signal_<name> (safety_filter as its SafetyFilterDecision code).
SIGNAL_NAMES = (
    "uncertainty",
    "risk",
    "density",
    "constraint_violation",
    "novelty",
    "rnd",
    "ldm",
    "agree",
    "safety_filter",
)
INVALID = grpc.StatusCode.INVALID_ARGUMENT
MAX_KEYS = 64  # observation keys per robot
MAX_VECTOR = 4096  # most numbers in an action or goal


@dataclass(frozen=True)
class RobotSpec:
    """What a robot declared in its hello; every one of its steps must match it."""

    observation: dict[str, FieldSpec]
    action_dim: int
    goal_dim: int
    signals: tuple[str, ...] = SIGNAL_NAMES  # the signals the store logs (see logged_signals)

    @classmethod
    def from_hello(
        cls, hello: pb.RobotHello, max_step_bytes: int, signals: tuple[str, ...] = SIGNAL_NAMES
    ) -> RobotSpec:
        """The hello's spec, checked: key names and dtypes the store accepts, bounded sizes."""
        if not 0 < hello.action_dim <= MAX_VECTOR:
            raise FleetError(INVALID, f"hello: action_dim must be in 1..{MAX_VECTOR}, got {hello.action_dim}")
        if not 0 <= hello.goal_dim <= MAX_VECTOR:
            raise FleetError(INVALID, f"hello: goal_dim must be in 0..{MAX_VECTOR}, got {hello.goal_dim}")
        if len(hello.observation_spec) > MAX_KEYS:
            raise FleetError(
                INVALID, f"hello: {len(hello.observation_spec)} observation keys, at most {MAX_KEYS}"
            )
        observation = {}
        for key, spec in sorted(hello.observation_spec.items()):
            if key in RESERVED_KEYS or key.startswith(SIGNAL_PREFIX):
                raise FleetError(
                    INVALID,
                    f"hello: observation key {clip(key)!r} is reserved "
                    f"({', '.join(RESERVED_KEYS)}, {SIGNAL_PREFIX}*)",
                )
            try:
                observation[key] = FieldSpec(
                    codec.parse_shape(spec.shape, clip(key)), codec.parse_dtype(spec.dtype)
                )
            except ValueError as err:
                raise FleetError(INVALID, f"hello: observation_spec {err}") from None
        spec = cls(observation, hello.action_dim, hello.goal_dim, signals)
        try:  # the store's own rules for key names, dtypes and dimensions, before anything is written
            check_schema(spec.store_schema())
        except StepError as err:
            raise FleetError(INVALID, f"hello: observation_spec: {err}") from None
        step_bytes = sum(math.prod(field.shape) * field.dtype.itemsize for field in observation.values())
        if step_bytes > max_step_bytes:
            raise FleetError(
                INVALID,
                f"hello: the observation is {step_bytes} bytes per step, over "
                f"max_step_bytes={max_step_bytes}",
            )
        return spec

    def store_schema(self) -> Schema:
        """The episode store keys this robot's steps become (see decode_step)."""
        schema = dict(self.observation)
        if self.goal_dim:
            schema["goal"] = FieldSpec((self.goal_dim,), np.dtype(np.float32))
        schema["action"] = FieldSpec((self.action_dim,), np.dtype(np.float32))
        schema["label"] = FieldSpec((), np.dtype(np.uint8))
        schema["timestamp"] = FieldSpec((), np.dtype(np.float64))
        schema.update({SIGNAL_PREFIX + name: FieldSpec((), np.dtype(np.float32)) for name in self.signals})
        return schema

    @functools.cached_property
    def signal_keys(self) -> tuple[tuple[str, str], ...]:
        return tuple((name, SIGNAL_PREFIX + name) for name in self.signals)

    def is_image(self, key: str) -> bool:
        return self.observation[key].is_image

    @functools.cached_property
    def wire_layout(self) -> tuple[tuple[str, str | None, np.dtype, tuple[int, ...], int], ...]:
        """(key, dtype name, dtype, shape, byte size) per observation key: what a plainly right step carries.
        (A non-native byte order gets no name: the wire carries native order, its steps take the slow path.)"""
        return tuple(
            (
                key,
                spec.dtype.name if spec.dtype.isnative else None,
                spec.dtype,
                spec.shape,
                math.prod(spec.shape) * spec.dtype.itemsize,
            )
            for key, spec in self.observation.items()
        )


def logged_signals(committed: Schema | None) -> tuple[str, ...]:
    """The signals a store logs: all of them in a new store; in one committed by an earlier server (before
    the safety signals existed) the ones its schema has, so upgrading the server keeps the store usable."""
    if committed is None:
        return SIGNAL_NAMES
    return tuple(name for name in SIGNAL_NAMES if SIGNAL_PREFIX + name in committed)


def decode_vector(tensor: pb.Tensor, size: int, what: str) -> np.ndarray:
    """A finite float32 vector of `size` numbers (actions, goals), or INVALID_ARGUMENT naming the problem."""
    try:
        value = codec.from_tensor(tensor, max_bytes=8 * max(size, 1), what=what)
    except ValueError as err:
        raise FleetError(INVALID, str(err)) from None
    if value.shape != (size,):
        raise FleetError(INVALID, f"{what}: shape {value.shape}, expected ({size},)")
    if value.dtype.kind not in "fiu":
        raise FleetError(INVALID, f"{what}: dtype {value.dtype} is not numeric")
    if not np.all(np.isfinite(value)):
        raise FleetError(INVALID, f"{what} contains NaN or infinity: {value.tolist()}")
    return value.astype(np.float32)


def step_time(timestamp: float, what: str) -> np.float64:
    """A robot's timestamp (seconds since the epoch; 0: now), refused when it is not a finite time."""
    if not math.isfinite(timestamp) or timestamp < 0:
        raise FleetError(
            INVALID, f"{what}: timestamp {timestamp} is not a time (finite seconds since the epoch)"
        )
    return np.float64(timestamp or time.time())


def decode_step(
    step: pb.Step, spec: RobotSpec, episode_goal: np.ndarray | None, max_frame_bytes: int, label: np.uint8
) -> dict:
    """A checked step as the flat key -> array mapping the episode store keeps; `label` (a store code)
    is the server's decision, not the robot's claim.

    Every step of a robot runs through here (10 Hz times the fleet), so a step that is plainly right
    takes a fast path; anything else goes through the full checks, which name the problem.
    """
    flat = _decode_plain(step, spec, episode_goal, max_frame_bytes)
    if flat is None:
        flat = _decode_checked(step, spec, episode_goal, max_frame_bytes)
    flat["label"] = label
    flat["timestamp"] = step_time(step.timestamp, f"step seq {step.seq}")
    return flat


def _decode_plain(
    step: pb.Step, spec: RobotSpec, episode_goal: np.ndarray | None, max_frame_bytes: int
) -> dict | None:
    """decode_step for a step whose tensors have exactly the declared dtypes, shapes and sizes (and float32
    goal and action), all finite; None at the first thing that is not so (_decode_checked then decides)."""
    observation = step.observation
    if len(observation) != len(spec.observation) or (
        step.HasField("camera") and len(step.camera.data) > max_frame_bytes
    ):
        return None
    flat: dict = {}
    float32_bytes = []  # checked for NaN and infinity all at once
    for key, dtype_name, dtype, shape, size in spec.wire_layout:
        tensor = observation.get(key)
        if tensor is None or tensor.dtype != dtype_name or tuple(tensor.shape) != shape:
            return None
        data = tensor.data
        if len(data) != size:
            return None
        flat[key] = value = np.frombuffer(data, dtype).reshape(shape)
        if dtype == np.float32:
            float32_bytes.append(data)
        elif dtype.kind == "f" and not np.isfinite(value).all():
            return None
    vectors = []  # (key, tensor, size) in the order _decode_checked adds them
    if spec.goal_dim:
        if step.HasField("goal"):
            vectors.append(("goal", step.goal, spec.goal_dim))
        elif episode_goal is None:
            return None
        else:
            flat["goal"] = episode_goal
    if not step.HasField("action"):
        return None
    vectors.append(("action", step.action, spec.action_dim))
    for key, tensor, size in vectors:
        data = tensor.data
        if (
            tensor.dtype != "float32"
            or len(tensor.shape) != 1
            or tensor.shape[0] != size
            or len(data) != 4 * size
        ):
            return None
        flat[key] = np.frombuffer(data, np.float32)
        float32_bytes.append(data)
    if not np.isfinite(np.frombuffer(b"".join(float32_bytes), np.float32)).all():
        return None
    signals = step.signals
    for name, key in spec.signal_keys:
        value = float(getattr(signals, name))
        if not math.isfinite(value):
            return None
        flat[key] = np.float32(value)
    return flat


def _decode_checked(
    step: pb.Step, spec: RobotSpec, episode_goal: np.ndarray | None, max_frame_bytes: int
) -> dict:
    """decode_step with every check in turn: the first problem found ends the stream with its status."""
    where = f"step seq {step.seq}"
    if step.HasField("camera") and len(step.camera.data) > max_frame_bytes:
        raise FleetError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"{where}: camera frame of {len(step.camera.data)} bytes is over max_frame_bytes="
            f"{max_frame_bytes}; send a smaller or more compressed frame",
        )
    missing = sorted(set(spec.observation) - set(step.observation))
    unexpected = sorted(set(step.observation) - set(spec.observation))
    if missing or unexpected:
        raise FleetError(
            INVALID,
            f"{where}: observation keys differ from the hello's observation_spec "
            f"(missing {missing}, unexpected {[clip(key) for key in unexpected[:8]]})",
        )
    flat: dict = {}
    for key, field_spec in spec.observation.items():
        tensor = step.observation[key]
        if tuple(tensor.shape) != field_spec.shape:
            raise FleetError(
                INVALID,
                f"{where}: observation {key!r} has shape {tuple(tensor.shape)}, "
                f"the hello declared {field_spec.shape}",
            )
        try:
            value = codec.from_tensor(
                tensor, max_bytes=8 * math.prod(field_spec.shape), what=f"{where}: observation {key!r}"
            )
        except ValueError as err:
            raise FleetError(INVALID, str(err)) from None
        if value.dtype != field_spec.dtype:
            raise FleetError(
                INVALID,
                f"{where}: observation {key!r} has dtype {value.dtype}, "
                f"the hello declared {field_spec.dtype}",
            )
        if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
            raise FleetError(INVALID, f"{where}: observation {key!r} contains NaN or infinity")
        flat[key] = value
    if spec.goal_dim:
        if step.HasField("goal"):
            flat["goal"] = decode_vector(step.goal, spec.goal_dim, f"{where}: goal")
        elif episode_goal is not None:
            flat["goal"] = episode_goal
        else:
            raise FleetError(
                INVALID,
                f"{where}: no goal (goal_dim is {spec.goal_dim}; set it in the step or in episode_start)",
            )
    if not step.HasField("action"):
        raise FleetError(INVALID, f"{where}: no action")
    flat["action"] = decode_vector(step.action, spec.action_dim, f"{where}: action")
    for name, key in spec.signal_keys:
        value = float(getattr(step.signals, name))
        if not math.isfinite(value):
            raise FleetError(INVALID, f"{where}: signal {name} is {value}")
        flat[key] = np.float32(value)
    return flat


class RobotService(SessionService, pb_grpc.RobotServiceServicer):
    peer = "a robot"

    def callbacks(self) -> dict:
        fleet = self.fleet
        return dict(
            hello=fleet.robot_hello,
            handle=fleet.robot_message,
            left=fleet.robot_left,
            on_sent=fleet.metrics.observe_step_latency,
        )
