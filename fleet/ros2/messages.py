"""ROS 2 messages <-> numpy, duck-typed on the ROS field names.

Readers take any object with the message's fields: rosbags' dataclasses (rosbag2 import, tests), rclpy
messages (the ROS node) and the DDS transport's structs (fleet/ros2/dds.py) all share them. Byte fields may
be numpy arrays, bytes, array.array('B') or lists of ints.

Builders make the messages we publish through a `MessageKit`: the backend's constructor for a ROS type name
and how it wants numeric sequences. The default kit builds rosbags dataclasses (what `serialize_cdr` and
the DDS transport take); the ROS node passes an rclpy kit (array.array sequences, bytes for uint8[]).

Bad input raises ValueError (or KeyError for a missing joint) naming the problem: unknown encoding, a
buffer shorter than height x step, a step shorter than a row.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

# encoding -> (channels, dtype, what to do to reach RGB); the common camera driver encodings.
_ENCODINGS: dict[str, tuple[int, str, str]] = {
    "rgb8": (3, "u1", "rgb"),
    "bgr8": (3, "u1", "bgr"),
    "rgba8": (4, "u1", "rgba"),
    "bgra8": (4, "u1", "bgra"),
    "mono8": (1, "u1", "mono"),
    "8UC1": (1, "u1", "mono"),
    "8UC3": (3, "u1", "bgr"),  # OpenCV's default channel order
    "mono16": (1, "u2", "mono16"),
    "16UC1": (1, "u2", "depth_mm"),  # REP 118 depth: millimetres, 0 = no return
    "32FC1": (1, "f4", "depth_m"),  # REP 118 depth: metres, NaN = no return
}
# Depth becomes grey on one fixed scale, 1 level per DEPTH_MM_PER_LEVEL mm up to 2.55 m (a tabletop
# camera's range), so a distance has the same grey in every frame and every episode; farther saturates.
DEPTH_MM_PER_LEVEL = 10.0
IMAGE_ENCODINGS = tuple(_ENCODINGS)


def octets(data) -> np.ndarray:
    """A uint8 view of a byte field (ndarray, bytes, bytearray, array.array('B'), memoryview or list)."""
    if isinstance(data, np.ndarray):
        return data.reshape(-1).view(np.uint8) if data.dtype.itemsize == 1 else data.astype(np.uint8)
    try:
        return np.frombuffer(data, np.uint8)
    except TypeError:
        return np.asarray(data, np.uint8)


def stamp_seconds(header_or_stamp) -> float:
    """Seconds of a builtin_interfaces/Time, or of a message's / header's `stamp`."""
    stamp = header_or_stamp
    for field in ("header", "stamp"):
        stamp = getattr(stamp, field, stamp)
    try:
        return stamp.sec + stamp.nanosec * 1e-9
    except AttributeError:
        raise ValueError(
            f"{type(header_or_stamp).__name__} has no stamp (expected a Time, a Header or a stamped message)"
        ) from None


def image_to_rgb(msg) -> np.ndarray:
    """sensor_msgs/Image -> (H, W, 3) uint8 RGB; honours `step` (row padding) and `is_bigendian`."""
    encoding = str(msg.encoding)
    if encoding not in _ENCODINGS:
        raise ValueError(
            f"Image encoding {encoding!r} is not supported (supported: {', '.join(IMAGE_ENCODINGS)})"
        )
    channels, kind, convert = _ENCODINGS[encoding]
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if height == 0 or width == 0:
        raise ValueError(f"Image is empty ({width}x{height} {encoding})")
    dtype = np.dtype(kind).newbyteorder(">" if msg.is_bigendian else "<")
    row_bytes = width * channels * dtype.itemsize
    if step < row_bytes:
        raise ValueError(
            f"Image step {step} is shorter than a row of {width} {encoding} pixels ({row_bytes} bytes)"
        )
    data = octets(msg.data)
    if data.size < height * step:
        raise ValueError(
            f"Image data has {data.size} bytes, {height} rows of step {step} need {height * step}"
        )
    rows = data[: height * step].reshape(height, step)[:, :row_bytes]
    pixels = np.ascontiguousarray(rows).view(dtype).reshape(height, width, channels)
    if convert == "rgb":
        return pixels.copy()
    if convert == "bgr":
        return np.ascontiguousarray(pixels[..., ::-1])
    if convert == "rgba":
        return np.ascontiguousarray(pixels[..., :3])
    if convert == "bgra":
        return np.ascontiguousarray(pixels[..., 2::-1])
    if convert == "mono16":  # intensity over the full 16-bit range, as cv_bridge converts it to mono8
        pixels = (pixels.astype(np.float32) * (255.0 / 65535.0)).round()
    elif convert in ("depth_mm", "depth_m"):
        millimetres = pixels.astype(np.float32) * (1000.0 if convert == "depth_m" else 1.0)
        millimetres = np.nan_to_num(millimetres, nan=0.0, posinf=0.0, neginf=0.0)
        pixels = np.clip(millimetres / DEPTH_MM_PER_LEVEL, 0.0, 255.0).round()
    return np.repeat(pixels.astype(np.uint8), 3, axis=2)


def compressed_image_to_rgb(msg) -> np.ndarray:
    """sensor_msgs/CompressedImage (JPEG or PNG; `format` as image_transport writes it) -> (H, W, 3) RGB."""
    fmt = str(msg.format)
    if "compresseddepth" in fmt.lower():  # image_transport's depth plugin: a header, then 16/32-bit PNG/RVL
        raise ValueError(
            f"CompressedImage format {fmt!r} is not supported (compressedDepth): subscribe to the raw Image"
        )
    image = cv2.imdecode(octets(msg.data), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"CompressedImage (format {fmt!r}) could not be decoded as JPEG or PNG")
    return np.ascontiguousarray(image[..., ::-1])


def joint_state_positions(msg) -> dict[str, float]:
    """sensor_msgs/JointState -> {joint name: position}; ValueError when names and positions disagree."""
    names = [str(name) for name in msg.name]
    position = np.asarray(msg.position, np.float64).reshape(-1)
    if position.size != len(names):
        raise ValueError(f"JointState has {len(names)} names but {position.size} positions ({names})")
    if len(set(names)) != len(names):
        raise ValueError(f"JointState names a joint twice: {names}")
    return dict(zip(names, position.tolist(), strict=True))


def joint_positions(msg, names: Sequence[str]) -> np.ndarray:
    """sensor_msgs/JointState -> positions of `names` in that order (float64); KeyError names a missing joint."""
    by_name = joint_state_positions(msg)
    missing = [name for name in names if name not in by_name]
    if missing:
        raise KeyError(f"JointState has no joint {missing[0]!r} (it has {sorted(by_name)})")
    return np.array([by_name[name] for name in names], np.float64)


def float_array(msg) -> np.ndarray:
    """std_msgs/Float64MultiArray (or Float32MultiArray) -> its data, from `layout.data_offset` on."""
    return np.asarray(msg.data, np.float64)[int(msg.layout.data_offset) :]


# -- builders ------------------------------------------------------------------------------------------


@functools.cache
def _jazzy_types():
    from rosbags.typesys import Stores, get_typestore

    return get_typestore(Stores.ROS2_JAZZY).types


def rosbags_type(name: str):
    """The rosbags dataclass of a ROS 2 Jazzy message type ("sensor_msgs/msg/Image")."""
    return _jazzy_types()[name]


@dataclass(frozen=True)
class MessageKit:
    """How a backend builds messages: its class for a ROS type name, and its numeric sequences' form."""

    make: Callable[[str], Callable[..., Any]] = rosbags_type
    floats: Callable[[np.ndarray], Any] = np.asarray  # float64[] fields (from a float64 array)
    octets: Callable[[np.ndarray], Any] = np.asarray  # uint8[] fields (from a uint8 array)


