"""Flotilla on ROS 2: the robot node (robot_node.py), a thin rclpy layer over fleet/ros2."""
