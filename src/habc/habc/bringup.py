"""The declarative bringup description (config/<name>.yaml) and its resolution (no rclpy).

launch/bringup.launch.py (full ROS 2) and `habc launch` (pip environment) both call
`load_description` and `resolve`, so the two cannot drift: same nodes, executables,
parameter files, remaps and namespaces.
"""

from dataclasses import dataclass, replace
import json
import os
from pathlib import Path
import re
import string
from typing import Any

import yaml

from habc_common import checkpoints, update_trust
from habc_episodes.episode import robot_label

TRUE_WORDS = {'true', '1', 'yes', 'on'}
FALSE_WORDS = {'false', '0', 'no', 'off'}
_NODE_KEYS = {'name', 'package', 'executable', 'parameters', 'remappings', 'namespace',
              'required', 'enabled_if', 'argument_parameters', 'nice', 'per_robot',
              'robot_parameters'}
# A fleet description declares this argument: how many robots (robot1..robotN), or their
# names. Its `per_robot` nodes start once per robot, in the robot's namespace.
ROBOTS_ARGUMENT = 'robots'
# Placeholders of robot_parameters templates besides the description's arguments: the robot's
# name (its namespace) and its position in the fleet (1, 2, ...).
ROBOT_PLACEHOLDERS = ('robot', 'robot_index')
_ROBOT_NAME = re.compile(r'[A-Za-z_][A-Za-z0-9_]*')


@dataclass(frozen=True)
class LaunchArgument:
    """A launch argument: a string with a default and a description."""

    name: str
    default: str
    description: str


@dataclass(frozen=True)
class NodeSpec:
    """One process of the bringup, as declared (namespace still relative)."""

    name: str
    package: str
    executable: str
    parameters: tuple[Path, ...]
    remappings: tuple[tuple[str, str], ...]
    namespace: str = ''
    required: bool = False
    enabled_if: str | None = None
    # (parameter, launch argument): the argument's value, when not empty, sets the parameter
    # after every parameter file.
    argument_parameters: tuple[tuple[str, str], ...] = ()
    # Niceness the process starts with (0-19; higher yields the CPU to the others).
    nice: int = 0
    # Started once per robot of a fleet, in that robot's namespace.
    per_robot: bool = False
    # (parameter, template): '{robot}', '{robot_index}' and '{<argument>}' are filled in; a
    # shared node's template that names {robot} becomes the list over every robot.
    robot_parameters: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class BringupDescription:
    """A whole bringup: its arguments and nodes, loaded from one YAML file."""

    name: str
    description: str
    path: Path
    arguments: tuple[LaunchArgument, ...]
    nodes: tuple[NodeSpec, ...]


@dataclass(frozen=True)
class ResolvedNode:
    """A node to start: enabled, with its absolute namespace."""

    name: str
    package: str
    executable: str
    parameters: tuple[Path, ...]
    remappings: tuple[tuple[str, str], ...]
    namespace: str
    required: bool
    argument_parameters: tuple[tuple[str, str], ...] = ()
    # Parameters set by launch arguments (`-p name:=value`, after the parameter files).
    parameter_values: tuple[tuple[str, Any], ...] = ()
    nice: int = 0
    # The robot whose stack this node belongs to ('' for a fleet's shared nodes and in a
    # one-robot bringup). A required node takes down its own robot's stack only.
    group: str = ''

    @property
    def full_name(self) -> str:
        """The node's fully qualified name, e.g. /robot1/policy."""
        return join_namespace(self.namespace, self.name)


class DescriptionError(ValueError):
    """The bringup description is invalid; the message names the file and the entry."""


def _fail(path: Path, message: str) -> None:
    raise DescriptionError(f'{path}: {message}')


