"""The Flotilla robot node: a ROS 2 lifecycle node around fleet/ros2's RobotNodeLogic (the fleet's RobotAgent).

The only module that imports rclpy. It declares the parameters (fleet.ros2.node.RosRobotConfig), moves
messages in (JointState, Image / CompressedImage with sensor-data QoS, a latched std_msgs/Bool protective
stop, a TF lookup for the end-effector pose) and commands out (Float64MultiArray, JointTrajectory or
TwistStamped, lifecycle publishers: nothing leaves an inactive node), and runs the control tick on a timer in
its own callback group under a MultiThreadedExecutor, so sensor callbacks never wait behind a tick.
Everything that decides what the robot does is RobotNodeLogic's, unit-tested without ROS.

    ros2 run flotilla_ros robot_node --ros-args --params-file config/robot.yaml
    ros2 lifecycle set /robot_0/flotilla_robot configure && ... activate   (robot.launch.py does both)
    ros2 service call /robot_0/flotilla_robot/clear_protective_stop std_srvs/srv/Trigger
"""

from __future__ import annotations

import array
import importlib
import threading

import rclpy
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.exceptions import ParameterUninitializedException
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.lifecycle import Node, State, TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from rclpy.signals import SignalHandlerOptions
from rclpy.time import Time

from fleet.ros2 import messages as m
from fleet.ros2.node import NODE_NAME, OUTPUT_TYPES, RobotNodeLogic, config_from_params, parameter_types

PARAMETER_TYPES = {
    "string": Parameter.Type.STRING,
    "integer": Parameter.Type.INTEGER,
    "double": Parameter.Type.DOUBLE,
    "bool": Parameter.Type.BOOL,
    "string_array": Parameter.Type.STRING_ARRAY,
    "double_array": Parameter.Type.DOUBLE_ARRAY,
}
# Reliable and volatile: it matches every publisher (a transient-local subscription would silently miss a
# volatile publisher's stop); the node latches the stop itself.
STOP_QOS = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.VOLATILE)


def message_class(ros_type: str):
    """ "std_msgs/msg/Bool" -> std_msgs.msg.Bool."""
    module, name = ros_type.rsplit("/", 1)
    return getattr(importlib.import_module(module.replace("/", ".")), name)


# rclpy's messages: sequences as array.array (what their setters take without a per-element check).
RCLPY = m.MessageKit(
    make=message_class,
    floats=lambda values: array.array("d", values.tobytes()),
    octets=lambda values: array.array("B", values.tobytes()),
)


