"""`flotilla import-bag`: rosbag2 recordings written with rosbags' own Writer (mcap and sqlite3) of a
6-DoF UR-style arm, a 15 Hz JPEG wrist camera with dropped frames and late stamps, and 50 Hz MoveIt
Servo twist commands, imported and checked step by step, then trained on."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from configs.schema import ConfigError
from fleet.io.rosbag import NS, ImportBagConfig, run
from fleet.store import EpisodeStore
from tests.test_cli import flotilla

UR_JOINTS = [
    "shoulder_pan_joint",
    "shoulder_lift_joint",
    "elbow_joint",
    "wrist_1_joint",
    "wrist_2_joint",
    "wrist_3_joint",
]
FINGER = "robotiq_85_left_knuckle_joint"
EPOCH_NS = 1_700_000_000 * NS  # bags carry wall-clock ROS time


@dataclass
class ArmBag:
    """What a recording holds; times are seconds after the bag's start (EPOCH_NS)."""

    seconds: float = 6.0
    joint_hz: float = 100.0
    camera_hz: float = 15.0
    command_hz: float = 50.0
    gripper_hz: float = 10.0
    finger_hz: float = 20.0  # the gripper's driver publishes its finger joint on /joint_states too
    dropped_frames: set[int] = field(default_factory=lambda: {20, 21, *range(45, 60)})
    camera_latency_s: float = 0.035  # a frame arrives this long after its stamp
    still: tuple[float, float] | None = None  # commands are zero in [a, b) seconds (a pause)
    markers: list[tuple[float, object]] = field(default_factory=list)  # (seconds, Bool or String data)
    frame: tuple[int, int] = (48, 64)  # the camera's height, width
    scene: bool = False  # frames look like a camera's (texture, a moving object, noise), not flat colour
    raw_camera: bool = False  # sensor_msgs/Image bgr8 instead of a JPEG CompressedImage
    camera_clock: str = "wall"  # wall | zero (the driver leaves header.stamp at zero) | sim (seconds from 0)
    trajectory_hz: float = 0.0  # > 0: JointTrajectory commands too (stamp zero: "now"), 1 ms after the grid

    def image(self, k: int) -> np.ndarray:
        """Frame k, RGB."""
        rgb = np.full((*self.frame, 3), frame_color(k), np.uint8)
        if self.scene:
            height, width = self.frame
            yy, xx = np.mgrid[0:height, 0:width]
            noise = np.random.default_rng(k).normal(scale=2.0, size=(height, width, 3))
            scene = (
                np.stack([xx * 200 / width, yy * 150 / height + 40, 120 + 40 * np.sin(xx / 9.0)], axis=-1)
                + noise
            )
            side = min(height, width) // 8  # an object moving across the view
            x, y = (k * 7) % (width - side), (k * 3) % (height - side)
            scene[y : y + side, x : x + side] = (200, 40, 40)
            rgb = np.clip(scene, 0, 255).astype(np.uint8)
        return rgb

    def joint_times(self) -> list[int]:
        return _times(self.seconds, self.joint_hz)

    def frame_times(self) -> list[tuple[int, int]]:
        """(frame number, stamp ns) of every recorded frame."""
        stamps = _times(self.seconds, self.camera_hz)
        return [(k, t) for k, t in enumerate(stamps) if k not in self.dropped_frames]

    def command_times(self) -> list[int]:
        return _times(self.seconds, self.command_hz)

    def gripper_times(self) -> list[int]:
        return _times(self.seconds, self.gripper_hz)

    def command(self, t_ns: int) -> list[float]:
        """Twist linear xyz, angular xyz: linear.x is the stamp in seconds, so a held value says its age."""
        if self.still and self.still[0] <= t_ns / NS < self.still[1]:
            return [0.0] * 6
        return [t_ns / NS, 0.1, -0.2, 0.0, 0.0, 0.3]


