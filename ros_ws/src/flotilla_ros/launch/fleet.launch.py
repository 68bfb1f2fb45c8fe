"""Several robots on one machine: one robot.launch.py per id, each in its own namespace.

    ros2 launch flotilla_ros fleet.launch.py robots:=arm_left,arm_right fleet:=fleet.example.org:50051 \
        token_dir:=~/.config/flotilla params_file:=/path/to/two_arms.yaml

Each robot reads `<token_dir>/<robot_id>.token`. Topic names in the params file that are relative
(`joint_states`, not `/joint_states`) resolve inside each robot's namespace (/arm_left/joint_states), so
one file serves every robot; per-robot values go under `/<robot_id>/flotilla_robot:` in the same file.
"""

import os

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, IncludeLaunchDescription, OpaqueFunction
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.substitutions import FindPackageShare


def launch_setup(context):
    robots = [r.strip() for r in LaunchConfiguration("robots").perform(context).split(",") if r.strip()]
    if not robots:
        raise RuntimeError("fleet.launch.py: robots:=id1,id2,... names no robot")
    token_dir = os.path.expanduser(LaunchConfiguration("token_dir").perform(context))
    robot_launch = PathJoinSubstitution([FindPackageShare("flotilla_ros"), "launch", "robot.launch.py"])
    return [
        IncludeLaunchDescription(
            PythonLaunchDescriptionSource(robot_launch),
            launch_arguments={
                "robot_id": robot_id,
                "fleet": LaunchConfiguration("fleet"),
                "token_file": os.path.join(token_dir, f"{robot_id}.token"),
                "params_file": LaunchConfiguration("params_file"),
                "dry_run": LaunchConfiguration("dry_run"),
            }.items(),
        )
        for robot_id in robots
    ]


# Launch argument -> (default, description).
ARGUMENTS = {
    "robots": ("arm_left,arm_right", "robot ids, comma-separated"),
    "fleet": ("", "the fleet server's host:port"),
    "token_dir": ("~/.config/flotilla", "<robot_id>.token files"),
    "dry_run": ("", "true/false (empty: the file's value)"),
}


def generate_launch_description():
    default_params = PathJoinSubstitution([FindPackageShare("flotilla_ros"), "config", "two_arms.yaml"])
    declared = [DeclareLaunchArgument(n, default_value=d, description=t) for n, (d, t) in ARGUMENTS.items()]
    params = DeclareLaunchArgument(
        "params_file", default_value=default_params, description="node parameters (YAML)"
    )
    return LaunchDescription([*declared, params, OpaqueFunction(function=launch_setup)])
