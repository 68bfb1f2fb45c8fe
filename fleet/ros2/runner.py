"""The robot node on DDS without ROS: RobotNodeLogic's topics through DdsTransport, its tick on a timer.

    flotilla robot ros_ws/src/flotilla_ros/config/robot.yaml [domain=0] [loopback=false] [+node.dry_run=false]

reads the same parameter file as `ros2 launch flotilla_ros robot.launch.py` (`<node>: ros__parameters:`),
so a robot computer without ROS joins the fleet with the ROS package's configuration. The node's private
names (`~/protective_stop`) resolve under `/<robot_id>/flotilla_robot`, as the launch file names the node.
Runs until SIGINT/SIGTERM, then stops cleanly (hold published, episode ended, fleet session flushed).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from configs.schema import ConfigError, check, check_int, register_job
from fleet.ros2 import dds
from fleet.ros2.node import (
    NODE_NAME,
    OUTPUT_TYPES,
    RobotNodeLogic,
    RosRobotConfig,
    config_from_params,
    default_agent,
)
from fleet.stop_signals import StopSignals

log = logging.getLogger(__name__)


def resolve(topic: str, robot_id: str) -> str:
    """ROS name resolution for the node `/<robot_id>/flotilla_robot`: "~/x" is private, "x" is in the
    robot's namespace, "/x" is absolute."""
    if topic.startswith("~"):
        return f"/{robot_id}/{NODE_NAME}{topic[1:]}"
    return topic if topic.startswith("/") else f"/{robot_id}/{topic}"


class DdsRobotNode:
    """RobotNodeLogic on DDS. `timing` records each tick: (start on the monotonic clock, seconds the tick
    took, sensor -> command latency: command published minus the stamp of the joint state it used, NaN when
    nothing was published); stamps are the publisher's wall clock, so the latency needs one clock (one
    machine, or PTP-synchronized ones)."""

    def __init__(
        self,
        config: RosRobotConfig,
        transport: dds.DdsTransport,
        make_agent: Callable = default_agent,
    ):
        # TF needs ROS (tf2); without it the pose comes from the joints (fk) or is not observed.
        check(
            config.ee_pose != "tf",
            "ee_pose",
            "tf needs a ROS install (tf2); on DDS alone use fk (fk_dh, fk_tcp)",
        )
        self.config, self.transport = config, transport
        self.logic = RobotNodeLogic(config, make_agent, rivals=self._rivals)
        self.timing: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        rid = config.robot_id
        transport.subscribe(
            resolve(config.joint_states_topic, rid),
            "sensor_msgs/msg/JointState",
            self.logic.sensors.on_joint_state,
            "sensor_data",
        )
        for name, topic in zip(config.camera_names, config.camera_topics, strict=True):
            kind = "CompressedImage" if topic.endswith("/compressed") else "Image"
            transport.subscribe(
                resolve(topic, rid),
                f"sensor_msgs/msg/{kind}",
                lambda msg, name=name: self.logic.sensors.on_image(name, msg),
                "sensor_data",
            )
        transport.subscribe(
            resolve(config.protective_stop_topic, rid),
            "std_msgs/msg/Bool",
            self.logic.on_protective_stop,
            "default",  # matches volatile and transient-local publishers; the node latches the stop
        )
        self._publishers = {
            config.command_topic: transport.publisher(
                resolve(config.command_topic, rid), OUTPUT_TYPES[config.output]
            )
        }
        if config.gripper_topic:
            self._publishers[config.gripper_topic] = transport.publisher(
                resolve(config.gripper_topic, rid), "std_msgs/msg/Float64MultiArray"
            )

    def _rivals(self) -> int:
        return self.transport.other_writers(
            resolve(self.config.command_topic, self.config.robot_id),
            self._publishers[self.config.command_topic],
        )

    def start(self) -> DdsRobotNode:
        """configure (policy, fleet session) + activate, then the control timer."""
        self.logic.configure()
        self.logic.activate()
        self._thread = threading.Thread(target=self._loop, name=f"tick-{self.config.robot_id}", daemon=True)
        self._thread.start()
        return self

    def _publish(self, tick) -> None:
        if tick is not None and tick.published:
            for topic, msg in tick.commands:
                self._publishers[topic](msg)

    def _loop(self) -> None:
        period = self.config.period_s
        deadline = time.monotonic()
        while not self._stop.is_set():
            wait = deadline - time.monotonic()
            if wait > 0:
                self._stop.wait(wait)
                continue
            started = time.monotonic()
            try:
                tick = self.logic.tick()
                self._publish(tick)
            except Exception as err:
                log.exception("robot %s: control tick failed", self.config.robot_id)
                tick = self._hold_after(err)
            joints = self.logic.sensors.latest("joints")
            latency = time.time() - joints.stamp if joints is not None and tick and tick.published else np.nan
            self.timing.append((started, time.monotonic() - started, latency))
            deadline += period
            if deadline < time.monotonic():  # overran: skip the missed ticks rather than burst
                deadline = time.monotonic()

    def _hold_after(self, error: Exception):
        try:
            tick = self.logic.failed(error)
            self._publish(tick)
            return tick
        except Exception:
            log.exception("robot %s: the hold after a failed tick failed too", self.config.robot_id)
            return None

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._publish(self.logic.shutdown(timeout))


