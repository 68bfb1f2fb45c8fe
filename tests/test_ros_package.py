"""The ROS 2 package (ros_ws/src/flotilla_ros) checked without ROS: package.xml by catkin_pkg (the parser
colcon and rosdep use) against format 3 with real ROS package names, the ament_python install (setup.py
puts launch/, config/, package.xml and the resource marker where ament finds them), every launch file run
against a stub of the launch API, every parameter file against the node's typed parameters, and rclpy
imported only by the node module."""

import ast
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml
from catkin_pkg.package import parse_package_string

from fleet.ros2.node import NODE_NAME, OUTPUT_TYPES, config_from_params, parameter_types
from tests.fleet_harness import ROOT

PACKAGE = ROOT / "ros_ws/src/flotilla_ros"
# Non-message ROS packages the node uses (ROS 2 Jazzy and Humble both ship them), and rosdep keys.
ROS_PACKAGES = {"rclpy", "tf2_ros", "launch", "launch_ros", "ros2launch", "std_srvs", "builtin_interfaces"}
ROSDEP_KEYS = {"python3-pytest"}


def message_packages() -> set[str]:
    """ROS 2 Jazzy's message packages, from rosbags' copy of their definitions."""
    from rosbags.typesys import Stores, get_typestore

    return {name.split("/")[0] for name in get_typestore(Stores.ROS2_JAZZY).types}


def test_package_xml_is_format_3_with_real_dependencies():
    package = parse_package_string((PACKAGE / "package.xml").read_text(), str(PACKAGE / "package.xml"))
    package.validate()  # catkin_pkg's checks: name, version, maintainers, licenses, dependency sanity
    assert package.package_format == 3 and package.name == PACKAGE.name
    assert [e.content for e in package.exports if e.tagname == "build_type"] == ["ament_python"]
    names = {dep.name for dep in package.exec_depends + package.build_depends + package.test_depends}
    assert {"rclpy", "sensor_msgs", "std_msgs", "trajectory_msgs", "lifecycle_msgs", "geometry_msgs"} <= names
    assert {"launch", "launch_ros", "ros2launch"} <= names  # launch files, and `ros2 launch` to run them
    unknown = names - message_packages() - ROS_PACKAGES - ROSDEP_KEYS
    assert not unknown, f"not ROS package names: {unknown}"


def test_node_module_imports_only_real_packages_and_is_the_only_rclpy_user():
    from rosbags.typesys import Stores, get_typestore

    node = PACKAGE / "flotilla_ros/robot_node.py"
    source = node.read_text()
    types_used = set(re.findall(r'"([a-z0-9_]+/msg/[A-Z][A-Za-z0-9]*)"', source))
    types_used |= {f"sensor_msgs/msg/{kind}" for kind in ("Image", "CompressedImage")}  # f"...{kind}"
    types_used |= set(OUTPUT_TYPES.values())
    assert "sensor_msgs/msg/{kind}" in source
    jazzy = get_typestore(Stores.ROS2_JAZZY).types
    assert all(name in jazzy for name in types_used), types_used - set(jazzy)
    xml_deps = {dep.name for dep in parse_package_string((PACKAGE / "package.xml").read_text()).exec_depends}
    assert {name.split("/")[0] for name in types_used} | {"std_srvs", "tf2_ros", "rclpy"} <= xml_deps
    skip = {"node_modules", ".git", "build", "install", "data"}
    users = [
        path.relative_to(ROOT)
        for path in ROOT.rglob("*.py")
        if not skip & set(path.relative_to(ROOT).parts)
        and "rclpy" in (text := path.read_text(errors="replace"))
        and any(
            isinstance(n, ast.Import | ast.ImportFrom)
            and any(
                (a.name if isinstance(n, ast.Import) else n.module or "").split(".")[0] == "rclpy"
                for a in n.names
            )
            for n in ast.walk(ast.parse(text))
        )
    ]
    assert users == [node.relative_to(ROOT)]


