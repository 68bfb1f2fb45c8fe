"""fleet/ros2/messages.py against real ROS 2 (Jazzy) message definitions and CDR bytes (rosbags).

Every message is built, serialized to CDR and deserialized again before it is read, so the readers see what
a ROS subscriber would; hand-made padded / big-endian images check that `step` and `is_bigendian` are honoured.
"""

import array

import cv2
import numpy as np
import pytest
from rosbags.typesys import Stores, get_typestore

from fleet.ros2 import messages as m

TS = get_typestore(Stores.ROS2_JAZZY)
RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8)


def wire(msg):
    """What a subscriber gets: the message through CDR bytes and back."""
    return TS.deserialize_cdr(TS.serialize_cdr(msg, msg.__msgtype__), msg.__msgtype__)


def image(encoding, pixels, step=None, bigendian=False):
    """An Image whose rows are `step` bytes (zero padding after each row)."""
    height, width = pixels.shape[:2]
    rows = pixels.reshape(height, -1).view(np.uint8).reshape(height, -1)
    step = step or rows.shape[1]
    padded = np.zeros((height, step), np.uint8)
    padded[:, : rows.shape[1]] = rows
    return wire(
        TS.types["sensor_msgs/msg/Image"](
            header=m.header(1.5),
            height=height,
            width=width,
            encoding=encoding,
            is_bigendian=int(bigendian),
            step=step,
            data=padded.reshape(-1),
        )
    )


@pytest.mark.parametrize("step", [None, 7 * 3 + 11])
def test_rgb8_bgr8_with_and_without_row_padding(step):
    assert np.array_equal(m.image_to_rgb(image("rgb8", RGB, step)), RGB)
    assert np.array_equal(m.image_to_rgb(image("bgr8", RGB[..., ::-1].copy(), step)), RGB)


def test_mono8_rgba8_bgra8():
    gray = RGB[..., 0].copy()
    out = m.image_to_rgb(image("mono8", gray[..., None], step=9))
    assert out.shape == (5, 7, 3) and all(np.array_equal(out[..., c], gray) for c in range(3))
    alpha = np.full((5, 7, 1), 255, np.uint8)
    assert np.array_equal(m.image_to_rgb(image("rgba8", np.concatenate([RGB, alpha], 2))), RGB)
    assert np.array_equal(m.image_to_rgb(image("bgra8", np.concatenate([RGB[..., ::-1], alpha], 2))), RGB)


@pytest.mark.parametrize("bigendian", [False, True])
def test_16uc1_depth_either_byte_order_on_one_fixed_scale(bigendian):
    """10 mm a grey level whatever else the frame holds: the same distance is the same grey in every frame."""
    depth = np.array([[0, 1000], [2000, 4000]], np.uint16)
    stored = depth.astype(">u2" if bigendian else "<u2")[..., None]
    out = m.image_to_rgb(image("16UC1", stored, step=6, bigendian=bigendian))
    assert out[..., 0].tolist() == [[0, 100], [200, 255]]  # 4 m is past the 2.55 m range: saturates
    near_only = np.array([[0, 1000], [500, 600]], "<u2")[..., None]
    assert m.image_to_rgb(image("16UC1", near_only, step=6))[0, 1, 0] == 100  # not rescaled to its max


def test_32fc1_depth_in_metres_on_the_same_scale_and_nan_is_no_return():
    depth = np.array([[np.nan, 1.0], [2.0, np.inf]], "<f4")[..., None]
    out = m.image_to_rgb(image("32FC1", depth, step=2 * 4 + 4))
    assert out[..., 2].tolist() == [[0, 100], [200, 0]]


def test_bad_images_name_the_problem():
    with pytest.raises(ValueError, match="'yuv422'"):
        m.image_to_rgb(image("yuv422", RGB))
    short_step = image("rgb8", RGB)
    short_step.step = 20
    with pytest.raises(ValueError, match="step 20 is shorter"):
        m.image_to_rgb(short_step)
    truncated = image("rgb8", RGB)
    truncated.data = truncated.data[:-1]
    with pytest.raises(ValueError, match="104 bytes"):
        m.image_to_rgb(truncated)


def test_readers_take_other_backends_byte_fields():
    """rclpy gives uint8[] as array.array('B') (or bytes), the DDS structs as bytes."""
    msg = image("rgb8", RGB)
    for data in (bytes(msg.data), array.array("B", bytes(msg.data)), list(msg.data)):
        msg.data = data
        assert np.array_equal(m.image_to_rgb(msg), RGB)


def test_rgb_to_image_round_trips_through_cdr():
    for encoding in ("rgb8", "bgr8"):
        assert np.array_equal(m.image_to_rgb(wire(m.rgb_to_image(RGB, 2.0, "cam", encoding))), RGB)
    with pytest.raises(ValueError, match="rgb8 or bgr8"):
        m.rgb_to_image(RGB, 0.0, encoding="mono8")


def test_compressed_png_is_exact_and_jpeg_close():
    big = cv2.resize(RGB, (64, 48), interpolation=cv2.INTER_NEAREST)
    png = wire(m.rgb_to_compressed_image(big, 1.0, fmt="png"))
    assert png.format == "png" and np.array_equal(m.compressed_image_to_rgb(png), big)
    smooth = np.dstack([np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (48, 1))] * 3)
    smooth[..., 2] = 40  # a colour image: the channel order must survive
    jpeg = m.compressed_image_to_rgb(wire(m.rgb_to_compressed_image(smooth, 1.0, fmt="jpeg", quality=95)))
    assert np.abs(jpeg.astype(int) - smooth).mean() < 3
    broken = wire(m.rgb_to_compressed_image(big, 1.0, fmt="png"))
    broken.data = broken.data[:20]
    with pytest.raises(ValueError, match="could not be decoded"):
        m.compressed_image_to_rgb(broken)