def node_name_matches(pattern: str, name: str) -> bool:
    """ROS 2's rule for a parameter file's node key: a fully qualified name where `/**` stands for any
    number of namespaces (none too) and `*` for one name."""
    pattern = pattern if pattern.startswith("/") else f"/{pattern}"
    regex = re.escape(pattern).replace(r"/\*\*", "(/[^/]+)*").replace(r"\*", "[^/]+")
    return re.fullmatch(regex, name) is not None


def load_params(path: str | Path, robot_id: str | None = None) -> dict:
    """The `ros__parameters` that ROS 2 gives the node /<robot_id>/flotilla_robot from a parameter file:
    every section whose key matches its name, later ones over earlier ones (two_arms.yaml: `/**/...` for
    both arms, `/arm_right/...` for one). robot_id: the given one, else the file's, else the default."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    sections = [
        (str(key), dict(body["ros__parameters"] or {}))
        for key, body in data.items()
        if isinstance(body, dict) and "ros__parameters" in body
    ]
    if not sections:
        raise ValueError(f"{path}: no '<node>: ros__parameters:' section")
    if robot_id is None:
        ids = [body["robot_id"] for _key, body in sections if "robot_id" in body]
        robot_id = str(ids[0]) if ids else RosRobotConfig.robot_id
    name = f"/{robot_id}/{NODE_NAME}"
    params = {}
    for key, body in sections:
        if node_name_matches(key, name):
            params.update(body)
    if not params:
        raise ValueError(
            f"{path}: no section applies to the node {name} (sections: {[k for k, _ in sections]})"
        )
    return params


@dataclass
class RobotJobConfig:
    """`flotilla robot PARAMS` (configs/robot.yaml): the robot node on DDS, configured by a ROS 2 parameter file."""

    params: str | None = None  # a ROS 2 parameter file (ros_ws/src/flotilla_ros/config/*.yaml)
    domain: int = 0  # the DDS domain id (ROS_DOMAIN_ID of the ROS 2 nodes it talks to)
    # DDS announces and sends on 127.0.0.1 only, no multicast (the driver and controllers on this computer);
    # false: cyclonedds' defaults (its default interface, multicast), for ROS 2 nodes on other computers
    loopback: bool = True
    node: dict[str, Any] = field(default_factory=dict)  # parameters over the file's: +node.dry_run=false

    def __post_init__(self):
        check(
            bool(self.params),
            "params",
            "missing: give a ROS 2 parameter file, e.g. `flotilla robot arm_7.yaml`",
        )
        check_int(self.domain, "domain", 0)
        check(self.domain <= 232, "domain", f"must be 0..232 (DDS ports), got {self.domain}")


register_job("robot", RobotJobConfig)


def dds_config(job: RobotJobConfig) -> str | None:
    """The cyclonedds configuration for the job: loopback-only unless `loopback=false` ($CYCLONEDDS_URI's)."""
    return dds.LOOPBACK_CONFIG if job.loopback else None


def run(job: RobotJobConfig) -> None:
    """Run the node until SIGINT/SIGTERM, then stop it cleanly."""
    try:
        params = load_params(job.params, job.node.get("robot_id"))
    except (OSError, yaml.YAMLError, ValueError) as err:
        raise ConfigError("params", f"{job.params}: {err}") from None
    config = config_from_params({**params, **job.node})
    with dds.DdsTransport(job.domain, dds_config(job)) as transport:
        node = DdsRobotNode(config, transport).start()  # a token or certificate problem: ConfigError
        stop = StopSignals()
        log.info(
            "robot %s on DDS domain %d (%s)",
            config.robot_id,
            job.domain,
            "dry run" if config.dry_run else "live",
        )
        stop.wait()
        node.close()
