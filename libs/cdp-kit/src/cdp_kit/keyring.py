"""Envelope encryption under a versioned master key: secrets at rest, and later per-identity keys.

Every value is sealed with a fresh random **data key** (AES-256-GCM, ``cryptography``); the data
key is sealed by the **master key** (the KEK, AES-256-GCM too) and travels with the value. The
master key never leaves the key file; a value names the master key version that wrapped it, so
several versions can decrypt while only the newest encrypts (rotation).

Key file (``CDP_MASTER_KEY_FILE``; ``cdp up`` makes ``<data_dir>/secrets/master.key``; Kubernetes
mounts it from a Secret), text, one master key version a line, the LAST line encrypts::

    # comments and blank lines are ignored
    k20261203T065700Z-1a2b 3q2+7w...base64 of 32 random bytes...=

Sealed value, binary (format version 1)::

    0      1 byte   format version (1)
    1      1 byte   n = length of the key id
    2      n bytes  key id (ASCII) of the master key that wrapped the data key
    ..     12 bytes nonce of the wrapped data key
    ..     48 bytes data key (32) sealed by the master key (AES-256-GCM, 16-byte tag)
    ..     12 bytes nonce of the payload
    ..     rest     payload sealed by the data key (AES-256-GCM, 16-byte tag)

The associated data of both seals is ``header (version, n, key id) + 0x00 + context``: the caller's
context (for a destination secret ``destination:<id>:<field path>``) binds a ciphertext to its
place, so it cannot be copied into another field or destination, and the header cannot be
edited to point at another key. In text (JSON, protobuf Struct strings) a sealed value is
``cdpenc:v1:`` + unpadded URL-safe base64 of the binary form.

Reuse for crypto-shredding: a per-identity key is a data key that is *kept* rather than
discarded: ``Keyring.wrap_key`` seals it under the master key for storage in a vault (a table or
a KV entry that a privacy delete purges), records are sealed with ``seal_with_key`` under it, and
``Keyring.unwrap_key`` opens it again. Destroying the wrapped key erases every record sealed with it.
"""

from __future__ import annotations

import base64
import os
import re
import secrets
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cdp_kit.private import write_private

FORMAT_VERSION = 1
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
TEXT_PREFIX = "cdpenc:v1:"
KEY_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_WRAPPED_BYTES = NONCE_BYTES + KEY_BYTES + TAG_BYTES


class KeyringError(Exception):
    """A key file that cannot be used, or a sealed value that cannot be opened (never says why
    in a way that would help an attacker: no plaintext, no key material)."""


class UnknownKey(KeyringError):
    """The value was sealed under a master key version this keyring does not hold (retired?)."""


class DecryptionFailed(KeyringError):
    """Wrong key, wrong context, or a value that was altered."""


