"""Who may change the policy that drives the robot: signed updates from trusted checkpoints.

A PolicyUpdate's sha256 proves that the weights are the ones announced, not who announced
them: any process on the DDS domain can publish one. So the learner signs every update with
its Ed25519 key, and the policy node applies one only when

1. it is signed by a key in its trust list (public key files, `*.pub`);
2. the signature covers what the update claims: version, sha256, URI and policy name (an
   update for another robot's policy, or with a swapped URI, does not verify);
3. its URI names a checkpoint under one of the node's checkpoint roots, after resolving
   symbolic links (no `..`, no link out of the root);
4. its version is higher than the node's (policy_runtime checks that).

The same holds for the policy node's `weights_uri` parameter, whose claim travels in the
`weights_signature` parameter as a token (`habc keys sign` writes it).

Keys live in one folder, `~/.habc/keys` by default: `learner.key` (PKCS#8 PEM, mode 0600)
and `learner.pub` (SubjectPublicKeyInfo PEM). The learner node creates the pair on its first
start, and policy nodes trust that folder by default, so a single machine is secure without
a step; a robot on another machine gets a copy of `learner.pub` in its trusted folder.
No rclpy or torch here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
import hashlib
import json
import os
from pathlib import Path

DEFAULT_KEY_DIR = '~/.habc/keys'
PRIVATE_KEY_FILE = 'learner.key'
PUBLIC_KEY_SUFFIX = '.pub'
DEFAULT_SIGNING_KEY = f'{DEFAULT_KEY_DIR}/{PRIVATE_KEY_FILE}'
DEFAULT_POLICY_NAME = 'habc'
# Bytes signed before the claim, so that a habc update signature means nothing elsewhere.
SIGNATURE_CONTEXT = b'habc policy update v1\n'
SIGNATURE_BYTES = 64


def expand(path: str | Path) -> Path:
    """Return `path` with ~ and $VARIABLES expanded (as the learner's paths are)."""
    return Path(os.path.expandvars(os.path.expanduser(str(path))))


class UntrustedUpdateError(Exception):
    """An update that must not drive the robot; str(exc) is the reason, for the status."""


# Files beside the weights that the signature covers too, when present: the critic that
# raises help requests and its calibrated threshold (habc calibrate).
COMPANION_FILES = ('critic.safetensors', 'help_calibration.json')


def read_companions(folder: str | Path) -> dict[str, bytes]:
    """Return the contents of a checkpoint's companion files that exist, by name.

    Read once: what is hashed is what is loaded (a file swapped between the two cannot slip
    in).
    """
    contents = {}
    for name in COMPANION_FILES:
        path = Path(folder) / name
        if path.is_file():
            contents[name] = path.read_bytes()
    return contents


def companions_digest_of(contents: dict[str, bytes]) -> str:
    """Return the SHA-256 over companion file contents ('' when there are none).

    The digest covers each present file's name and content hash, in COMPANION_FILES order,
    so adding, removing or changing one changes it.
    """
    lines = [f'{name} {hashlib.sha256(contents[name]).hexdigest()}\n'
             for name in COMPANION_FILES if name in contents]
    return hashlib.sha256(''.join(lines).encode()).hexdigest() if lines else ''


def companions_digest(folder: str | Path) -> str:
    """Return the SHA-256 over a checkpoint folder's companion files ('' when it has none)."""
    return companions_digest_of(read_companions(folder))


@dataclass(frozen=True)
class UpdateClaim:
    """What a signature vouches for: this version of this policy is these weights, there.

    `companions_sha256` (companions_digest) vouches for the critic and calibration beside
    the weights; a claim without it is the same bytes as before it existed.
    """

    version: int
    sha256: str
    uri: str
    policy_name: str
    companions_sha256: str = ''

    def signed_bytes(self) -> bytes:
        """Return the canonical bytes the signature covers."""
        body = {'version': int(self.version), 'sha256': self.sha256.lower(), 'uri': self.uri,
                'policy_name': self.policy_name}
        if self.companions_sha256:
            body['companions_sha256'] = self.companions_sha256.lower()
        return SIGNATURE_CONTEXT + json.dumps(body, sort_keys=True,
                                              separators=(',', ':')).encode()


@dataclass(frozen=True)
class SigningKey:
    """A loaded private key and the id of its public half."""

    private_key: object  # cryptography's Ed25519PrivateKey
    key_id: str
    path: Path

    def sign(self, claim: UpdateClaim) -> bytes:
        """Return the 64-byte Ed25519 signature of `claim`."""
        return self.private_key.sign(claim.signed_bytes())


def key_id(public_key: object) -> str:
    """Return a short id of an Ed25519 public key: 16 hex digits of SHA-256 of its raw bytes."""
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def create_key_pair(private_path: str | Path, *, overwrite: bool = False) -> Path:
    """Write a new Ed25519 key pair: `private_path` (mode 0600) and its `.pub`; return it.

    Raises:
        FileExistsError: the private key exists and overwrite is False (a key that policy
            nodes trust is never replaced by accident).
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private_path = expand(private_path)
    if private_path.exists() and not overwrite:
        raise FileExistsError(f'{private_path} exists; policy nodes may trust it. Remove it '
                              'first (and update every trust list) to make a new one')
    private_path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(private_path.parent, 0o700)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    # Created with mode 0600 from the start: no moment in which others may read it.
    descriptor = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, 'wb') as file:
        file.write(pem)
    public_path(private_path).write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return private_path


def public_path(private_path: str | Path) -> Path:
    """Return where the public half of a private key file is kept (beside it, `.pub`)."""
    private_path = expand(private_path)
    return private_path.with_suffix(PUBLIC_KEY_SUFFIX)


def ensure_key_pair(private_path: str | Path) -> bool:
    """Create the key pair at `private_path` unless it exists; return True when created."""
    try:
        create_key_pair(private_path)
    except FileExistsError:
        return False
    return True


def load_signing_key(private_path: str | Path) -> SigningKey:
    """Load an Ed25519 private key file.

    Raises:
        UntrustedUpdateError: missing, unreadable, not an Ed25519 key, or readable by
            others (a key anyone on the machine can read signs for anyone).
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = expand(private_path)
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except OSError as exc:
        raise UntrustedUpdateError(f'signing key {path}: {exc.strerror or exc}; create one '
                                   'with `habc keys init`') from None
    if mode & 0o077:
        raise UntrustedUpdateError(f'signing key {path} can be read by other users (mode '
                                   f'{mode & 0o777:o}); run `chmod 600 {path}`')
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise UntrustedUpdateError(f'signing key {path}: not an unencrypted PEM private key '
                                   f'({exc})') from None
    if not isinstance(key, Ed25519PrivateKey):
        raise UntrustedUpdateError(f'signing key {path}: {type(key).__name__}, expected '
                                   'Ed25519')
    return SigningKey(key, key_id(key.public_key()), path)


def load_public_key(path: str | Path) -> tuple[str, object]:
    """Return (key id, Ed25519 public key) of a PEM public key file (ValueError if not one)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    data = Path(path).read_bytes()
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise ValueError(f'{path}: not a PEM public key ({exc})') from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f'{path}: {type(key).__name__}, expected an Ed25519 public key')
    return key_id(key), key


class TrustList:
    """The public keys whose signatures a policy node accepts.

    Entries are `.pub` files or folders of them. They are read at each verification (a few
    small files), so a key the learner creates after the policy node started is trusted
    without a restart, and a key removed from the folder stops being trusted at once.
    """

    def __init__(self, entries: Sequence[str]) -> None:
        self.entries = [expand(entry) for entry in entries]

    def keys(self) -> tuple[dict[str, object], list[str]]:
        """Return ({key id: public key}, problems with entries that could not be read)."""
        keys: dict[str, object] = {}
        problems: list[str] = []
        for entry in self.entries:
            files = (sorted(entry.glob(f'*{PUBLIC_KEY_SUFFIX}')) if entry.is_dir()
                     else [entry] if entry.exists() else [])
            if not entry.exists():
                problems.append(f'{entry} does not exist')
            for file in files:
                try:
                    identifier, key = load_public_key(file)
                except (OSError, ValueError) as exc:
                    problems.append(str(exc))
                    continue
                keys[identifier] = key
        return keys, problems

    def verify(self, claim: UpdateClaim, signer: str, signature: bytes) -> str:
        """Return the signer's key id when `signature` is a trusted key's over `claim`.

        Raises:
            UntrustedUpdateError: unsigned, signed by a key not in the list, or a signature
                that does not match the claim.
        """
        from cryptography.exceptions import InvalidSignature

        if not signature:
            raise UntrustedUpdateError(
                'unsigned update: this policy node accepts only updates signed by a trusted '
                'key (a learner with signing_key, or `habc keys sign`)')
        keys, problems = self.keys()
        if not keys:
            detail = f' ({"; ".join(problems)})' if problems else ''
            raise UntrustedUpdateError(
                f'no trusted key in {[str(e) for e in self.entries]}{detail}: copy the '
                "learner's public key (`habc keys show`) there, or set trusted_keys")
        key = keys.get(signer)
        if key is None:
            raise UntrustedUpdateError(f'signed by key {signer or "(none named)"}, which is not '
                                       f'trusted (trusted: {sorted(keys)})')
        if len(signature) != SIGNATURE_BYTES:
            raise UntrustedUpdateError(f'signature of {len(signature)} bytes; Ed25519 '
                                       f'signatures have {SIGNATURE_BYTES}')
        try:
            key.verify(bytes(signature), claim.signed_bytes())
        except InvalidSignature:
            raise UntrustedUpdateError(
                f'the signature of key {signer} does not match this update (version '
                f'{claim.version}, sha256 {claim.sha256[:12]}, uri {claim.uri!r}, policy '
                f'{claim.policy_name!r}): changed after signing, or meant for another '
                'policy') from None
        return signer


def check_under_roots(path: str | Path, roots: Iterable[str | Path],
                      files: Iterable[str] = ()) -> Path:
    """Return `path` resolved when it (and `files` inside it) lie under one of `roots`.

    Symbolic links are resolved first, so a link inside a root that points out of it does
    not pass; a path with a `..` component is refused before anything is resolved.

    Raises:
        UntrustedUpdateError: outside every root, or no roots configured.
    """
    path = expand(path)
    if '..' in path.parts:
        raise UntrustedUpdateError(f'{path}: ".." in a checkpoint path is not accepted')
    resolved_roots = [expand(root).resolve() for root in roots]
    if not resolved_roots:
        raise UntrustedUpdateError('no checkpoint_roots configured: this policy node loads '
                                   'updates only from folders listed there')
    resolved = path.resolve()
    for name in ('', *files):
        named, candidate = path / name, (resolved / name).resolve()
        if not any(candidate.is_relative_to(root) for root in resolved_roots):
            via = f' (a link to {candidate})' if candidate != named.absolute() else ''
            raise UntrustedUpdateError(
                f'{named}{via} is outside the checkpoint roots '
                f'{[str(root) for root in resolved_roots]}; copy the checkpoint under one of '
                'them or add its folder to checkpoint_roots')
    return resolved


def encode_token(version: int, signer: str, signature: bytes, companions: str = '') -> str:
    """Return the weights_signature parameter text.

    `<version>.<key id>.<signature hex>`, then `.<companions sha256>` when the signature
    covers a critic and calibration beside the weights.
    """
    token = f'{int(version)}.{signer}.{bytes(signature).hex()}'
    return f'{token}.{companions}' if companions else token


def decode_token(token: str) -> tuple[int, str, bytes, str]:
    """Parse a weights_signature token into (version, key id, signature, companions sha256).

    Raises:
        ValueError: a malformed token, with what is wrong.
    """
    parts = token.strip().split('.')
    if len(parts) not in (3, 4):
        raise ValueError('weights_signature must be <version>.<key id>.<signature hex>'
                         '[.<companions sha256>] (from `habc keys sign`)')
    version, signer, signature = parts[:3]
    companions = parts[3] if len(parts) == 4 else ''
    try:
        return int(version), signer, bytes.fromhex(signature), companions
    except ValueError:
        raise ValueError('weights_signature: the version must be an integer and the '
                         'signature hex digits') from None


@dataclass(frozen=True)
class UpdateGate:
    """A policy node's rules for updates: who may sign them, where checkpoints may lie.

    require_signature False accepts unsigned updates (a node on an isolated test bench);
    the checkpoint roots are checked either way.
    """

    trust: TrustList
    roots: tuple[str, ...]
    policy_name: str = DEFAULT_POLICY_NAME
    require_signature: bool = True

    @classmethod
    def of(cls, trusted_keys: Sequence[str], roots: Sequence[str],
           policy_name: str = DEFAULT_POLICY_NAME, require_signature: bool = True,
           ) -> UpdateGate:
        """Build a gate from parameter values."""
        return cls(TrustList(trusted_keys), tuple(roots), policy_name, require_signature)

    def check_claim(self, claim: UpdateClaim, signer: str, signature: bytes) -> str:
        """Return the signer's key id ('' unsigned and allowed); raise UntrustedUpdateError."""
        if claim.policy_name != self.policy_name and (signature or self.require_signature):
            raise UntrustedUpdateError(
                f'update for policy {claim.policy_name!r}; this node runs '
                f'{self.policy_name!r}: a learner of another fleet publishes on this topic '
                '(give each fleet its own policy_name, and its own ROS_DOMAIN_ID or topic), '
                "or set this node's policy_name if the policy was renamed")
        if not self.require_signature and not signature:
            return ''
        return self.trust.verify(claim, signer, signature)

    def check_location(self, folder: str | Path, files: Iterable[str] = ()) -> Path:
        """Return the checkpoint folder resolved when it lies under the roots (see above)."""
        return check_under_roots(folder, self.roots, files)