def test_setup_installs_launch_config_marker_and_the_node(tmp_path):
    """pip installs the package as colcon's ament_python build would lay it out under the prefix."""
    source = shutil.copytree(PACKAGE, tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(  # from a copy: the build leaves build/ and *.egg-info beside setup.py
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--prefix"]
        + [str(tmp_path / "prefix"), str(source)],
        check=True,
        capture_output=True,
    )
    share = tmp_path / "prefix/share"
    assert (share / "ament_index/resource_index/packages/flotilla_ros").exists()
    assert (share / "flotilla_ros/package.xml").exists()
    for folder, pattern in (("launch", "*.launch.py"), ("config", "*.yaml")):
        installed = sorted(p.name for p in (share / "flotilla_ros" / folder).glob(pattern))
        assert installed == sorted(p.name for p in (PACKAGE / folder).glob(pattern)) and installed
    entry_points = next((tmp_path / "prefix").rglob("flotilla_ros-*.dist-info/entry_points.txt")).read_text()
    assert "robot_node = flotilla_ros.robot_node:main" in entry_points
    assert next((tmp_path / "prefix").rglob("flotilla_ros/robot_node.py"))


def test_colcon_install_puts_the_executable_where_ros2_run_looks(tmp_path):
    """colcon builds an ament_python package with `setup.py install --single-version-externally-managed`
    (`develop` with --symlink-install); `ros2 run` and launch's executable= look in <prefix>/lib/<package>,
    which only setup.cfg's install_scripts / script_dir make them use (without it: <prefix>/bin)."""
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(PACKAGE / "setup.cfg")
    assert cfg["develop"]["script_dir"] == cfg["install"]["install_scripts"] == "$base/lib/flotilla_ros"
    source = shutil.copytree(PACKAGE, tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__"))
    prefix = tmp_path / "install"
    subprocess.run(
        [
            sys.executable,
            "setup.py",
            "-q",
            "install",
            "--prefix",
            str(prefix),
            "--record",
            str(tmp_path / "r"),
        ]
        + ["--single-version-externally-managed"],
        cwd=source,
        check=True,
        capture_output=True,
    )
    script = prefix / "lib/flotilla_ros/robot_node"
    assert script.is_file() and script.stat().st_mode & 0o111
    assert (
        "'console_scripts', 'robot_node'" in script.read_text() and not (prefix / "bin/robot_node").exists()
    )
    assert (prefix / "share/flotilla_ros/launch/robot.launch.py").is_file()


@pytest.mark.parametrize("name", sorted(p.name for p in (PACKAGE / "config").glob("*.yaml")))
def test_parameter_files_match_the_nodes_typed_parameters(name):
    kinds = parameter_types()
    check = {
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "double": lambda v: isinstance(v, float),
        "bool": lambda v: isinstance(v, bool),
        "string_array": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
        "double_array": lambda v: isinstance(v, list) and all(isinstance(x, float) for x in v),
    }
    sections = yaml.safe_load((PACKAGE / "config" / name).read_text())
    merged = {}
    for node, body in sections.items():
        assert node.endswith(f"/{NODE_NAME}") and set(body) == {"ros__parameters"}, node
        for key, value in body["ros__parameters"].items():
            assert key in kinds, f"{name}: unknown parameter {key}"
            # rcl gives an empty list no type (leave the parameter out for its default); ROS refuses a
            # double parameter written as an integer
            assert value != [], f"{name}: {key}: [] has no ROS type; leave it out"
            assert check[kinds[key]](value), f"{name}: {key}={value!r} is not a ROS {kinds[key]}"
        merged.update(body["ros__parameters"])
    config_from_params(merged)  # and the node accepts the whole


# -- launch files against a stub of the launch API -------------------------------------------------------------


class Action:
    """Records how a launch entity was built."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


class LaunchConfiguration(Action):
    def perform(self, context):
        return context[self.args[0]]


class Transition:  # lifecycle_msgs/msg/Transition's ids
    TRANSITION_CONFIGURE, TRANSITION_ACTIVATE = 1, 3


def stub_launch_api(monkeypatch):
    def module(name, **attrs):
        mod = types.ModuleType(name)
        mod.__getattr__ = lambda attr: attrs.setdefault(attr, type(attr, (Action,), {}))
        for key, value in attrs.items():
            setattr(mod, key, value)
        monkeypatch.setitem(sys.modules, name, mod)

    for name in [
        "launch",
        "launch.actions",
        "launch.events",
        "launch.launch_description_sources",
        "launch_ros",
        "launch_ros.actions",
        "launch_ros.event_handlers",
        "launch_ros.events",
        "launch_ros.events.lifecycle",
        "launch_ros.substitutions",
        "lifecycle_msgs",
    ]:
        module(name)
    module("launch.substitutions", LaunchConfiguration=LaunchConfiguration)
    module("lifecycle_msgs.msg", Transition=Transition)


def load_launch(path: Path):
    namespace = {"__file__": str(path), "__name__": path.stem}
    exec(compile(path.read_text(), str(path), "exec"), namespace)
    description = namespace["generate_launch_description"]()
    assert type(description).__name__ == "LaunchDescription"
    entities = description.args[0]
    arguments = {
        a.args[0]: a.kwargs["default_value"] for a in entities if type(a).__name__ == "DeclareLaunchArgument"
    }
    [opaque] = [a for a in entities if type(a).__name__ == "OpaqueFunction"]
    return arguments, opaque.kwargs["function"]


def test_robot_launch_builds_the_lifecycle_node_and_starts_it(monkeypatch):
    stub_launch_api(monkeypatch)
    arguments, setup = load_launch(PACKAGE / "launch/robot.launch.py")
    assert {"robot_id", "fleet", "token_file", "checkpoint", "output", "command_topic", "dry_run"} <= set(
        arguments
    )
    context = {name: value if isinstance(value, str) else "" for name, value in arguments.items()}
    context.update(robot_id="panda_1", fleet="10.0.0.5:50051", dry_run="false")
    node, on_inactive, configure = setup(context)
    assert type(node).__name__ == "LifecycleNode"
    kw = node.kwargs
    assert (kw["package"], kw["executable"], kw["name"], kw["namespace"]) == (
        "flotilla_ros",
        "robot_node",
        NODE_NAME,
        "panda_1",
    )
    overrides = kw["parameters"][1]
    assert overrides == {"robot_id": "panda_1", "fleet": "10.0.0.5:50051", "dry_run": False}
    assert set(overrides) <= set(parameter_types())
    setup_py = (PACKAGE / "setup.py").read_text()
    assert f'"{kw["executable"]} = {{PACKAGE}}.robot_node:main"' in setup_py
    assert configure.kwargs["event"].kwargs["transition_id"] == Transition.TRANSITION_CONFIGURE
    handler = on_inactive.args[0]
    assert handler.kwargs["goal_state"] == "inactive"
    assert (
        handler.kwargs["entities"][0].kwargs["event"].kwargs["transition_id"]
        == Transition.TRANSITION_ACTIVATE
    )
    context["autostart"] = "false"
    assert len(setup(context)) == 1  # only the node: configure and activate by hand
    # Every launch argument is used: each override reaches the node as its parameter, typed as ROS wants.
    kinds = parameter_types()
    context.update({name: "x" for name in arguments if name not in ("robot_id", "params_file", "autostart")})
    context["dry_run"] = "true"
    [node] = setup(context)
    overrides = node.kwargs["parameters"][1]
    assert set(overrides) == set(arguments) - {"params_file", "autostart"}
    assert all(kinds[name] == ("bool" if name == "dry_run" else "string") for name in overrides)
    for flag, live in (("True", False), ("FALSE", True)):
        context["dry_run"] = flag
        assert setup(context)[0].kwargs["parameters"][1]["dry_run"] is not live
    for flag in ("1", "yes", "flase"):  # not read as false (live): refused
        context["dry_run"] = flag
        with pytest.raises(RuntimeError, match=f"dry_run:={flag} .say true or false."):
            setup(context)


def test_fleet_launch_includes_one_robot_launch_per_robot(monkeypatch):
    stub_launch_api(monkeypatch)
    robot_arguments, _ = load_launch(PACKAGE / "launch/robot.launch.py")
    arguments, setup = load_launch(PACKAGE / "launch/fleet.launch.py")
    context = {name: value if isinstance(value, str) else "" for name, value in arguments.items()}
    context.update(robots="a, b", token_dir="/etc/flotilla")
    includes = setup(context)
    assert [type(i).__name__ for i in includes] == ["IncludeLaunchDescription"] * 2
    for robot_id, include in zip(["a", "b"], includes, strict=True):
        source = include.args[0].args[0]  # PythonLaunchDescriptionSource(PathJoinSubstitution([...]))
        assert source.args[0][-2:] == ["launch", "robot.launch.py"]
        launch_arguments = dict(include.kwargs["launch_arguments"])
        assert set(launch_arguments) <= set(robot_arguments)
        assert launch_arguments["robot_id"] == robot_id
        assert launch_arguments["token_file"] == f"/etc/flotilla/{robot_id}.token"
    context["robots"] = " "
    with pytest.raises(RuntimeError, match="names no robot"):
        setup(context)


# rclpy's Node and LifecycleNode attributes (rclpy/node.py Node.__init__, rclpy/lifecycle/node.py), which a
# subclass must not overwrite: the executor and destroy_node read them.
RCLPY_NODE_ATTRIBUTES = {
    *("_context", "_parameters", "_publishers", "_subscriptions", "_clients", "_services", "_timers"),
    *("_guards", "_default_callback_group", "_rate_group", "_allow_undeclared_parameters", "_descriptors"),
    *("_parameter_overrides", "_logger", "_parameter_event_publisher", "_clock", "_time_source"),
    *("_parameter_service", "_logger_service", "_type_description_service", "_pre_set_parameters_callbacks"),
    *("_on_set_parameters_callbacks", "_post_set_parameters_callbacks", "_callbacks", "_managed_entities"),
    *("_state_machine", "_service_change_state", "_service_get_state", "_service_get_available_states"),
    *("_service_get_available_transitions", "_service_get_transition_graph", "handle", "executor", "context"),
}


def test_node_class_does_not_overwrite_rclpy_node_attributes():
    tree = ast.parse((PACKAGE / "flotilla_ros/robot_node.py").read_text())
    assigned = {
        target.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign | ast.AnnAssign)
        for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
        for target in (target.elts if isinstance(target, ast.Tuple) else [target])
        if isinstance(target, ast.Attribute)
        and isinstance(target.value, ast.Name)
        and target.value.id == "self"
    }
    assert "_command_publishers" in assigned and not assigned & RCLPY_NODE_ATTRIBUTES
