"""ROS 2's wire without ROS (fleet/ros2/dds.py): the DDS types, names and QoS rmw_cyclonedds uses, bytes
equal to rosbags' CDR, and end to end on loopback: a pybullet Panda in its own process publishing
JointState (100 Hz) and Image (30 Hz) as ROS 2 topics, the robot node subscribed through DDS, its
Float64MultiArray commands moving the simulated robot, and the fleet server logging the episode."""

import os
import subprocess
import sys

import numpy as np
import pytest
from rosbags.typesys import Stores, get_typestore

from fleet.ros2 import dds
from fleet.ros2 import messages as m
from fleet.ros2.node import config_from_params, default_agent
from fleet.ros2.runner import DdsRobotNode, load_params, resolve
from fleet.store import EpisodeStore
from tests.fleet_harness import ROOT, wait_until
from tests.ros_harness import (
    CAMERA,
    COMMANDS,
    JOINT_STATES,
    ReachPolicy,
    panda_params,
    start_sim_robot,
    stop_sim_robot,
)

TS = get_typestore(Stores.ROS2_JAZZY)
DOMAIN = dds.free_domain_id()


def cdr(msg) -> bytes:
    return bytes(TS.serialize_cdr(msg, msg.__msgtype__))


def padded(raw: bytes) -> bytes:
    """RTPS carries a serialized payload padded to a multiple of 4 bytes."""
    return raw + b"\0" * (-len(raw) % 4)


def test_names_qos_and_type_hash():
    assert dds.dds_type_name("sensor_msgs/msg/Image") == "sensor_msgs::msg::dds_::Image_"
    assert dds.idl_type("sensor_msgs/msg/Image").__idl_typename__ == "sensor_msgs::msg::dds_::Image_"
    assert dds.dds_topic_name("/joint_states") == "rt/joint_states"
    assert resolve("~/protective_stop", "r1") == "/r1/flotilla_robot/protective_stop"
    assert resolve("joint_states", "r1") == "/r1/joint_states" and resolve("/a", "r1") == "/a"
    # The hashes `ros2 topic info -v` shows on Jazzy (rosidl's), from rosbags' copy of the definitions.
    assert dds.type_hash("sensor_msgs/msg/Image") == (
        "RIHS01_d31d41a9a4c4bc8eae9be757b0beed306564f7526c88ea6a4588fb9582527d47"
    )
    assert dds.type_hash("sensor_msgs/msg/JointState") == (
        "RIHS01_a13ee3a330e346c9d87b5aa18d24e11690752bd33a0350f11c5882bc9179260e"
    )
    qos = dds.ros_qos("sensor_data", "sensor_msgs/msg/Image")
    assert b"typehash=RIHS01_d31d41a9" in bytes(qos[dds.Policy.Userdata].data)
    with pytest.raises(ValueError, match="QoS profile 'fast'"):
        dds.ros_qos("fast", "std_msgs/msg/Bool")


@pytest.mark.parametrize(
    "msg",
    [
        m.joint_state(["a", "b"], [1.0, 2.0], 3.5, velocities=[0.1, 0.2]),
        m.rgb_to_image(np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3), 1.25, "cam"),
        m.rgb_to_compressed_image(np.zeros((8, 8, 3), np.uint8), 1.0, fmt="png"),
        m.float64_multi_array([0.5, -1.0]),
        m.joint_trajectory(["a", "b"], [0.1, 0.2], 0.1),
        m.twist_stamped([1, 2, 3], [4, 5, 6], 2.0, "base"),
        TS.types["std_msgs/msg/Bool"](data=True),
    ],
    ids=lambda msg: msg.__msgtype__,
)
def test_idl_serialization_equals_rosbags(msg):
    idl = dds.to_idl(msg, msg.__msgtype__)
    assert idl.serialize() == cdr(msg)
    received = type(idl).deserialize(cdr(msg))  # what a subscription hands its callback
    assert cdr(received) == cdr(msg) and dds.wire_bytes(received) == cdr(msg)


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "token"
    path.write_text("robot-token\n")
    return str(path)


