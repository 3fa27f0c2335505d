"""`habc launch`: the pip-environment stand-in for `ros2 launch` (no rclpy).

Starts the executables of a bringup description with the same parameters, remaps and
namespaces as launch/bringup.launch.py (or fleet.launch.py), prefixes each line of their
output with the node name (robot1/policy in a fleet), forwards Ctrl-C / SIGTERM to every node
(SIGINT, then SIGTERM, then SIGKILL after a grace period each), and exits non-zero when a
required node dies; in a fleet a robot's required node takes down that robot's stack only.
When the policy's checkpoint is left empty it prints one line first: the `habc demo`
checkpoint the nodes will start from, or, with none, what to do
(habc.bringup.checkpoint_notice).
"""

import argparse
import ctypes
from dataclasses import dataclass
import functools
import os
import signal
import subprocess
import sys
import threading
import time
from typing import TextIO

from habc.bringup import (
    checkpoint_notice,
    description_path,
    DescriptionError,
    find_executable,
    load_description,
    resolve,
    ResolvedNode,
    ros_arguments,
)
from habc_common.ros_env import apply_project_defaults

_COLORS = ('36', '33', '35', '32', '34', '91', '96', '93')
_PR_SET_PDEATHSIG = 1


def _prepare_child(nice: int) -> None:
    """In the child before exec: its niceness, and death with the launcher."""
    if nice:
        os.nice(nice)
    _die_with_launcher()


def _die_with_launcher() -> None:
    """In the child before exec: get SIGTERM if the launcher dies, even by SIGKILL.

    Each node runs in a session of its own (so a terminal Ctrl-C reaches only the
    launcher), which also means nothing else would stop it after a launcher crash.
    """
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: best effort only
        pass


@dataclass
class _Child:
    node: ResolvedNode
    process: subprocess.Popen
    reader: threading.Thread
    reported: bool = False

    @property
    def label(self) -> str:
        return node_label(self.node)


def node_label(node: ResolvedNode) -> str:
    """Return a node's log prefix: its name, with its robot in a fleet (robot1/policy)."""
    return f'{node.group}/{node.name}' if node.group else node.name


