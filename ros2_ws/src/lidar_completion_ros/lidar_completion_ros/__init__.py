"""ROS 2 wrapper of the lidar_completion core library: the completion node and rosbag2 tools.

Only this package imports rclpy and message types; it converts at its edges and calls
``lidar_completion.completer.SceneCompleter`` for everything else.
"""

__version__ = "0.1.0"