def test_sim_robot_on_ros2_topics_end_to_end(server, token_file):
    goal = [0.55, 0.12, 0.15]
    robot = start_sim_robot(DOMAIN, 60.0, goal)
    transport = dds.DdsTransport(DOMAIN, dds.LOOPBACK_CONFIG)
    try:
        seen: dict[str, list] = {JOINT_STATES: [], CAMERA: [], COMMANDS: []}
        for topic, kind in [
            (JOINT_STATES, "sensor_msgs/msg/JointState"),
            (CAMERA, "sensor_msgs/msg/Image"),
            (COMMANDS, "std_msgs/msg/Float64MultiArray"),
        ]:
            transport.subscribe(topic, kind, seen[topic].append, "sensor_data")
        config = config_from_params(
            panda_params(
                fleet=server.address, token_file=token_file, robot_id="panda_1", goal=goal, dry_run=False
            )
        )
        node = DdsRobotNode(config, transport, make_agent=lambda c: default_agent(c, ReachPolicy())).start()
        wait_until(lambda: len(seen[COMMANDS]) >= 30, 20, "30 commands on the wire")
        node.close()
        writers = {w.topic_name: w for w in transport.discovered_publications()}
        result = stop_sim_robot(robot)
    finally:
        transport.close()
        robot.kill()
        robot.wait()

    # The robot moved where the policy sent it, by the node's commands.
    start = np.linalg.norm(np.subtract(result["start_ee"], goal))
    end = np.linalg.norm(np.subtract(result["end_ee"], goal))
    assert start > 0.15 and end < 0.05, result
    assert result["applied"] >= 20
    # Sensors at their rates: ~100 Hz joint states, ~30 Hz images (2x, not 3.3x: after a stall on a loaded
    # machine the robot catches up one message of each per loop).
    assert len(seen[JOINT_STATES]) > 2 * len(seen[CAMERA]) > 0

    # Bytes on the wire are rosbags' CDR of the same message (plus RTPS's padding to 4 bytes).
    for samples in seen.values():
        for sample in samples[:20]:
            raw = dds.wire_bytes(sample)
            decoded = TS.deserialize_cdr(raw, sample.__msgtype__)
            assert padded(cdr(decoded)) == bytes(raw)
    # What ROS 2 nodes discover of the robot's and the node's writers: ROS names, types and QoS, Jazzy's hash.
    for topic, kind, reliability, depth in [
        (JOINT_STATES, "sensor_msgs/msg/JointState", "BestEffort", 5),
        (CAMERA, "sensor_msgs/msg/Image", "BestEffort", 5),
        (COMMANDS, "std_msgs/msg/Float64MultiArray", "Reliable", 10),
    ]:
        qos = writers[dds.dds_topic_name(topic)].qos
        assert writers[dds.dds_topic_name(topic)].type_name == dds.dds_type_name(kind)
        assert bytes(qos[dds.Policy.Userdata].data) == f"typehash={dds.type_hash(kind)};".encode()
        assert reliability in repr(qos[dds.Policy.Reliability]) and qos[dds.Policy.History].depth == depth
        assert qos[dds.Policy.DataRepresentation].use_cdrv0_representation  # XCDR1
    js = TS.deserialize_cdr(dds.wire_bytes(seen[JOINT_STATES][-1]), "sensor_msgs/msg/JointState")
    assert js.name[:2] == ["panda_joint1", "panda_joint2"] and len(js.position) == 9
    image = m.image_to_rgb(seen[CAMERA][-1])
    assert image.shape == (64, 64, 3) and image.std() > 0
    commands = [m.float_array(s) for s in seen[COMMANDS]]
    assert all(c.shape == (4,) for c in commands) and any(np.abs(c[:3]).max() > 0.5 for c in commands)

    # The fleet server logged the episode: observations from the topics, the policy's actions.
    server.stop()
    store = EpisodeStore.open(server.config.store)
    assert store.num_episodes == 1
    meta = store.episode_meta(0)
    assert (meta.robot_id, meta.task, meta.outcome) == ("panda_1", "reach", "stopped")
    steps = store.episode(0)
    assert steps["joint_pos"].shape[1:] == (7,) and steps["front_rgb"].shape[1:] == (96, 96, 3)
    assert np.abs(np.diff(steps["ee_pos"], axis=0)).max() > 0.005  # the logged pose followed the robot
    assert len(steps["action"]) >= 20
    ticks = [latency for _, _, latency in node.timing if not np.isnan(latency)]
    assert ticks and all(0 <= latency < 2.0 for latency in ticks)


