.PHONY: setup run demo test lint lock

# One idempotent set-up step used by every target (venv, locked deps, colcon build, env.sh).
setup:
	bash tools/setup.sh

# The main job: the closed habc loop on the simulated robot, in the pip ROS 2 environment
# (trains the SFT checkpoint first if there is none; prints a table per learner round).
run: setup
	bash -c '. ./env.sh && exec habc demo'

demo: run

# Every test, linting included (this is what .ci/run calls).
test: setup
	bash -c '. ./env.sh && exec python -m pytest'

lint: setup
	bash -c '. ./env.sh && exec ruff check .'

# After editing requirements.in: install it and rewrite requirements.lock.
lock: setup
	.venv/bin/python -m pip install -r requirements.in
	.venv/bin/python tools/lock_requirements.py