def load_description(path: Path) -> BringupDescription:
    """Load and validate a bringup description; parameter paths become absolute."""
    path = Path(path).resolve()
    if not path.is_file():
        _fail(path, 'no such bringup description')
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise DescriptionError(f'{path}: not valid YAML: {exc}') from exc
    if not isinstance(data, dict) or not isinstance(data.get('nodes'), list):
        _fail(path, "expected a mapping with a 'nodes' list")

    arguments = []
    for arg_name, body in (data.get('arguments') or {}).items():
        if not isinstance(body, dict) or 'default' not in body:
            _fail(path, f"argument {arg_name!r} needs a 'default'")
        arguments.append(LaunchArgument(str(arg_name), str(body['default']),
                                        str(body.get('description', ''))))
    argument_names = {a.name for a in arguments}

    nodes = []
    for index, entry in enumerate(data['nodes']):
        where = f'nodes[{index}]'
        if not isinstance(entry, dict):
            _fail(path, f'{where} must be a mapping')
        unknown = set(entry) - _NODE_KEYS
        if unknown:
            _fail(path, f'{where} has unknown key(s) {sorted(unknown)}; '
                  f'known: {sorted(_NODE_KEYS)}')
        for key in ('name', 'package', 'executable'):
            if not entry.get(key):
                _fail(path, f"{where} needs a '{key}'")
        where = f"node {entry['name']!r}"
        parameters = []
        for rel in entry.get('parameters') or []:
            param_path = (path.parent / rel).resolve()
            if not param_path.is_file():
                _fail(path, f'{where}: parameter file {rel} not found at {param_path}')
            parameters.append(param_path)
        remappings = []
        for pair in entry.get('remappings') or []:
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
                _fail(path, f'{where}: each remapping is a [from, to] pair, got {pair!r}')
            remappings.append((str(pair[0]), str(pair[1])))
        enabled_if = entry.get('enabled_if')
        if enabled_if is not None and enabled_if not in argument_names:
            _fail(path, f'{where}: enabled_if names undeclared argument {enabled_if!r}')
        mapping = entry.get('argument_parameters') or {}
        if not isinstance(mapping, dict):
            _fail(path, f'{where}: argument_parameters maps parameter names to launch '
                  f'arguments, got {mapping!r}')
        for parameter, argument in mapping.items():
            if argument not in argument_names:
                _fail(path, f'{where}: argument_parameters names undeclared argument '
                      f'{argument!r} (for parameter {parameter!r})')
        nice = entry.get('nice', 0)
        if isinstance(nice, bool) or not isinstance(nice, int) or not 0 <= nice <= 19:
            _fail(path, f'{where}: nice must be an integer from 0 to 19 (the niceness the '
                  f'process starts with; higher yields the CPU to the others), got {nice!r}')
        per_robot = entry.get('per_robot', False)
        if not isinstance(per_robot, bool):
            _fail(path, f'{where}: per_robot must be true or false, got {per_robot!r}')
        if per_robot and ROBOTS_ARGUMENT not in argument_names:
            _fail(path, f'{where} is per_robot, but the description declares no '
                  f'{ROBOTS_ARGUMENT!r} argument (how many robots, or their names)')
        templates = entry.get('robot_parameters') or {}
        if not isinstance(templates, dict):
            _fail(path, f'{where}: robot_parameters maps parameter names to templates such '
                  f"as '{{storage_root}}/{{robot}}', got {templates!r}")
        known = argument_names | set(ROBOT_PLACEHOLDERS)
        for parameter, template in templates.items():
            named = _placeholders(str(template))
            unknown = sorted(named - known)
            if unknown:
                _fail(path, f'{where}: robot_parameters.{parameter} names {unknown}, which '
                      f'are neither arguments nor {list(ROBOT_PLACEHOLDERS)}')
            if named & set(ROBOT_PLACEHOLDERS) and ROBOTS_ARGUMENT not in argument_names:
                _fail(path, f'{where}: robot_parameters.{parameter} names a robot, but the '
                      f'description declares no {ROBOTS_ARGUMENT!r} argument')
        nodes.append(NodeSpec(
            name=str(entry['name']), package=str(entry['package']),
            executable=str(entry['executable']), parameters=tuple(parameters),
            remappings=tuple(remappings), namespace=str(entry.get('namespace') or ''),
            required=bool(entry.get('required', False)), enabled_if=enabled_if,
            argument_parameters=tuple((str(k), str(v)) for k, v in mapping.items()),
            nice=nice, per_robot=per_robot,
            robot_parameters=tuple((str(k), str(v)) for k, v in templates.items())))

    names = [n.name for n in nodes]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        _fail(path, f'node names must be unique; repeated: {duplicates}')
    return BringupDescription(name=str(data.get('name', path.stem)),
                              description=str(data.get('description', '')), path=path,
                              arguments=tuple(arguments), nodes=tuple(nodes))