def test_runner_reads_the_ros_packages_parameter_file(tmp_path):
    params = load_params(ROOT / "ros_ws/src/flotilla_ros/config/robot.yaml")
    config = config_from_params(params)
    assert config.dry_run is True  # dry-run by default: a new robot is checked before it moves
    # Every section matching the node's name applies, in file order, as ROS 2 applies them.
    two_arms = ROOT / "ros_ws/src/flotilla_ros/config/two_arms.yaml"
    assert load_params(two_arms, "arm_right")["goal"] == [0.55, -0.1, 0.15]
    assert load_params(two_arms, "arm_left")["goal"] == [0.55, 0.1, 0.15]
    assert load_params(two_arms, "arm_left")["joint_states_topic"] == "joint_states"
    only_right = tmp_path / "right.yaml"
    only_right.write_text("/arm_right/flotilla_robot:\n  ros__parameters:\n    joint_names: [a]\n")
    assert load_params(only_right, "arm_right") == {"joint_names": ["a"]}
    with pytest.raises(ValueError, match="no section applies to the node /arm_left/flotilla_robot"):
        load_params(only_right, "arm_left")


def test_robot_job_config_errors_are_one_line(tmp_path):
    """`flotilla robot PARAMS`: a bad parameter, a missing file, no token file: one line, exit code 2."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("/**/flotilla_robot:\n  ros__parameters:\n    joint_names: [a]\n    output: servo\n")
    good = tmp_path / "good.yaml"
    good.write_text("/**/flotilla_robot:\n  ros__parameters:\n    joint_names: [a]\n")
    for args, message in [
        ([bad], "flotilla robot: output: must be one of float64_multi_array"),
        ([tmp_path / "missing.yaml"], "flotilla robot: params: "),
        ([good], "flotilla robot: token_file: must name a file"),
        ([good, "+node.rate_hz=0"], "flotilla robot: rate_hz: must be a number in (0.0, 1000.0]"),
        ([good, "domain=300"], "flotilla robot: domain: must be 0..232"),
        ([good, "+node.ee_pose=tf"], "flotilla robot: ee_pose: tf needs a ROS install"),
    ]:
        domain = [] if any(str(arg).startswith("domain=") for arg in args) else [f"domain={DOMAIN}"]
        run = subprocess.run(
            [sys.executable, "-m", "flotilla.cli", "robot", *map(str, args), "loopback=true", *domain],
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 2 and message in run.stderr, run.stderr
        assert len(run.stderr.strip().splitlines()) == 1, run.stderr


def test_two_robots_on_one_domain_read_their_own_namespaced_topics():
    """fleet.launch.py's layout over DDS: relative topic names resolve in each robot's namespace."""
    params = dict(
        joint_names=["j1"],
        joint_states_topic="joint_states",
        camera_names=["front"],
        camera_topics=["front/image_raw/compressed"],
        image_size=8,
    )
    rgb = np.zeros((16, 16, 3), np.uint8)
    with dds.DdsTransport(DOMAIN, dds.LOOPBACK_CONFIG) as transport:
        nodes = {
            rid: DdsRobotNode(config_from_params({**params, "robot_id": rid}), transport)
            for rid in ("a", "b")
        }
        joints = {
            rid: transport.publisher(f"/{rid}/joint_states", "sensor_msgs/msg/JointState") for rid in nodes
        }
        cameras = {
            rid: transport.publisher(f"/{rid}/front/image_raw/compressed", "sensor_msgs/msg/CompressedImage")
            for rid in nodes
        }

        def delivered():
            for value, rid in enumerate(nodes):
                joints[rid](m.joint_state(["j1"], [float(value)], 1.0))
                rgb[:] = 100 * value
                cameras[rid](m.rgb_to_compressed_image(rgb, 1.0, fmt="png"))
            latest = [
                node.logic.sensors.latest(key) for node in nodes.values() for key in ("joints", "front_rgb")
            ]
            return all(item is not None for item in latest)

        wait_until(delivered, 10, "both robots' sensors", interval=0.1)
    for value, node in enumerate(nodes.values()):
        assert node.logic.sensors.latest("joints").value[0].tolist() == [value]
        assert node.logic.sensors.latest("front_rgb").value.shape == (8, 8, 3)
        assert int(node.logic.sensors.latest("front_rgb").value[0, 0, 0]) == 100 * value


class Still:
    """A policy that asks for no motion (the agent takes any object with this interface)."""

    version, uncertainty = "still", 0.0

    def reset(self):
        pass

    def act(self, obs, goal=None):
        return np.zeros(4, np.float32)


def test_a_second_node_for_the_same_robot_stops_both_until_it_leaves(server, token_file):
    """Two nodes for one robot would take turns commanding it (the second, refused by the fleet server,
    holds): each sees the other's writer on the command topic and publishes nothing while it is there."""
    params = dict(
        joint_names=["j1"], robot_id="twin", fleet=server.address, token_file=token_file, dry_run=False
    )
    config = config_from_params(params)
    first, second = (dds.DdsTransport(DOMAIN, dds.LOOPBACK_CONFIG) for _ in range(2))
    try:
        nodes = [
            DdsRobotNode(config, t, make_agent=lambda c: default_agent(c, Still())) for t in (first, second)
        ]
        for node in nodes:
            node.logic.configure()
            node.logic.activate()

        def tick(node):
            node.logic.sensors.on_joint_state(m.joint_state(["j1"], [0.0], 1.0))
            return node.logic.tick()

        wait_until(lambda: all(tick(node).control == "rival" for node in nodes), 10, "both see the other")
        held = tick(nodes[0])
        assert not held.published and not held.commands
        assert held.reason == (
            "not publishing: 1 other publisher(s) on /flotilla/commands (another node for robot twin?)"
        )
        nodes[1].logic.shutdown(timeout=1.0)
        second.close()
        wait_until(lambda: tick(nodes[0]).published, 10, "the first publishes once the second has gone")
        nodes[0].close(timeout=1.0)
    finally:
        first.close()
        second.close()


