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