def _placeholders(template: str) -> set[str]:
    try:
        return {field for _, field, _, _ in string.Formatter().parse(template) if field}
    except ValueError as exc:
        raise DescriptionError(f'template {template!r}: {exc}') from None


def _render(template: str, values: dict[str, str]) -> Any:
    # A value that renders to an integer is an integer (seeds); anything else is text.
    text = template.format(**values)
    return int(text) if re.fullmatch(r'-?[0-9]+', text) else text


def _robot_values(values: dict[str, str], robot: str, index: int) -> dict[str, str]:
    # The argument values with the placeholders of robot `robot`, the index-th (from 1).
    return {**values, 'robot': robot, 'robot_index': str(index)}


def _render_shared(template: str, values: dict[str, str], robots: list[str]) -> Any:
    # A shared node's template: one value, or, naming a robot, the list over the robots.
    if not _placeholders(template) & set(ROBOT_PLACEHOLDERS):
        return _render(template, values)
    return [_render(template, _robot_values(values, robot, index))
            for index, robot in enumerate(robots, 1)]


def robot_names(value: str) -> list[str]:
    """Return the robots `robots:=` names: a count N (robot1..robotN) or comma-separated names.

    Raises:
        DescriptionError: no robot, a name that is not a ROS namespace token, or a name given
            twice (two robots in one namespace would share every topic and service).
    """
    text = str(value).strip()
    if re.fullmatch(r'[0-9]+', text):
        names = [f'robot{i}' for i in range(1, int(text) + 1)]
    else:
        names = [name.strip().strip('/') for name in text.split(',') if name.strip()]
    if not names:
        raise DescriptionError(f'{ROBOTS_ARGUMENT}:={value!r} names no robot: give a count '
                               '(robots:=2) or names (robots:=left,right)')
    for name in names:
        if not _ROBOT_NAME.fullmatch(name):
            raise DescriptionError(f'{ROBOTS_ARGUMENT}:={value!r}: {name!r} is not a robot '
                                   'namespace (a letter or _, then letters, digits and _)')
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise DescriptionError(f'{ROBOTS_ARGUMENT}:={value!r}: robot namespace(s) {repeated} '
                               'given twice; two robots in one namespace would share every '
                               'topic, service and episode id: give each its own name')
    return names


def parse_bool(name: str, value: str) -> bool:
    """Parse a boolean launch argument the way launch's IfCondition does."""
    lowered = str(value).strip().lower()
    if lowered in TRUE_WORDS:
        return True
    if lowered in FALSE_WORDS:
        return False
    raise DescriptionError(f'launch argument {name}:={value!r} must be true or false')


def join_namespace(*parts: str) -> str:
    """Join namespace parts into an absolute namespace ('' parts are skipped)."""
    pieces = [p.strip('/') for p in parts if p and p.strip('/')]
    return '/' + '/'.join(pieces) if pieces else '/'


def argument_values(description: BringupDescription,
                    overrides: dict[str, str] | None = None) -> dict[str, str]:
    """Return every argument's value: defaults updated by `overrides` (unknown ones fail)."""
    values = {a.name: a.default for a in description.arguments}
    for key, value in (overrides or {}).items():
        if key not in values:
            raise DescriptionError(f'unknown launch argument {key!r} for {description.path}; '
                                   f'known: {sorted(values)}')
        values[key] = str(value)
    return values


# A description that declares this argument lets the user layer one more parameter file on
# every node (after the node's own files, so it wins): storage paths, a checkpoint, budgets.
PARAMS_FILE_ARGUMENT = 'params_file'
# A description that declares this argument runs every node on the simulated robot's clock
# (ROS `use_sim_time`; the simulator publishes /clock): 'auto' follows `use_sim`.
SIM_TIME_ARGUMENT = 'use_sim_time'
# The argument that names the policy checkpoint; the parameters it feeds (argument_parameters)
# are the ones `checkpoint_notice` checks.
CHECKPOINT_ARGUMENT = 'checkpoint'


