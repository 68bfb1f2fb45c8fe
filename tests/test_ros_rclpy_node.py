"""The rclpy node module (ros_ws/src/flotilla_ros/flotilla_ros/robot_node.py) run against a stand-in for
rclpy, which cannot be installed here: it drives the module's own code (parameters -> config, lifecycle
callbacks, subscriptions and their QoS, lifecycle publishers, the tick, dry-run logging, the protective
stop and its service, the stop on shutdown) with messages built as rclpy builds them (array.array
sequences) from ROS 2 Jazzy's definitions (rosbags), a real RobotAgent and a real fleet server.

The stand-in follows rclpy's API as its sources define it (Node's parameter declaration by type,
ParameterUninitializedException, LifecycleNode's publishers that drop messages while inactive,
TransitionCallbackReturn); that the real rclpy behaves so is what only a ROS install can confirm.
"""

import array
import enum
import functools
import importlib.util
import sys
import types

import numpy as np
import pytest
from rosbags.typesys import Stores, get_typestore

from fleet.proto import flotilla_pb2 as pb
from fleet.ros2 import messages as m
from fleet.ros2.node import NODE_NAME, RobotNodeLogic, default_agent
from tests.fleet_harness import ROOT, wait_until
from tests.test_ros_node import JOINTS, ConstantPolicy

TS = get_typestore(Stores.ROS2_JAZZY)
NODE_MODULE = ROOT / "ros_ws/src/flotilla_ros/flotilla_ros/robot_node.py"


class ParameterUninitializedException(Exception):
    pass


class Parameter:
    class Type(enum.Enum):
        NOT_SET, BOOL, INTEGER, DOUBLE, STRING, STRING_ARRAY, DOUBLE_ARRAY = range(7)

    def __init__(self, name, value=None):
        self.name, self.value = name, value


class TransitionCallbackReturn(enum.Enum):
    SUCCESS, FAILURE, ERROR = range(3)


class Logger:
    def __init__(self):
        self.lines = []

    def _log(self, level, text, **_throttle):
        self.lines.append((level, text))

    info = functools.partialmethod(_log, "info")
    warning = functools.partialmethod(_log, "warning")
    error = functools.partialmethod(_log, "error")


class LifecyclePublisher:
    """rclpy's: publish() while inactive drops the message (and warns)."""

    def __init__(self, msg_type, topic, qos):
        self.msg_type, self.topic, self.qos = msg_type, topic, qos
        self.active, self.sent = False, []

    def publish(self, msg):
        assert isinstance(msg, self.msg_type)
        if self.active:
            self.sent.append(msg)


class Entity:
    def __init__(self, kind, msg_type, name, callback, qos=None, callback_group=None):
        self.kind, self.msg_type, self.name, self.callback = kind, msg_type, name, callback
        self.qos, self.callback_group = qos, callback_group
        if kind == "service":
            self.srv_type = msg_type


class LifecycleNode:
    """The parts of rclpy.lifecycle.LifecycleNode (rclpy.node.Node) robot_node.py uses."""

    def __init__(self, node_name, *, namespace="", parameter_overrides=()):
        self._name, self._namespace = node_name, namespace
        self._overrides = {p.name: p.value for p in parameter_overrides}
        self._parameters, self._publishers, self._subscriptions, self._services, self._timers = (
            {},
            [],
            [],
            [],
            [],
        )
        self._logger = Logger()
        self.managed = []
        self.others = {}  # topic -> publishers of other nodes (the ROS graph)

    def count_publishers(self, topic):
        return sum(p.topic == topic for p in self.managed) + self.others.get(topic, 0)

    def declare_parameter(self, name, value=None, descriptor=None, ignore_override=False):
        assert isinstance(value, Parameter.Type) and name not in self._parameters
        self._parameters[name] = self._overrides.get(name)

    def get_parameter(self, name):
        if self._parameters[name] is None:
            raise ParameterUninitializedException(name)
        return Parameter(name, self._parameters[name])

    def create_subscription(self, msg_type, topic, callback, qos, *, callback_group=None):
        self._subscriptions.append(Entity("subscription", msg_type, topic, callback, qos, callback_group))
        return self._subscriptions[-1]

    def create_service(self, srv_type, name, callback):
        self._services.append(Entity("service", srv_type, name, callback))
        return self._services[-1]

    def create_lifecycle_publisher(self, msg_type, topic, qos):
        self.managed.append(LifecyclePublisher(msg_type, topic, qos))
        return self.managed[-1]

    def create_timer(self, period, callback, callback_group=None):
        self._timers.append(Entity("timer", None, period, callback, callback_group=callback_group))
        return self._timers[-1]

    def destroy_timer(self, timer):
        self._timers.remove(timer)

    def destroy_subscription(self, subscription):
        self._subscriptions.remove(subscription)

    def destroy_service(self, service):
        self._services.remove(service)

    def destroy_lifecycle_publisher(self, publisher):
        self.managed.remove(publisher)

    def on_activate(self, state):
        for publisher in self.managed:
            publisher.active = True
        return TransitionCallbackReturn.SUCCESS

    def on_deactivate(self, state):
        for publisher in self.managed:
            publisher.active = False
        return TransitionCallbackReturn.SUCCESS

    def get_logger(self):
        return self._logger

    def get_clock(self):
        return types.SimpleNamespace(now=lambda: types.SimpleNamespace(nanoseconds=12_500_000_000))

    def subscription(self, topic):
        [found] = [s for s in self._subscriptions if s.name == topic]
        return found


