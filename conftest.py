"""Test set-up for every test of the workspace: loopback DDS, own domain, offscreen Qt.

Applies to tests/ and src/*/test alike; no hub downloads either.
"""

import os

# Hard rule: no rclpy process of this test run may discover beyond this machine. Forced
# (not setdefault) so that a shell with another range cannot leak into the tests.
os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
# Keep concurrent test runs on one machine from seeing each other's topics.
os.environ.setdefault('ROS_DOMAIN_ID', str(10 + os.getpid() % 90))
os.environ['QT_QPA_PLATFORM'] = 'offscreen'
os.environ['HF_HUB_OFFLINE'] = '1'
# One torch/OpenMP thread per process (this one and every node it starts): the suite runs
# many processes on a 2-core machine, and OpenMP threads that spin-wait for each other there
# slowed a 6 s training test past 300 s beside two CPU-bound processes (37 s with 2 threads
# vs 9 s with 1, measured with two busy loops alone).
os.environ.setdefault('OMP_NUM_THREADS', '1')

# Nodes started without a checkpoint look for the one `habc demo` trained (runs/demo/sft):
# a user's own runs must not leak into the tests, so by default they find none. A test that
# wants a search folder sets the variable itself (monkeypatch.setenv).
os.environ['HABC_CHECKPOINT_SEARCH'] = os.devnull

# Fixtures shared by the packages' tests (tests/ is on pythonpath, see pytest.ini).
pytest_plugins = ['bag_fixtures', 'ros_fixtures', 'vla_fixtures']
