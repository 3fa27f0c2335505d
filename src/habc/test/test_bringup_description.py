"""Loading, validating and resolving bringup descriptions."""

from pathlib import Path

import pytest

from habc.bringup import (
    checkpoint_notice,
    description_path,
    DescriptionError,
    file_parameter,
    join_namespace,
    load_description,
    parse_bool,
    resolve,
    ros_arguments,
)
from habc.launcher import parse_launch_arguments
from habc_common.checkpoints import NO_CHECKPOINT_HINT


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / 'params').mkdir(exist_ok=True)
    (tmp_path / 'params' / 'a.yaml').write_text('/**:\n  ros__parameters: {}\n')
    path = tmp_path / 'bringup.yaml'
    path.write_text(text)
    return path


GOOD = """
name: demo
arguments:
  namespace: {default: '', description: robot namespace}
  use_b: {default: 'true', description: start b}
nodes:
  - {name: a, package: pkg_a, executable: a_node, parameters: [params/a.yaml],
     remappings: [[cmd, /robot/cmd]], required: true}
  - {name: b, package: pkg_b, executable: b_node, namespace: arm, enabled_if: use_b}
"""


def test_load_and_resolve(tmp_path):
    description = load_description(write(tmp_path, GOOD))
    assert [n.name for n in description.nodes] == ['a', 'b']
    assert description.nodes[0].parameters == ((tmp_path / 'params' / 'a.yaml').resolve(),)
    a, b = resolve(description)
    assert (a.namespace, b.namespace) == ('/', '/arm')
    assert a.required and not b.required
    (a_only,) = resolve(description, {'use_b': 'false', 'namespace': 'robot1'})
    assert a_only.namespace == '/robot1'
    assert ros_arguments(a_only) == [
        '--ros-args', '-r', '__node:=a', '-r', '__ns:=/robot1', '--params-file',
        str((tmp_path / 'params' / 'a.yaml').resolve()), '-r', 'cmd:=/robot/cmd']


@pytest.mark.parametrize('text, message', [
    ('nodes: {}', "expected a mapping with a 'nodes' list"),
    ('nodes:\n  - {name: a, package: p}', "nodes\\[0\\] needs a 'executable'"),
    ('nodes:\n  - {name: a, package: p, executable: e, params: []}',
     "unknown key\\(s\\) \\['params'\\]"),
    ('nodes:\n  - {name: a, package: p, executable: e, parameters: [nope.yaml]}',
     'parameter file nope.yaml not found'),
    ('nodes:\n  - {name: a, package: p, executable: e, enabled_if: use_x}',
     "undeclared argument 'use_x'"),
    ('nodes:\n  - {name: a, package: p, executable: e, remappings: [[x]]}',
     'each remapping is a \\[from, to\\] pair'),
    ('nodes:\n  - {name: a, package: p, executable: e}\n  - {name: a, package: p, executable: f}',
     "repeated: \\['a'\\]"),
    ('nodes: [', 'not valid YAML'),
    ('nodes:\n  - {name: a, package: p, executable: e, argument_parameters: {x: nope}}',
     "argument_parameters names undeclared argument 'nope'"),
])
def test_invalid_descriptions_name_the_problem(tmp_path, text, message):
    with pytest.raises(DescriptionError, match=message):
        load_description(write(tmp_path, text))


def test_unknown_or_bad_arguments(tmp_path):
    description = load_description(write(tmp_path, GOOD))
    with pytest.raises(DescriptionError, match="unknown launch argument 'use_c'"):
        resolve(description, {'use_c': 'true'})
    with pytest.raises(DescriptionError, match='must be true or false'):
        resolve(description, {'use_b': 'maybe'})
    with pytest.raises(DescriptionError, match='name:=value'):
        parse_launch_arguments(['use_b=false'])
    assert parse_launch_arguments(['use_b:=false', 'x:=a:=b']) == {'use_b': 'false',
                                                                    'x': 'a:=b'}


def test_helpers():
    assert join_namespace('', '') == '/'
    assert join_namespace('/robot1/', 'arm') == '/robot1/arm'
    assert parse_bool('x', 'True') and not parse_bool('x', 'off')