ROSBAGS = MessageKit()


def seconds_to_time(seconds: float, kit: MessageKit = ROSBAGS, kind: str = "builtin_interfaces/msg/Time"):
    sec = int(np.floor(seconds))
    nanosec = min(int(round((seconds - sec) * 1e9)), 999_999_999)
    return kit.make(kind)(sec=sec, nanosec=nanosec)


def header(stamp_s: float, frame_id: str = "", kit: MessageKit = ROSBAGS):
    return kit.make("std_msgs/msg/Header")(stamp=seconds_to_time(stamp_s, kit), frame_id=frame_id)


def float64_multi_array(values, kit: MessageKit = ROSBAGS):
    """std_msgs/Float64MultiArray: one dimension labelled "data" (what forward_command_controller takes)."""
    values = np.asarray(values, np.float64).reshape(-1)
    dim = kit.make("std_msgs/msg/MultiArrayDimension")(label="data", size=values.size, stride=values.size)
    layout = kit.make("std_msgs/msg/MultiArrayLayout")(dim=[dim], data_offset=0)
    return kit.make("std_msgs/msg/Float64MultiArray")(layout=layout, data=kit.floats(values))


def joint_trajectory(
    names: Sequence[str], positions, time_from_start_s: float, stamp_s: float = 0.0, kit: MessageKit = ROSBAGS
):
    """trajectory_msgs/JointTrajectory with one point (positions reached `time_from_start_s` after stamp;
    a zero stamp means "start now" to joint_trajectory_controller)."""
    positions = np.asarray(positions, np.float64).reshape(-1)
    if positions.size != len(names):
        raise ValueError(f"JointTrajectory: {positions.size} positions for {len(names)} joints")
    empty = kit.floats(np.zeros(0, np.float64))
    point = kit.make("trajectory_msgs/msg/JointTrajectoryPoint")(
        positions=kit.floats(positions),
        velocities=empty,
        accelerations=empty,
        effort=empty,
        time_from_start=seconds_to_time(time_from_start_s, kit, "builtin_interfaces/msg/Duration"),
    )
    return kit.make("trajectory_msgs/msg/JointTrajectory")(
        header=header(stamp_s, kit=kit), joint_names=list(names), points=[point]
    )