def test_stopping_while_sensor_messages_are_in_flight(server, token_file):
    """A publisher floods joint states and 320x240 images while the node stops and its transport closes,
    three times over: the stop is clean (a listener firing into a deleted reader would crash the process)."""
    import threading

    config = config_from_params(
        dict(
            joint_names=["j1"],
            camera_names=["c"],
            camera_topics=["/c/image_raw"],
            image_size=8,
            fleet=server.address,
            token_file=token_file,
        )
    )
    source = dds.DdsTransport(DOMAIN, dds.LOOPBACK_CONFIG)
    joints = source.publisher("/joint_states", "sensor_msgs/msg/JointState", "sensor_data")
    camera = source.publisher("/c/image_raw", "sensor_msgs/msg/Image", "sensor_data")
    image = m.rgb_to_image(np.zeros((240, 320, 3), np.uint8), 0.0)
    stop = threading.Event()

    def flood():
        while not stop.is_set():
            joints(m.joint_state(["j1"], [0.0], 1.0))
            camera(image)

    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    try:
        for _ in range(3):
            with dds.DdsTransport(DOMAIN, dds.LOOPBACK_CONFIG) as transport:
                node = DdsRobotNode(config, transport, make_agent=lambda c: default_agent(c, Still())).start()
                wait_until(
                    lambda node=node: node.logic.sensors.latest("c_rgb") is not None,
                    10,
                    "an image",
                    interval=0.05,
                )
                node.close(timeout=1.0)
            assert node.logic.state == "finalized" and len(node.timing) > 0
    finally:
        stop.set()
        thread.join(5)
        source.close()


