#!/usr/bin/env bash
# Entry point of the habc image: the environment env.sh gives the pip workspace, on apt ROS.
#   tests                 run the test suite (the parts that do not test the pip set-up)
#   anything else         run it (default: ros2 launch habc bringup.launch.py)
set -e
. "/opt/ros/${ROS_DISTRO:-jazzy}/setup.bash"
. /ws/install/setup.bash

# DDS stays on this host unless HABC_DISCOVERY_RANGE opens it (README, "Beyond localhost").
export ROS_AUTOMATIC_DISCOVERY_RANGE="${HABC_DISCOVERY_RANGE:-LOCALHOST}"
if [ "$ROS_AUTOMATIC_DISCOVERY_RANGE" = LOCALHOST ]; then
  export FASTRTPS_DEFAULT_PROFILES_FILE=/ws/config/dds/fastdds_localhost.xml
else
  export FASTRTPS_DEFAULT_PROFILES_FILE=/ws/config/dds/fastdds_network.xml
fi
export FASTDDS_DEFAULT_PROFILES_FILE="$FASTRTPS_DEFAULT_PROFILES_FILE"

if [ "$1" = tests ]; then
  shift
  cd /ws
  exec python -m pytest -m 'not pip_env' "$@"
fi
exec "$@"
