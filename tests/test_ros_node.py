"""The ROS 2 robot node's logic without ROS (fleet/ros2/node.py): parameters, forward kinematics, sensors
and the deadman, limits, dry-run, protective stop and the lifecycle, around the real RobotAgent talking to a
real fleet server on 127.0.0.1. Messages are rosbags' Jazzy dataclasses after a CDR round trip."""

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from rosbags.typesys import Stores, get_typestore

from configs.schema import ConfigError
from fleet.agent import POLICY
from fleet.proto import flotilla_pb2 as pb
from fleet.ros2 import messages as m
from fleet.ros2.node import (
    ACTIVE,
    FINALIZED,
    INACTIVE,
    UNCONFIGURED,
    RobotNodeLogic,
    RosRobotConfig,
    TransitionError,
    apply_limits,
    config_from_params,
    default_agent,
    dh_forward_kinematics,
    first_policy,
)
from fleet.store import EpisodeStore
from tests.fleet_harness import wait_until
from tests.ros_harness import PANDA_DH, PANDA_TCP

TS = get_typestore(Stores.ROS2_JAZZY)
JOINTS = ["j1", "j2", "j3"]
PANDA_FLANGE = [0.0, 0.0, 0.107]


def wire(msg):
    return TS.deserialize_cdr(TS.serialize_cdr(msg, msg.__msgtype__), msg.__msgtype__)


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class ConstantPolicy:
    """A policy that always wants the same motion (the agent takes any object with this interface)."""

    version = "constant"
    uncertainty = 0.0

    def __init__(self, action):
        self.action = np.asarray(action, np.float32)

    def reset(self):
        pass

    def act(self, obs, goal=None):
        return self.action


def config(**overrides):
    values = dict(joint_names=JOINTS, action_dim=4, goal=[0.1, 0.2, 0.3], rate_hz=10.0)
    values.update(overrides)
    return RosRobotConfig(**values)


# -- parameters -----------------------------------------------------------------------------------------------


def test_parameters_are_checked_with_one_line_errors():
    assert config_from_params({"joint_names": ("a", "b"), "action_dim": 2}).joint_names == ["a", "b"]
    cases = [
        ({"joint_names": ["a"], "rate": 10}, "rate: unknown parameter"),
        ({"joint_names": ["a"], "robot_id": "arm-7"}, "robot_id: is the robot's ROS namespace too"),
        ({}, "joint_names: must list"),
        ({"joint_names": ["a"], "output": "twist"}, "output: must be one of"),
        ({"joint_names": ["a"], "output": "joint_trajectory"}, "needs action_mode absolute"),
        ({"joint_names": ["a"], "camera_names": ["front"]}, "camera_topics: needs one topic per camera"),
        ({"joint_names": ["a"], "ee_pose": "fk", "fk_dh": [0, 0, 0]}, "fk_dh: needs 4 numbers"),
        ({"joint_names": ["a"], "action_low": [0] * 4, "action_high": [1] * 3}, "action_high: has 3 values"),
        ({"joint_names": ["a"], "workspace_low": [0] * 3, "workspace_high": [1] * 3}, "needs ee_pose"),
        ({"joint_names": ["a"], "dry_run": "no"}, "dry_run: must be true or false"),
        (
            {"joint_names": ["a"], "camera_names": ["d"], "camera_topics": ["/d/image_raw/compressedDepth"]},
            "camera_topics: /d/image_raw/compressedDepth: compressedDepth .depth images. is not supported",
        ),
        (
            {"joint_names": ["a"], "fk_convention": "craig"},
            "fk_convention: must be one of modified, standard",
        ),
        ({"joint_names": ["a"], "fk_tcp": [0.0] * 4}, "fk_tcp: needs 3 or 6 numbers, got 4"),
    ]
    for params, message in cases:
        with pytest.raises(ConfigError, match=message):
            config_from_params(params)


def test_observation_spec_follows_the_sim_names():
    spec = config(
        gripper_joints=["f1", "f2"], camera_names=["wrist"], camera_topics=["/c"], image_size=32
    ).observation_spec()
    assert spec == {
        "joint_pos": ((3,), "float32"),
        "gripper": ((1,), "float32"),
        "wrist_rgb": ((32, 32, 3), "uint8"),
    }


