"""The HABC learner: core math (no rclpy), offline trainer and learner node."""
