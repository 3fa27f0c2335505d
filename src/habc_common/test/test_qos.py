"""The QoS profile each habc topic gets, by name (and camera images by type)."""

import pytest

from habc_common.messages import message_class
from habc_common.qos import (
    COMMANDS,
    JOINT_STATES,
    LATCHED,
    profile_name,
    qos_for_topic,
    SENSOR_DATA,
)


@pytest.mark.parametrize(('name', 'msgtype', 'expected'), [
    ('observation', 'habc_msgs/msg/Observation', SENSOR_DATA),      # relative, as recorded
    ('/robot1/observation', 'habc_msgs/msg/Observation', SENSOR_DATA),  # fully qualified
    ('camera/top/image_raw', 'sensor_msgs/msg/Image', SENSOR_DATA),
    ('joint_states', 'sensor_msgs/msg/JointState', JOINT_STATES),
    ('/r/executed_action', 'habc_msgs/msg/ExecutedAction', COMMANDS),
    ('intervention', 'habc_msgs/msg/InterventionState', COMMANDS),
    ('policy/chunk', 'habc_msgs/msg/ActionChunk', COMMANDS),
    ('/policy/update', 'habc_msgs/msg/PolicyUpdate', LATCHED),
    ('recorder/events', 'habc_msgs/msg/EpisodeEvent', LATCHED),
])
def test_habc_topics_get_their_profile(name, msgtype, expected):
    assert qos_for_topic(name, msgtype) is expected


def test_other_topics_get_none_and_a_name_matches_whole_segments():
    assert qos_for_topic('/chatter', 'std_msgs/msg/String') is None
    assert qos_for_topic('/my_observation', 'habc_msgs/msg/Observation') is None
    assert profile_name(qos_for_topic('/robot1/observation')) == 'SENSOR_DATA'
    assert profile_name(LATCHED) == 'LATCHED'


def test_message_class_by_name():
    from std_msgs.msg import String

    assert message_class('std_msgs/msg/String') is String
    assert message_class('std_msgs/String') is String
    with pytest.raises(ValueError, match='not installed'):
        message_class('no_such_pkg/msg/Thing')
    with pytest.raises(ValueError, match='is not "package/msg/Type"'):
        message_class('String')