def test_shipped_descriptions_are_valid():
    root = Path(__file__).resolve().parents[3]
    skeleton = load_description(root / 'config' / 'skeleton.yaml')
    assert {n.executable for n in skeleton.nodes} == {'robot_stub_node', 'hold_position_node'}
    bringup = load_description(root / 'config' / 'bringup.yaml')
    assert {n.executable for n in bringup.nodes} == {
        'sim_robot_node', 'sync_node', 'policy_node', 'teleop_arbiter_node',
        'episode_recorder_node', 'scripted_operator_node', 'learner_node'}
    # Every node can be switched off by a launch argument (the real-robot variant).
    assert all(n.enabled_if for n in bringup.nodes)
    # checkpoint:=DIR sets the policy's checkpoint and the learner's init_checkpoint.
    assert {n.name: n.argument_parameters for n in bringup.nodes
            if n.argument_parameters} == {'policy': (('checkpoint', 'checkpoint'),),
                                          'learner': (('init_checkpoint', 'checkpoint'),)}


CHECKPOINT_BRINGUP = """
arguments:
  namespace: {default: ''}
  params_file: {default: ''}
  checkpoint: {default: ''}
nodes:
  - {name: robot, package: p, executable: r, parameters: [robot.yaml]}
  - {name: policy, package: p, executable: e, parameters: [policy.yaml],
     argument_parameters: {checkpoint: checkpoint}}
  - {name: learner, package: p, executable: l, parameters: [learner.yaml],
     argument_parameters: {init_checkpoint: checkpoint}}
"""


def checkpoint_bringup(tmp_path: Path):
    for name, text in (('robot', '{}'), ('policy', "{checkpoint: ''}"),
                       ('learner', '{work_dir: /tmp/w}')):
        (tmp_path / f'{name}.yaml').write_text(f'/**:\n  ros__parameters: {text}\n')
    path = tmp_path / 'd.yaml'
    path.write_text(CHECKPOINT_BRINGUP)
    return load_description(path)


def test_checkpoint_argument_sets_its_parameters_after_the_files(tmp_path):
    description = checkpoint_bringup(tmp_path)
    assert all(not n.parameter_values for n in resolve(description))
    robot, policy, learner = resolve(description, {'checkpoint': 'runs/x y/sft'})
    assert robot.parameter_values == ()
    assert policy.parameter_values == (('checkpoint', 'runs/x y/sft'),)
    assert learner.parameter_values == (('init_checkpoint', 'runs/x y/sft'),)
    # After the parameter files, as a YAML string (rcl parses -p values as YAML).
    assert ros_arguments(policy)[-2:] == ['-p', 'checkpoint:="runs/x y/sft"']


def test_the_policy_trusts_the_learner_started_beside_it(tmp_path):
    # The real bringup: with the defaults both sides agree, and nothing is added.
    nodes = {n.name: n for n in resolve(load_description(description_path('bringup')))}
    assert nodes['policy'].parameter_values == (('use_sim_time', True),)
    # A params file moves the learner's work_dir and key: the policy gets both added after
    # what its own files say (kept), and one command-line word per list.
    extra = tmp_path / 'extra.yaml'
    extra.write_text('/**/learner:\n  ros__parameters: {work_dir: /data/learner, '
                     'signing_key: /data/keys/robot.key}\n'
                     '/**/policy:\n  ros__parameters: {checkpoint_roots: [/data/sft]}\n')
    nodes = {n.name: n for n in resolve(load_description(description_path('bringup')),
                                        {'params_file': str(extra)})}
    values = dict(nodes['policy'].parameter_values)
    assert values['checkpoint_roots'] == ['/data/sft', '/data/learner']
    assert values['trusted_keys'] == ['~/.habc/keys', '/data/keys/robot.pub']
    assert '-p' in ros_arguments(nodes['policy'])
    assert 'checkpoint_roots:=["/data/sft","/data/learner"]' in ros_arguments(nodes['policy'])
    # Without a learner in the bringup there is nothing to trust.
    nodes = resolve(load_description(description_path('bringup')),
                    {'use_learner': 'false'})
    assert all('trusted_keys' not in dict(n.parameter_values) for n in nodes)


def test_file_parameter_follows_node_keys_and_file_order(tmp_path):
    description = checkpoint_bringup(tmp_path)
    extra = tmp_path / 'extra.yaml'
    extra.write_text('/**/learner:\n  ros__parameters: {init_checkpoint: /a}\n'
                     '/robot1/policy:\n  ros__parameters: {checkpoint: /b}\n'
                     '/*/learner:\n  ros__parameters: {init_checkpoint: /c}\n')
    _, policy, learner = resolve(description, {'params_file': str(extra)})
    assert file_parameter(policy, 'checkpoint') == ''  # policy.yaml's; /robot1 is not its ns
    assert file_parameter(learner, 'init_checkpoint') == '/a'  # /*/ needs one namespace
    assert file_parameter(learner, 'work_dir') == '/tmp/w'
    assert file_parameter(learner, 'nothing') is None
    _, policy, learner = resolve(description, {'params_file': str(extra),
                                               'namespace': 'robot1'})
    assert file_parameter(policy, 'checkpoint') == '/b'
    assert file_parameter(learner, 'init_checkpoint') == '/c'  # the last match wins


