"""The habc command: help, doctor."""

import json
import os
import subprocess
import sys


def habc(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-m', 'habc.cli', *args], capture_output=True,
                          text=True, env={**os.environ, **env}, timeout=120)


def test_help_lists_every_subcommand():
    result = habc('--help')
    assert result.returncode == 0
    for name in ('doctor', 'launch'):
        assert name in result.stdout
    assert 'habc launch bringup' in result.stdout
    assert habc().returncode == 2


def test_doctor_passes_in_the_workspace_environment():
    result = habc('doctor', '--json')
    rows = {r['check']: r for r in json.loads(result.stdout)}
    assert result.returncode == 0, result.stdout + result.stderr
    assert rows['discovery range']['detail'].startswith('LOCALHOST')
    assert '16 MB' in rows['DDS profile']['detail']
    assert '127.0.0.1' in rows['DDS profile']['detail']
    assert 'rmw_fastrtps_cpp' in rows['rclpy / RMW']['detail']
    assert 'torch 2.13.0' in rows['torch']['detail']


def test_doctor_fails_clearly_on_a_missing_dds_profile():
    result = habc('doctor', FASTRTPS_DEFAULT_PROFILES_FILE='/nonexistent/profile.xml')
    assert result.returncode == 1
    assert 'points to a missing file: /nonexistent/profile.xml' in result.stdout
    assert 'check(s) failed: DDS profile' in result.stderr


def test_doctor_fails_when_discovery_range_unset():
    env = {k: v for k, v in os.environ.items() if k != 'ROS_AUTOMATIC_DISCOVERY_RANGE'}
    result = subprocess.run([sys.executable, '-m', 'habc.cli', 'doctor'], capture_output=True,
                            text=True, env=env, timeout=120)
    assert result.returncode == 1
    assert 'ROS_AUTOMATIC_DISCOVERY_RANGE is unset' in result.stdout
