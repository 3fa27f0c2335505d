"""Named QoS profiles of the habc topics, each with the reason it was chosen."""

from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

# Camera frames: a late frame is worthless, so best effort with a shallow queue.
SENSOR_DATA = QoSProfile(depth=5, history=HistoryPolicy.KEEP_LAST,
                         reliability=ReliabilityPolicy.BEST_EFFORT,
                         durability=DurabilityPolicy.VOLATILE)

# Joint states run at 100-1000 Hz; a ~16 ms Python stall on 2 cores overflows depth 10
# (measured), so keep a deeper queue. Reliable so recorders see every sample.
JOINT_STATES = QoSProfile(depth=100, history=HistoryPolicy.KEEP_LAST,
                          reliability=ReliabilityPolicy.RELIABLE,
                          durability=DurabilityPolicy.VOLATILE)

# Robot commands and executed actions: reliable, every tick matters for training data.
COMMANDS = QoSProfile(depth=50, history=HistoryPolicy.KEEP_LAST,
                      reliability=ReliabilityPolicy.RELIABLE,
                      durability=DurabilityPolicy.VOLATILE)

# Weight updates and episode events: latched, so a node that starts later (policy after
# learner, dashboard after recorder) still receives the latest one.
LATCHED = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST,
                     reliability=ReliabilityPolicy.RELIABLE,
                     durability=DurabilityPolicy.TRANSIENT_LOCAL)

# Events that must all arrive, also to a reader that joins later (the newest ten): help
# requests, which can be raised and answered back to back.
LATCHED_EVENTS = QoSProfile(depth=10, history=HistoryPolicy.KEEP_LAST,
                            reliability=ReliabilityPolicy.RELIABLE,
                            durability=DurabilityPolicy.TRANSIENT_LOCAL)

# Which profile each habc topic gets, by its name relative to the robot namespace
# (docs/ros_interfaces.md). Publishers use these profiles; a subscriber or a replay that
# picks its QoS by topic name must pick the same, or e.g. a reliable subscription would
# never match the best-effort observation publisher.
_TOPIC_PROFILES = {
    'observation': SENSOR_DATA,
    'joint_states': JOINT_STATES,
    'policy/update': LATCHED,
    'policy/status': LATCHED,
    'recorder/events': LATCHED,
    'learner/status': LATCHED,
    'help_request': LATCHED_EVENTS,
    'forward_position_controller/commands': COMMANDS,
    'joint_trajectory_controller/joint_trajectory': COMMANDS,
    'intervention': COMMANDS,
    'executed_action': COMMANDS,
    'policy/chunk': COMMANDS,
    'policy/joint_command': COMMANDS,
    'teleop/joint_command': COMMANDS,
    'teleop/engage': COMMANDS,
    'teleop/estop': COMMANDS,
    'sim/privileged': COMMANDS,
}
_PROFILE_NAMES = {'SENSOR_DATA': SENSOR_DATA, 'JOINT_STATES': JOINT_STATES,
                  'COMMANDS': COMMANDS, 'LATCHED': LATCHED}


def qos_for_topic(name: str, msgtype: str = '') -> QoSProfile | None:
    """Return the habc profile of a topic, or None for a topic that is not one of habc's.

    `name` may be relative ('observation') or fully qualified ('/robot1/observation'): the
    profile is looked up by its last segments, at a namespace boundary. Camera images
    (sensor_msgs/msg/Image, any name) are SENSOR_DATA.
    """
    path = '/' + name.strip('/')
    for relative, profile in _TOPIC_PROFILES.items():
        if path.endswith('/' + relative):
            return profile
    if msgtype == 'sensor_msgs/msg/Image':
        return SENSOR_DATA
    return None


def profile_name(profile: QoSProfile) -> str:
    """Return the name of one of the profiles above ('SENSOR_DATA', ...), '' for another."""
    return next((name for name, known in _PROFILE_NAMES.items() if known is profile), '')