def test_checkpoint_notice_says_what_the_nodes_start_from_or_what_to_do(tmp_path):
    description = checkpoint_bringup(tmp_path)
    search = [tmp_path / 'runs' / 'demo']
    notice = checkpoint_notice(resolve(description), search)
    assert notice == f'{NO_CHECKPOINT_HINT} (searched {search[0]})'
    assert '\n' not in notice
    # Named by the argument or by the parameter files: nothing to say.
    assert checkpoint_notice(resolve(description, {'checkpoint': '/ckpt'}), search) is None
    both = tmp_path / 'both.yaml'
    both.write_text('/**:\n  ros__parameters: {checkpoint: /p, init_checkpoint: /l}\n')
    assert checkpoint_notice(resolve(description, {'params_file': str(both)}), search) is None
    # A trained one: the nodes will find it, and the line names it.
    sft = search[0] / 'sft'
    sft.mkdir(parents=True)
    (sft / 'model.safetensors').write_bytes(b'w')
    (sft / 'config.json').write_text('{}')
    notice = checkpoint_notice(resolve(description), search)
    assert notice.startswith('checkpoint: policy.checkpoint, learner.init_checkpoint left '
                             f'empty, so the nodes start from {sft}')


def test_params_file_argument_layers_one_more_file_on_every_node(tmp_path):
    path = tmp_path / 'd.yaml'
    (tmp_path / 'a.yaml').write_text('/**:\n  ros__parameters: {}\n')
    path.write_text("""
arguments:
  params_file: {default: ''}
nodes:
  - {name: a, package: p, executable: e, parameters: [a.yaml]}
""")
    description = load_description(path)
    assert resolve(description)[0].parameters == (tmp_path / 'a.yaml',)
    extra = tmp_path / 'extra.yaml'
    extra.write_text('/**:\n  ros__parameters: {}\n')
    (node,) = resolve(description, {'params_file': str(extra)})
    assert node.parameters == (tmp_path / 'a.yaml', extra)
    with pytest.raises(DescriptionError, match='no such parameter file'):
        resolve(description, {'params_file': str(tmp_path / 'missing.yaml')})


def test_use_sim_time_follows_use_sim_unless_given(tmp_path):
    (tmp_path / 'n.yaml').write_text('/**:\n  ros__parameters: {}\n')
    path = tmp_path / 'd.yaml'
    path.write_text("""
arguments:
  use_sim: {default: 'true'}
  use_sim_time: {default: auto}
nodes:
  - {name: robot, package: p, executable: r, parameters: [n.yaml]}
  - {name: policy, package: p, executable: e, parameters: [n.yaml]}
""")
    description = load_description(path)
    assert {n.parameter_values for n in resolve(description)} == {(('use_sim_time', True),)}
    # A bool, not the string 'true': rcl would refuse a string for use_sim_time.
    assert ros_arguments(resolve(description)[0])[-2:] == ['-p', 'use_sim_time:=true']
    assert resolve(description, {'use_sim': 'false'})[1].parameter_values == (
        ('use_sim_time', False),)
    assert resolve(description, {'use_sim': 'false', 'use_sim_time': 'true'})[1]\
        .parameter_values == (('use_sim_time', True),)
    with pytest.raises(DescriptionError, match='use_sim_time'):
        resolve(description, {'use_sim_time': 'sometimes'})


def test_the_bringup_runs_the_simulated_robot_on_simulated_time():
    bringup = load_description(description_path('bringup'))
    nodes = resolve(bringup)
    assert all(dict(n.parameter_values)['use_sim_time'] is True for n in nodes)
    real = resolve(bringup, {'use_sim': 'false', 'use_scripted_operator': 'false'})
    assert all(dict(n.parameter_values)['use_sim_time'] is False for n in real)


FLEET = """
arguments:
  robots: {default: '2'}
  storage_root: {default: /data/fleet}
  params_file: {default: ''}
  use_sim: {default: 'true'}
  use_sim_time: {default: auto}
nodes:
  - {name: robot, package: p, executable: r, per_robot: true, required: true,
     robot_parameters: {seed: '{robot_index}00'}}
  - {name: episode_recorder, package: habc_policy, executable: episode_recorder_node,
     per_robot: true, robot_parameters: {storage_dir: '{storage_root}/{robot}'}}
  - {name: learner, package: p, executable: l, required: true,
     robot_parameters: {index_paths: '{storage_root}/{robot}/episodes.sqlite',
                        root: '{storage_root}'}}
"""


