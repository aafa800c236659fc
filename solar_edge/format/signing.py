"""Ed25519 keys for packets: generate, save, load, key ids, sign, verify.

Files: the private key is PKCS#8 PEM (unencrypted), written with mode 0600; the public key
is one line of 64 lowercase hex digits (the raw 32-byte Ed25519 key). :func:`load_public_key`
also accepts a SubjectPublicKeyInfo PEM. The key id is the first 8 bytes of SHA-256 over the
raw public key; a packet names its signer by this id.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from solar_edge.errors import KeyFileError, SignatureError

KEY_ID_BYTES = 8
SIGNATURE_BYTES = 64
PUBLIC_KEY_BYTES = 32

TrustedKeys = (Mapping[bytes, Ed25519PublicKey] | Iterable[Ed25519PublicKey | str | Path]
               | Ed25519PublicKey)


def generate_private_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def public_key_bytes(key: Ed25519PublicKey | Ed25519PrivateKey) -> bytes:
    """The raw 32-byte public key."""
    if isinstance(key, Ed25519PrivateKey):
        key = key.public_key()
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(key: Ed25519PublicKey | Ed25519PrivateKey) -> bytes:
    """First 8 bytes of SHA-256 over the raw public key."""
    return hashlib.sha256(public_key_bytes(key)).digest()[:KEY_ID_BYTES]


def keyring(keys: TrustedKeys) -> dict[bytes, Ed25519PublicKey]:
    """Normalise trusted keys to ``{id: key}``: a mapping by key id, one public key, or an
    iterable of public keys and public key files (paths). KeyFileError for anything else."""
    if isinstance(keys, Mapping):
        ring = dict(keys)
        for kid, key in ring.items():
            if not isinstance(key, Ed25519PublicKey) or key_id(key) != kid:
                raise KeyFileError(f"key id {kid!r:.40} does not match its public key")
        return ring
    if isinstance(keys, Ed25519PublicKey):
        keys = [keys]
    elif isinstance(keys, str | Path | bytes) or not isinstance(keys, Iterable):
        raise KeyFileError(f"trusted keys must be a list of Ed25519 public keys or key files, "
                           f"got {type(keys).__name__} (e.g. [signing.load_public_key(path)])")
    ring = {}
    for key in keys:
        if isinstance(key, str | Path):
            key = load_public_key(key)
        if not isinstance(key, Ed25519PublicKey):
            raise KeyFileError(f"a trusted key must be an Ed25519 public key or a key file, "
                               f"got {type(key).__name__}")
        ring[key_id(key)] = key
    return ring


def sign(private_key: Ed25519PrivateKey, message: bytes) -> bytes:
    return private_key.sign(message)


def verify(public_key: Ed25519PublicKey, signature: bytes, message: bytes) -> None:
    """Raise :class:`SignatureError` unless ``signature`` is valid for ``message``."""
    try:
        public_key.verify(signature, message)
    except InvalidSignature as exc:
        raise SignatureError("Ed25519 signature does not verify", field="signature") from exc


def save_private_key(key: Ed25519PrivateKey, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write PKCS#8 PEM with mode 0600 (created so, never widened first)."""
    path = Path(path)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError as exc:
        raise KeyFileError(f"{path} exists; refusing to overwrite a private key") from exc
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    os.chmod(path, 0o600)
    return path


def save_public_key(key: Ed25519PublicKey | Ed25519PrivateKey, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(public_key_bytes(key).hex() + "\n")
    return path


def _read(path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from exc


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    data = _read(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path} is not an unencrypted PEM private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """Read a public key file: 64 hex digits (raw key) or a PEM public key."""
    data = _read(path)
    text = data.strip()
    if text.startswith(b"-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(data)
        except (ValueError, TypeError) as exc:
            raise KeyFileError(f"{path} is not a valid PEM public key") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise KeyFileError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
        return key
    try:
        raw = bytes.fromhex(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise KeyFileError(f"{path} is neither hex nor PEM") from exc
    if len(raw) != PUBLIC_KEY_BYTES:
        raise KeyFileError(f"{path}: expected {PUBLIC_KEY_BYTES} key bytes, got {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)
