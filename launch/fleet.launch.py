"""Full ROS 2 fleet: `ros2 launch habc fleet.launch.py robots:=2 [arg:=value ...]`.

Built from config/fleet.yaml by habc.ros_launch, with the same description and resolution
that `habc launch fleet` uses in the pip environment: N robot stacks, each in its own
namespace with its own episode store, and one learner.
"""

from habc.ros_launch import generate, shipped_description


def generate_launch_description():
    """Declare the fleet's arguments and start its nodes."""
    return generate(shipped_description('fleet'))