class Launcher:
    """Supervise the processes of one resolved bringup."""

    def __init__(self, nodes: list[ResolvedNode], out: TextIO = sys.stdout,
                 grace_s: float = 5.0, color: bool | None = None) -> None:
        self.nodes = nodes
        self.out = out
        self.grace_s = grace_s
        self.color = out.isatty() if color is None else color
        self.children: list[_Child] = []
        # Robots of a fleet whose stack was stopped because one of its required nodes died.
        self.stopped_robots: dict[str, str] = {}
        self._stop_signal: int | None = None
        self._write_lock = threading.Lock()

    def _say(self, prefix: str, line: str, color: str = '1') -> None:
        tag = f'\033[{color}m[{prefix}]\033[0m' if self.color else f'[{prefix}]'
        with self._write_lock:
            self.out.write(f'{tag} {line}\n')
            self.out.flush()

    def announce(self, line: str) -> None:
        """Print one line of the launcher's own, prefixed [launch]."""
        self._say('launch', line)

    def _pump(self, name: str, color: str, stream: TextIO) -> None:
        for line in stream:
            self._say(name, line.rstrip('\n'), color)

    def request_stop(self, signum: int, _frame: object = None) -> None:
        """Signal handler: remember the request; the supervision loop does the rest."""
        if self._stop_signal is None:
            self._stop_signal = signum

    def start(self) -> None:
        """Start every node; raise FileNotFoundError before starting any if one is missing."""
        commands = [[str(find_executable(n.package, n.executable)), *ros_arguments(n)]
                    for n in self.nodes]
        # faulthandler: a node that dies of a signal in native code (SIGSEGV, SIGABRT) prints
        # its Python stack first, so the log says where.
        env = dict(os.environ, PYTHONUNBUFFERED='1', PYTHONFAULTHANDLER='1')
        for index, (node, command) in enumerate(zip(self.nodes, commands, strict=True)):
            # A session of its own: a terminal Ctrl-C reaches only the launcher, which then
            # stops the nodes in order instead of all of them racing at once.
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, text=True, env=env,
                                       start_new_session=True, bufsize=1,
                                       preexec_fn=functools.partial(_prepare_child, node.nice))
            color = _COLORS[index % len(_COLORS)]
            reader = threading.Thread(target=self._pump,
                                      args=(node_label(node), color, process.stdout),
                                      daemon=True)
            reader.start()
            child = _Child(node, process, reader)
            self.children.append(child)
            required = ', required' if node.required else ''
            self._say('launch', f'started {child.label} (pid {process.pid}{required}): '
                      f'{node.package}/{node.executable} {" ".join(command[1:])}')

    def supervise(self, poll_s: float = 0.05) -> int:
        """Wait until a stop request, a required node's death or all nodes exiting.

        In a fleet, a required node of a robot's stack that dies stops that robot's stack
        only (its recorder closes the running episode as incomplete); the shared nodes and
        the other robots go on. A shared required node (the learner) stops everything.
        """
        while True:
            if self._stop_signal is not None:
                name = signal.Signals(self._stop_signal).name
                self._say('launch', f'{name} received: stopping {len(self.alive())} node(s)')
                clean = self.shutdown()
                self._report_stopped_robots()
                return 0 if clean else 1
            for child in self.children:
                code = child.process.poll()
                if code is None or child.reported:
                    continue
                child.reported = True
                child.reader.join(timeout=1.0)
                how = _describe_exit(code)
                if child.node.required and child.node.group:
                    robot = child.node.group
                    self.stopped_robots[robot] = f'required node {child.label} died ({how})'
                    self._say('launch', f'required node {child.label} died ({how}); stopping '
                              f"robot {robot}'s stack, the others go on", '31')
                    self.shutdown([c for c in self.children if c.node.group == robot])
                    continue
                if child.node.required:
                    self._say('launch', f'required node {child.label} died ({how}); '
                              'stopping the bringup', '31')
                    self.shutdown()
                    self._report_stopped_robots()
                    return 1
                self._say('launch', f'node {child.label} exited ({how})')
            if not self.alive():
                self._say('launch', 'all nodes exited')
                return 0
            time.sleep(poll_s)

    def _report_stopped_robots(self) -> None:
        for robot, why in self.stopped_robots.items():
            self._say('launch', f'robot {robot} stopped early: {why}', '31')

    def alive(self) -> list[_Child]:
        """Return the children still running."""
        return [c for c in self.children if c.process.poll() is None]

    def shutdown(self, children: list[_Child] | None = None) -> bool:
        """Stop running nodes (all, or `children`): SIGINT, SIGTERM, SIGKILL; True if clean."""
        children = self.children if children is None else children

        def alive() -> list[_Child]:
            return [c for c in children if c.process.poll() is None]

        clean = True
        for child in alive():
            if child.node.nice:
                # Niceness yields the CPU to the robot's ticks while the loop runs; stopping,
                # a niced node (the learner) on a busy machine would get so little CPU that
                # it missed the grace period. Back to normal where permitted (root or
                # CAP_SYS_NICE); elsewhere it keeps its niceness.
                try:
                    os.setpriority(os.PRIO_PGRP, child.process.pid, 0)
                except OSError:
                    pass
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
            running = alive()
            if not running:
                break
            if sig != signal.SIGINT:
                clean = False
                self._say('launch', f'{[c.label for c in running]} still running: '
                          f'sending {sig.name}', '31')
            for child in running:
                try:
                    os.killpg(child.process.pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + self.grace_s
            while alive() and time.monotonic() < deadline:
                time.sleep(0.05)
        for child in children:
            child.process.wait()
            child.reader.join(timeout=1.0)
            if not child.reported:
                child.reported = True
                self._say('launch', f'{child.label} stopped '
                          f'({_describe_exit(child.process.returncode)})')
        return clean


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f'killed by {signal.Signals(-code).name}'
        except ValueError:
            return f'killed by signal {-code}'
    return f'exit code {code}'


def parse_launch_arguments(items: list[str]) -> dict[str, str]:
    """Parse `name:=value` items as `ros2 launch` does."""
    values = {}
    for item in items:
        if ':=' not in item:
            raise DescriptionError(f'launch arguments are name:=value, got {item!r}')
        key, value = item.split(':=', 1)
        values[key] = value
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `habc launch` options to a parser."""
    parser.add_argument('description', nargs='?', default='bringup',
                        help='bringup name in config/ (default: bringup; fleet: several '
                        'robots, one learner) or a YAML path')
    parser.add_argument('arguments', nargs='*', metavar='name:=value',
                        help='launch arguments, as for ros2 launch (e.g. use_sim:=false)')
    parser.add_argument('--show-args', action='store_true',
                        help='list the launch arguments of the description and exit')
    parser.add_argument('--dry-run', action='store_true',
                        help='print the command of every node and exit')
    parser.add_argument('--grace', type=float, default=5.0, metavar='S',
                        help='seconds each stop signal gets before the next (default 5)')


def run(args: argparse.Namespace) -> int:
    """Run `habc launch` with parsed arguments; return the exit code."""
    apply_project_defaults()  # children inherit ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
    try:
        description = load_description(description_path(args.description))
        if args.show_args:
            for arg in description.arguments:
                print(f'{arg.name}:={arg.default!r}\n    {arg.description}')
            return 0
        nodes = resolve(description, parse_launch_arguments(args.arguments))
        if not nodes:
            print('habc launch: every node is disabled by the launch arguments',
                  file=sys.stderr)
            return 2
        if args.dry_run:
            for node in nodes:
                exe = find_executable(node.package, node.executable)
                print(' '.join([str(exe), *ros_arguments(node)]))
            return 0
        launcher = Launcher(nodes, grace_s=args.grace)
        signal.signal(signal.SIGINT, launcher.request_stop)
        signal.signal(signal.SIGTERM, launcher.request_stop)
        notice = checkpoint_notice(nodes)
        if notice:  # one line: which checkpoint the nodes will find, or what to do
            launcher.announce(notice)
        launcher.start()
    except (DescriptionError, FileNotFoundError) as exc:
        print(f'habc launch: {exc}', file=sys.stderr)
        return 2
    return launcher.supervise()


def main(argv: list[str] | None = None) -> None:
    """Console script `launch` of the habc package (same as `habc launch`)."""
    parser = argparse.ArgumentParser(prog='launch', description=__doc__.splitlines()[0])
    add_arguments(parser)
    args, extra = parser.parse_known_args(argv)
    if any(':=' not in item for item in extra):
        parser.error(f'unrecognized arguments: {" ".join(extra)}')
    args.arguments = [*args.arguments, *extra]
    sys.exit(run(args))