def bound_udp_addresses() -> set[str]:
    """The IPv4 addresses this process's UDP sockets are bound to (/proc: socket inodes -> /proc/net/udp)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    addresses = set()
    for line in open("/proc/self/net/udp").read().splitlines()[1:]:
        fields = line.split()
        if fields[9] in inodes:
            raw = fields[1].split(":")[0]
            addresses.add(".".join(str(int(raw[i : i + 2], 16)) for i in (6, 4, 2, 0)))
    return addresses


def test_flotilla_robot_keeps_dds_on_loopback_by_default():
    """`flotilla robot` without loopback=false: no socket bound to another interface's address, no
    multicast (cyclonedds binds its receive sockets to 0.0.0.0 whatever the configuration; it announces
    and sends on 127.0.0.1 only). With cyclonedds' defaults, its transmit socket takes the default interface's."""
    from fleet.ros2.runner import RobotJobConfig, dds_config

    config = dds_config(RobotJobConfig(params="robot.yaml"))
    assert config == dds.LOOPBACK_CONFIG and "<AllowMulticast>false</AllowMulticast>" in config
    with dds.DdsTransport(DOMAIN, config) as transport:
        transport.publisher("/joint_states", "sensor_msgs/msg/JointState")
        bound = bound_udp_addresses()
    assert "127.0.0.1" in bound and bound <= {"127.0.0.1", "0.0.0.0"}, bound


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_subscribing_while_a_publisher_is_sending():
    """A reader's listener could fire before cyclonedds had finished building it (take() then failed on a
    reader without its topic: ~70-220 ignored AttributeErrors for 40 subscriptions to a flooded topic);
    the transport skips those calls and takes what came once the reader is built."""
    import threading
    import time

    with (
        dds.DdsTransport(DOMAIN, dds.LOOPBACK_CONFIG) as source,
        dds.DdsTransport(DOMAIN, dds.LOOPBACK_CONFIG) as transport,
    ):
        joints = source.publisher("/flood/joint_states", "sensor_msgs/msg/JointState", "sensor_data")
        stop = threading.Event()

        def flood():
            while not stop.is_set():
                joints(m.joint_state(["j1"], [0.0], 1.0))

        thread = threading.Thread(target=flood, daemon=True)
        thread.start()
        wait_until(lambda: source.discovered_publications(), 5, "the flood under way")
        time.sleep(0.3)
        received = [[] for _ in range(40)]
        try:
            for seen in received:
                transport.subscribe(
                    "/flood/joint_states", "sensor_msgs/msg/JointState", seen.append, "sensor_data"
                )
            wait_until(lambda: all(received), 10, "every subscription's samples", interval=0.05)
        finally:
            stop.set()
            thread.join(5)


class Broken:
    """A policy that raises (a bug, an observation it cannot take)."""

    version, uncertainty = "broken", 0.0

    def reset(self):
        pass

    def act(self, obs, goal=None):
        raise RuntimeError("policy bug")


def test_a_tick_that_raises_holds_the_robot(server, token_file, caplog):
    """The policy raising at every tick: the node publishes holds (zero motion), saying why, rather than
    nothing (which leaves the controller on its last command)."""
    from fleet.proto import flotilla_pb2 as pb

    config = config_from_params(
        dict(
            joint_names=["j1"], robot_id="broken", fleet=server.address, token_file=token_file, dry_run=False
        )
    )
    commands = []
    with dds.DdsTransport(DOMAIN, dds.LOOPBACK_CONFIG) as transport:
        transport.subscribe("/flotilla/commands", "std_msgs/msg/Float64MultiArray", commands.append)
        joints = transport.publisher("/joint_states", "sensor_msgs/msg/JointState", "sensor_data")
        node = DdsRobotNode(config, transport, make_agent=lambda c: default_agent(c, Broken()))
        try:
            node.start()

            def feed():
                joints(m.joint_state(["j1"], [0.0], 1.0))
                return node.logic.agent.client.state.mode == pb.MODE_AUTONOMOUS

            wait_until(feed, 10, "the fleet's autonomy", interval=0.02)
            commands.clear()  # from here on the policy is asked, and raises
            wait_until(lambda: not feed() or len(commands) >= 3, 10, "three holds", interval=0.02)
        finally:
            node.close(timeout=1.0)
    assert all(m.float_array(c).tolist() == [0.0, 0.0, 0.0, 0.0] for c in commands[:3])
    assert "control tick failed" in caplog.text and "policy bug" in caplog.text


def test_robot_job_ends_at_once_on_sigint_or_sigterm(server, token_file, tmp_path):
    """`flotilla robot` (a format-1 checkpoint, dry run, a simulated Panda publishing its sensors) exits 0
    within seconds of SIGINT or SIGTERM, several times over. It hung in 1 run of 4 or more: the signal
    landed on a cyclonedds or gRPC thread while the main thread sat in a bare Event.wait()."""
    import signal

    import yaml

    params = panda_params(
        robot_id="arm_sig",
        fleet=server.address,
        token_file=token_file,
        checkpoint=str(ROOT / "tests" / "fixtures" / "checkpoints_v1" / "mlp_images"),
        image_size=24,
        goal=[0.55, 0.1, 0.15],
        dry_run=True,
    )
    path = tmp_path / "arm.yaml"
    path.write_text(yaml.safe_dump({"/**/flotilla_robot": {"ros__parameters": params}}))
    robot = start_sim_robot(DOMAIN, 120.0, params["goal"])
    try:
        for run, sig in enumerate([signal.SIGINT, signal.SIGTERM, signal.SIGINT, signal.SIGTERM]):
            job = subprocess.Popen(
                [sys.executable, "-m", "flotilla.cli", "robot", str(path), f"domain={DOMAIN}"],
                cwd=tmp_path,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            lines = []
            for line in job.stdout:  # until the node runs (its log line), then stop it
                lines.append(line)
                if "on DDS domain" in line:
                    break
            assert job.poll() is None, "".join(lines)
            job.send_signal(sig)
            try:
                out = job.communicate(timeout=30)[0]
            except subprocess.TimeoutExpired:
                job.kill()
                pytest.fail(f"run {run}: flotilla robot did not exit 30 s after {sig.name}")
            assert job.returncode == 0, "".join(lines) + out
    finally:
        stop_sim_robot(robot)
