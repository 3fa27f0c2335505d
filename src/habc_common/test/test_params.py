"""Declarative parameters: validation, YAML checks and real rclpy declaration."""

from dataclasses import dataclass

import pytest

from habc_common.params import (
    check_parameter_file,
    from_mapping,
    param,
    param_specs,
    validate_params,
)


@dataclass(frozen=True)
class ExampleParams:
    rate_hz: float = param(50.0, 'Rate (Hz).', min=1.0, max=100.0)
    depth: int = param(10, 'Queue depth.', min=1)
    mode: str = param('chunk', 'Execution mode.', choices=('chunk', 'ensemble'))
    names: list[str] = param([], 'Joint names.')
    gains: list[float] = param([1.0, 2.0], 'Gains.')
    enabled: bool = param(True, 'Switch.')

    def __post_init__(self):
        validate_params(self)


def test_defaults_are_valid_and_specs_listed():
    params = ExampleParams()
    assert params.rate_hz == 50.0 and params.gains == [1.0, 2.0]
    specs = param_specs(ExampleParams)
    assert list(specs) == ['rate_hz', 'depth', 'mode', 'names', 'gains', 'enabled']
    assert specs['rate_hz'][2].description == 'Rate (Hz).'


def test_list_defaults_are_not_shared():
    a, b = ExampleParams(), ExampleParams()
    assert a.gains is not b.gains


@pytest.mark.parametrize('kwargs, message', [
    ({'rate_hz': 0.5}, "parameter 'rate_hz' of ExampleParams is 0.5, below its minimum 1.0"),
    ({'rate_hz': 101.0}, 'above its maximum 100.0'),
    ({'rate_hz': float('nan')}, 'must be finite'),
    ({'depth': 2.5}, "parameter 'depth' of ExampleParams must be int"),
    ({'depth': True}, 'must be int'),
    ({'mode': 'other'}, "choose one of ['chunk', 'ensemble']"),
    ({'names': ['a', 3]}, 'must be str'),
    ({'gains': 1.0}, 'must be a list of float'),
])
def test_invalid_values_name_the_parameter(kwargs, message):
    with pytest.raises(ValueError, match=message.replace('[', r'\[').replace(']', r'\]')
                       .replace('(', r'\(').replace(')', r'\)')):
        ExampleParams(**kwargs)


def test_from_mapping_coerces_ints_and_rejects_unknown_keys():
    assert from_mapping(ExampleParams, {'rate_hz': 20}).rate_hz == 20.0
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['rat_hz'\]"):
        from_mapping(ExampleParams, {'rat_hz': 20.0}, 'robot.yaml')


def test_check_parameter_file(tmp_path):
    good = tmp_path / 'good.yaml'
    good.write_text('/**:\n  ros__parameters:\n    rate_hz: 10\n    names: [a, b]\n')
    (params,) = check_parameter_file(ExampleParams, good)
    assert params.names == ['a', 'b']
    bad = tmp_path / 'bad.yaml'
    bad.write_text('/**:\n  ros__parameters:\n    depth: 0\n')
    with pytest.raises(ValueError, match='below its minimum'):
        check_parameter_file(ExampleParams, bad)
    broken = tmp_path / 'broken.yaml'
    broken.write_text('/**:\n  rate_hz: 3\n')
    with pytest.raises(ValueError, match='has no ros__parameters section'):
        check_parameter_file(ExampleParams, broken)


def test_declare_on_a_real_rclpy_node(ros):
    from rclpy.parameter import Parameter

    from habc_common.params import declare_node_parameters

    overrides = [Parameter('rate_hz', value=25.0), Parameter('names', value=['x', 'y'])]
    node = ros.create_node('params_test', parameter_overrides=overrides)
    params = declare_node_parameters(node, ExampleParams)
    assert params == ExampleParams(rate_hz=25.0, names=['x', 'y'])
    descriptor = node.describe_parameter('rate_hz')
    assert descriptor.description == 'Rate (Hz).'
    assert descriptor.floating_point_range[0].to_value == 100.0

    bad = ros.create_node('params_bad', parameter_overrides=[Parameter('mode', value='other')])
    with pytest.raises(ValueError, match="node 'params_bad'.*choose one of"):
        declare_node_parameters(bad, ExampleParams)
