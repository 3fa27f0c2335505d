"""`habc demo`'s bookkeeping: the per-version table and the parameter file it writes."""

import json
from pathlib import Path

import yaml

from habc.demo import (
    DemoConfig,
    format_row,
    Monitor,
    set_aside_if_stale,
    version_stats,
    write_params,
)
from habc_episodes.index import EpisodeIndex


def test_version_stats_group_labelled_episodes_by_the_version_that_ran_them(tmp_path):
    path = tmp_path / 'episodes.sqlite'
    rows = [('a', '1:sft', 'success', 0), ('b', '1:sft', 'failure', 2), ('c', '2', 'success', 1),
            ('d', '', 'failure', 1), ('e', '2', None, 0)]
    with EpisodeIndex(path) as index:
        for n, (episode, version, outcome, interventions) in enumerate(rows):
            index.create(episode, f'/bags/{episode}', 'task', version, started_at=10.0 * n)
            index.finish(episode, 100, interventions, ended_at=10.0 * n + 5)
            if outcome:
                index.label(episode, outcome, 'test', now=10.0 * n + 6)
    monitor = Monitor(updates={'2': 100.0}, activations={'1:sft': 0.0, '2': 100.25})
    stats = {r.version: r for r in version_stats(path, monitor)}
    assert set(stats) == {'1:sft', '2', 'none'}   # 'e' is unlabelled: not counted
    first = stats['1:sft']
    assert (first.episodes, first.successes, first.interventions) == (2, 1, 2)
    assert first.success_rate == 0.5 and first.update_latency_s is None
    assert stats['2'].update_latency_s == 0.25
    # 1 of 1: Wilson 95% 21-100%
    assert format_row(stats['2']) == ('|       2 |        1 |      100% |      21-100% | '
                                      '            1 |         0.25 s |')
    assert '- (initial)' in format_row(first)
    assert version_stats(tmp_path / 'missing.sqlite', monitor) == []


def test_params_file_points_every_node_at_the_run_folder(tmp_path):
    tmp_path = tmp_path.resolve()
    config = DemoConfig(out=tmp_path, rounds=3, episodes_per_round=2, steps_per_round=7)
    (tmp_path / 'run').mkdir()
    path = write_params(config, tmp_path / 'sft', tmp_path / 'run')
    params = yaml.safe_load(path.read_text())
    learner = params['/**/learner']['ros__parameters']
    assert learner['index_path'] == str(tmp_path / 'run' / 'episodes' / 'episodes.sqlite')
    assert (learner['episodes_per_round'], learner['steps_per_round']) == (2, 7)
    assert params['/**/episode_recorder']['ros__parameters']['storage_dir'] == str(
        tmp_path / 'run' / 'episodes')
    assert params['/**/policy']['ros__parameters']['checkpoint'] == str(
        (tmp_path / 'sft').resolve())
    assert Path(learner['init_checkpoint']) == (tmp_path / 'sft').resolve()
    # The simulator renders, and the synchronizer expects, the cameras the SFT was made for.
    for node in ('/**/sim_robot', '/**/sync'):
        assert params[node]['ros__parameters']['cameras'] == list(config.cameras)


def test_an_sft_checkpoint_of_an_older_recipe_is_kept_aside_not_reused(tmp_path, capsys):
    def checkpoint(name, **config):
        path = tmp_path / name
        path.mkdir()
        (path / 'config.json').write_text(json.dumps({'type': 'small_vla', 'config': config}))
        return path
    current = checkpoint('sft', num_views=2, locator={'outputs': 3})
    set_aside_if_stale(current, ('top', 'angle'))
    assert (current / 'config.json').is_file()            # the recipe matches: kept in place
    old = checkpoint('sft_one_camera', num_views=1, locator={})
    set_aside_if_stale(old, ('top', 'angle'))
    assert not old.exists()
    (aside,) = tmp_path.glob('sft_one_camera-old-*')
    assert (aside / 'config.json').is_file()              # renamed, nothing deleted
    assert 'older recipe (1 camera(s), locator: no)' in capsys.readouterr().out


