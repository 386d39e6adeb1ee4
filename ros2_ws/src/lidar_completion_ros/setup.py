"""ament_python package: ``colcon build`` (ROS workspace) or ``pip install -e`` (plain venv).

launch/ and config/ hold the real files (the repository's top-level launch/ and config/*
are symlinks into this package); they are installed to share/lidar_completion_ros/ for
``ros2 launch``, with or without ``--symlink-install``.
"""

from glob import glob
from pathlib import Path

from setuptools import setup

package_name = "lidar_completion_ros"
here = Path(__file__).resolve().parent


def files(pattern: str) -> list[str]:
    # Relative paths (setuptools requires them), whatever the working directory.
    return sorted(str(Path(p)) for p in glob(pattern, root_dir=here))


setup(
    name=package_name,
    version="0.1.0",
    packages=[package_name],
    data_files=[
        ("share/ament_index/resource_index/packages", ["resource/" + package_name]),
        ("share/" + package_name, ["package.xml"]),
        ("share/" + package_name + "/launch", files("launch/*.launch.py")),
        ("share/" + package_name + "/config", files("config/completion_node.yaml") + files("config/*.rviz")
         + files("config/fastdds_*.xml")),
    ],
    install_requires=["setuptools"],
    zip_safe=True,
    maintainer="lidar-completion maintainers",
    maintainer_email="lidar-completion@example.com",
    description="ROS 2 LiDAR scene-completion node and rosbag2 replay/record tools",
    license="MIT",
    entry_points={
        "console_scripts": [
            "completion_node = lidar_completion_ros.node:main",
            "bag_replay = lidar_completion_ros.bag_replay:main",
            "bag_record = lidar_completion_ros.bag_record:main",
        ],
    },
)
