"""Full ROS 2 bringup: `ros2 launch habc bringup.launch.py [arg:=value ...]`.

Built from config/bringup.yaml by habc.ros_launch, with the same description and resolution
that `habc launch bringup` uses in the pip environment. Pass `description:=/path.yaml` to
launch another description.
"""

from habc.ros_launch import generate, shipped_description


def generate_launch_description():
    """Declare the bringup's arguments and start its nodes."""
    return generate(shipped_description('bringup'))
