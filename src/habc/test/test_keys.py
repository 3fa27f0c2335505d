"""habc keys: the learner's key pair, what a robot trusts, and signing weights_uri loads."""

import json
from types import SimpleNamespace

import pytest

from habc.cli import main
from habc_common.update_trust import decode_token, TrustList, UpdateClaim


@pytest.fixture
def habc(tmp_path, monkeypatch, capsys):
    """Run `habc ...` in this process; HOME (so ~/.habc/keys) is the test's own."""
    monkeypatch.setenv('HOME', str(tmp_path))

    def run(*args: str) -> SimpleNamespace:
        with pytest.raises(SystemExit) as exit_:
            main(list(args))
        out = capsys.readouterr()
        return SimpleNamespace(returncode=exit_.value.code, stdout=out.out, stderr=out.err)
    return run


def test_init_show_and_sign(habc, tmp_path):
    keys = tmp_path / '.habc' / 'keys'
    shown = habc('keys', 'show')
    assert shown.returncode == 2 and 'create one with `habc keys init`' in shown.stderr

    created = habc('keys', 'init')
    assert created.returncode == 0, created.stderr
    assert (keys / 'learner.key').stat().st_mode & 0o777 == 0o600
    assert keys.stat().st_mode & 0o777 == 0o700
    key_id = created.stdout.split('key id:')[1].split()[0]
    again = habc('keys', 'init')  # a trusted key is never replaced by accident
    assert again.returncode == 2 and 'exists' in again.stderr
    assert key_id in habc('keys', 'show').stdout

    checkpoint = tmp_path / 'learner' / 'v7'
    checkpoint.mkdir(parents=True)
    (checkpoint / 'model.safetensors').write_bytes(b'weights')
    (checkpoint / 'config.json').write_text(json.dumps({'version': '7'}))
    signed = habc('keys', 'sign', str(checkpoint), '--node', '/robot1/policy')
    assert signed.returncode == 0, signed.stderr
    commands = [line.split() for line in signed.stdout.splitlines()
                if line.startswith('ros2 param set')]
    assert [c[3:5] for c in commands] == [['/robot1/policy', 'expected_sha256'],
                                         ['/robot1/policy', 'weights_signature'],
                                         ['/robot1/policy', 'weights_uri']]
    sha, token, uri = (c[5] for c in commands)
    version, signer, signature, companions = decode_token(token)
    assert (version, signer, uri, companions) == (7, key_id, str(checkpoint), '')
    # What the policy node checks: the trusted key over exactly this claim.
    trust = TrustList([str(keys)])
    assert trust.verify(UpdateClaim(7, sha, uri, 'habc'), signer, signature) == key_id

    # Without a version in config.json, the operator must choose one.
    (checkpoint / 'config.json').write_text('{}')
    unversioned = habc('keys', 'sign', str(checkpoint))
    assert unversioned.returncode == 2 and 'pass --version N' in unversioned.stderr
    assert habc('keys', 'sign', str(checkpoint), '--version', '9').returncode == 0


def test_a_key_others_can_read_is_refused(habc, tmp_path):
    assert habc('keys', 'init').returncode == 0
    key = tmp_path / '.habc' / 'keys' / 'learner.key'
    key.chmod(0o644)
    shown = habc('keys', 'show')
    assert shown.returncode == 2 and f'run `chmod 600 {key}`' in shown.stderr
    doctor = habc('doctor', '--json')
    rows = {r['check']: r for r in json.loads(doctor.stdout)}
    assert rows['policy updates']['status'] == 'FAIL'
    key.chmod(0o600)
    doctor = habc('doctor', '--json')
    rows = {r['check']: r for r in json.loads(doctor.stdout)}
    assert rows['policy updates']['status'] == 'ok'
    assert 'updates must be signed' in rows['policy updates']['detail']