def test_the_long_schedule_fills_in_only_the_options_left_at_their_defaults():
    import argparse

    from habc.demo import add_arguments, apply_long_schedule, LONG_OUT, LONG_SCHEDULE

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(['--long', '--rounds', '5'])
    defaults = vars(parser.parse_args([]))
    apply_long_schedule(args, defaults)
    assert args.rounds == 5                                   # given explicitly: kept
    assert args.demos == LONG_SCHEDULE['demos'] and args.out == LONG_OUT
    assert args.episodes_per_round == LONG_SCHEDULE['episodes_per_round']


def test_with_a_backbone_only_a_transformers_vla_on_that_folder_is_reused(tmp_path, capsys):
    backbone = tmp_path / 'vlm'
    backbone.mkdir()

    def checkpoint(name, kind, **config):
        path = tmp_path / name
        path.mkdir()
        (path / 'config.json').write_text(json.dumps({'type': kind, 'config': config}))
        return path
    current = checkpoint('sft', 'transformers_vla', num_views=2, backbone_dir=str(backbone))
    set_aside_if_stale(current, ('top', 'angle'), backbone)
    assert (current / 'config.json').is_file()
    small = checkpoint('sft_small', 'small_vla', num_views=2, locator={'outputs': 3})
    set_aside_if_stale(small, ('top', 'angle'), backbone)
    assert not small.exists() and list(tmp_path.glob('sft_small-old-*'))
    assert 'older recipe (2 camera(s), backbone: none)' in capsys.readouterr().out
    other = checkpoint('sft_other', 'transformers_vla', num_views=2,
                       backbone_dir=str(tmp_path / 'another_vlm'))
    set_aside_if_stale(other, ('top', 'angle'), backbone)
    assert not other.exists()
    # Without --backbone the demo's recipe is the small VLA again.
    vla = checkpoint('sft_vla', 'transformers_vla', num_views=2, backbone_dir=str(backbone))
    set_aside_if_stale(vla, ('top', 'angle'))
    assert not vla.exists()


def test_a_backbone_that_is_not_a_vlm_folder_stops_the_demo_before_any_work(tmp_path,
                                                                           capsys):
    import argparse

    from habc.demo import add_arguments, run

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert 'SFT policy on a pretrained vision-language model' in ' '.join(
        parser.format_help().split())
    out = tmp_path / 'demo'
    args = parser.parse_args(['--out', str(out), '--backbone', str(tmp_path / 'missing')])
    assert run(args) == 2
    err = capsys.readouterr().err
    assert 'habc demo: --backbone' in err and 'not found' in err and 'nothing is downloaded' in err
    assert not out.exists()


def test_the_sft_on_a_backbone_records_demonstrations_and_writes_a_transformers_vla(
        tmp_path, tiny_backbone):
    from safetensors.torch import load_file

    from habc.demo import sft_profile, train_backbone_sft
    from habc_policy.models.base import load_policy

    # Two real expert demonstrations in MuJoCo (both succeed at these seeds), two steps.
    config = DemoConfig(out=tmp_path, demos=2, sft_steps=2, batch_size=4, workers=1,
                        backbone=tiny_backbone.resolve())
    checkpoint = tmp_path / 'sft'
    train_backbone_sft(config, sft_profile(config), checkpoint)

    policy = load_policy(checkpoint)
    assert type(policy).__name__ == 'TransformersVLA' and policy.version == '1:sft'
    assert (policy.config.num_views, policy.config.image_size) == (2, 96)
    assert policy.config.backbone_dir == str(tiny_backbone.resolve())
    assert not [k for k in load_file(str(checkpoint / 'model.safetensors'))
                if k.startswith('backbone.')]
    set_aside_if_stale(checkpoint, config.cameras, config.backbone)
    assert (checkpoint / 'model.safetensors').is_file()  # the next run reuses it
