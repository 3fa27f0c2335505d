"""Helpers for tests that start real rclpy processes (imported by tests, not a fixture file)."""

import os
from pathlib import Path
import subprocess
import sys
import threading
import time

ROOT = Path(__file__).resolve().parents[1]


def ros_env(**extra: str) -> dict[str, str]:
    """Return the environment for a child rclpy process: loopback DDS, this test's domain."""
    env = dict(os.environ)
    env['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
    env['PYTHONUNBUFFERED'] = '1'
    env.update(extra)
    return env


class Child:
    """A child process whose merged output is collected by a thread, so waits can time out."""

    def __init__(self, command: list[str]) -> None:
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, env=ros_env(),
                                        start_new_session=True)
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            with self._changed:
                self.lines.append(line.rstrip('\n'))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def output(self) -> str:
        with self._changed:
            return '\n'.join(self.lines)

    def wait_for(self, needle: str, timeout: float = 30.0) -> str:
        """Return the first output line containing `needle`; fail with the output if none."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines:
                    if needle in line:
                        return line
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.process.poll() is not None
                                      and not self._reader.is_alive()):
                    break
                self._changed.wait(timeout=min(remaining, 0.5))
        raise AssertionError(f'{needle!r} not seen within {timeout} s; output:\n{self.output}')

    def finish(self, timeout: float = 30.0) -> int:
        """Wait for exit (killing the process group after `timeout`); return the exit code."""
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            os.killpg(self.process.pid, 9)
            self.process.wait()
            raise AssertionError(
                f'process did not exit within {timeout} s:\n{self.output}') from exc
        finally:
            self._reader.join(timeout=5.0)
        return self.process.returncode

    def kill(self) -> None:
        """Kill the whole process group if it still runs (test clean-up)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, 9)
            self.process.wait()


def start_python(script: Path, *args: str) -> Child:
    """Start a Python script as its own process with the ROS test environment."""
    return Child([sys.executable, str(script), *args])
