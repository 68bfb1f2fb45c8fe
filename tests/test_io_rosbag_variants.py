"""`flotilla import-bag` on the recordings the field has, not only the ones ros2 bag record writes today:
a 7-DoF arm that is not a Panda (Kinova joint_1..7, published in a different order in every message) with
its gripper on another topic and unstamped geometry_msgs/Twist commands, recorded with every storage
variant rosbag2 has (mcap with zstd or lz4 chunks, sqlite3 with file or message compression, a bag split
into two files, a Humble-era sqlite3 bag without message definitions, a bare .mcap file), and cameras in
every raw encoding with padded rows, PNG and oversized frames. Bags are written with rosbags' own Writer."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from configs.schema import ConfigError
from fleet.io.rosbag import NS, ImportBagConfig, run
from fleet.store import EpisodeStore
from tests.test_io_rosbag import EPOCH_NS, record

rosbag2 = pytest.importorskip("rosbags.rosbag2")
typesys = pytest.importorskip("rosbags.typesys")

KINOVA = [f"joint_{i}" for i in range(1, 8)]
SECONDS = 2.0
CAMERA_HZ = 15
VENDOR_TYPE = "kortex_driver/msg/BaseFeedback"  # a vendor's own message type


def typestore():
    store = typesys.get_typestore(typesys.Stores.ROS2_JAZZY)
    store.register(typesys.get_types_from_msg("float64[] joint_torques\nfloat64 tool_force", VENDOR_TYPE))
    return store


def scene(k: int, height: int = 24, width: int = 40) -> np.ndarray:
    """Frame k (RGB): red and green ramps across, blue says the frame (10 k)."""
    yy, xx = np.mgrid[0:height, 0:width]
    return np.stack([xx * 255 // width, yy * 255 // height, np.full_like(xx, 10 * k)], -1).astype(np.uint8)


def image_msg(types, rgb: np.ndarray, header, encoding: str, pad: int):
    """sensor_msgs/Image in `encoding`, each row padded by `pad` bytes (as some drivers align rows)."""
    pixels = {
        "rgb8": rgb,
        "bgr8": rgb[..., ::-1],
        "rgba8": np.concatenate([rgb, np.full((*rgb.shape[:2], 1), 255, np.uint8)], -1),
        "mono8": rgb[..., :1],
        "16UC1": rgb[..., :1].astype("<u2") * 100,  # depth in mm
    }[encoding]
    height, width = rgb.shape[:2]
    row = width * pixels.shape[2] * pixels.itemsize
    rows = np.zeros((height, row + pad), np.uint8)
    rows[:, :row] = np.ascontiguousarray(pixels).view(np.uint8).reshape(height, row)
    return types["sensor_msgs/msg/Image"](
        header=header, height=height, width=width, encoding=encoding, is_bigendian=0, step=row + pad,
        data=rows.reshape(-1),
    )  # fmt: skip


def kinova_messages(camera: str | None = None, frame=(24, 40), vendor: bool = False, gripper: bool = True):
    """(topics, [(receive ns, topic key, message)]): 100 Hz joint states in a new order every message,
    a 20 Hz gripper JointState on its own topic, 50 Hz unstamped Twist commands, and optionally a 15 Hz
    camera (`camera`: a raw encoding, or "png" for a CompressedImage) stamped 30 ms before it arrives."""
    store = typestore()
    types = store.types
    rng = np.random.default_rng(0)

    def header(t: int):
        stamp = types["builtin_interfaces/msg/Time"](sec=(EPOCH_NS + t) // NS, nanosec=t % NS)
        return types["std_msgs/msg/Header"](stamp=stamp, frame_id="")

    def joints(names, values, t):
        return types["sensor_msgs/msg/JointState"](
            header=header(t), name=list(names), position=np.asarray(values, np.float64),
            velocity=np.zeros(0), effort=np.zeros(0),
        )  # fmt: skip

    topics = {
        "arm": ("/joint_states", "sensor_msgs/msg/JointState"),
        "gripper": ("/robotiq_gripper/joint_states", "sensor_msgs/msg/JointState"),
        "command": ("/twist_controller/commands", "geometry_msgs/msg/Twist"),
    }
    messages = []
    for k in range(round(SECONDS * 100)):
        t = k * 10_000_000
        names = rng.permutation(KINOVA)  # joint j of the arm holds t + j
        messages.append((t + 1_000, "arm", joints(names, [t / NS + KINOVA.index(n) for n in names], t)))
    for k in range(round(SECONDS * 20)) if gripper else ():
        t = k * 50_000_000
        messages.append((t + 2_000, "gripper", joints(["finger_joint"], [0.25 + k / 100], t)))
    vector = types["geometry_msgs/msg/Vector3"]
    for k in range(round(SECONDS * 50)):  # linear.x is the send time: a held value says its age
        t = k * 20_000_000
        twist = types["geometry_msgs/msg/Twist"](
            linear=vector(x=t / NS, y=0.1, z=0.0), angular=vector(x=0, y=0, z=0.5)
        )
        messages.append((t + 3_000, "command", twist))
    if camera is not None:
        kind = "sensor_msgs/msg/CompressedImage" if camera == "png" else "sensor_msgs/msg/Image"
        topics["camera"] = ("/camera/color/image_raw", kind)
        for k in range(round(SECONDS * CAMERA_HZ)):
            t = round(k * NS / CAMERA_HZ)
            rgb = scene(k, *frame)
            if camera == "png":
                data = cv2.imencode(".png", rgb[..., ::-1])[1].reshape(-1)
                msg = types[kind](header=header(t), format="rgb8; png compressed bgr8", data=data)
            else:
                msg = image_msg(types, rgb, header(t), camera, pad=12)
            messages.append((t + 30_000_000, "camera", msg))
    if vendor:
        topics["vendor"] = ("/base_feedback", VENDOR_TYPE)
        for k in range(round(SECONDS * 10)):
            msg = types[VENDOR_TYPE](joint_torques=np.arange(7.0), tool_force=1.0)
            messages.append((k * 100_000_000, "vendor", msg))
    return topics, messages


def write_bag(path: Path, topics, messages, storage="mcap", compression=None, version=9) -> Path:
    store = typestore()
    plugin = {"mcap": rosbag2.StoragePlugin.MCAP, "sqlite3": rosbag2.StoragePlugin.SQLITE3}[storage]
    writer = rosbag2.Writer(path, version=version, storage_plugin=plugin)
    if compression is not None:
        writer.set_compression(compression, rosbag2.enums.CompressionFormat.ZSTD)
    with writer:
        record(writer, store, topics, messages)
    return path


def kinova_mapping(**observation) -> dict:
    return {
        "rate_hz": 10,
        "max_staleness_s": 0.1,
        "observation": {
            "joint_pos": {"topic": "/joint_states", "joints": KINOVA},
            "gripper": {"topic": "/robotiq_gripper/joint_states", "joints": ["finger_joint"]},
            **observation,
        },
        "action": {"topic": "/twist_controller/commands"},
    }


def import_bag(tmp_path: Path, bag: Path, mapping: dict, name: str = "out") -> EpisodeStore:
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(mapping))
    config = ImportBagConfig(
        paths=[str(bag)],
        mapping=str(tmp_path / f"{name}.yaml"),
        out=str(tmp_path / f"{name}.zarr"),
        progress=False,
    )
    run(config)
    return EpisodeStore.open(tmp_path / f"{name}.zarr")


# ------------------------------------------------------------------------------------------ storage variants
def lz4_chunks(path: Path, topics, messages) -> Path:
    """An mcap bag with lz4-compressed chunks (rosbag2's mcap plugin offers lz4; rosbags writes only zstd)."""
    lz4 = pytest.importorskip("lz4.frame")
    from rosbags.rosbag2 import storage_mcap

    init = storage_mcap.McapWriter.__init__

    def with_lz4(self, *args):
        init(self, *args)
        self.compression, self.compressor = "lz4", lz4.compress

    storage_mcap.McapWriter.__init__ = with_lz4
    try:
        return write_bag(path, topics, messages)
    finally:
        storage_mcap.McapWriter.__init__ = init


def split_in_two(path: Path, topics, messages, storage: str) -> Path:
    """One bag in two storage files (ros2 bag record --max-bag-duration): each half written as a bag, the
    files moved into one folder and their metadata merged."""
    half = SECONDS / 2 * NS
    parts = [
        write_bag(
            path.with_name(f"{path.name}_{i}"),
            topics,
            [m for m in messages if (m[0] < half) == (i == 0)],
            storage,
        )
        for i in range(2)
    ]
    path.mkdir()
    infos = [yaml.safe_load((p / "metadata.yaml").read_text())["rosbag2_bagfile_information"] for p in parts]
    merged = {**infos[0], "relative_file_paths": [], "files": []}
    for i, (part, info) in enumerate(zip(parts, infos, strict=True)):
        (file,) = info["relative_file_paths"]
        name = f"{path.name}_{i}{Path(file).suffix}"
        shutil.move(part / file, path / name)
        merged["relative_file_paths"].append(name)
        merged["files"].append({**info["files"][0], "path": name})
    for topic, other in zip(
        merged["topics_with_message_count"], infos[1]["topics_with_message_count"], strict=True
    ):
        topic["message_count"] += other["message_count"]
    merged["message_count"] += infos[1]["message_count"]
    end = infos[1]["starting_time"]["nanoseconds_since_epoch"] + infos[1]["duration"]["nanoseconds"]
    merged["duration"]["nanoseconds"] = end - merged["starting_time"]["nanoseconds_since_epoch"]
    (path / "metadata.yaml").write_text(yaml.safe_dump({"rosbag2_bagfile_information": merged}))
    return path


def humble_sqlite3(path: Path, topics, messages) -> Path:
    """A bag as ROS 2 Humble's sqlite3 plugin leaves it: metadata version 5, database schema 3, and no
    message definitions (Iron added them), so only the standard types can be read."""
    write_bag(path, topics, messages, "sqlite3", version=8)
    meta = yaml.safe_load((path / "metadata.yaml").read_text())
    info = meta["rosbag2_bagfile_information"]
    info["version"] = 5
    for key in ("custom_data", "ros_distro"):
        info.pop(key, None)
    for topic in info["topics_with_message_count"]:
        topic["topic_metadata"].pop("type_description_hash", None)
        topic["topic_metadata"]["offered_qos_profiles"] = ""  # Humble: a YAML string
    (path / "metadata.yaml").write_text(yaml.safe_dump(meta))
    with sqlite3.connect(next(path.glob("*.db3"))) as db:
        db.execute("DROP TABLE message_definitions")
        db.execute("ALTER TABLE topics DROP COLUMN type_description_hash")
        db.execute("UPDATE schema SET schema_version = 3")
    return path


def bare_file(path: Path, topics, messages, storage: str) -> Path:
    """The .mcap or .db3 file alone (no metadata.yaml beside it)."""
    bag = write_bag(path.with_name(path.name + "_bag"), topics, messages, storage)
    path.mkdir()
    suffix = {"mcap": ".mcap", "sqlite3": ".db3"}[storage]
    return shutil.move(next(bag.glob("*" + suffix)), path / ("recording" + suffix))


def without_metadata(path: Path, topics, messages, storage: str) -> Path:
    """A split bag whose recorder was killed before it wrote metadata.yaml: only the storage files."""
    split_in_two(path, topics, messages, storage)
    (path / "metadata.yaml").unlink()
    return path


MODE = rosbag2.enums.CompressionMode
RECORDINGS = {
    "mcap-zstd-chunks": lambda p, t, m: write_bag(p, t, m, "mcap", MODE.STORAGE),
    "mcap-lz4-chunks": lz4_chunks,
    "mcap-zstd-file": lambda p, t, m: write_bag(p, t, m, "mcap", MODE.FILE),
    "sqlite3-zstd-file": lambda p, t, m: write_bag(p, t, m, "sqlite3", MODE.FILE),
    "sqlite3-zstd-message": lambda p, t, m: write_bag(p, t, m, "sqlite3", MODE.MESSAGE),
    "mcap-split": lambda p, t, m: split_in_two(p, t, m, "mcap"),
    "sqlite3-split": lambda p, t, m: split_in_two(p, t, m, "sqlite3"),
    "sqlite3-humble": humble_sqlite3,
    "mcap-version-8": lambda p, t, m: write_bag(p, t, m, "mcap", version=8),
    "bare-mcap-file": lambda p, t, m: bare_file(p, t, m, "mcap"),
    "bare-db3-file": lambda p, t, m: bare_file(p, t, m, "sqlite3"),
    "mcap-no-metadata": lambda p, t, m: without_metadata(p, t, m, "mcap"),
    "sqlite3-no-metadata": lambda p, t, m: without_metadata(p, t, m, "sqlite3"),
}


@pytest.fixture(scope="module")
def plain_kinova(tmp_path_factory):
    """The plain (uncompressed mcap) recording's import: what every variant must give."""
    folder = tmp_path_factory.mktemp("kinova")
    with import_bag(folder, write_bag(folder / "plain", *kinova_messages()), kinova_mapping()) as store:
        yield {key: store.episode(0)[key] for key in store.schema}


def test_a_non_panda_arm_by_joint_name_with_its_gripper_and_unstamped_twists(plain_kinova):
    steps = plain_kinova
    # Unstamped twists are held by receive time (3 us after sending): none has arrived at 0.0 s, so the
    # episode starts at 0.1 s; 2 s of recording is 19 steps.
    grid_s = np.arange(1, 20) / 10
    np.testing.assert_allclose(steps["timestamp"] - EPOCH_NS / NS, grid_s, atol=1e-6)
    # Joint j holds t + j whatever order each message lists the joints in; t is the newest sample's stamp.
    held_s = np.floor(grid_s * 100 + 1e-6) / 100
    np.testing.assert_allclose(steps["joint_pos"], held_s[:, None] + np.arange(7), atol=1e-5)
    np.testing.assert_allclose(steps["gripper"][:, 0], 0.25 + np.floor(grid_s * 20 + 1e-6) / 100, atol=1e-6)
    sent_s = np.floor((grid_s - 3e-6) * 50) / 50  # the newest twist received by each step
    np.testing.assert_allclose(
        steps["action"], np.c_[sent_s, np.tile([0.1, 0, 0, 0, 0.5], (19, 1))], atol=1e-6
    )


@pytest.mark.parametrize("recording", list(RECORDINGS))
def test_every_storage_variant_imports_the_same_steps(plain_kinova, tmp_path, recording):
    bag = RECORDINGS[recording](tmp_path / recording, *kinova_messages())
    with import_bag(tmp_path, bag, kinova_mapping()) as store:
        assert store.num_episodes == 1
        for key, values in plain_kinova.items():
            np.testing.assert_array_equal(store.episode(0)[key], values, err_msg=key)


# ------------------------------------------------------------------------------------------ cameras
@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "mono8", "16UC1", "png"])
def test_camera_encodings_with_padded_rows_become_rgb(tmp_path, encoding):
    bag = write_bag(tmp_path / "bag", *kinova_messages(camera=encoding))
    mapping = kinova_mapping(wrist_rgb={"topic": "/camera/color/image_raw", "size": None})
    with import_bag(tmp_path, bag, mapping) as store:
        steps = store.episode(0)
    grid_s = np.round((steps["timestamp"] - EPOCH_NS / NS) * 10) / 10  # float64 of ~1.7e9 s: 0.2 us
    shown = np.floor(grid_s * CAMERA_HZ + 1e-6).astype(int)  # by header stamp: the newest frame taken
    for image, k in zip(steps["wrist_rgb"], shown, strict=True):
        want = scene(k)
        if encoding in ("mono8", "16UC1"):  # grey from the red ramp (depth: 10 mm a level, up to 2.55 m)
            red = want[..., 0].astype(np.float64)
            want = np.repeat((np.clip(red * 10, 0, 255) if encoding == "16UC1" else red)[..., None], 3, -1)
            want = np.round(want).astype(np.uint8)
        np.testing.assert_array_equal(image, want, err_msg=f"step showing frame {k}")