def twist_stamped(linear, angular, stamp_s: float, frame_id: str, kit: MessageKit = ROSBAGS):
    """geometry_msgs/TwistStamped (MoveIt Servo's command input)."""
    vector = kit.make("geometry_msgs/msg/Vector3")
    lx, ly, lz = (float(v) for v in np.asarray(linear, np.float64).reshape(3))
    ax, ay, az = (float(v) for v in np.asarray(angular, np.float64).reshape(3))
    twist = kit.make("geometry_msgs/msg/Twist")(
        linear=vector(x=lx, y=ly, z=lz), angular=vector(x=ax, y=ay, z=az)
    )
    return kit.make("geometry_msgs/msg/TwistStamped")(header=header(stamp_s, frame_id, kit), twist=twist)


def joint_state(
    names: Sequence[str],
    positions,
    stamp_s: float,
    velocities=(),
    frame_id: str = "",
    kit: MessageKit = ROSBAGS,
):
    """sensor_msgs/JointState (what a robot driver publishes; the simulated robot and tests use it)."""
    return kit.make("sensor_msgs/msg/JointState")(
        header=header(stamp_s, frame_id, kit),
        name=list(names),
        position=kit.floats(np.asarray(positions, np.float64).reshape(-1)),
        velocity=kit.floats(np.asarray(velocities, np.float64).reshape(-1)),
        effort=kit.floats(np.zeros(0, np.float64)),
    )


def rgb_to_image(rgb, stamp_s: float, frame_id: str = "", encoding: str = "rgb8", kit: MessageKit = ROSBAGS):
    """(H, W, 3) uint8 RGB -> sensor_msgs/Image in rgb8 or bgr8, unpadded rows."""
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"rgb_to_image wants (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
    if encoding not in ("rgb8", "bgr8"):
        raise ValueError(f"rgb_to_image encodes rgb8 or bgr8, not {encoding!r}")
    pixels = rgb if encoding == "rgb8" else rgb[..., ::-1]
    height, width = rgb.shape[:2]
    return kit.make("sensor_msgs/msg/Image")(
        header=header(stamp_s, frame_id, kit),
        height=height,
        width=width,
        encoding=encoding,
        is_bigendian=0,
        step=width * 3,
        data=kit.octets(np.ascontiguousarray(pixels).reshape(-1)),
    )


def rgb_to_compressed_image(
    rgb, stamp_s: float, frame_id: str = "", fmt: str = "jpeg", quality: int = 90, kit: MessageKit = ROSBAGS
):
    """(H, W, 3) uint8 RGB -> sensor_msgs/CompressedImage, JPEG or PNG."""
    extension = {"jpeg": ".jpg", "png": ".png"}.get(fmt)
    if extension is None:
        raise ValueError(f"CompressedImage format {fmt!r}: use 'jpeg' or 'png'")
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)] if fmt == "jpeg" else []
    ok, encoded = cv2.imencode(extension, np.ascontiguousarray(np.asarray(rgb)[..., ::-1]), params)
    if not ok:
        raise ValueError(f"could not encode a {np.asarray(rgb).shape} image as {fmt}")
    return kit.make("sensor_msgs/msg/CompressedImage")(
        header=header(stamp_s, frame_id, kit), format=fmt, data=kit.octets(encoded.reshape(-1))
    )