def test_token_file_errors(tmp_path):
    from fleet.ros2.node import read_token

    with pytest.raises(ConfigError, match="token_file: must name"):
        read_token("")
    with pytest.raises(ConfigError, match="cannot read"):
        read_token(str(tmp_path / "none"))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        read_token(str(tmp_path / "empty"))


# -- forward kinematics ----------------------------------------------------------------------------------------


def test_dh_forward_kinematics_matches_pybullets_panda():
    """Franka's published DH parameters against pybullet_data's Panda URDF: the flange (panda_link8) and,
    with the hand's turn in fk_tcp's rpy, the sim's TCP (panda_grasptarget: position and orientation)."""
    from sim.tasks.bullet import PhysicsClient, pybullet, pybullet_data

    p = PhysicsClient(pybullet.DIRECT)
    try:
        robot = p.loadURDF(f"{pybullet_data.getDataPath()}/franka_panda/panda.urdf", useFixedBase=True)
        rng = np.random.default_rng(0)
        for _ in range(5):
            q = rng.uniform(-1.5, 1.5, 7)
            q[3] = rng.uniform(-3.0, -0.1)  # joint 4's range is negative
            for joint, angle in enumerate(q):
                p.resetJointState(robot, joint, angle)
            for index, tcp in ((7, PANDA_FLANGE), (11, PANDA_TCP)):  # panda_link8, panda_grasptarget
                link = p.getLinkState(robot, index, computeForwardKinematics=True)
                position, quat = dh_forward_kinematics(q, PANDA_DH, tcp)
                assert np.allclose(position, link[4], atol=1e-5)
                assert abs(abs(np.dot(quat, link[5])) - 1) < 1e-6  # the same rotation (q or -q)
    finally:
        p.disconnect()


UR5E_TABLE = [  # Universal Robots' published UR5e table (standard DH): a, d, alpha per joint
    (0.0, 0.1625, np.pi / 2),
    (-0.425, 0.0, 0.0),
    (-0.3922, 0.0, 0.0),
    (0.0, 0.1333, np.pi / 2),
    (0.0, 0.0997, -np.pi / 2),
    (0.0, 0.0996, 0.0),
]


def standard_dh_product(q, table):
    """The textbook product of Rz(theta) Tz(d) Tx(a) Rx(alpha), written out apart from node.py."""
    transform = np.eye(4)
    for theta, (a, d, alpha) in zip(q, table, strict=True):
        rz = np.array(
            [
                [np.cos(theta), -np.sin(theta), 0, 0],
                [np.sin(theta), np.cos(theta), 0, 0],
                [0, 0, 1, 0],
                [0, 0, 0, 1],
            ]
        )
        tz, tx = np.eye(4), np.eye(4)
        tz[2, 3], tx[0, 3] = d, a
        rx = np.array(
            [
                [1, 0, 0, 0],
                [0, np.cos(alpha), -np.sin(alpha), 0],
                [0, np.sin(alpha), np.cos(alpha), 0],
                [0, 0, 0, 1],
            ]
        )
        transform = transform @ rz @ tz @ tx @ rx
    return transform


def quaternion_matrix(q):
    x, y, z, w = q
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def test_standard_dh_ur5e_flange_pose():
    """A UR5e with its published (standard) table: the flange at zero joints is where UR's numbers put it
    (x = a2 + a3, y = -(d4 + d6), z = d1 - d5), and other poses agree with an independent product."""
    dh = [v for a, d, alpha in UR5E_TABLE for v in (a, d, alpha, 0.0)]
    position, quat = dh_forward_kinematics(np.zeros(6), dh, convention="standard")
    assert position == pytest.approx([-0.8172, -0.2329, 0.0628], abs=1e-9)
    # the alphas add up to Rx(pi/2): the flange's z points along the base's -y
    assert abs(abs(np.dot(quat, [np.sqrt(0.5), 0.0, 0.0, np.sqrt(0.5)])) - 1) < 1e-9
    rng = np.random.default_rng(3)
    for q in rng.uniform(-np.pi, np.pi, (4, 6)):
        expected = standard_dh_product(q, UR5E_TABLE)
        position, quat = dh_forward_kinematics(q, dh, [0.0, 0.0, 0.05], "standard")
        assert position == pytest.approx(expected[:3, 3] + expected[:3, 2] * 0.05, abs=1e-9)
        assert np.allclose(quaternion_matrix(quat), expected[:3, :3], atol=1e-9)
    # the same rows read as Craig's are another robot: the convention must be said, and is checked
    assert not np.allclose(dh_forward_kinematics(np.zeros(6), dh)[0], [-0.8172, -0.2329, 0.0628])
    with pytest.raises(ConfigError, match="fk_convention: must be one of"):
        config(fk_convention="dh")