def test_large_frames_of_another_aspect_are_resized_to_the_mapping_size(tmp_path):
    bag = write_bag(tmp_path / "bag", *kinova_messages(camera="png", frame=(480, 640)))
    mapping = kinova_mapping(front_rgb={"topic": "/camera/color/image_raw", "size": [96, 96]})
    with import_bag(tmp_path, bag, mapping) as store:
        images = store.episode(0)["front_rgb"]
    assert images.shape == (19, 96, 96, 3)
    # Squeezed to the policy's square input as the ROS node does (cv2 INTER_AREA), not cropped.
    want = cv2.resize(scene(1, 480, 640), (96, 96), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(images[0], want)


# ------------------------------------------------------------------------------------------ clear errors
def test_an_unsupported_encoding_is_one_line_naming_the_topic(tmp_path):
    topics, messages = kinova_messages(camera="rgb8")
    for _, name, msg in messages:
        if name == "camera":
            msg.encoding = "yuv422_yuy2"
    bag = write_bag(tmp_path / "bag", topics, messages)
    mapping = kinova_mapping(wrist_rgb={"topic": "/camera/color/image_raw"})
    with pytest.raises(
        ConfigError,
        match=r"observation.wrist_rgb: topic /camera/color/image_raw .*'yuv422_yuy2' is not supported \(supported: rgb8, bgr8",
    ):
        import_bag(tmp_path, bag, mapping)


def test_a_vendor_type_without_definitions_is_one_line_naming_the_topic(tmp_path):
    bag = humble_sqlite3(tmp_path / "humble", *kinova_messages(vendor=True))
    with import_bag(tmp_path, bag, kinova_mapping(), "unmapped") as store:  # unmapped: no matter
        assert store.num_steps == 19
    mapping = kinova_mapping(torques={"topic": "/base_feedback", "field": "joint_torques"})
    with pytest.raises(ConfigError) as error:
        import_bag(tmp_path, bag, mapping, "mapped")
    message = str(error.value)
    assert (
        "observation.torques: topic /base_feedback" in message
        and f"no definition of {VENDOR_TYPE}" in message
    )
    assert "\n" not in message and not (tmp_path / "mapped.zarr").exists()
    # With its definition in the bag (recorded on Iron or later) the vendor type imports.
    with_definitions = write_bag(tmp_path / "jazzy", *kinova_messages(vendor=True))
    with import_bag(tmp_path, with_definitions, mapping, "jazzy") as store:
        np.testing.assert_array_equal(store.episode(0)["torques"][0], np.arange(7, dtype=np.float32))


def test_a_mapped_topic_without_messages_is_one_line_naming_it(tmp_path):
    topics, messages = kinova_messages(gripper=False)  # the topic is in the bag, with no message
    bag = write_bag(tmp_path / "bag", topics, messages)
    with pytest.raises(
        ConfigError, match=r"^mapping: observation.gripper: topic /robotiq_gripper/joint_states .*no messages"
    ):
        import_bag(tmp_path, bag, kinova_mapping())


def test_a_folder_of_bags_is_one_line_asking_for_the_bags(tmp_path):
    for name in ("run_1", "run_2"):
        write_bag(tmp_path / "bags" / name, *kinova_messages())
    with pytest.raises(
        ConfigError, match=r"^paths: .*/bags is a folder of 2 bags \(run_1, run_2\), not a bag"
    ):
        import_bag(tmp_path, tmp_path / "bags", kinova_mapping())


def test_a_joint_field_the_driver_leaves_empty_is_one_line(tmp_path):
    bag = write_bag(tmp_path / "bag", *kinova_messages())  # velocity and effort are published empty
    mapping = kinova_mapping(joint_vel={"topic": "/joint_states", "joints": KINOVA, "field": "velocity"})
    with pytest.raises(
        ConfigError, match="observation.joint_vel: .* a message has 0 velocity values for 7 joints"
    ):
        import_bag(tmp_path, bag, mapping)