def _times(seconds: float, hz: float) -> list[int]:
    return [round(k * NS / hz) for k in range(int(round(seconds * hz)))]


def joint_positions(t_ns: int) -> list[float]:
    """Joint j of UR_JOINTS at time t: t + j (so the held sample's time can be read back)."""
    return [t_ns / NS + j for j in range(len(UR_JOINTS))]


def frame_color(k: int) -> tuple[int, int, int]:
    """Frame k's flat RGB colour: its two digits, 20 levels apart (far beyond JPEG's error on flat colour)."""
    return (30 + 20 * (k % 10), 30 + 20 * (k // 10), 128)


def write_arm_bag(path: Path, bag: ArmBag, storage: str = "mcap") -> Path:
    """A rosbag2 folder as ros2 bag record would leave it, written with rosbags' Writer."""
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    from fleet.ros2 import messages as m

    store = get_typestore(Stores.ROS2_JAZZY)
    types = store.types
    plugin = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}[storage]
    # The driver publishes joints in alphabetical order, not the arm's: the mapping orders them.
    published = sorted(UR_JOINTS)
    messages = []  # (receive ns, connection name, message)
    for t in bag.joint_times():
        by_name = dict(zip(UR_JOINTS, joint_positions(t), strict=True))
        msg = m.joint_state(published, [by_name[n] for n in published], (EPOCH_NS + t) / NS)
        msg.header.stamp = types["builtin_interfaces/msg/Time"](sec=(EPOCH_NS + t) // NS, nanosec=t % NS)
        messages.append((t + 1_000_000, "joints", msg))
    camera_type = "sensor_msgs/msg/Image" if bag.raw_camera else "sensor_msgs/msg/CompressedImage"
    for t in _times(bag.seconds, bag.finger_hz):
        msg = m.joint_state([FINGER], [t / NS], (EPOCH_NS + t) / NS)
        msg.header.stamp = types["builtin_interfaces/msg/Time"](sec=(EPOCH_NS + t) // NS, nanosec=t % NS)
        messages.append((t + 2_000_000, "joints", msg))
    for k, t in bag.frame_times():
        stamp = types["builtin_interfaces/msg/Time"](sec=(EPOCH_NS + t) // NS, nanosec=t % NS)
        if bag.camera_clock != "wall":
            sim_ns = t if bag.camera_clock == "sim" else 0
            stamp = types["builtin_interfaces/msg/Time"](sec=sim_ns // NS, nanosec=sim_ns % NS)
        if bag.raw_camera:
            msg = m.rgb_to_image(bag.image(k), 0.0, "wrist_camera", encoding="bgr8")
            msg.header.stamp = stamp
        else:
            bgr = np.ascontiguousarray(bag.image(k)[..., ::-1])
            jpeg = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].reshape(-1)
            header = types["std_msgs/msg/Header"](stamp=stamp, frame_id="wrist_camera")
            msg = types[camera_type](header=header, format="rgb8; jpeg compressed bgr8", data=jpeg)
        messages.append((t + round(bag.camera_latency_s * NS), "camera", msg))
    for t in bag.command_times():
        v = bag.command(t)
        msg = m.twist_stamped(v[:3], v[3:], (EPOCH_NS + t) / NS, "tool0")
        msg.header.stamp = types["builtin_interfaces/msg/Time"](sec=(EPOCH_NS + t) // NS, nanosec=t % NS)
        messages.append((t + 500_000, "twist", msg))
    for i, t in enumerate(bag.gripper_times()):
        messages.append((t, "gripper", m.float64_multi_array([float(i % 2)])))
    for t in _times(bag.seconds, bag.trajectory_hz) if bag.trajectory_hz else []:
        by_name = dict(zip(UR_JOINTS, joint_positions(t), strict=True))
        msg = m.joint_trajectory(published, [by_name[n] + 0.5 for n in published], 0.1)
        messages.append((t + 1_000_000, "trajectory", msg))
    for seconds, data in bag.markers:
        kind = "std_msgs/msg/Bool" if isinstance(data, bool) else "std_msgs/msg/String"
        messages.append((round(seconds * NS), "marker", types[kind](data=data)))
    topics = {
        "joints": ("/joint_states", "sensor_msgs/msg/JointState"),
        "camera": ("/wrist_camera/image_raw/compressed", camera_type),
        "twist": ("/servo_node/delta_twist_cmds", "geometry_msgs/msg/TwistStamped"),
        "gripper": ("/gripper_controller/commands", "std_msgs/msg/Float64MultiArray"),
    }
    if bag.trajectory_hz:
        topics["trajectory"] = (
            "/joint_trajectory_controller/joint_trajectory",
            "trajectory_msgs/msg/JointTrajectory",
        )
    if bag.markers:
        marker_type = "std_msgs/msg/Bool" if isinstance(bag.markers[0][1], bool) else "std_msgs/msg/String"
        topics["marker"] = ("/episode", marker_type)
    with Writer(path, version=9, storage_plugin=plugin) as writer:
        record(writer, store, topics, messages)
    return path


def record(writer, store, topics: dict, messages: list) -> None:
    """Write `messages` ((receive ns after EPOCH_NS, topic name, message)) in receive order to an open
    rosbags Writer; `topics`: name -> (topic, message type)."""
    connections = {
        name: writer.add_connection(topic, kind, typestore=store) for name, (topic, kind) in topics.items()
    }
    for receive, name, msg in sorted(messages, key=lambda item: item[0]):
        writer.write(connections[name], EPOCH_NS + receive, store.serialize_cdr(msg, topics[name][1]))


def arm_mapping(**changes) -> dict:
    mapping = {
        "rate_hz": 10,
        "time": "header",
        "max_staleness_s": 0.1,
        "max_gap_s": 0.25,
        "observation": {
            "joint_pos": {"topic": "/joint_states", "joints": UR_JOINTS},
            "wrist_rgb": {"topic": "/wrist_camera/image_raw/compressed", "size": [32, 32]},
        },
        "action": [
            {"topic": "/servo_node/delta_twist_cmds"},
            {"topic": "/gripper_controller/commands", "max_staleness_s": 0.15},
        ],
    }
    mapping.update(changes)
    return mapping


def write_mapping(path: Path, mapping: dict) -> Path:
    path.write_text(yaml.safe_dump(mapping))
    return path


def import_bags(tmp_path: Path, bags: list[Path], mapping: dict, name: str = "out.zarr") -> EpisodeStore:
    out = tmp_path / name
    config = ImportBagConfig(
        paths=[str(b) for b in bags],
        mapping=str(write_mapping(tmp_path / f"{name}.yaml", mapping)),
        out=str(out),
        progress=False,
    )
    run(config)
    return EpisodeStore.open(out)


def frame_numbers(images: np.ndarray) -> list[int]:
    """Which frame each step shows (frames are flat colours, JPEG error is a few levels)."""
    colors = images.reshape(len(images), -1, 3).mean(axis=1)
    digits = np.round((colors[:, :2] - 30) / 20).astype(int)
    return (digits[:, 0] + 10 * digits[:, 1]).tolist()


def reference(bag: ArmBag, mapping: dict, grid_s: np.ndarray) -> dict:
    """What each grid step should hold, by a plain loop over the samples (no shared code with the importer)."""
    use_header = mapping["time"] == "header"
    late = round(bag.camera_latency_s * NS)
    streams = {
        "joints": ([t if use_header else t + 1_000_000 for t in bag.joint_times()], bag.joint_times()),
        "camera": (
            [t if use_header else t + late for _, t in bag.frame_times()],
            [k for k, _ in bag.frame_times()],
        ),
        "twist": ([t if use_header else t + 500_000 for t in bag.command_times()], bag.command_times()),
        "gripper": (bag.gripper_times(), list(range(len(bag.gripper_times())))),
    }
    stale = {"joints": 0.1, "camera": 0.1, "twist": 0.1, "gripper": 0.15}
    out = {"fresh": [], "joints": [], "frame": [], "twist": [], "gripper": []}
    for g in grid_s:
        g_ns = round(g * NS)
        fresh = True
        for name, (times, payload) in streams.items():
            before = [i for i, t in enumerate(times) if t <= g_ns]
            if not before:
                fresh = False
                out["frame" if name == "camera" else name].append(None)
                continue
            i = max(before, key=lambda i: times[i])
            fresh &= g_ns - times[i] <= round(stale[name] * NS)
            out["frame" if name == "camera" else name].append(payload[i])
        out["fresh"].append(fresh)
    return out


@pytest.fixture(scope="module")
def arm_bags(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bags")
    return {
        storage: write_arm_bag(folder / f"arm_{storage}", ArmBag(), storage)
        for storage in ("mcap", "sqlite3")
    }


# ------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_import_holds_samples_bridges_short_gaps_and_splits_long_ones(arm_bags, tmp_path, storage):
    with import_bags(tmp_path, [arm_bags[storage]], arm_mapping()) as store:
        assert store.num_episodes == 2
        # 0.0 .. 3.0 s; frames 45..59 (3.0 .. 3.93 s) are missing: the 9 steps 3.1 .. 3.9 s are a gap longer
        # than 0.25 s, dropped; frame 60 (4.0 s) starts the second episode, which ends at 5.9 s.
        assert list(store.episode_ends) == [31, 51]
        schema = store.schema
        assert schema["joint_pos"].shape == (6,) and schema["action"].shape == (7,)
        assert schema["wrist_rgb"].shape == (32, 32, 3) and schema["wrist_rgb"].dtype == np.uint8
        for index, first_s in ((0, 0.0), (1, 4.0)):
            steps = store.episode(index)
            seconds = steps["timestamp"] - EPOCH_NS / NS
            np.testing.assert_allclose(seconds, first_s + 0.1 * np.arange(len(seconds)), atol=1e-6)
            # Joint states at 100 Hz land on every grid time: the step holds the sample of exactly that time,
            # each joint in the mapping's order although the bag lists them alphabetically.
            grid_ns = round(first_s * NS) + 100_000_000 * np.arange(len(seconds))
            expected = np.array([joint_positions(int(t)) for t in grid_ns], np.float32)
            np.testing.assert_array_equal(steps["joint_pos"], expected)
            # The twist's linear.x is its stamp: 50 Hz commands are also on the grid.
            np.testing.assert_allclose(steps["action"][:, 0], seconds, atol=1e-5)
            np.testing.assert_array_equal(
                steps["action"][:, 1:6], np.tile([0.1, -0.2, 0, 0, 0.3], (len(seconds), 1)).astype(np.float32)
            )
            np.testing.assert_array_equal(steps["action"][:, 6], np.round(seconds * 10) % 2)
            assert set(steps["label"].tolist()) == {0}  # demo
            # By header stamp, a step shows the newest frame taken at or before it: frame floor(15 t).
            frames = frame_numbers(steps["wrist_rgb"])
            want = [int(t) * 15 // NS for t in grid_ns]
            if index == 0:
                # frames 20 and 21 are dropped: 1.4 s still shows frame 19 (0.133 s old: a one-step gap, bridged)
                assert want[13:15] == [19, 21] and frames[13:15] == [19, 19]
                want[14] = 19
                assert want[30] == 45 and frames[30] == 44  # 3.0 s: frame 45 is missing, 44 is 67 ms old
                want[30] = 44
            assert frames == want
        meta = store.episode_meta(0)
        assert (
            meta.task == "rosbag" and meta.success and json.loads(json.dumps(meta.extra))["control_hz"] == 10
        )
        assert meta.extra["bag"] == str(arm_bags[storage])


def test_mcap_and_sqlite3_import_identically(arm_bags, tmp_path):
    stores = [import_bags(tmp_path, [arm_bags[s]], arm_mapping(), f"{s}.zarr") for s in ("mcap", "sqlite3")]
    a, b = (s.episode(1) for s in stores)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_receive_time_resampling_matches_a_plain_reference(arm_bags, tmp_path):
    mapping = arm_mapping(time="receive")
    with import_bags(tmp_path, [arm_bags["mcap"]], mapping) as store:
        bag = ArmBag()
        grid_s = np.arange(60) * 0.1  # the bag starts at 0 s (the first receive time, the gripper's)
        ref = reference(bag, mapping, grid_s)
        fresh = np.array(ref["fresh"])
        # Frames arrive 35 ms after their stamp: the first arrives at 0.035 s, so the first step is 0.1 s.
        assert not fresh[0] and fresh[1]
        got_s = (
            np.concatenate([store.episode(i)["timestamp"] for i in range(store.num_episodes)]) - EPOCH_NS / NS
        )
        kept = np.round(got_s * 10).astype(int)
        # Every kept step is fresh or inside a gap of at most 2 steps; every fresh step is kept.
        assert set(np.flatnonzero(fresh)) <= set(kept.tolist())
        for i in set(kept.tolist()) - set(np.flatnonzero(fresh)):
            assert fresh[max(i - 2, 0) : i].any() and fresh[i + 1 : i + 3].any()
        steps = {
            k: np.concatenate([store.episode(i)[k] for i in range(store.num_episodes)])
            for k in ("joint_pos", "wrist_rgb", "action")
        }
        np.testing.assert_array_equal(
            steps["joint_pos"], np.array([joint_positions(ref["joints"][i]) for i in kept], np.float32)
        )
        assert frame_numbers(steps["wrist_rgb"]) == [ref["frame"][i] for i in kept]
        np.testing.assert_allclose(steps["action"][:, 0], [ref["twist"][i] / NS for i in kept], atol=1e-5)
        np.testing.assert_array_equal(steps["action"][:, 6], [ref["gripper"][i] % 2 for i in kept])


def test_cut_by_bool_marker_topic(tmp_path):
    bag = ArmBag(
        dropped_frames=set(), markers=[(0.5, True), (1.0, True), (2.05, False), (3.0, True), (4.5, False)]
    )
    path = write_arm_bag(tmp_path / "marked", bag)
    mapping = arm_mapping(episodes={"cut": "topic", "topic": "/episode"})
    with import_bags(tmp_path, [path], mapping) as store:
        # [0.5, 2.05) and [3.0, 4.5): steps 0.5 .. 2.0 and 3.0 .. 4.4 (a repeated true changes nothing)
        starts = [store.episode(i)["timestamp"][0] - EPOCH_NS / NS for i in range(2)]
        assert list(store.episode_ends) == [16, 31] and np.allclose(starts, [0.5, 3.0])


def test_cut_by_string_marker_and_by_pause(tmp_path):
    bag = ArmBag(
        dropped_frames=set(), markers=[(1.0, "start"), (2.0, "stop"), (2.5, "noise"), (4.0, "start")]
    )
    path = write_arm_bag(tmp_path / "strings", bag)
    with import_bags(
        tmp_path, [path], arm_mapping(episodes={"cut": "topic", "topic": "/episode"}), "s.zarr"
    ) as store:
        assert list(store.episode_ends) == [10, 30]  # 1.0 .. 1.9, then 4.0 .. 5.9 (open until the bag ends)
    # The operator lets go for 2 s (the twist is all zeros in [2.0, 4.0)): two episodes, the pause dropped.
    paused = write_arm_bag(tmp_path / "paused", ArmBag(dropped_frames=set(), still=(2.0, 4.0)))
    mapping = arm_mapping(episodes={"cut": "pause", "pause_s": 1.5})
    with import_bags(tmp_path, [paused], mapping, "p.zarr") as store:
        # moving 0 .. 1.98 s, then 4.0 .. 5.98 s: steps 0.0 .. 1.9 and 4.0 .. 5.9
        assert list(store.episode_ends) == [20, 40]
        assert np.isclose(store.episode(1)["timestamp"][0] - EPOCH_NS / NS, 4.0)


def test_raw_images_at_their_own_size_a_sub_message_field_and_a_second_joint_publisher(tmp_path):
    bag = ArmBag(seconds=1.0, dropped_frames=set(), raw_camera=True, scene=True)
    path = write_arm_bag(tmp_path / "raw", bag, "sqlite3")
    mapping = arm_mapping(action={"topic": "/servo_node/delta_twist_cmds", "field": "twist.linear"})
    mapping["observation"]["wrist_rgb"]["size"] = None
    mapping["observation"]["finger"] = {"topic": "/joint_states", "joints": [FINGER]}
    with import_bags(tmp_path, [path], mapping) as store:
        steps = store.episode(0)
        # The arm's and the gripper's messages share /joint_states; each key holds its own publisher's.
        np.testing.assert_array_equal(steps["finger"][:, 0], np.arange(10, dtype=np.float32) / 10)
        np.testing.assert_array_equal(steps["joint_pos"][:, 0], np.arange(10, dtype=np.float32) / 10)
        assert len(steps["action"]) == 10 and steps["action"].shape[1] == 3  # linear x, y, z
        np.testing.assert_allclose(steps["action"][:, 1:], np.tile([0.1, -0.2], (10, 1)), atol=1e-7)
        # bgr8 rows become RGB, bit-exact: step i (0.1 i s) shows frame floor(1.5 i)
        for i in range(10):
            np.testing.assert_array_equal(steps["wrist_rgb"][i], bag.image(i * 15 // 10))


def test_zero_stamps_mean_receive_time_and_another_clock_is_refused(tmp_path):
    unstamped = write_arm_bag(
        tmp_path / "zero", ArmBag(seconds=1.0, camera_clock="zero", dropped_frames=set())
    )
    with import_bags(tmp_path, [unstamped], arm_mapping(), "zero.zarr") as store:
        assert (
            store.num_steps == 9
        )  # frames by receive time: the first arrives at 0.035 s, steps 0.1 .. 0.9 s
    sim_time = write_arm_bag(tmp_path / "sim", ArmBag(seconds=1.0, camera_clock="sim", dropped_frames=set()))
    with pytest.raises(
        ConfigError,
        match="observation.wrist_rgb: topic /wrist_camera/image_raw/compressed .*"
        "first time is 1700000000 s before .*try time: receive",
    ):
        import_bags(tmp_path, [sim_time], arm_mapping())
    with import_bags(tmp_path, [sim_time], arm_mapping(time="receive"), "receive.zarr") as store:
        assert store.num_steps == 9


def test_joint_trajectory_commands_by_joint_name(tmp_path):
    path = write_arm_bag(
        tmp_path / "trajectory", ArmBag(seconds=1.0, dropped_frames=set(), trajectory_hz=25.0)
    )
    topic = "/joint_trajectory_controller/joint_trajectory"
    mapping = arm_mapping(action={"topic": topic, "joints": UR_JOINTS})
    with import_bags(tmp_path, [path], mapping) as store:
        steps = store.episode(0)
        # Zero stamps: held by receive time (1 ms after each 40 ms); nothing has arrived at 0.0 s yet.
        grid_ns = 100_000_000 * np.arange(1, 10)
        sent_ns = (grid_ns - 1_000_000) // 40_000_000 * 40_000_000
        want = np.array([np.add(joint_positions(int(t)), 0.5) for t in sent_ns], np.float32)
        np.testing.assert_array_equal(steps["action"], want)
    with pytest.raises(
        ConfigError, match=f"action: topic {topic} .*field must be one of positions, velocities"
    ):
        import_bags(
            tmp_path,
            [path],
            arm_mapping(action={"topic": topic, "joints": UR_JOINTS, "field": "position"}),
            "f.zarr",
        )


def test_several_bags_are_separate_episodes(arm_bags, tmp_path):
    mapping = arm_mapping(max_gap_s=2.0)  # the 1 s camera outage is bridged: one episode per bag
    with import_bags(tmp_path, [arm_bags["mcap"], arm_bags["sqlite3"]], mapping) as store:
        assert list(store.episode_ends) == [60, 120]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"observation": {"joint_pos": {"topic": "/joint_state", "joints": UR_JOINTS}}},
            "mapping: observation.joint_pos: topic /joint_state is not in",
        ),
        (
            {"observation": {"wrist_rgb": {"topic": "/joint_states"}}},
            "mapping: observation.wrist_rgb: topic /joint_states is sensor_msgs/msg/JointState; it needs a camera topic",
        ),
        (
            {
                "observation": {
                    "joint_pos": {"topic": "/joint_states", "joints": ["shoulder_pan_joint", "wrist_4_joint"]}
                }
            },
            "mapping: observation.joint_pos: topic /joint_states (sensor_msgs/msg/JointState): no joint "
            "'wrist_4_joint' (the topic's joints: elbow_joint, robotiq_85_left_knuckle_joint, shoulder_lift_joint",
        ),
        (
            {"observation": {"joint_pos": {"topic": "/joint_states", "joint": UR_JOINTS}}},
            "mapping: observation.joint_pos.joint: no such setting",
        ),
        (
            {"action": {"topic": "/servo_node/delta_twist_cmds", "field": "twist.lineer"}},
            "mapping: action: topic /servo_node/delta_twist_cmds (geometry_msgs/msg/TwistStamped): twist has no field 'lineer' (fields: linear, angular)",
        ),
        ({"rate_hz": 0}, "mapping: rate_hz: must be a number in (0.0, 1000.0]"),
    ],
)
def test_mapping_problems_are_one_line_naming_the_topic(arm_bags, tmp_path, change, message):
    mapping = arm_mapping()
    for key, value in change.items():
        mapping[key] = {**mapping[key], **value} if key == "observation" else value
    with pytest.raises(ConfigError) as err:
        import_bags(tmp_path, [arm_bags["mcap"]], mapping)
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value)


def test_cli_imports_then_trains_a_policy_on_the_store(arm_bags, tmp_path, one_torch_thread):
    mapping = write_mapping(tmp_path / "ur.yaml", arm_mapping(max_gap_s=2.0))
    out = tmp_path / "ur.zarr"
    result = flotilla(
        "import-bag",
        str(arm_bags["mcap"]),
        str(arm_bags["sqlite3"]),
        f"mapping={mapping}",
        f"out={out}",
        "task_name=ur_wipe",
    )
    assert "imported 2 episodes (120 steps at 10 Hz) from 2 bag(s)" in result.stdout
    refused = flotilla("import-bag", str(arm_bags["mcap"]), f"mapping={mapping}", f"out={out}", check=False)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
        f"flotilla import-bag: out: {out} already exists; pass overwrite=true to replace it"
    ]
    run_dir = tmp_path / "run"
    flotilla(
        "train",
        f"data={out}",
        f"out={run_dir}",
        "task=reach",
        "task.name=ur_wipe",
        "task.obs_keys=[joint_pos]",
        "cameras=true",
        "camera_names=[wrist]",
        "action_space.kind=delta",
        "policy=mlp",
        "steps=4",
        "batch_size=8",
        "val_ratio=0.5",
        "val_every=2",
        "checkpoint_every=2",
        "progress=false",
        "tensorboard=false",
        "threads=1",
    )
    config = json.loads((run_dir / "checkpoints" / "latest" / "config.json").read_text())
    assert config["step"] == 4