def resolve(description: BringupDescription,
            overrides: dict[str, str] | None = None) -> list[ResolvedNode]:
    """Apply argument values: drop disabled nodes and make namespaces absolute.

    In a fleet description (one that declares `robots`) every `per_robot` node starts once
    per robot in the namespace <namespace>/<robot>, with its /clock remapped into that
    namespace (each simulated robot keeps its own time); the shared nodes (the learner) run
    on the wall clock, since a fleet has no single simulated time.
    """
    values = argument_values(description, overrides)
    robot_namespace = values.get('namespace', '')
    extra: tuple[Path, ...] = ()
    if values.get(PARAMS_FILE_ARGUMENT):
        extra_file = Path(values[PARAMS_FILE_ARGUMENT]).expanduser().resolve()
        if not extra_file.is_file():
            raise DescriptionError(f'{PARAMS_FILE_ARGUMENT}:={values[PARAMS_FILE_ARGUMENT]}: '
                                   f'no such parameter file ({extra_file})')
        extra = (extra_file,)
    robots = robot_names(values[ROBOTS_ARGUMENT]) if ROBOTS_ARGUMENT in values else None
    sim_time = _sim_time(values)
    resolved = []
    # A fleet's robot stacks start one robot after another, then the shared nodes.
    stacks: dict[str, list[ResolvedNode]] = {robot: [] for robot in robots or []}
    for spec in description.nodes:
        if spec.enabled_if and not parse_bool(spec.enabled_if, values[spec.enabled_if]):
            continue
        arguments = tuple((parameter, values[argument])
                          for parameter, argument in spec.argument_parameters
                          if values[argument])
        node = ResolvedNode(
            name=spec.name, package=spec.package, executable=spec.executable,
            parameters=spec.parameters + extra, remappings=spec.remappings,
            namespace=join_namespace(robot_namespace, spec.namespace),
            required=spec.required, argument_parameters=spec.argument_parameters,
            nice=spec.nice)
        if robots is None or not spec.per_robot:
            # A fleet has no single simulated time: its shared nodes run on the wall clock.
            shared_time = sim_time if robots is None or sim_time is None else False
            clock = () if shared_time is None else ((SIM_TIME_ARGUMENT, shared_time),)
            fleet = tuple((parameter, _render_shared(template, values, robots or []))
                          for parameter, template in spec.robot_parameters)
            resolved.append(replace(node, parameter_values=clock + fleet + arguments))
            continue
        clock = () if sim_time is None else ((SIM_TIME_ARGUMENT, sim_time),)
        for index, robot in enumerate(robots, 1):
            own = tuple((parameter, _render(template, _robot_values(values, robot, index)))
                        for parameter, template in spec.robot_parameters)
            namespace = join_namespace(robot_namespace, robot, spec.namespace)
            stacks[robot].append(replace(
                node, namespace=namespace, group=robot,
                remappings=spec.remappings + (('/clock', join_namespace(namespace, 'clock')),),
                parameter_values=clock + own + arguments))
    nodes = trust_own_learner([node for stack in stacks.values() for node in stack]
                              + resolved)
    check_stores(nodes)
    return nodes


# (package, executable) of the episode recorder, whose stores check_stores compares.
RECORDER_NODE = ('habc_policy', 'episode_recorder_node')
DEFAULT_STORAGE_DIR = '~/.habc/episodes'


def check_stores(nodes: list[ResolvedNode]) -> None:
    """Refuse two recorders that would write one store under one robot label.

    Several robots may share a store: the index's robot column tells their episodes apart
    (and each recorder recovers only its own robot's rows after a crash). Under one label
    they could not be told apart, and each would mark the other's live recording incomplete.

    Raises:
        DescriptionError: naming both nodes, the store and what to change.
    """
    seen: dict[tuple[Path, str], ResolvedNode] = {}
    for node in nodes:
        if (node.package, node.executable) != RECORDER_NODE:
            continue
        storage = update_trust.expand(str(_node_value(node, 'storage_dir',
                                                      DEFAULT_STORAGE_DIR))).resolve()
        label = robot_label(str(_node_value(node, 'robot', '') or ''), node.namespace)
        other = seen.setdefault((storage, label), node)
        if other is not node:
            raise DescriptionError(
                f'{other.full_name} and {node.full_name} would both record into {storage} as '
                f"robot {label!r}: the index's robot column could not tell their episodes "
                "apart. Give each robot its own store (storage_dir, or the fleet's "
                "storage_root) or its own robot label (the recorder's robot parameter)")


