"""Sealing personal fields of an event under the keys of the people they name (crypto-shredding).

The invariant this module keeps: **a sealed part opens only while the key of every person it
names still exists.** It is pure (no I/O): the keys come from ``cdp_kit.vault``.

* A part is some fields of an event's payload, written as the wire form of a message of the same
  type holding only them (``split_fields``); opening merges the bytes back (protobuf's merge of
  a message with its missing fields is the message).
* Its record key is ``HKDF-SHA256(ikm = the per-identity keys of its refs, sorted by ref and
  concatenated; salt = 16 random bytes of this part; info = "cdp-seal/v1" + the sorted refs)``,
  32 bytes; the part is ``AES-256-GCM(record key)`` with the ``keyring.seal_with_key`` layout
  (nonce + ciphertext + tag). The associated data binds it to its place: event id, event type
  and path, so a sealed part copied into another event does not open.
* **Shared-device rule**: a part naming several people derives from all their keys, so it
  becomes unreadable when ANY of them is erased (it errs on the side of erasing).
* A part that cannot be opened (a key destroyed, revoked, or the bytes altered) raises ``Erased``:
  the reader folds the event as erased (``Sealed.whole``) or with the fields left empty.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TypeVar

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from google.protobuf import symbol_database
from google.protobuf.message import Message

from cdp.common.v1 import envelope_pb2
from cdp_kit.keyring import KEY_BYTES, KeyringError, open_with_key, seal_with_key

Sealed = envelope_pb2.Sealed
M = TypeVar("M", bound=Message)
SALT_BYTES = 16
INFO = b"cdp-seal/v1"


class Erased(Exception):
    """A sealed part cannot be opened any more: its person (one of them) was erased."""


def record_key(keys: Mapping[str, bytes], refs: Sequence[str], salt: bytes) -> bytes:
    """The key of one part, derived from the keys of every ref (``KeyError`` if one is missing)."""
    ordered = sorted(set(refs))
    material = b"".join(keys[ref] for ref in ordered)
    info = INFO + b"\x00" + "\x00".join(ordered).encode()
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt, info=info).derive(material)


def _aad(event_id: str, event_type: str, path: str) -> bytes:
    return f"{event_id}\x00{event_type}\x00{path}".encode()


def seal(
    keys: Mapping[str, bytes],
    refs: Sequence[str],
    plaintext: bytes,
    *,
    event_id: str,
    event_type: str,
    path: str = "",
    whole: bool = True,
) -> envelope_pb2.Sealed:
    salt = os.urandom(SALT_BYTES)
    key = record_key(keys, refs, salt)
    ciphertext = seal_with_key(key, plaintext, _aad(event_id, event_type, path))
    return Sealed(path=path, key_refs=list(refs), salt=salt, ciphertext=ciphertext, whole=whole)


def open_part(keys: Mapping[str, bytes], part: envelope_pb2.Sealed, *, event_id: str, event_type: str) -> bytes:
    try:
        key = record_key(keys, part.key_refs, part.salt)
        return open_with_key(key, part.ciphertext, _aad(event_id, event_type, part.path))
    except (KeyError, KeyringError):
        raise Erased() from None


def split_fields(payload: M, fields: Sequence[str]) -> tuple[M, bytes]:
    """``(payload without fields, wire form of only fields)``; ``payload`` itself is unchanged."""
    stripped = type(payload)()
    stripped.CopyFrom(payload)
    personal = type(payload)()
    for name in fields:
        value = getattr(stripped, name)
        if not isinstance(value, Message):  # a repeated or map field
            getattr(personal, name).MergeFrom(value)
        elif stripped.HasField(name):
            getattr(personal, name).CopyFrom(value)
        stripped.ClearField(name)
    return stripped, personal.SerializeToString()


def merge_part(env: envelope_pb2.Envelope, path: str, plaintext: bytes) -> None:
    """Merge an opened part back into the envelope's payload."""
    if not path:
        env.payload.value = env.payload.value + plaintext  # wire concatenation is protobuf's merge
        return
    cls = symbol_database.Default().GetSymbol(env.type)
    payload = cls.FromString(env.payload.value)
    target: Message = payload
    steps = path.split(".")
    for i, step in enumerate(steps):
        if step.isdigit():
            continue
        field = getattr(target, step)
        target = field[int(steps[i + 1])] if i + 1 < len(steps) and steps[i + 1].isdigit() else field
    target.MergeFromString(plaintext)
    env.payload.value = payload.SerializeToString()