# -- sensors, deadman, limits ------------------------------------------------------------------------------------


def test_sensors_assemble_convert_and_go_stale():
    clock = Clock()
    cfg = config(
        gripper_joints=["f1", "f2"],
        camera_names=["front", "wrist"],
        camera_topics=["/front/image_raw", "/wrist/image_raw/compressed"],
        image_size=16,
        max_sensor_age_s=0.2,
    )
    node = RobotNodeLogic(cfg, clock=clock)
    rgb = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert node.sensors.assemble() == (None, "no joints yet")
    node.sensors.on_joint_state(
        wire(m.joint_state(["f2", "j3", "j1", "f1", "j2"], [0.01, 3, 1, 0.02, 2], 5.0))
    )
    node.sensors.on_image("front", wire(m.rgb_to_image(rgb, 5.0, encoding="bgr8")))
    assert node.sensors.assemble()[1] == "no wrist_rgb yet"
    node.sensors.on_image("wrist", wire(m.rgb_to_compressed_image(rgb, 5.0, fmt="png")))
    obs, problem = node.sensors.assemble()
    assert problem == ""
    assert obs["joint_pos"].tolist() == [1, 2, 3] and obs["gripper"] == pytest.approx([0.03])
    assert obs["front_rgb"].shape == (16, 16, 3) and np.array_equal(obs["front_rgb"], obs["wrist_rgb"])
    assert np.abs(obs["front_rgb"].astype(int) - rgb[::2, ::2]).mean() < 80  # resized, in RGB order
    clock.now += 0.15
    node.sensors.on_joint_state(wire(m.joint_state(cfg.joint_names + ["f1", "f2"], [1, 2, 3, 0, 0], 5.1)))
    clock.now += 0.1  # the cameras are 0.25 s old, the joints 0.1 s
    obs, problem = node.sensors.assemble()
    assert obs is None and problem.startswith("front_rgb is stale (0.250 s old")


def test_a_one_joint_gripper_maps_its_joint_to_the_opening():
    """A Robotiq 2F-85's finger_joint: 0 rad is open (85 mm), 0.8 rad closed; NaN in the map is refused."""
    node = RobotNodeLogic(
        config(gripper_joints=["finger_joint"], gripper_scale=-0.10625, gripper_offset=0.085), clock=Clock()
    )
    for angle, opening in [(0.0, 0.085), (0.4, 0.0425), (0.8, 0.0)]:
        node.sensors.on_joint_state(
            wire(m.joint_state(["j1", "j2", "j3", "finger_joint"], [1, 2, 3, angle], 5.0))
        )
        assert node.sensors.assemble()[0]["gripper"] == pytest.approx([opening], abs=1e-7)
    with pytest.raises(ConfigError, match="gripper_scale: must be a number"):
        config(gripper_joints=["finger_joint"], gripper_scale=float("nan"))


