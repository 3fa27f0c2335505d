"""Joint names of the ALOHA bimanual robot (two ViperX arms) that gym-aloha simulates."""

from collections.abc import Sequence

ARM_JOINTS = ('waist', 'shoulder', 'elbow', 'forearm_roll', 'wrist_angle', 'wrist_rotate',
              'gripper')

# 14 values, left arm first: 6 joint angles (rad) and a gripper opening (0..1) per arm,
# in gym-aloha's agent_pos order.
ALOHA_JOINT_NAMES = tuple(f'{side}_{joint}' for side in ('left', 'right') for joint in ARM_JOINTS)


def order_positions(names: Sequence[str], positions: Sequence[float],
                    wanted: Sequence[str] = ALOHA_JOINT_NAMES) -> list[float]:
    """Return `positions` (given for `names`) in the order of `wanted`.

    Raises ValueError when the lengths differ, a name repeats, or a wanted joint is missing,
    naming the joints concerned so a miswired publisher is easy to find.
    """
    names, positions = list(names), list(positions)
    if len(names) != len(positions):
        raise ValueError(f'{len(names)} joint names but {len(positions)} positions')
    index = {name: i for i, name in enumerate(names)}
    if len(index) != len(names):
        raise ValueError(f'joint names repeat: {sorted(n for n in index if names.count(n) > 1)}')
    missing = [name for name in wanted if name not in index]
    if missing:
        raise ValueError(f'joints {missing} missing (got {names})')
    return [float(positions[index[name]]) for name in wanted]