# (package, executable) of the nodes whose trust trust_own_learner wires.
POLICY_NODE = ('habc_policy', 'policy_node')
LEARNER_NODE = ('habc_learner', 'learner_node')


def trust_own_learner(nodes: list[ResolvedNode]) -> list[ResolvedNode]:
    """Make each policy node trust the updates of the learner started beside it.

    The policy node applies only updates signed by its trusted_keys from its
    checkpoint_roots (habc_common.update_trust). With the defaults both sides agree
    (~/.habc/keys, ~/.habc/learner); when a parameter file moves the learner's work_dir or
    signing_key, the policy node's lists get the learner's folders added here (after what its
    own files say, which stays), so the bringup is secure and working without extra steps.
    """
    learners = [node for node in nodes if (node.package, node.executable) == LEARNER_NODE]
    if not learners:
        return nodes
    roots, keys = [], []
    for learner in learners:
        roots.append(str(_node_value(learner, 'work_dir', checkpoints.LEARNER_WORK_DIR)))
        signing_key = _node_value(learner, 'signing_key', update_trust.DEFAULT_SIGNING_KEY)
        keys.append(str(Path(signing_key).with_suffix(update_trust.PUBLIC_KEY_SUFFIX)))
    wired = []
    for node in nodes:
        if (node.package, node.executable) == POLICY_NODE:
            extra = []
            for name, default, needed in (
                    ('checkpoint_roots', checkpoints.LEARNER_WORK_DIR, roots),
                    ('trusted_keys', update_trust.DEFAULT_KEY_DIR, keys)):
                own = [str(item) for item in _node_value(node, name, [default])]
                missing = [item for item in needed if not _covered(item, own)]
                if missing:
                    extra.append((name, list(dict.fromkeys(own + missing))))
            node = replace(node, parameter_values=node.parameter_values + tuple(extra))
        wired.append(node)
    return wired


def _covered(path: str, folders: list[str]) -> bool:
    # Whether `path` is one of `folders` or inside one (~ and $VARIABLES expanded).
    target = update_trust.expand(path).resolve()
    return any(target.is_relative_to(update_trust.expand(folder).resolve())
               for folder in folders)


def _node_value(node: ResolvedNode, name: str, default: Any) -> Any:
    explicit = dict(node.parameter_values)
    if name in explicit:
        return explicit[name]
    value = file_parameter(node, name)
    return default if value is None else value


def _sim_time(values: dict[str, str]) -> bool | None:
    """Return the use_sim_time every node gets (None: the description does not declare it)."""
    if SIM_TIME_ARGUMENT not in values:
        return None
    value = values[SIM_TIME_ARGUMENT]
    if value.strip().lower() == 'auto':
        return parse_bool('use_sim', values.get('use_sim', 'false'))
    return parse_bool(SIM_TIME_ARGUMENT, value)


def ros_arguments(node: ResolvedNode) -> list[str]:
    """Return the `--ros-args ...` command-line arguments that start `node` as declared."""
    args = ['--ros-args', '-r', f'__node:={node.name}', '-r', f'__ns:={node.namespace}']
    for param_file in node.parameters:
        args += ['--params-file', str(param_file)]
    for name, value in node.parameter_values:
        # JSON is YAML: a string stays a string ('true', '1', '~' too), a bool a bool, a
        # list a list (compact: one command-line word).
        args += ['-p', f'{name}:={json.dumps(value, separators=(",", ":"))}']
    for source, target in node.remappings:
        args += ['-r', f'{source}:={target}']
    return args