def test_joint_states_are_taken_by_name_whatever_the_driver_sends():
    """Another order, extra joints (wheels), the gripper in a message of its own: each joint by its name. A
    joint never measured holds with its name; a message that cannot be read is refused and the hold says why."""
    clock = Clock()
    node = RobotNodeLogic(config(gripper_joints=["f1", "f2"], max_sensor_age_s=0.2), clock=clock)
    node.sensors.on_joint_state(wire(m.joint_state(["wheel_l", "j3", "j1", "wheel_r"], [9, 3, 1, 8], 5.0)))
    obs, problem = node.sensors.assemble()
    assert obs is None and problem.startswith("no joint 'j2' measured yet (the last JointState has [")
    node.sensors.on_joint_state(wire(m.joint_state(["j2", "j1", "j3"], [2, 1, 3], 5.0)))
    assert node.sensors.assemble()[1].startswith("no joint 'f1' measured yet")
    node.sensors.on_joint_state(wire(m.joint_state(["f2", "f1"], [0.01, 0.02], 5.0)))  # the gripper's driver
    obs, problem = node.sensors.assemble()
    assert (
        problem == "" and obs["joint_pos"].tolist() == [1, 2, 3] and obs["gripper"] == pytest.approx([0.03])
    )
    node.sensors.on_joint_state(wire(m.joint_state(["base_x"], [7.0], 5.1)))  # another device's: ignored
    clock.now += 0.1
    node.sensors.on_joint_state(wire(m.joint_state(["j1", "j2", "j3"], [4, 5, 6], 5.2)))
    clock.now += 0.15  # the arm is fresh, the fingers (0.25 s) are not: the whole joint state is stale
    obs, problem = node.sensors.assemble()
    assert obs is None and problem.startswith("joints is stale (0.250 s old")
    bad = wire(m.joint_state(["f1", "f2"], [0.0, 0.0], 5.3))
    bad.position = bad.position[:1]
    with pytest.raises(ValueError, match="2 names but 1 positions"):
        node.sensors.on_joint_state(bad)
    assert node.sensors.assemble()[1].endswith(
        "its last message was refused: JointState has 2 names but 1 positions (['f1', 'f2'])"
    )


def test_a_joint_without_a_reading_is_refused_and_a_non_finite_hold_sends_nothing():
    """A driver's NaN position is never observed nor held at (absolute actions hold the measured joints:
    a NaN hold recursed until the stack ran out); a policy's NaN action is a hold."""
    clock = Clock()
    cfg = config(action_mode="absolute", action_dim=3, dry_run=False)
    node = RobotNodeLogic(cfg, clock=clock)
    node.state = ACTIVE
    with pytest.raises(ValueError, match="JointState position of 'j2' is nan"):
        node.sensors.on_joint_state(wire(m.joint_state(JOINTS, [0.1, np.nan, 0.3], 1.0)))
    assert node.sensors.assemble()[1].endswith("refused: JointState position of 'j2' is nan")
    feed(node)
    hold = node._command(np.array([0.2, np.nan, 0.1]), None, POLICY)
    assert hold.action.tolist() == [0.1, 0.2, 0.3] and hold.reason.startswith("non-finite action from policy")
    node.sensors._latest["joint:j2"].value = np.nan  # as if the check were bypassed: still no recursion
    nothing = node._hold_tick("stale", "stale")
    assert nothing.commands == () and nothing.reason.endswith("no finite hold to send")


def test_a_bad_image_is_refused_and_the_hold_names_it():
    node = RobotNodeLogic(config(camera_names=["front"], camera_topics=["/front/image_raw"]), clock=Clock())
    feed(node)
    image = wire(m.rgb_to_image(np.zeros((4, 4, 3), np.uint8), 1.0))
    image.encoding = "yuv422"
    with pytest.raises(ValueError, match="'yuv422' is not supported"):
        node.sensors.on_image("front", image)
    problem = node.sensors.assemble()[1]
    assert problem.startswith("no front_rgb yet; its last message was refused: Image encoding 'yuv422'")


def test_limits_box_joints_velocity_and_workspace():
    box = config(action_low=[-1] * 4, action_high=[1] * 4)
    assert apply_limits(np.array([2.0, -3.0, 0.5, 9.0]), {}, box).tolist() == [1, -1, 0.5, 1]
    absolute = config(
        action_mode="absolute", joint_lower=[-1, -1, -1], joint_upper=[1, 1, 1], max_joint_velocity=1.0
    )
    obs = {"joint_pos": np.array([0.0, 0.95, -0.5])}
    limited = apply_limits(np.array([0.5, 2.0, -0.52, 0.7]), obs, absolute)
    assert limited == pytest.approx([0.1, 1.0, -0.52, 0.7])  # 1 rad/s at 10 Hz: 0.1 rad per tick
    cartesian = config(ee_pose="fk", fk_dh=[0.0] * 12, workspace_low=[0, 0, 0.1], workspace_high=[1, 1, 1])
    limited = apply_limits(np.array([1.0, 0.0, -1.0, 1.0]), {"ee_pos": np.array([0.5, 0.5, 0.11])}, cartesian)
    assert limited == pytest.approx([1.0, 0.0, -1 / 3, 1.0])  # 3 cm down would leave the box: 1 cm


