"""A pybullet Panda as a ROS 2 robot over DDS (what a robot driver and camera driver publish), for
tests/test_ros_dds.py and benchmarks/ros_loop.py. Run as its own process, so the node under test talks to
it through real DDS on loopback:

    python -m tests.ros_harness --domain 17 --seconds 6 --goal 0.55 0.1 0.15

Publishes /joint_states (sensor_msgs/JointState, `joint_hz`) and /front_camera/image_raw
(sensor_msgs/Image rgb8, `camera_hz`), stamped with the wall clock when sent; takes the action vector on
/flotilla/commands (std_msgs/Float64MultiArray, the sim's [dx, dy, dz, gripper]) and applies the latest
one at each of the sim's 10 Hz control steps (a command older than 0.3 s: hold). The sim's state changes at
its control steps; messages go out at the drivers' rates. Prints one JSON line when done.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from fleet.ros2 import dds
from fleet.ros2 import messages as m

PANDA_JOINTS = [f"panda_joint{i}" for i in range(1, 8)]
PANDA_FINGERS = ["panda_finger_joint1", "panda_finger_joint2"]
JOINT_STATES, CAMERA, COMMANDS = "/joint_states", "/front_camera/image_raw", "/flotilla/commands"
# Franka Panda, Craig DH [a, d, alpha, theta_offset] per joint (Franka's robot documentation), and the TCP
# (pybullet_data's panda_grasptarget) in the last joint's frame: flange 0.107 m + hand to grasp target 0.105 m,
# the hand turned -45 degrees about the flange's z (so ee_quat is the sim's).
PANDA_DH = [
    *(0.0, 0.333, 0.0, 0.0),
    *(0.0, 0.0, -np.pi / 2, 0.0),
    *(0.0, 0.316, np.pi / 2, 0.0),
    *(0.0825, 0.0, np.pi / 2, 0.0),
    *(-0.0825, 0.384, -np.pi / 2, 0.0),
    *(0.0, 0.0, np.pi / 2, 0.0),
    *(0.088, 0.0, np.pi / 2, 0.0),
]
PANDA_TCP = [0.0, 0.0, 0.212, 0.0, 0.0, -np.pi / 4]
COMMAND_TIMEOUT_S = 0.3
ROOT = Path(__file__).resolve().parent.parent


def panda_params(**overrides) -> dict:
    """The node parameters for this robot (what config/panda.yaml says for a real Panda)."""
    params = dict(
        task="reach",
        joint_names=PANDA_JOINTS,
        gripper_joints=PANDA_FINGERS,
        camera_names=["front"],
        camera_topics=[CAMERA],
        ee_pose="fk",
        fk_dh=PANDA_DH,
        fk_tcp=PANDA_TCP,
        output="float64_multi_array",
        command_topic=COMMANDS,
        action_dim=4,
        workspace_low=[0.25, -0.35, 0.0],
        workspace_high=[0.75, 0.35, 0.45],
        action_low=[-1.0] * 4,
        action_high=[1.0] * 4,
    )
    params.update(overrides)
    return params


class SimRosRobot:
    def __init__(self, transport, goal, seed=0, image_size=64, joint_hz=100.0, camera_hz=30.0):
        from sim.tasks import make_env

        self.env = make_env("reach", seed=seed, cameras=("front",), image_size=image_size)
        self.obs, _ = self.env.reset(seed=seed, options={"goal": goal})
        self.joint_hz, self.camera_hz = joint_hz, camera_hz
        self._joints = transport.publisher(JOINT_STATES, "sensor_msgs/msg/JointState", "sensor_data")
        self._camera = transport.publisher(CAMERA, "sensor_msgs/msg/Image", "sensor_data")
        self._lock = threading.Lock()
        self._command: tuple[np.ndarray, float] | None = None
        self.commands = 0
        self.applied = 0
        transport.subscribe(COMMANDS, "std_msgs/msg/Float64MultiArray", self._on_command)

    def _on_command(self, msg) -> None:
        with self._lock:
            self._command = (m.float_array(msg), time.monotonic())
            self.commands += 1

    def run(self, seconds: float, stop: threading.Event | None = None) -> None:
        from sim.conventions import CONTROL_HZ

        stop = stop or threading.Event()
        start = time.monotonic()
        next_joint = next_camera = next_control = start
        gripper = -1.0
        while (now := time.monotonic()) < start + seconds and not stop.is_set():
            if now >= next_control:
                with self._lock:
                    command = self._command
                if command is not None and now - command[1] <= COMMAND_TIMEOUT_S and command[0].size == 4:
                    action, gripper = command[0], float(command[0][3])
                    self.applied += 1
                else:
                    action = np.array([0.0, 0.0, 0.0, gripper])
                self.obs = self.env.step(action)[0]
                next_control += 1.0 / CONTROL_HZ
            if now >= next_joint:
                fingers = [self.obs["gripper"][0] / 2] * 2
                positions = np.concatenate([self.obs["joint_pos"], fingers])
                self._joints(m.joint_state(PANDA_JOINTS + PANDA_FINGERS, positions, time.time()))
                next_joint += 1.0 / self.joint_hz
            if now >= next_camera:
                self._camera(m.rgb_to_image(self.obs["front_rgb"], time.time(), "front_camera"))
                next_camera += 1.0 / self.camera_hz
            time.sleep(max(0.0, min(next_joint, next_camera, next_control) - time.monotonic()))


class ReachPolicy:
    """Scripted: move the TCP straight to the goal (a stand-in for a trained policy, without torch)."""

    version = "scripted-reach"
    uncertainty = 0.0

    def reset(self):
        pass

    def act(self, obs, goal=None):
        step = np.clip((np.asarray(goal) - obs["ee_pos"]) / 0.03, -1, 1)
        return np.append(step, -1.0).astype(np.float32)


def start_sim_robot(domain: int, seconds: float, goal, **rates) -> subprocess.Popen:
    """This module as a process (rates: joint_hz, camera_hz), returned once its publishers exist; it runs
    for `seconds` at most (stop_sim_robot ends it earlier and reads its result)."""
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in rates.items()]
    robot = subprocess.Popen(
        [sys.executable, "-m", "tests.ros_harness", f"--domain={domain}", f"--seconds={seconds}", *flags]
        + ["--goal", *map(str, goal)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    if json.loads(robot.stdout.readline() or "{}") != {"ready": True}:
        robot.kill()
        raise RuntimeError(f"the simulated ROS robot did not start (exit code {robot.wait()})")
    return robot


def stop_sim_robot(robot: subprocess.Popen, timeout: float = 30.0) -> dict:
    """Stop it (SIGINT) and return its result: start and end TCP, goal, commands received and applied."""
    robot.send_signal(signal.SIGINT)
    return json.loads(robot.communicate(timeout=timeout)[0].strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--domain", type=int, required=True)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--goal", type=float, nargs=3, default=[0.55, 0.1, 0.15])
    parser.add_argument("--joint-hz", type=float, default=100.0)
    parser.add_argument("--camera-hz", type=float, default=30.0)
    args = parser.parse_args(argv)
    # stop_sim_robot's SIGINT only sets a flag: a KeyboardInterrupt raised inside a DDS call could leave
    # the transport's locks held, and the process then hung in its shutdown on a loaded machine
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with dds.DdsTransport(args.domain, dds.LOOPBACK_CONFIG) as transport:
        robot = SimRosRobot(transport, args.goal, joint_hz=args.joint_hz, camera_hz=args.camera_hz)
        start_ee = robot.obs["ee_pos"].tolist()
        print(json.dumps({"ready": True}), flush=True)
        robot.run(args.seconds, stop)
    result = {
        "start_ee": start_ee,
        "end_ee": robot.obs["ee_pos"].tolist(),
        "goal": args.goal,
        "commands": robot.commands,
        "applied": robot.applied,
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
