"""Node parameters declared once, as a validated dataclass.

A node's parameters are one frozen dataclass whose fields carry a description and optional
bounds (`param(...)`). The same class is used three ways:
  - the node declares them on its rclpy Node (`declare_node_parameters`) with descriptors
    that `ros2 param describe` shows, and reads back a validated instance;
  - the tests check every YAML parameter file in config/ against it (`check_parameter_file`);
  - the pip launcher and the launch file pass those files unchanged.
This module does not import rclpy at module level so cores and tests can use it without DDS.
"""

from dataclasses import dataclass, field, fields, MISSING
import math
from pathlib import Path
import typing
from typing import Any

import yaml

_META_KEY = 'habc_param'


@dataclass(frozen=True)
class ParamSpec:
    """Description and bounds of one parameter (kept in the dataclass field's metadata)."""

    description: str
    min: float | None = None
    max: float | None = None
    choices: tuple[Any, ...] | None = None
    read_only: bool = False


def param(default: Any, description: str, *, min: float | None = None,
          max: float | None = None, choices: tuple | None = None,
          read_only: bool = False) -> Any:
    """Declare a dataclass field as a node parameter with a description and bounds."""
    meta = {_META_KEY: ParamSpec(description, min, max, choices, read_only)}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def param_specs(cls: type) -> dict[str, tuple[type, Any, ParamSpec]]:
    """Return name -> (python type, default, spec) for every parameter of `cls`."""
    hints = typing.get_type_hints(cls)
    specs = {}
    for f in fields(cls):
        spec = f.metadata.get(_META_KEY)
        if spec is None:
            continue
        if f.default is not MISSING:
            default = f.default
        elif f.default_factory is not MISSING:
            default = f.default_factory()
        else:
            raise TypeError(f'{cls.__name__}.{f.name}: parameters need a default')
        specs[f.name] = (hints[f.name], default, spec)
    return specs


def validate_params(instance: Any) -> None:
    """Check types and bounds of every parameter; raise ValueError naming the bad one.

    Call it from the dataclass's __post_init__.
    """
    cls = type(instance)
    for name, (hint, _default, spec) in param_specs(cls).items():
        value = getattr(instance, name)
        where = f'parameter {name!r} of {cls.__name__}'
        _check_type(value, hint, where)
        if spec.min is not None and value < spec.min:
            raise ValueError(f'{where} is {value}, below its minimum {spec.min}')
        if spec.max is not None and value > spec.max:
            raise ValueError(f'{where} is {value}, above its maximum {spec.max}')
        if spec.choices is not None and value not in spec.choices:
            raise ValueError(f'{where} is {value!r}; choose one of {list(spec.choices)}')


def _check_type(value: Any, hint: Any, where: str) -> None:
    origin = typing.get_origin(hint)
    if origin is list:
        (item_type,) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ValueError(f'{where} must be a list of {item_type.__name__}, got {value!r}')
        for item in value:
            _check_type(item, item_type, where)
        return
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and not math.isfinite(float(value)):
            raise ValueError(f'{where} must be finite, got {value!r}')
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, hint)
    if not ok:
        raise ValueError(f'{where} must be {hint.__name__}, got {value!r}')


def from_mapping(cls: type, values: dict[str, Any], source: str = 'parameters') -> Any:
    """Build `cls` from a dict, rejecting unknown keys with a message that lists known ones."""
    specs = param_specs(cls)
    unknown = sorted(set(values) - set(specs))
    if unknown:
        raise ValueError(f'{source}: unknown parameter(s) {unknown} for {cls.__name__}; '
                         f'known: {sorted(specs)}')
    coerced = {}
    for name, value in values.items():
        hint = specs[name][0]
        # YAML and ROS give ints where a float is meant (rate_hz: 50); accept them.
        if hint is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        coerced[name] = list(value) if isinstance(value, tuple) else value
    try:
        return cls(**coerced)
    except ValueError as exc:
        raise ValueError(f'{source}: {exc}') from exc


def read_parameter_file(path: Path) -> dict[str, dict[str, Any]]:
    """Return node key -> ros__parameters dict from a ROS 2 YAML parameter file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f'{path}: not valid YAML: {exc}') from exc
    if not isinstance(data, dict):
        raise ValueError(f'{path}: expected a mapping of node names to ros__parameters')
    result = {}
    for node_key, body in data.items():
        if not isinstance(body, dict) or 'ros__parameters' not in body:
            raise ValueError(f'{path}: entry {node_key!r} has no ros__parameters section')
        result[node_key] = body['ros__parameters'] or {}
    return result


def check_parameter_file(cls: type, path: Path) -> list[Any]:
    """Validate every node section of a parameter file against `cls`; return the instances."""
    return [from_mapping(cls, values, f'{path} [{key}]')
            for key, values in read_parameter_file(path).items()]


def declare_node_parameters(node: Any, cls: type) -> Any:
    """Declare the parameters of `cls` on an rclpy node and return a validated instance.

    Invalid values raise ValueError naming the parameter and the allowed range, so the node
    fails at start-up with one clear line instead of misbehaving later.
    """
    from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
    from rclpy.exceptions import InvalidParameterTypeException, InvalidParameterValueException
    from rclpy.parameter import Parameter

    values = {}
    for name, (hint, default, spec) in param_specs(cls).items():
        descriptor = ParameterDescriptor(description=spec.description,
                                         read_only=spec.read_only)
        if spec.choices is not None:
            descriptor.additional_constraints = f'one of {list(spec.choices)}'
        if hint is float and (spec.min is not None or spec.max is not None):
            descriptor.floating_point_range = [FloatingPointRange(
                from_value=float(spec.min if spec.min is not None else -1e308),
                to_value=float(spec.max if spec.max is not None else 1e308))]
        elif hint is int and (spec.min is not None or spec.max is not None):
            descriptor.integer_range = [IntegerRange(
                from_value=int(spec.min if spec.min is not None else -2**63),
                to_value=int(spec.max if spec.max is not None else 2**63 - 1), step=0)]
        # An empty list carries no type for rclpy; declare it with its explicit type.
        initial = default
        if isinstance(default, list) and not default:
            item = typing.get_args(hint)[0]
            initial = {str: Parameter.Type.STRING_ARRAY, float: Parameter.Type.DOUBLE_ARRAY,
                       int: Parameter.Type.INTEGER_ARRAY, bool: Parameter.Type.BOOL_ARRAY}[item]
        try:
            value = node.declare_parameter(name, initial, descriptor).value
        except (InvalidParameterTypeException, InvalidParameterValueException) as exc:
            raise ValueError(f'node {node.get_name()!r}: parameter {name!r} '
                             f'({spec.description}) rejected: {exc}') from exc
        if value is None and initial is not default:
            # Declared by type only and set nowhere: rclpy reports it unset (None); the
            # default is the empty list.
            value = []
        if hasattr(value, 'tolist'):  # rclpy returns numeric arrays as array.array
            value = value.tolist()
        elif isinstance(value, tuple):
            value = list(value)
        values[name] = value
    return from_mapping(cls, values, f'node {node.get_name()!r}')