# -- the node with a real agent and fleet server --------------------------------------------------------------


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "token"
    path.write_text("robot-token\n")
    return str(path)


def make_node(server, token_file, clock, policy, **overrides):
    cfg = config(fleet=server.address, token_file=token_file, **overrides)
    return RobotNodeLogic(
        cfg, make_agent=lambda c: default_agent(c, policy), clock=clock, wall_clock=lambda: 42.5
    )


def feed(node, positions=(0.1, 0.2, 0.3)):
    node.sensors.on_joint_state(wire(m.joint_state(JOINTS, positions, 1.0)))


def test_lifecycle_dry_run_stop_deadman_and_episodes(server, token_file):
    clock = Clock()
    node = make_node(server, token_file, clock, ConstantPolicy([0.5, 0, 0, 1.0]), max_sensor_age_s=0.5)
    assert node.tick().reason == "node is unconfigured"
    with pytest.raises(TransitionError, match="cannot activate a node that is unconfigured"):
        node.activate()
    node.configure()
    assert node.state == INACTIVE
    wait_until(lambda: node.agent.client.state.mode == pb.MODE_AUTONOMOUS, 10, "the server's first command")
    node.activate()
    assert node.state == ACTIVE and node.tick().control == "stale"  # no joint state yet: hold

    # Dry run (the default): the command is computed but not published, nothing is logged to the fleet.
    feed(node)
    tick = node.tick()
    assert tick.control == "dry_run" and not tick.published
    assert m.float_array(wire(tick.commands[0][1])).tolist() == [0.5, 0, 0, 1.0]
    assert not node.agent.in_episode

    node.config.dry_run = False
    tick = node.tick()
    assert tick.published and tick.control == POLICY and tick.commands[0][0] == node.config.command_topic
    assert node.agent.in_episode

    clock.now += 0.6  # the deadman: joints older than max_sensor_age_s -> zero motion, gripper kept
    tick = node.tick()
    assert tick.control == "stale" and tick.action.tolist() == [0, 0, 0, 1.0] and tick.published

    feed(node)
    node.on_protective_stop(TS.types["std_msgs/msg/Bool"](data=True))
    node.on_protective_stop(TS.types["std_msgs/msg/Bool"](data=False))  # latched: false does not clear it
    tick = node.tick()
    assert tick.reason == "protective stop" and tick.action.tolist() == [0, 0, 0, 1.0]
    node.clear_protective_stop()
    assert node.tick().control == POLICY

    tick = node.deactivate()
    assert tick.published and tick.action.tolist() == [0, 0, 0, 1.0] and node.state == INACTIVE
    assert not node.agent.in_episode
    node.shutdown()
    assert node.state == FINALIZED and node.agent is None
    server.stop()
    store = EpisodeStore.open(server.config.store)
    assert store.num_episodes == 1
    meta = store.episode_meta(0)
    assert (meta.robot_id, meta.outcome) == ("robot_0", "stopped")
    steps = store.episode(0)
    # 4 ticks reached the agent: policy, (stale: none), stop (a violation hold), policy
    assert len(steps["action"]) == 3 and steps["action"][0].tolist() == [0.5, 0, 0, 1.0]
    assert steps["joint_pos"][0] == pytest.approx([0.1, 0.2, 0.3])


