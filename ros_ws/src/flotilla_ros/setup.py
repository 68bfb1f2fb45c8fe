"""ament_python build of flotilla_ros: `colcon build --packages-select flotilla_ros`.

Installs the node module, `ros2 run flotilla_ros robot_node`, the launch files and the parameter files
(share/flotilla_ros/{launch,config}), the ament resource marker and package.xml.
"""

from glob import glob

from setuptools import setup

PACKAGE = "flotilla_ros"

setup(
    name=PACKAGE,
    version="0.1.0",
    packages=[PACKAGE],
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", sorted(glob("launch/*.launch.py"))),
        (f"share/{PACKAGE}/config", sorted(glob("config/*.yaml"))),
    ],
    install_requires=["setuptools"],
    zip_safe=True,
    maintainer="Flotilla maintainers",
    maintainer_email="flotilla@example.org",
    description="Flotilla robot nodes: the fleet robot agent on ROS 2 robots",
    license="Apache-2.0",
    entry_points={"console_scripts": [f"robot_node = {PACKAGE}.robot_node:main"]},
)
