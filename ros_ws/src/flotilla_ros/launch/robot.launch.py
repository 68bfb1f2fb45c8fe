"""One robot: the Flotilla lifecycle node in the robot's namespace, configured and activated at launch.

    ros2 launch flotilla_ros robot.launch.py robot_id:=panda_1 fleet:=fleet.example.org:50051 \
        token_file:=~/.config/flotilla/panda_1.token params_file:=/path/to/panda.yaml

Parameters come from `params_file` (default: this package's config/robot.yaml); a launch argument given
here overrides its parameter, one left empty keeps the file's value. The node starts in dry run unless
the file or `dry_run:=false` says otherwise.
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, EmitEvent, OpaqueFunction, RegisterEventHandler
from launch.events import matches_action
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import LifecycleNode
from launch_ros.event_handlers import OnStateTransition
from launch_ros.events.lifecycle import ChangeState
from launch_ros.substitutions import FindPackageShare
from lifecycle_msgs.msg import Transition

# Launch argument -> what it overrides (empty: the params file's value).
OVERRIDES = {
    "fleet": "the fleet server's host:port",
    "token_file": "a file holding this robot's token",
    "checkpoint": "'latest' (the registry's, sha256-verified) or a local checkpoint folder",
    "joint_states_topic": "sensor_msgs/JointState topic",
    "command_topic": "the controller's command topic",
    "output": "float64_multi_array | joint_trajectory | twist_stamped",
    "dry_run": "true: compute and log only; false: publish commands",
}


def launch_setup(context):
    robot_id = LaunchConfiguration("robot_id").perform(context)
    overrides = {"robot_id": robot_id}
    for name in OVERRIDES:
        value = LaunchConfiguration(name).perform(context)
        if value:
            overrides[name] = value
    if "dry_run" in overrides:  # anything but true/false is refused: dry_run:=1 must not mean "live"
        flag = overrides["dry_run"].lower()
        if flag not in ("true", "false"):
            raise RuntimeError(f"robot.launch.py: dry_run:={overrides['dry_run']} (say true or false)")
        overrides["dry_run"] = flag == "true"
    node = LifecycleNode(
        package="flotilla_ros",
        executable="robot_node",
        name="flotilla_robot",
        namespace=robot_id,
        output="screen",
        parameters=[LaunchConfiguration("params_file"), overrides],
    )
    actions = [node]
    if LaunchConfiguration("autostart").perform(context).lower() == "true":
        actions += [
            RegisterEventHandler(
                OnStateTransition(
                    target_lifecycle_node=node,
                    goal_state="inactive",
                    entities=[
                        EmitEvent(
                            event=ChangeState(
                                lifecycle_node_matcher=matches_action(node),
                                transition_id=Transition.TRANSITION_ACTIVATE,
                            )
                        )
                    ],
                )
            ),
            EmitEvent(
                event=ChangeState(
                    lifecycle_node_matcher=matches_action(node),
                    transition_id=Transition.TRANSITION_CONFIGURE,
                )
            ),
        ]
    return actions


def generate_launch_description():
    default_params = PathJoinSubstitution([FindPackageShare("flotilla_ros"), "config", "robot.yaml"])
    return LaunchDescription(
        [
            DeclareLaunchArgument(
                "robot_id", default_value="robot_0", description="the robot's fleet id and namespace"
            ),
            DeclareLaunchArgument(
                "params_file", default_value=default_params, description="node parameters (YAML)"
            ),
            DeclareLaunchArgument(
                "autostart", default_value="true", description="configure and activate at launch"
            ),
            *(
                DeclareLaunchArgument(name, default_value="", description=text)
                for name, text in OVERRIDES.items()
            ),
            OpaqueFunction(function=launch_setup),
        ]
    )