def test_absolute_mode_trajectory_output_holds_measured_joints(server, token_file):
    clock = Clock()
    node = make_node(
        server,
        token_file,
        clock,
        ConstantPolicy([1.0, 1.0, 1.0, 0.0]),
        action_dim=4,
        action_mode="absolute",
        output="joint_trajectory",
        max_joint_velocity=0.5,
        dry_run=False,
        max_episode_steps=2,
    )
    node.configure()
    wait_until(lambda: node.agent.client.state.mode == pb.MODE_AUTONOMOUS, 10, "the server's first command")
    node.activate()
    feed(node)
    traj = wire(node.tick().commands[0][1])
    assert traj.joint_names == JOINTS and traj.points[0].positions == pytest.approx([0.15, 0.25, 0.35])
    assert traj.points[0].time_from_start.nanosec == 100_000_000  # one control period
    node.tick()
    assert not node.agent.in_episode  # max_episode_steps: ended as a timeout, the next tick begins another
    node.tick()
    assert node.agent.in_episode
    node.on_protective_stop(TS.types["std_msgs/msg/Bool"](data=True))
    held = wire(node.tick().commands[0][1])  # the agent holds (a violation): where the joints are
    assert held.points[0].positions == pytest.approx([0.1, 0.2, 0.3])
    clock.now += 1.0
    hold = wire(node.tick().commands[0][1])
    assert hold.points[0].positions == pytest.approx([0.1, 0.2, 0.3])  # stale: hold where the joints are
    node.shutdown()
    server.stop()
    store = EpisodeStore.open(server.config.store)
    assert [store.episode_meta(i).outcome for i in range(store.num_episodes)] == ["timeout", "timeout"]
    # The episode holds what the limits let through, not what the policy asked for, and a hold of
    # absolute actions is logged as the measured joints (not "go to zero").
    assert store.episode(0)["action"][0] == pytest.approx([0.15, 0.25, 0.35, 0.0])
    assert store.episode(1)["action"][1] == pytest.approx([0.1, 0.2, 0.3, 0.0])


def test_twist_output_and_unconfigured_shutdown():
    cfg = config(output="twist_stamped", dry_run=False)
    node = RobotNodeLogic(cfg, wall_clock=lambda: 3.5)
    twist = wire(node._command(np.array([1.0, -0.5, 0.0, 0.0]), None, POLICY).commands[0][1])
    assert (twist.twist.linear.x, twist.twist.linear.y) == pytest.approx((0.3, -0.15))  # 3 cm x 10 Hz
    assert twist.header.frame_id == "base_link" and m.stamp_seconds(twist) == 3.5
    assert node.shutdown() is None and node.state == FINALIZED


def test_latest_checkpoint_is_fetched_verified_and_drives_the_node(
    server, token_file, tmp_path, one_torch_thread, caplog
):
    """checkpoint "latest": the registry's newest version is fetched (sha256-checked) and run; a later one
    that does not fit the robot is not swapped in; a damaged one is never loaded, and the node stays
    unconfigured saying why."""

    from fleet.client import publish_checkpoint
    from policies.checkpoint import save_checkpoint
    from policies.models import ShapeMeta, build_policy
    from tests.test_registry import tamper

    meta = ShapeMeta(obs={"joint_pos": (3,)}, action_dim=4, goal_dim=3)
    policy = build_policy("mlp", meta, horizon=8, n_action_steps=4, hidden_dims=(16,))
    rng = np.random.default_rng(0)
    policy.normalizer.fit(
        {
            "joint_pos": rng.uniform(-1, 1, (64, 3)),
            "action": rng.uniform(-1, 1, (64, 4)),
            "goal": rng.uniform(0, 1, (64, 3)),
        }
    )
    folder = save_checkpoint(tmp_path / "ckpt", policy, meta, "v7")
    publish_checkpoint(server.address, "trainer-token", folder, "v7")

    cfg = config(
        fleet=server.address, token_file=token_file, checkpoint="latest", cache_dir=str(tmp_path / "cache")
    )
    node = RobotNodeLogic(cfg)
    node.configure()
    node.activate()
    feed(node)
    tick = node.tick()
    assert node.agent.version == "v7" and tick.control == "dry_run"
    assert tick.action.shape == (4,) and np.all(np.isfinite(tick.action))
    # A later version for another robot (5 joints) reaches it: refused, v7 keeps driving.
    other = ShapeMeta(obs={"joint_pos": (5,)}, action_dim=4, goal_dim=3)
    misfit = build_policy("mlp", other, horizon=8, n_action_steps=4, hidden_dims=(16,))
    publish_checkpoint(
        server.address, "trainer-token", save_checkpoint(tmp_path / "v8", misfit, other, "v8"), "v8"
    )
    with caplog.at_level(logging.ERROR, logger="fleet.agent"):
        wait_until(
            lambda: node.agent.poll_policy() is None and "version v8 failed" in caplog.text, 10, "v8 refused"
        )
    assert (
        "v8 does not fit robot robot_0: joint_pos is (5,) in the checkpoint, (3,) on this robot"
        in caplog.text
    )
    assert node.agent.poll_policy() is None and node.agent.version == "v7"
    node.shutdown()

    tamper(Path(server.config.registry_dir) / "v8" / "model.safetensors")  # the latest
    damaged = RobotNodeLogic(config(**{**vars(cfg), "cache_dir": str(tmp_path / "cache2")}))
    with pytest.raises(
        ConfigError, match="checkpoint: the registry at .* refused 'latest': DATA_LOSS: .*v8"
    ) as err:
        damaged.configure()
    assert "\n" not in str(err.value) and "damaged" in str(err.value)
    assert damaged.state == UNCONFIGURED and damaged.agent is None
    # A download whose bytes do not hash to what the server says (a man in the middle, a bad disk on its
    # side): the SDK's own check, one line too.
    from fleet.client.registry import CheckpointError as FetchError

    def corrupted(version):
        raise FetchError(
            f"fetch of policy version 'v7' from {server.address}: file 'model.safetensors' "
            "does not match its sha256: ...; nothing was kept"
        )

    with pytest.raises(
        ConfigError, match="checkpoint: fetch of policy version 'v7' .* does not match its sha256"
    ):
        first_policy(cfg, corrupted)
    # a damaged local folder (format 1, its weights truncated)
    folder = shutil.copytree(V1 / "mlp_ensemble", tmp_path / "truncated")
    (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:100])
    with pytest.raises(
        ConfigError, match="checkpoint: .*truncated/model.safetensors: damaged safetensors file"
    ):
        first_policy(config(checkpoint=str(folder)), None)