def message_modules() -> dict[str, types.ModuleType]:
    """`<pkg>.msg` / `<pkg>.srv` modules holding ROS 2 Jazzy's message classes (rosbags' dataclasses)."""
    modules: dict[str, types.ModuleType] = {}
    for name, cls in TS.types.items():
        package, kind, short = name.split("/")
        modules.setdefault(package, types.ModuleType(package))
        module = modules.setdefault(f"{package}.{kind}", types.ModuleType(f"{package}.{kind}"))
        setattr(module, short, cls)
    trigger = types.SimpleNamespace(
        Request=object, Response=lambda: types.SimpleNamespace(success=False, message="")
    )
    modules["std_srvs"] = types.ModuleType("std_srvs")
    modules["std_srvs.srv"] = types.ModuleType("std_srvs.srv")
    modules["std_srvs.srv"].Trigger = trigger
    return modules


@pytest.fixture
def robot_node(monkeypatch):
    """The module, imported with the stand-in rclpy; its logic's agent runs a constant policy."""
    rclpy = {
        "rclpy": {"init": lambda **_: None, "try_shutdown": lambda: None},
        "rclpy.callback_groups": {"MutuallyExclusiveCallbackGroup": object, "ReentrantCallbackGroup": object},
        "rclpy.exceptions": {"ParameterUninitializedException": ParameterUninitializedException},
        "rclpy.executors": {"ExternalShutdownException": RuntimeError, "MultiThreadedExecutor": object},
        "rclpy.lifecycle": {
            "Node": LifecycleNode,
            "State": object,
            "TransitionCallbackReturn": TransitionCallbackReturn,
        },
        "rclpy.parameter": {"Parameter": Parameter},
        "rclpy.qos": {
            "DurabilityPolicy": enum.Enum("DurabilityPolicy", "VOLATILE TRANSIENT_LOCAL"),
            "ReliabilityPolicy": enum.Enum("ReliabilityPolicy", "RELIABLE BEST_EFFORT"),
            "QoSProfile": lambda **kw: types.SimpleNamespace(**kw),
            "qos_profile_sensor_data": "sensor_data",
        },
        "rclpy.signals": {"SignalHandlerOptions": enum.Enum("SignalHandlerOptions", "ALL NO")},
        "rclpy.time": {"Time": object},
    }
    for name, attrs in rclpy.items():
        monkeypatch.setitem(sys.modules, name, types.SimpleNamespace(**attrs))
    for name, module in message_modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    spec = importlib.util.spec_from_file_location("flotilla_ros_robot_node", NODE_MODULE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    policy = ConstantPolicy([0.4, 0.0, 0.0, 1.0])
    monkeypatch.setattr(
        module,
        "RobotNodeLogic",
        functools.partial(RobotNodeLogic, make_agent=lambda c: default_agent(c, policy)),
    )
    return module


def params(server, token_file, **overrides):
    values = dict(fleet=server.address, token_file=token_file, joint_names=JOINTS, goal=[0.1, 0.2, 0.3])
    values.update(overrides)
    return [Parameter(name, value) for name, value in values.items()]


@pytest.fixture
def token_file(tmp_path):
    (tmp_path / "token").write_text("robot-token\n")
    return str(tmp_path / "token")


def joint_state(positions=(0.1, 0.2, 0.3)):
    """A JointState as rclpy hands it to a callback: array.array sequences."""
    return m.joint_state(JOINTS, positions, 1.0, kit=RCLPY_LIKE)


RCLPY_LIKE = m.MessageKit(floats=lambda a: array.array("d", a.tobytes()))


def test_node_module_configures_ticks_publishes_stops_and_shuts_down(
    robot_node, server, token_file, monkeypatch
):
    node = robot_node.FlotillaRobotNode(parameter_overrides=params(server, token_file))
    assert node._name == NODE_NAME
    assert robot_node.FlotillaRobotNode.__mro__[1] is LifecycleNode
    assert node.on_configure(None) == TransitionCallbackReturn.SUCCESS
    assert node.logic.config.dry_run is True and node.logic.config.rate_hz == 10.0  # unset: the defaults
    joints = node.subscription("/joint_states")
    assert joints.qos == "sensor_data" and joints.msg_type.__msgtype__ == "sensor_msgs/msg/JointState"
    stop = node.subscription("~/protective_stop")
    assert stop.qos.reliability.name == "RELIABLE" and stop.qos.durability.name == "VOLATILE"
    [publisher] = node.managed
    assert publisher.topic == "/flotilla/commands"
    [timer] = node._timers
    assert timer.name == pytest.approx(0.1)
    wait_until(
        lambda: node.logic.agent.client.state.mode == pb.MODE_AUTONOMOUS, 10, "the server's first command"
    )

    assert node.on_activate(None) == TransitionCallbackReturn.SUCCESS
    joints.callback(joint_state())
    timer.callback()
    assert publisher.sent == []  # dry run: logged, not published
    assert ("info", "dry run, not published: [0.4, 0.0, 0.0, 1.0]") in node.get_logger().lines

    node.logic.config.dry_run = False
    timer.callback()
    assert m.float_array(publisher.sent[-1]).tolist() == pytest.approx([0.4, 0, 0, 1.0])
    stop.callback(TS.types["std_msgs/msg/Bool"](data=True))
    timer.callback()
    assert m.float_array(publisher.sent[-1]).tolist() == [0, 0, 0, 1.0]  # held, gripper kept
    [clear] = node._services
    assert clear.name == "~/clear_protective_stop"
    assert clear.callback(None, clear.msg_type.Response()).success
    timer.callback()
    assert m.float_array(publisher.sent[-1])[0] == pytest.approx(0.4)
    monkeypatch.setattr("fleet.ros2.node.RIVALS_EVERY_S", 0.0)  # counted at every tick here
    node.others[publisher.topic] = 1  # a second node for this robot: neither publishes while both are up
    sent = len(publisher.sent)
    timer.callback()
    assert len(publisher.sent) == sent and node.get_logger().lines[-1] == (
        "warning",
        f"holding: not publishing: 1 other publisher(s) on {publisher.topic} (another node for robot robot_0?)",
    )
    node.others.clear()
    timer.callback()
    assert len(publisher.sent) == sent + 1
    policy = node.logic.agent.policy
    policy.act = lambda obs, goal=None: 1 / 0  # raised out of the timer, it would end the executor
    timer.callback()
    assert m.float_array(publisher.sent[-1]).tolist() == [0, 0, 0, 1.0]  # held, gripper kept
    assert node.get_logger().lines[-2:] == [
        ("error", "tick failed: ZeroDivisionError: division by zero"),
        ("warning", "holding: tick failed: ZeroDivisionError: division by zero"),
    ]
    del policy.act

    lines = len(node.get_logger().lines)
    joints.callback(  # another device's joints on the topic: not ours, nothing to say while ours arrive
        TS.types["sensor_msgs/msg/JointState"](
            header=m.header(0.0), name=["x"], position=np.zeros(1), velocity=np.zeros(0), effort=np.zeros(0)
        )
    )
    assert len(node.get_logger().lines) == lines
    joints.callback(  # a message that cannot be read: a warning, never fatal
        TS.types["sensor_msgs/msg/JointState"](
            header=m.header(0.0),
            name=["x", "y"],
            position=np.zeros(1),
            velocity=np.zeros(0),
            effort=np.zeros(0),
        )
    )
    level, text = node.get_logger().lines[-1]
    assert level == "warning" and text.startswith("ValueError: JointState has 2 names but 1 positions")

    sent = len(publisher.sent)
    assert node.on_deactivate(None) == TransitionCallbackReturn.SUCCESS
    assert len(publisher.sent) == sent + 1 and m.float_array(publisher.sent[-1]).tolist() == [0, 0, 0, 1.0]
    assert node.on_cleanup(None) == TransitionCallbackReturn.SUCCESS
    assert node.logic is None and not node._subscriptions and not node._timers and not node.managed
    assert node.on_shutdown(None) == TransitionCallbackReturn.SUCCESS


def test_bad_parameters_fail_configure_with_one_line(robot_node, server, token_file):
    node = robot_node.FlotillaRobotNode(parameter_overrides=params(server, token_file, output="servo"))
    assert node.on_configure(None) == TransitionCallbackReturn.FAILURE
    level, text = node.get_logger().lines[-1]
    assert (
        level == "error" and text.startswith("configure failed: output: must be one of") and "\n" not in text
    )
    assert node.logic is None and not node._subscriptions