def test_a_fleet_starts_each_robots_stack_in_its_namespace_and_one_learner(tmp_path):
    path = tmp_path / 'fleet.yaml'
    path.write_text(FLEET)
    nodes = resolve(load_description(path))
    assert [(n.full_name, n.group) for n in nodes] == [
        ('/robot1/robot', 'robot1'), ('/robot1/episode_recorder', 'robot1'),
        ('/robot2/robot', 'robot2'), ('/robot2/episode_recorder', 'robot2'), ('/learner', '')]
    values = {n.full_name: dict(n.parameter_values) for n in nodes}
    assert values['/robot2/robot'] == {'use_sim_time': True, 'seed': 200}
    assert values['/robot1/episode_recorder']['storage_dir'] == '/data/fleet/robot1'
    # The learner reads every robot's store, on the wall clock (each robot has its own).
    assert values['/learner'] == {'use_sim_time': False, 'root': '/data/fleet', 'index_paths': [
        '/data/fleet/robot1/episodes.sqlite', '/data/fleet/robot2/episodes.sqlite']}
    assert ('/clock', '/robot2/clock') in nodes[2].remappings
    assert not nodes[4].remappings
    named = resolve(load_description(path), {'robots': 'left, right,arm_3'})
    assert [n.namespace for n in named if n.name == 'robot'] == ['/left', '/right', '/arm_3']


@pytest.mark.parametrize('robots, message', [
    ('left,left', "robot namespace\\(s\\) \\['left'\\] given twice"),
    ('0', 'names no robot'),
    ('a,2b', "'2b' is not a robot namespace"),
])
def test_colliding_or_bad_robot_namespaces_are_refused(tmp_path, robots, message):
    path = tmp_path / 'fleet.yaml'
    path.write_text(FLEET)
    with pytest.raises(DescriptionError, match=message):
        resolve(load_description(path), {'robots': robots})


def test_two_recorders_writing_one_store_under_one_robot_label_are_refused(tmp_path):
    path = tmp_path / 'fleet.yaml'
    path.write_text(FLEET)
    same = tmp_path / 'same.yaml'
    # Every robot's recorder is told the same label: the robot column cannot tell them apart.
    same.write_text('/**/episode_recorder:\n  ros__parameters: {robot: arm}\n')
    description = load_description(path)
    different_stores = resolve(description, {'params_file': str(same)})
    assert len(different_stores) == 5  # own stores: the same label is harmless
    path.write_text(FLEET.replace("'{storage_root}/{robot}'", "'{storage_root}'"))
    with pytest.raises(DescriptionError, match="/robot1/episode_recorder and "
                       "/robot2/episode_recorder would both record into /data/fleet as "
                       "robot 'arm'"):
        resolve(load_description(path), {'params_file': str(same)})
    # Without the label, each records under its namespace: one store is fine.
    assert len(resolve(load_description(path))) == 5


@pytest.mark.parametrize('text, message', [
    ('nodes:\n  - {name: a, package: p, executable: e, per_robot: true}',
     "per_robot, but the description declares no 'robots' argument"),
    ("arguments: {robots: {default: '1'}}\nnodes:\n  - {name: a, package: p, executable: e, "
     "robot_parameters: {x: '{nope}'}}", "names \\['nope'\\]"),
    ("nodes:\n  - {name: a, package: p, executable: e, robot_parameters: {x: '{robot}'}}",
     "names a robot, but the description declares no 'robots' argument"),
])
def test_invalid_fleet_descriptions_name_the_problem(tmp_path, text, message):
    with pytest.raises(DescriptionError, match=message):
        load_description(write(tmp_path, text))


def test_the_shipped_fleet_matches_the_bringup():
    root = Path(__file__).resolve().parents[3]
    fleet = load_description(root / 'config' / 'fleet.yaml')
    bringup = load_description(root / 'config' / 'bringup.yaml')
    # Each robot runs the bringup's robot-side nodes with the same parameter files.
    assert {(n.name, n.executable, n.parameters) for n in fleet.nodes if n.per_robot} == {
        (n.name, n.executable, n.parameters) for n in bringup.nodes if n.name != 'learner'}
    nodes = resolve(fleet, {'robots': '3'})
    policies = [n for n in nodes if n.name == 'policy']
    assert len(policies) == 3 and len([n for n in nodes if n.name == 'learner']) == 1
    # One PolicyUpdate for all: each policy node listens on the learner's topic.
    assert all(('policy/update', '/policy/update') in n.remappings for n in policies)