# -- checkpoints that fit the robot, or do not ------------------------------------------------------------------

V1 = Path(__file__).resolve().parent / "fixtures" / "checkpoints_v1"  # written by the project's first format


def panda_config(**overrides):
    from tests.ros_harness import PANDA_JOINTS

    values = dict(
        joint_names=PANDA_JOINTS,
        camera_names=["front"],
        camera_topics=["/front/image_raw"],
        image_size=24,
        ee_pose="fk",
        fk_dh=PANDA_DH,
        fk_tcp=PANDA_TCP,
        goal=[0.5, 0.0, 0.2],
    )
    return RosRobotConfig(**{**values, **overrides})


@pytest.mark.parametrize("source", ["folder", "registry"])
def test_a_first_format_checkpoint_drives_the_node_as_it_acted_when_written(
    server, token_file, one_torch_thread, tmp_path, source
):
    """tests/fixtures/checkpoints_v1/mlp_images (format 1) through the node's own paths (checkpoint: its
    folder, or "latest" after it was published to the registry): the recorded camera frame and the joints
    (ee_pos by fk) give the action recorded with it."""
    import base64
    import json

    from fleet.client import publish_checkpoint

    record = json.loads((V1 / "expected.json").read_text())
    frame = record["inputs"][0]
    rgb = np.frombuffer(base64.b64decode(frame["front_rgb"]["uint8_b64"]), np.uint8)
    rgb = rgb.reshape(frame["front_rgb"]["shape"])
    checkpoint, version = str(V1 / "mlp_images"), "mlp_images-v1"
    if source == "registry":
        publish_checkpoint(server.address, "trainer-token", V1 / "mlp_images", "old-v1")
        checkpoint, version = "latest", "old-v1"
    cfg = panda_config(
        fleet=server.address,
        token_file=token_file,
        checkpoint=checkpoint,
        goal=frame["goal"],
        cache_dir=str(tmp_path / "cache"),
    )
    node = RobotNodeLogic(cfg)
    node.configure()
    try:
        node.activate()
        node.sensors.on_joint_state(wire(m.joint_state(cfg.joint_names, frame["joint_pos"], 1.0)))
        node.sensors.on_image("front", wire(m.rgb_to_image(rgb, 1.0)))
        tick = node.tick()
        assert node.agent.version == version and tick.control == "dry_run"
        expected = record["expected"]["mlp_images"]["num_samples_1"]["actions"][0]
        assert tick.action == pytest.approx(expected, abs=1e-4)  # no action box in this config
    finally:
        node.shutdown()


