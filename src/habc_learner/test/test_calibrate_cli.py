"""`habc calibrate`: a checkpoint's critic scored on labelled bags, the threshold written back."""

import json

import numpy as np
import pytest

from habc_policy.help_calibration import (
    CALIBRATION_FILE,
    conformal_threshold,
    HelpCalibration,
    sustained_low,
)

SEC = 1_000_000_000
POLICY, HUMAN = 0, 1


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    """Return a low-dim policy with a (random-weight) HABC critic, saved on disk."""
    from safetensors.torch import save_file
    import torch

    from habc_policy.models.critic import DualHeadCritic
    from habc_policy.models.lowdim import LowDimFlowConfig, LowDimFlowPolicy

    torch.manual_seed(3)
    policy = LowDimFlowPolicy(LowDimFlowConfig(state_dim=14, action_dim=14, horizon=5,
                                                     hidden_dim=32, feature_dim=16))
    policy.version = '4:habc'
    folder = tmp_path_factory.mktemp('ckpt') / 'checkpoint'
    policy.save(folder)
    critic = DualHeadCritic(16, hidden_dim=16, num_layers=1)
    save_file({k: v.contiguous() for k, v in critic.state_dict().items()},
              str(folder / 'critic.safetensors'))
    return folder, policy, critic


def write(bags, path, offset: float, sources: list[int]):
    messages = []
    for k, source in enumerate(sources):
        stamp = 100 * SEC + k * SEC // 50
        state = np.full(14, offset + 0.02 * k)
        messages.append(('/observation', stamp, bags.observation(stamp, state, k)))
        messages.append(('/executed_action', stamp + 1000,
                         bags.action(stamp + 1000, source, state, episode_id=path.name)))
    return bags.write(path, messages)


def run(argv):
    import argparse

    from habc_learner.calibrate_cli import add_arguments
    from habc_learner.calibrate_cli import run as calibrate
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return calibrate(parser.parse_args([*argv, '--quiet']))


def expected_score(policy, critic, offset: float, steps: int) -> float:
    import torch

    from habc_policy.models.critic import estimate
    chosen = np.arange(0, steps, 10)
    states = torch.as_tensor(np.stack([np.full(14, offset + 0.02 * k) for k in chosen]),
                             dtype=torch.float32)
    p_v, _ = estimate(policy.eval(), critic.eval(), {'state': states})
    return sustained_low(tuple(zip((chosen * 0.02).tolist(), p_v.tolist(), strict=True)), 0.1)


def test_calibrate_writes_the_conformal_threshold_of_the_policys_own_successes(
        tmp_path, bags, checkpoint, capsys):
    folder, policy, critic = checkpoint
    rows, offsets = [], np.linspace(-1.0, 1.0, 9)
    for i, offset in enumerate(offsets):        # 9 successes the policy drove alone
        rows.append(f'{write(bags, tmp_path / "bags" / f"ok{i}", offset, [POLICY] * 40)},'
                    'success')
    # A success rescued by a human and a failure: they may not set the threshold.
    rows.append(f'{write(bags, tmp_path / "bags" / "rescued", -3.0, [POLICY] * 20 + [HUMAN] * 20)}'
                ',success')
    rows.append(f'{write(bags, tmp_path / "bags" / "failed", 3.0, [POLICY] * 40)},failure')
    labels = tmp_path / 'labels.csv'
    labels.write_text('\n'.join(rows) + '\n')
    assert run([str(folder), str(tmp_path / 'bags'), '--labels', str(labels),
                '--false-alarm-rate', '0.2', '--below-for', '0.1']) == 0
    calibration = HelpCalibration.load(folder)
    tau, bound = conformal_threshold([expected_score(policy, critic, o, 40) for o in offsets],
                                     0.2)
    assert calibration.help_threshold == pytest.approx(tau, abs=1e-6)
    assert calibration.false_alarm_bound == pytest.approx(bound) == pytest.approx(0.2)
    assert (calibration.calibration_successes, calibration.failures) == (9, 2)
    assert calibration.policy_version == '4:habc'
    out = capsys.readouterr().out
    assert 'help_threshold' in out and CALIBRATION_FILE in out
    stored = json.loads((folder / CALIBRATION_FILE).read_text())
    assert stored['target_false_alarm_rate'] == 0.2


def test_calibrate_says_what_is_missing(tmp_path, bags, checkpoint, capsys):
    folder, policy, _ = checkpoint
    bare = tmp_path / 'bare'
    policy.save(bare)                                    # no critic
    bag = write(bags, tmp_path / 'bags' / 'only_failure', 0.0, [POLICY] * 30)
    labels = tmp_path / 'labels.csv'
    labels.write_text(f'{bag},failure\n')
    assert run([str(bare), str(bag), '--labels', str(labels)]) == 2
    assert 'critic.safetensors' in capsys.readouterr().err
    assert run([str(folder), str(bag), '--labels', str(labels), '--dry-run']) == 2
    assert 'none succeeded without a takeover' in capsys.readouterr().err
    assert run([str(folder), str(bag), '--false-alarm-rate', '1.5']) == 2
    assert 'must lie in (0, 1)' in capsys.readouterr().err
