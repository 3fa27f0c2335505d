"""Project environment defaults: LOCALHOST unless the user chose otherwise."""

from habc_common.ros_env import apply_project_defaults


def test_defaults_fill_only_missing_variables(tmp_path):
    (tmp_path / 'config' / 'dds').mkdir(parents=True)
    profile = tmp_path / 'config' / 'dds' / 'fastdds_localhost.xml'
    profile.write_text('<profiles/>')
    environ = {'HABC_ROOT': str(tmp_path), 'MUJOCO_GL': 'osmesa'}
    applied = apply_project_defaults(environ)
    assert environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] == 'LOCALHOST'
    assert environ['FASTRTPS_DEFAULT_PROFILES_FILE'] == str(profile)
    assert environ['MUJOCO_GL'] == 'osmesa'  # the user's choice is kept
    assert 'MUJOCO_GL' not in applied


def test_explicit_range_is_respected():
    environ = {'ROS_AUTOMATIC_DISCOVERY_RANGE': 'SUBNET'}
    apply_project_defaults(environ)
    assert environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] == 'SUBNET'
    empty = {'ROS_AUTOMATIC_DISCOVERY_RANGE': ''}
    apply_project_defaults(empty)
    assert empty['ROS_AUTOMATIC_DISCOVERY_RANGE'] == 'LOCALHOST'