def test_a_checkpoint_for_another_robot_is_refused_at_configure(tmp_path, token_file, one_torch_thread):
    """A 7-joint arm given a policy trained on 3 joints (and one with another camera size, action size and
    goal): one ConfigError line at configure naming each mismatch, before any fleet session or tick."""
    from policies.checkpoint import save_checkpoint
    from policies.models import ShapeMeta, build_policy

    meta = ShapeMeta(obs={"joint_pos": (3,), "wrist_rgb": (24, 24, 3)}, action_dim=4, goal_dim=3)
    policy = build_policy("mlp", meta, horizon=8, n_action_steps=4, hidden_dims=(16,))
    folder = save_checkpoint(tmp_path / "three_joints", policy, meta, "v3")
    cfg = panda_config(fleet="127.0.0.1:1", token_file=token_file, checkpoint=str(folder), action_dim=8)
    node = RobotNodeLogic(cfg)
    with pytest.raises(ConfigError) as err:
        node.configure()
    message = str(err.value)
    assert message.startswith("checkpoint: v3 does not fit robot robot_0: ") and "\n" not in message
    assert "it observes wrist_rgb (24, 24, 3), which this robot does not" in message
    assert "joint_pos is (3,) in the checkpoint, (7,) on this robot" in message
    assert "its actions have 4 values, action_dim is 8" in message
    assert node.state == UNCONFIGURED and node.agent is None
    old = panda_config(token_file=token_file, checkpoint=str(V1 / "gc_diffusion"), goal=[0.5, 0.0])
    with pytest.raises(ConfigError, match="its goal has 3 values, goal has 2"):
        RobotNodeLogic(old).configure()
    with pytest.raises(ConfigError, match="trained with 0.03 m per action unit, ee_step_m is 0.05"):
        RobotNodeLogic(
            panda_config(token_file=token_file, checkpoint=str(V1 / "mlp_images"), ee_step_m=0.05)
        ).configure()
    with pytest.raises(ConfigError, match="checkpoint: .*none is not a checkpoint folder"):
        RobotNodeLogic(panda_config(token_file=token_file, checkpoint=str(tmp_path / "none"))).configure()


def test_the_ur5e_parameter_file_drives_a_ur5e(server, token_file):
    """config/ur5e.yaml as shipped: joint states in ur_robot_driver's order (elbow first, and no others) go
    to the policy in the file's order, ee_pos is UR's standard-DH flange, and the command is a 6-joint
    JointTrajectory limited to max_joint_velocity from the measured joints."""
    from fleet.ros2.runner import load_params
    from tests.fleet_harness import ROOT

    params = load_params(ROOT / "ros_ws/src/flotilla_ros/config/ur5e.yaml")
    params.update(
        fleet=server.address, token_file=token_file, camera_names=[], camera_topics=[], dry_run=False
    )
    cfg = config_from_params(params)
    node = RobotNodeLogic(cfg, make_agent=lambda c: default_agent(c, ConstantPolicy([0.5] * 6)))
    node.configure()
    try:
        wait_until(
            lambda: node.agent.client.state.mode == pb.MODE_AUTONOMOUS, 10, "the server's first command"
        )
        node.activate()
        driver_order = ["elbow_joint", "shoulder_lift_joint", "shoulder_pan_joint", "wrist_1_joint"]
        driver_order += ["wrist_2_joint", "wrist_3_joint"]
        q = {name: 0.1 * (i + 1) for i, name in enumerate(cfg.joint_names)}  # pan 0.1 ... wrist_3 0.6
        node.sensors.on_joint_state(wire(m.joint_state(driver_order, [q[n] for n in driver_order], 1.0)))
        obs, problem = node.sensors.assemble()
        assert problem == "" and obs["joint_pos"] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
        expected = standard_dh_product(obs["joint_pos"].astype(float), UR5E_TABLE)
        assert obs["ee_pos"] == pytest.approx(expected[:3, 3], abs=1e-6)
        tick = node.tick()
        assert (
            tick.published and tick.commands[0][0] == "/scaled_joint_trajectory_controller/joint_trajectory"
        )
        trajectory = wire(tick.commands[0][1])
        assert trajectory.joint_names == cfg.joint_names
        step = 0.5 / cfg.rate_hz  # 0.5 rad/s at 10 Hz from where each joint is
        assert trajectory.points[0].positions == pytest.approx(
            [min(0.5, v + step) if v < 0.5 else max(0.5, v - step) for v in obs["joint_pos"]], abs=1e-6
        )
    finally:
        node.shutdown()
