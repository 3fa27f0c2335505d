"""habc keys: the key pair that signs policy updates, and signatures for weights_uri.

A policy node applies a PolicyUpdate (or a weights_uri) only when a key in its trusted_keys
signed it (habc_common/update_trust.py). The learner node creates its pair on its first
start; these commands make one ahead of time, show what a robot must trust, and sign a
checkpoint an operator loads by hand:

  habc keys init                   create ~/.habc/keys/learner.key and learner.pub
  habc keys show                   key id, files, and where a robot's copy of the .pub goes
  habc keys sign runs/v7           the three `ros2 param set` commands that load runs/v7
"""

import argparse
import hashlib
import json
from pathlib import Path
import sys

from habc_common.update_trust import (
    companions_digest,
    create_key_pair,
    DEFAULT_POLICY_NAME,
    DEFAULT_SIGNING_KEY,
    encode_token,
    load_public_key,
    load_signing_key,
    public_path,
    UntrustedUpdateError,
    UpdateClaim,
)

HELP = __doc__
WEIGHTS_FILE = 'model.safetensors'  # habc_policy.models.base.WEIGHTS_FILE (no torch here)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the subcommands of `habc keys`."""
    actions = parser.add_subparsers(dest='action', metavar='ACTION', required=True)
    init = actions.add_parser('init', help='create the signing key pair')
    show = actions.add_parser('show', help='print the key id and the public key file')
    sign = actions.add_parser('sign', help='sign a checkpoint for the weights_uri parameter')
    for sub in (init, show, sign):
        sub.add_argument('--key', default=DEFAULT_SIGNING_KEY,
                         help='private key file (default: %(default)s; its .pub beside it)')
    init.add_argument('--force', action='store_true',
                      help='replace an existing pair (every robot must then trust the new one)')
    sign.add_argument('checkpoint', type=Path, help='checkpoint folder (model.safetensors + '
                      "config.json) under the policy node's checkpoint_roots")
    sign.add_argument('--version', type=int, default=None,
                      help="version number to load it as; must exceed the node's active one "
                      "(default: the checkpoint's own number)")
    sign.add_argument('--policy-name', default=DEFAULT_POLICY_NAME,
                      help="the policy node's policy_name (default: %(default)s)")
    sign.add_argument('--node', default='/policy',
                      help='policy node name for the printed commands (default: %(default)s)')


def run(args: argparse.Namespace) -> int:
    """Run one `habc keys` action."""
    try:
        return {'init': _init, 'show': _show, 'sign': _sign}[args.action](args)
    except (UntrustedUpdateError, FileExistsError, OSError, ValueError) as exc:
        print(f'habc keys {args.action}: {exc}', file=sys.stderr)
        return 2


def _init(args: argparse.Namespace) -> int:
    path = create_key_pair(args.key, overwrite=args.force)
    print(f'created {path} (private, mode 600) and {public_path(path)}')
    return _show(args)


def _show(args: argparse.Namespace) -> int:
    key = load_signing_key(args.key)
    public = public_path(key.path)
    identifier, _ = load_public_key(public)
    if identifier != key.key_id:
        raise ValueError(f'{public} is not the public half of {key.path} (key ids '
                         f'{identifier} and {key.key_id}); recreate it with --force')
    print(f'key id:      {key.key_id}\nprivate key: {key.path}\npublic key:  {public}\n'
          f'Policy nodes on this machine trust {public.parent} by default. On another '
          f"machine, copy {public.name} into a folder in the policy node's trusted_keys.")
    return 0


def _sign(args: argparse.Namespace) -> int:
    folder = args.checkpoint.expanduser().resolve()
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise ValueError(f'{folder}: no {WEIGHTS_FILE}; pass a checkpoint folder')
    version = args.version if args.version is not None else _own_version(folder)
    digest = hashlib.sha256()
    with weights.open('rb') as file:
        for block in iter(lambda: file.read(1 << 20), b''):
            digest.update(block)
    sha256 = digest.hexdigest()
    key = load_signing_key(args.key)
    uri = str(folder)
    # The critic and calibration beside the weights are signed with them (sign again after
    # habc calibrate).
    companions = companions_digest(folder)
    token = encode_token(version, key.key_id, key.sign(
        UpdateClaim(version, sha256, uri, args.policy_name, companions)), companions)
    print(f'# {folder} as version {version} of policy {args.policy_name!r}, signed by key '
          f'{key.key_id}. In this order (weights_uri starts the load):')
    print(f'ros2 param set {args.node} expected_sha256 {sha256}')
    print(f'ros2 param set {args.node} weights_signature {token}')
    print(f'ros2 param set {args.node} weights_uri {uri}')
    return 0


def _own_version(folder: Path) -> int:
    try:
        text = str(json.loads((folder / 'config.json').read_text()).get('version', ''))
        return int(text.split(':')[0])
    except (OSError, ValueError, AttributeError):
        raise ValueError(f'{folder}: config.json names no version number; pass --version N '
                         "above the policy node's active version") from None
