"""ROS 2 without rclpy: message conversion (messages.py), the robot node's logic (node.py) and a DDS
transport that speaks ROS 2 topics (dds.py). The rclpy layer is ros_ws/src/flotilla_ros, the only place
that imports rclpy."""
