"""Joint names of the ALOHA bimanual robot (two ViperX arms) that gym-aloha simulates."""

ARM_JOINTS = ('waist', 'shoulder', 'elbow', 'forearm_roll', 'wrist_angle', 'wrist_rotate',
              'gripper')

# 14 values, left arm first: 6 joint angles (rad) and a gripper opening (0..1) per arm,
# in gym-aloha's agent_pos order.
ALOHA_JOINT_NAMES = tuple(f'{side}_{joint}' for side in ('left', 'right') for joint in ARM_JOINTS)