def test_joint_positions_by_name_and_missing_joint():
    msg = wire(m.joint_state(["j2", "j0", "j1"], [2.0, 0.0, 1.0], 3.25))
    assert m.joint_positions(msg, ["j0", "j1", "j2"]).tolist() == [0.0, 1.0, 2.0]
    assert m.stamp_seconds(msg) == 3.25 and m.stamp_seconds(msg.header) == 3.25
    with pytest.raises(KeyError, match="'j7'"):
        m.joint_positions(msg, ["j0", "j7"])
    msg.position = msg.position[:2]
    with pytest.raises(ValueError, match="3 names but 2 positions"):
        m.joint_positions(msg, ["j0"])


def test_joint_state_with_a_joint_named_twice_is_refused():
    msg = wire(m.joint_state(["j0", "j1", "j0"], [0.0, 1.0, 2.0], 1.0))
    with pytest.raises(ValueError, match="names a joint twice"):
        m.joint_positions(msg, ["j0"])


@pytest.mark.parametrize("fmt", ["jpeg", "rgb8; jpeg compressed bgr8", "png", "bgr8; png compressed bgr8"])
def test_compressed_formats_that_drivers_write(fmt):
    """image_transport's compressed plugin writes "<encoding>; <codec> compressed <encoding>" (Humble on);
    older drivers plain "jpeg" / "png": the bytes decide, whichever the string."""
    smooth = np.dstack([np.tile(np.linspace(0, 255, 32, dtype=np.uint8), (24, 1))] * 3)
    smooth[..., 2] = 40
    codec = "png" if "png" in fmt else "jpeg"
    msg = wire(m.rgb_to_compressed_image(smooth, 1.0, fmt=codec, quality=95))
    msg.format = fmt
    assert np.abs(m.compressed_image_to_rgb(wire(msg)).astype(int) - smooth).mean() < 3


def test_compressed_depth_and_empty_images_are_refused_by_name():
    msg = wire(m.rgb_to_compressed_image(RGB, 1.0, fmt="png"))
    msg.format = "16UC1; compressedDepth png"
    with pytest.raises(ValueError, match="'16UC1; compressedDepth png' is not supported .compressedDepth."):
        m.compressed_image_to_rgb(msg)
    empty = image("rgb8", RGB)
    empty.height = empty.width = empty.step = 0
    with pytest.raises(ValueError, match="Image is empty"):
        m.image_to_rgb(empty)


def test_8uc3_is_bgr_and_mono16_big_endian_with_padding():
    assert np.array_equal(m.image_to_rgb(image("8UC3", RGB[..., ::-1].copy(), step=7 * 3 + 3)), RGB)
    intensity = np.array([[0, 257 * 64], [257 * 128, 65535]], ">u2")[..., None]  # full 16-bit range
    assert m.image_to_rgb(image("mono16", intensity, step=8, bigendian=True))[..., 1].tolist() == [
        [0, 64],
        [128, 255],
    ]


def test_command_builders_match_ros_definitions():
    array_msg = wire(m.float64_multi_array([0.5, -1.0, 2.0]))
    assert m.float_array(array_msg).tolist() == [0.5, -1.0, 2.0]
    assert array_msg.layout.dim[0].size == 3
    traj = wire(m.joint_trajectory(["a", "b"], [0.1, 0.2], 0.25))
    assert traj.joint_names == ["a", "b"] and traj.points[0].positions.tolist() == [0.1, 0.2]
    assert (traj.points[0].time_from_start.sec, traj.points[0].time_from_start.nanosec) == (0, 250_000_000)
    names = [f"joint_{i}" for i in range(1, 7)]
    six = wire(m.joint_trajectory(names, np.linspace(-1, 1, 6), 1.25, stamp_s=3.5))
    assert six.joint_names == names and six.points[0].positions == pytest.approx(np.linspace(-1, 1, 6))
    assert (six.points[0].time_from_start.sec, six.points[0].time_from_start.nanosec) == (1, 250_000_000)
    assert m.stamp_seconds(six) == 3.5 and len(six.points[0].velocities) == 0
    with pytest.raises(ValueError, match="3 positions for 2 joints"):
        m.joint_trajectory(["a", "b"], [1, 2, 3], 0.1)
    twist = wire(m.twist_stamped([0.1, 0, 0], [0, 0, 0.3], 7.5, "base_link"))
    assert (twist.twist.linear.x, twist.twist.angular.z, twist.header.frame_id) == (0.1, 0.3, "base_link")
    assert m.stamp_seconds(twist) == 7.5


def test_float64_multi_array_bytes_are_the_ros_layout():
    """The CDR of Float64MultiArray as ROS 2 writes it: encapsulation, one dim "data", offset 0, doubles."""
    raw = bytes(TS.serialize_cdr(m.float64_multi_array([1.0, 2.0]), "std_msgs/msg/Float64MultiArray"))
    assert raw[:4] == b"\x00\x01\x00\x00"  # CDR little endian
    assert raw[4:8] == (1).to_bytes(4, "little") and raw[8:12] == (5).to_bytes(4, "little")
    assert raw[12:17] == b"data\x00"
    assert raw[-16:] == np.array([1.0, 2.0], "<f8").tobytes()


def test_stamp_seconds_rejects_non_stamps():
    with pytest.raises(ValueError, match="no stamp"):
        m.stamp_seconds(object())