class FlotillaRobotNode(Node):
    def __init__(self, **kwargs):
        super().__init__(NODE_NAME, **kwargs)
        for name, kind in parameter_types().items():
            self.declare_parameter(name, PARAMETER_TYPES[kind])  # typed, unset: the config's default applies
        self.logic: RobotNodeLogic | None = None
        self._entities: list = []
        self._command_publishers: dict = {}  # topic -> lifecycle publisher (rclpy's Node owns _publishers)
        self._lock = threading.Lock()  # ticks and transitions do not interleave
        self._tf = None

    # -- lifecycle
    def on_configure(self, state: State) -> TransitionCallbackReturn:
        params = {}
        for name in parameter_types():
            try:
                value = self.get_parameter(name).value
            except ParameterUninitializedException:  # typed, not given: RosRobotConfig's default
                continue
            params[name] = list(value) if isinstance(value, list | tuple | array.array) else value
        try:
            config = config_from_params(params)
            ee_pose = self._tf_pose if config.ee_pose == "tf" else None
            self.logic = RobotNodeLogic(
                config, kit=RCLPY, wall_clock=self._now_s, ee_pose=ee_pose, rivals=self._rivals
            )
            self.logic.configure()
        except Exception as err:  # a config error is one line; the node stays unconfigured
            self.get_logger().error(f"configure failed: {err}")
            self.logic = None
            return TransitionCallbackReturn.FAILURE
        if config.ee_pose == "tf":
            from tf2_ros import Buffer, TransformListener

            buffer = Buffer()
            self._tf = (buffer, TransformListener(buffer, self))
        sensors = ReentrantCallbackGroup()
        on = self.logic.sensors
        self._entities.append(
            self.create_subscription(
                message_class("sensor_msgs/msg/JointState"),
                config.joint_states_topic,
                self._guard(on.on_joint_state),
                qos_profile_sensor_data,
                callback_group=sensors,
            )
        )
        for name, topic in zip(config.camera_names, config.camera_topics, strict=True):
            kind = "CompressedImage" if topic.endswith("/compressed") else "Image"
            self._entities.append(
                self.create_subscription(
                    message_class(f"sensor_msgs/msg/{kind}"),
                    topic,
                    self._guard(lambda msg, name=name: on.on_image(name, msg)),
                    qos_profile_sensor_data,
                    callback_group=sensors,
                )
            )
        self._entities.append(
            self.create_subscription(
                message_class("std_msgs/msg/Bool"),
                config.protective_stop_topic,
                self.logic.on_protective_stop,
                STOP_QOS,
                callback_group=sensors,
            )
        )
        self._entities.append(
            self.create_service(
                message_class("std_srvs/srv/Trigger"), "~/clear_protective_stop", self._clear_stop
            )
        )
        self._command_publishers = {
            config.command_topic: self.create_lifecycle_publisher(
                message_class(OUTPUT_TYPES[config.output]), config.command_topic, 10
            )
        }
        if config.gripper_topic:
            self._command_publishers[config.gripper_topic] = self.create_lifecycle_publisher(
                message_class("std_msgs/msg/Float64MultiArray"), config.gripper_topic, 10
            )
        self._timer = self.create_timer(
            config.period_s, self._tick, callback_group=MutuallyExclusiveCallbackGroup()
        )
        self.get_logger().info(
            f"configured robot {config.robot_id} ({'dry run' if config.dry_run else 'LIVE'}) -> {config.fleet}"
        )
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: State) -> TransitionCallbackReturn:
        with self._lock:
            self.logic.activate()
        return super().on_activate(state)

    def on_deactivate(self, state: State) -> TransitionCallbackReturn:
        with self._lock:
            self._publish(self.logic.deactivate())  # the hold goes out before the publishers close
        return super().on_deactivate(state)

    def on_cleanup(self, state: State) -> TransitionCallbackReturn:
        with self._lock:
            self.logic.cleanup()
            self._teardown()
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: State) -> TransitionCallbackReturn:
        with self._lock:
            if self.logic is not None:
                self._publish(self.logic.shutdown())
            self._teardown()
        return TransitionCallbackReturn.SUCCESS

    def _teardown(self) -> None:
        if getattr(self, "_timer", None) is not None:
            self.destroy_timer(self._timer)
            self._timer = None
        for entity in self._entities:
            (self.destroy_service if hasattr(entity, "srv_type") else self.destroy_subscription)(entity)
        for publisher in self._command_publishers.values():
            self.destroy_lifecycle_publisher(publisher)
        self._entities, self._command_publishers, self.logic = [], {}, None

    # -- callbacks
    def _guard(self, callback):
        def guarded(msg):
            try:
                callback(msg)
            except Exception as err:  # a bad message (wrong encoding, missing joint) is logged, never fatal
                self.get_logger().warning(f"{type(err).__name__}: {err}", throttle_duration_sec=5.0)

        return guarded

    def _tick(self) -> None:
        with self._lock:
            if self.logic is None:
                return
            try:
                tick = self.logic.tick()
            except Exception as err:  # raised out of the timer it would end the executor: hold instead
                self.get_logger().error(
                    f"tick failed: {type(err).__name__}: {err}", throttle_duration_sec=2.0
                )
                tick = self.logic.failed(err)
            self._publish(tick)
        if tick.reason and tick.control in ("stale", "hold", "rival"):
            self.get_logger().warning(f"holding: {tick.reason}", throttle_duration_sec=2.0)
        elif tick.control == "dry_run":
            action = [round(float(a), 4) for a in tick.action]
            self.get_logger().info(f"dry run, not published: {action}", throttle_duration_sec=1.0)

    def _publish(self, tick) -> None:
        if tick is not None and tick.published:
            for topic, msg in tick.commands:
                self._command_publishers[topic].publish(msg)

    def _clear_stop(self, request, response):
        self.logic.clear_protective_stop()
        response.success, response.message = True, "protective stop cleared"
        return response

    def _tf_pose(self):
        buffer, _listener = self._tf
        config = self.logic.config
        try:
            transform = buffer.lookup_transform(config.base_frame, config.ee_frame, Time()).transform
        except Exception:  # not yet available or too old: the tick holds and says why
            return None
        t, r = transform.translation, transform.rotation
        return (t.x, t.y, t.z), (r.x, r.y, r.z, r.w)

    def _rivals(self) -> int:
        """Publishers on the command topic other than this node's own (the graph counts ours too)."""
        return max(0, self.count_publishers(self.logic.config.command_topic) - 1)

    def _now_s(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9


def main(args=None) -> None:
    # Ctrl-C reaches us as KeyboardInterrupt with the context still up, so the stop below can publish.
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    node = FlotillaRobotNode()
    executor = MultiThreadedExecutor()
    executor.add_node(node)
    try:
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        with node._lock:  # a clean stop: hold, end the episode, flush the fleet session
            if node.logic is not None:
                node._publish(node.logic.shutdown())
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    main()