def seal_with_key(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """``nonce + AES-256-GCM(key, plaintext, aad)``: one value under one known key."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def open_with_key(key: bytes, sealed: bytes, aad: bytes) -> bytes:
    if len(sealed) < NONCE_BYTES + TAG_BYTES:
        raise DecryptionFailed("sealed value is too short")
    try:
        return AESGCM(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], aad)
    except InvalidTag:
        raise DecryptionFailed("wrong key or context, or the value was altered") from None


def _header(key_id: str) -> bytes:
    kid = key_id.encode("ascii")
    return bytes([FORMAT_VERSION, len(kid)]) + kid


def _split(blob: bytes) -> tuple[bytes, str, bytes, bytes]:
    """(header, key id, wrapped data key, sealed payload) of a sealed value."""
    if len(blob) < 2 or blob[0] != FORMAT_VERSION:
        raise KeyringError("not a sealed value of a known format version")
    end = 2 + blob[1]
    if len(blob) < end + _WRAPPED_BYTES + NONCE_BYTES + TAG_BYTES:
        raise KeyringError("sealed value is truncated")
    try:
        key_id = blob[2:end].decode("ascii")
    except UnicodeDecodeError:
        raise KeyringError("sealed value has a malformed key id") from None
    return blob[:end], key_id, blob[end : end + _WRAPPED_BYTES], blob[end + _WRAPPED_BYTES :]


def _aad(header: bytes, context: bytes) -> bytes:
    return header + b"\x00" + context


class Keyring:
    """Master key versions by id; ``newest`` encrypts, every version decrypts."""

    def __init__(self, keys: Mapping[str, bytes], newest: str) -> None:
        if newest not in keys:
            raise KeyringError("the newest key id is not among the keys")
        for key_id, key in keys.items():
            if not KEY_ID.match(key_id) or len(key) != KEY_BYTES:
                raise KeyringError(f"master key {key_id!r} is not a {KEY_BYTES}-byte key with a valid id")
        self._keys = dict(keys)
        self.newest = newest

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(self._keys)

    def __repr__(self) -> str:  # never the key material
        return f"Keyring(newest={self.newest!r}, versions={len(self._keys)})"

    def _key(self, key_id: str) -> bytes:
        if key_id not in self._keys:
            raise UnknownKey(f"master key {key_id!r} is not in the key file")
        return self._keys[key_id]

    # -- binary form
    def seal(self, plaintext: bytes, context: bytes) -> bytes:
        """A fresh data key seals ``plaintext``; the newest master key seals the data key."""
        header = _header(self.newest)
        aad = _aad(header, context)
        data_key = AESGCM.generate_key(bit_length=KEY_BYTES * 8)
        wrapped = seal_with_key(self._key(self.newest), data_key, aad)
        return header + wrapped + seal_with_key(data_key, plaintext, aad)

    def open(self, blob: bytes, context: bytes) -> bytes:
        header, key_id, wrapped, payload = _split(blob)
        aad = _aad(header, context)
        data_key = open_with_key(self._key(key_id), wrapped, aad)
        return open_with_key(data_key, payload, aad)

    def reseal(self, blob: bytes, context: bytes) -> bytes:
        """The same plaintext sealed under the newest master key (rotation)."""
        return self.seal(self.open(blob, context), context)

    # -- kept data keys (per-identity keys for crypto-shredding)
    def wrap_key(self, data_key: bytes, context: bytes) -> bytes:
        """A data key sealed under the newest master key, to be stored in a vault."""
        return self.seal(data_key, context)

    def unwrap_key(self, wrapped: bytes, context: bytes) -> bytes:
        return self.open(wrapped, context)

    # -- text form
    def seal_text(self, value: str, context: str) -> str:
        blob = self.seal(value.encode(), context.encode())
        return TEXT_PREFIX + base64.urlsafe_b64encode(blob).rstrip(b"=").decode("ascii")

    def open_text(self, token: str, context: str) -> str:
        return self.open(_blob_of(token), context.encode()).decode()

    def reseal_text(self, token: str, context: str) -> str:
        return self.seal_text(self.open_text(token, context), context)


def is_sealed(value: object) -> bool:
    return isinstance(value, str) and value.startswith(TEXT_PREFIX)


def _blob_of(token: str) -> bytes:
    if not is_sealed(token):
        raise KeyringError("not a sealed value")
    body = token[len(TEXT_PREFIX) :]
    try:
        return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except ValueError:
        raise KeyringError("sealed value is not valid base64") from None


def key_id_of(token: str) -> str:
    """The master key version a sealed text value was wrapped with."""
    return _split(_blob_of(token))[1]


# ---------------------------------------------------------------- key files


def new_key_id(now: datetime | None = None) -> str:
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    return f"k{stamp}-{secrets.token_hex(2)}"


def parse_key_file(text: str, source: str = "key file") -> Keyring:
    keys: dict[str, bytes] = {}
    newest = ""
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2 or not KEY_ID.match(parts[0]):
            raise KeyringError(f"{source}:{number}: expected '<key id> <base64 of {KEY_BYTES} bytes>'")
        try:
            key = base64.b64decode(parts[1], validate=True)
        except ValueError:
            raise KeyringError(f"{source}:{number}: the key is not valid base64") from None
        if len(key) != KEY_BYTES:
            raise KeyringError(f"{source}:{number}: a master key is {KEY_BYTES} bytes, this one {len(key)}")
        if parts[0] in keys:
            raise KeyringError(f"{source}:{number}: key id {parts[0]} appears twice")
        keys[parts[0]] = key
        newest = parts[0]
    if not keys:
        raise KeyringError(f"{source}: holds no master key")
    return Keyring(keys, newest)


def load_keyring(path: Path) -> Keyring:
    try:
        text = path.read_text()
    except OSError as exc:
        raise KeyringError(f"cannot read master key file {path}: {exc.strerror or exc}") from None
    return parse_key_file(text, str(path))


def _key_line(key_id: str, key: bytes) -> str:
    return f"{key_id} {base64.b64encode(key).decode('ascii')}\n"


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_private(path, text)


def ensure_key_file(path: Path) -> bool:
    """Create ``path`` (0600, its folder 0700) with one new master key unless it exists.
    Returns whether it was created."""
    if path.exists():
        return False
    header = "# CDP master keys: '<key id> <base64>', one a line; the last line encrypts. Keep it secret.\n"
    _write_private(path, header + _key_line(new_key_id(), AESGCM.generate_key(bit_length=KEY_BYTES * 8)))
    return True


def add_key(path: Path) -> str:
    """Append a new master key version to an existing key file (it becomes the newest)."""
    text = path.read_text()
    parse_key_file(text, str(path))
    key_id = new_key_id()
    if not text.endswith("\n"):
        text += "\n"
    _write_private(path, text + _key_line(key_id, AESGCM.generate_key(bit_length=KEY_BYTES * 8)))
    return key_id


def retire_keys(path: Path, keep: str) -> list[str]:
    """Rewrite the key file with only version ``keep``; returns the retired ids."""
    keyring = load_keyring(path)
    key = keyring._key(keep)
    retired = [k for k in keyring.key_ids if k != keep]
    header = "# CDP master keys: '<key id> <base64>', one a line; the last line encrypts. Keep it secret.\n"
    _write_private(path, header + _key_line(keep, key))
    return retired


class KeyFile:
    """A key file and the keyring read from it; ``reload`` picks up a new version (rotation)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.keyring = load_keyring(path)

    def reload(self) -> Keyring:
        self.keyring = load_keyring(self.path)
        return self.keyring