def _node_key_pattern(key: str) -> re.Pattern:
    # A node key of a parameter file as rcl matches it: '/**' any namespaces, '*' one token.
    key = key if key.startswith('/') else '/' + key
    pattern = re.escape(key).replace(re.escape('/**'), '(?:/[^/]+)*')
    return re.compile(pattern.replace(re.escape('*'), '[^/]*'))


def file_parameter(node: ResolvedNode, name: str) -> Any:
    """Return the value the node's parameter files give `name` (None: none sets it).

    Files apply in order, and within a file its node keys (`/**`, `/**/learner`, `learner`)
    that match the node's full name; the last value wins. Unreadable files are skipped:
    the node reports those itself.
    """
    value = None
    for path in node.parameters:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
        if not isinstance(data, dict):
            continue
        for key, body in data.items():
            if not (isinstance(body, dict) and isinstance(body.get('ros__parameters'), dict)):
                continue
            if name in body['ros__parameters'] and \
                    _node_key_pattern(str(key)).fullmatch(node.full_name):
                value = body['ros__parameters'][name]
    return value


def checkpoint_notice(nodes: list[ResolvedNode],
                      folders: list[Path] | None = None) -> str | None:
    """Return one line on the checkpoint the nodes will start from; None: all are set.

    The parameters that the `checkpoint` launch argument feeds (the policy's `checkpoint`,
    the learner's `init_checkpoint`) take the argument's value, else their parameter files'.
    Empty ones make the nodes search for the newest `habc demo` SFT checkpoint
    (habc_common.checkpoints): this says which one they will find, or what to do.
    """
    empty = []
    for node in nodes:
        explicit = dict(node.parameter_values)
        for parameter, argument in node.argument_parameters:
            if argument != CHECKPOINT_ARGUMENT:
                continue
            value = explicit.get(parameter) or file_parameter(node, parameter)
            if not value:
                empty.append(f'{node.name}.{parameter}')
    if not empty:
        return None
    folders = checkpoints.search_folders() if folders is None else folders
    found = checkpoints.find_checkpoint(folders)
    searched = checkpoints.describe_search(folders)
    if found is None:
        return f'{checkpoints.NO_CHECKPOINT_HINT} (searched {searched})'
    return (f'checkpoint: {", ".join(empty)} left empty, so the nodes start from {found}, '
            f'the newest `habc demo` checkpoint in {searched} (pass checkpoint:=DIR to '
            'choose another)')


def find_executable(package: str, executable: str,
                    prefixes: list[str] | None = None) -> Path:
    """Find lib/<package>/<executable> under the ament prefixes, as `ros2 run` does."""
    if prefixes is None:
        prefixes = [p for p in os.environ.get('AMENT_PREFIX_PATH', '').split(os.pathsep) if p]
    for prefix in prefixes:
        candidate = Path(prefix) / 'lib' / package / executable
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError(
        f'executable {executable!r} of package {package!r} not found under AMENT_PREFIX_PATH '
        f'({len(prefixes)} prefixes); build the workspace (make setup) and source env.sh')


def description_path(name_or_path: str) -> Path:
    """Resolve `bringup` or a YAML path to the description file.

    A bare name is looked up in the installed share/habc/config (what the launch file uses),
    then in $HABC_ROOT/config.
    """
    candidate = Path(name_or_path)
    if candidate.suffix in ('.yaml', '.yml'):
        return candidate
    searched = []
    try:
        from ament_index_python.packages import get_package_share_directory
        searched.append(Path(get_package_share_directory('habc')) / 'config')
    except Exception:  # noqa: BLE001 - not built yet or not sourced; fall back below
        pass
    if os.environ.get('HABC_ROOT'):
        searched.append(Path(os.environ['HABC_ROOT']) / 'config')
    for folder in searched:
        path = folder / f'{name_or_path}.yaml'
        if path.is_file():
            return path
    raise DescriptionError(f'no bringup description {name_or_path!r} in '
                           f'{[str(s) for s in searched] or "(habc not built or sourced)"}')


def as_dict(value: Any) -> Any:
    """Return plain data for printing (paths as strings)."""
    if isinstance(value, (list, tuple)):
        return [as_dict(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, '__dataclass_fields__'):
        return {k: as_dict(getattr(value, k)) for k in value.__dataclass_fields__}
    return value
