"""Sealing personal fields of an event under the keys of the people they name (crypto-shredding).

The invariant this module keeps: **a sealed part opens only while the key of every person it
names still exists.** It is pure (no I/O): the keys come from ``cdp_kit.vault``.

* A part is some fields of an event's payload, written as the wire form of a message of the same
  type holding only them (``split_fields``); opening merges the bytes back (protobuf's merge of
  a message with its missing fields is the message).
* **Format v2** (``Sealed.format = 2``, what ``seal`` writes): the key of a *set* of refs is
  ``HKDF-SHA256(ikm = the per-identity keys of the refs, sorted by ref and concatenated; no salt;
  info = "cdp-seal/v2" + the sorted refs)``, 32 bytes; each part is ``AES-256-GCM(set key)`` with
  its own random 12-byte nonce (``keyring.seal_with_key``'s layout: nonce + ciphertext + tag). The
  set key is deterministic, so a process derives it once per set and keeps the ``AESGCM`` object
  (``SetKeys``): identity opens a record and seals its fragment under the same set with one
  derivation. Random 96-bit nonces keep AES-GCM sound up to 2**32 parts under one set key (NIST
  SP 800-38D), far beyond the parts one person's set of identity generations is sealed with.
* **Format v1** (``format`` 0, written before v2; still opened): one key per part,
  ``HKDF-SHA256(ikm as above; salt = the part's 16 random bytes; info = "cdp-seal/v1" + the sorted
  refs)``.
* The associated data binds a part to its place: event id, event type and path, so a sealed
  part copied into another event does not open.
* **Shared-device rule**: a part naming several people derives from all their keys, so it
  becomes unreadable when ANY of them is erased (it errs on the side of erasing).
* A part that cannot be opened (a key destroyed, revoked, or the bytes altered) raises ``Erased``:
  the reader folds the event as erased (``Sealed.whole``) or with the fields left empty.
* A part that no sealer writes (``check_part``: an unknown format, a v2 part with a salt, a v1
  part whose salt is not 16 bytes, a ciphertext shorter than nonce + tag, no refs, more than
  ``MAX_REFS`` refs, a ref not of the shape ``REF_PATTERN``) raises ``MalformedPart``: it is not an
  erasure but poison, which the reader dead-letters (inputs) or sets aside (own logs) with the
  rule broken as its reason. A ref read from a log is never used (in a subject, a lookup) before
  it matched ``REF_PATTERN``.
* A ``SetKeys`` cache holds derived set keys: its owner (``cdp_kit.vault``) clears it whenever a
  ref is revoked or found destroyed, so a cached set key never outlives the keys it came from.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Container, Mapping, Sequence
from typing import TypeVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from google.protobuf import symbol_database
from google.protobuf.message import Message

from cdp.common.v1 import envelope_pb2
from cdp_kit.keyring import KEY_BYTES, NONCE_BYTES, TAG_BYTES, KeyringError, open_with_key, seal_with_key

Sealed = envelope_pb2.Sealed
M = TypeVar("M", bound=Message)
SALT_BYTES = 16
INFO = b"cdp-seal/v1"
INFO_V2 = b"cdp-seal/v2"
FORMAT_V1 = 0
FORMAT_V2 = 2
SET_KEYS_CACHED = 65_536
_SHA256 = hashes.SHA256()
# A key ref (``cdp_kit.vault.new_key``): ``<block: 16 hex>.<identity hash: 16 hex>.<generation: 8 hex>``;
# refs made before key blocks were ``<identity hash>.<16 hex>``. Both match: lowercase hex tokens,
# two or three, dot-separated. Nothing else may reach a subject (``*``, ``>``, spaces, empty tokens).
REF_PATTERN = r"[0-9a-f]{1,32}(?:\.[0-9a-f]{1,32}){1,2}"
_REF = re.compile(REF_PATTERN)
# At most this many refs in one part: a part names the people of one record, one link, one split
# part (each with every key generation identity knows of them); 20,000 refs is an attack on the
# reader (a fetch of every block named), never a record.
MAX_REFS = 4096


def valid_ref(ref: str) -> bool:
    """Whether ``ref`` has the shape of a key ref (safe to use in a subject)."""
    return _REF.fullmatch(ref) is not None


class Erased(Exception):
    """A sealed part cannot be opened any more: its person (one of them) was erased."""


class MalformedPart(ValueError):
    """A sealed part no sealer writes: poison, not an erasure. ``rule`` names what it breaks; the
    message never carries the part's bytes (nor its refs, which a forger chose)."""

    def __init__(self, rule: str, detail: str = "") -> None:
        super().__init__(f"sealed part malformed: {rule}" + (f" ({detail})" if detail else ""))
        self.rule = rule


def check_part(part: envelope_pb2.Sealed, known: Container[str] | None = None) -> None:
    """``MalformedPart`` unless the part has the shape of what ``seal`` (v2) or ``seal_v1`` wrote.
    ``known``: refs already found valid (a reader's key cache: a lookup instead of a match)."""
    refs = part.key_refs
    count = len(refs)
    if not count:
        raise MalformedPart("key_refs_empty")
    if count > MAX_REFS:
        raise MalformedPart("key_refs_too_many", f"{count} refs, at most {MAX_REFS}")
    match = _REF.fullmatch
    for ref in refs:
        if (known is None or ref not in known) and match(ref) is None:
            raise MalformedPart("key_ref_invalid", f"ref {list(refs).index(ref) + 1} of {count}")
    salt = part.salt
    if part.format == FORMAT_V2:
        if salt:
            raise MalformedPart("v2_has_salt")
    elif part.format == FORMAT_V1:
        if len(salt) != SALT_BYTES:
            raise MalformedPart("v1_salt_length", f"{len(salt)} bytes")
    else:
        raise MalformedPart("format_unknown", f"format {part.format}")
    if len(part.ciphertext) < NONCE_BYTES + TAG_BYTES:
        raise MalformedPart("ciphertext_too_short", f"{len(part.ciphertext)} bytes")


def record_key(keys: Mapping[str, bytes], refs: Sequence[str], salt: bytes) -> bytes:
    """The v1 key of one part, derived from the keys of every ref (``KeyError`` if one is missing)."""
    ordered = sorted(set(refs))
    material = b"".join(keys[ref] for ref in ordered)
    info = INFO + b"\x00" + "\x00".join(ordered).encode()
    return HKDF(algorithm=_SHA256, length=KEY_BYTES, salt=salt, info=info).derive(material)


def set_key(keys: Mapping[str, bytes], refs: Sequence[str]) -> bytes:
    """The v2 key of a set of refs, derived from the keys of every ref (``KeyError`` if one is missing)."""
    ordered = sorted(set(refs))
    material = b"".join(keys[ref] for ref in ordered)
    info = INFO_V2 + b"\x00" + "\x00".join(ordered).encode()
    return HKDF(algorithm=_SHA256, length=KEY_BYTES, salt=None, info=info).derive(material)


class SetKeys:
    """``AESGCM`` objects of v2 set keys by set of refs: derived once, reused for every part sealed
    or opened under the same set. The cache is keyed by refs alone, which holds because a ref names
    one key for ever (a destroyed key is never made again under the same ref); its owner clears it
    when a ref is revoked or destroyed (``clear``). Bounded: the oldest entry goes first."""

    def __init__(self, size: int = SET_KEYS_CACHED) -> None:
        self.size = size
        self._aead: dict[frozenset[str], AESGCM] = {}

    def cached(self, refs: Sequence[str]) -> AESGCM | None:
        """The set's ``AESGCM`` if it was derived here (and not cleared since)."""
        return self._aead.get(frozenset(refs))

    def aead(self, keys: Mapping[str, bytes], refs: Sequence[str]) -> AESGCM:
        """``KeyError`` if a key of the set is not in ``keys`` (and the set is not cached)."""
        refset = frozenset(refs)
        found = self._aead.get(refset)
        if found is None:
            found = AESGCM(set_key(keys, refs))
            cache = self._aead
            if len(cache) >= self.size:
                del cache[next(iter(cache))]
            cache[refset] = found
        return found

    def clear(self) -> None:
        self._aead.clear()

    def __len__(self) -> int:
        return len(self._aead)


class _Randomness:
    """Random bytes from the OS (``os.urandom``), taken in blocks: one system call per ~1,800 nonces
    or keys instead of one each. Never shared with a forked child (it would repeat nonces and keys):
    ``os.register_at_fork`` drops the pool in the child of a fork."""

    BLOCK = 64 * 1024

    def __init__(self) -> None:
        self._pool = b""
        self._at = 0
        self._lock = threading.Lock()

    def take(self, n: int) -> bytes:
        with self._lock:
            at = self._at
            if at + n > len(self._pool):
                self._pool, at = os.urandom(max(self.BLOCK, n)), 0
            self._at = at + n
            return self._pool[at : at + n]

    def forget(self) -> None:
        self._pool, self._at = b"", 0
        self._lock = threading.Lock()  # a lock held by another thread at the fork would never be released


_RANDOM = _Randomness()
os.register_at_fork(after_in_child=_RANDOM.forget)


def random_bytes(n: int) -> bytes:
    """``n`` bytes of ``os.urandom``, taken from a per-process pool (``_Randomness``)."""
    return _RANDOM.take(n)


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
    cache: SetKeys | None = None,
) -> envelope_pb2.Sealed:
    """A v2 part: ``plaintext`` under the set key of ``refs`` (from ``cache`` when given), a fresh nonce.
    ``MalformedPart`` for more than ``MAX_REFS`` refs: no reader would open it."""
    if len(refs) > MAX_REFS:
        raise MalformedPart("key_refs_too_many", f"{len(refs)} refs, at most {MAX_REFS}")
    aead = cache.aead(keys, refs) if cache is not None else AESGCM(set_key(keys, refs))
    return seal_with(aead, refs, plaintext, event_id=event_id, event_type=event_type, path=path, whole=whole)


def seal_with(
    aead: AESGCM,
    refs: Sequence[str],
    plaintext: bytes,
    *,
    event_id: str,
    event_type: str,
    path: str = "",
    whole: bool = True,
) -> envelope_pb2.Sealed:
    """A v2 part under a set key already at hand (``SetKeys.cached``: derived by ``seal``, which
    checked the number of refs)."""
    nonce = random_bytes(NONCE_BYTES)
    ciphertext = nonce + aead.encrypt(nonce, plaintext, _aad(event_id, event_type, path))
    return Sealed(path=path, key_refs=refs, ciphertext=ciphertext, whole=whole, format=FORMAT_V2)


def seal_v1(
    keys: Mapping[str, bytes],
    refs: Sequence[str],
    plaintext: bytes,
    *,
    event_id: str,
    event_type: str,
    path: str = "",
    whole: bool = True,
) -> envelope_pb2.Sealed:
    """A v1 part (one key per part from a random salt): what ``seal`` wrote before v2, kept so that
    tests can prove v1 parts on the log still open."""
    salt = os.urandom(SALT_BYTES)
    key = record_key(keys, refs, salt)
    ciphertext = seal_with_key(key, plaintext, _aad(event_id, event_type, path))
    return Sealed(path=path, key_refs=list(refs), salt=salt, ciphertext=ciphertext, whole=whole)


def open_part(
    keys: Mapping[str, bytes],
    part: envelope_pb2.Sealed,
    *,
    event_id: str,
    event_type: str,
    cache: SetKeys | None = None,
    checked: bool = False,
) -> bytes:
    """The plaintext of a v1 or v2 part; ``Erased`` if a key is missing or the part was altered;
    ``MalformedPart`` if it has no shape a sealer writes (``check_part``; ``checked``: the caller
    checked it already)."""
    if not checked:
        check_part(part)
    aad = _aad(event_id, event_type, part.path)
    try:
        if part.format == FORMAT_V1:
            return open_with_key(record_key(keys, part.key_refs, part.salt), part.ciphertext, aad)
        aead = cache.aead(keys, part.key_refs) if cache is not None else AESGCM(set_key(keys, part.key_refs))
        sealed = part.ciphertext
        return aead.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], aad)
    except (KeyError, KeyringError, InvalidTag):
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
    _at(payload, path).MergeFromString(plaintext)
    env.payload.value = payload.SerializeToString()


def merge_parts(env: envelope_pb2.Envelope, opened: Sequence[tuple[str, bytes]]) -> None:
    """Merge opened parts (path, plaintext) back into the payload, as ``merge_part`` of each in
    order would, but parsing and serializing the payload once: a prepared batch of activation has a
    part per record, and a parse and a serialize of the whole batch per part made opening it
    quadratic. Parts at the payload itself ("") and inside it are not mixed in one event; if they
    are, each is merged in turn."""
    if not opened:
        return
    nested = [(path, plaintext) for path, plaintext in opened if path]
    if not nested:
        env.payload.value = env.payload.value + b"".join(plaintext for _path, plaintext in opened)
        return
    if len(nested) != len(opened):
        for path, plaintext in opened:
            merge_part(env, path, plaintext)
        return
    cls = symbol_database.Default().GetSymbol(env.type)
    payload = cls.FromString(env.payload.value)
    for path, plaintext in nested:
        _at(payload, path).MergeFromString(plaintext)
    env.payload.value = payload.SerializeToString()


def _at(payload: Message, path: str) -> Message:
    """The message at ``path`` ("parts.2": element 2 of the repeated field parts) in ``payload``."""
    target: Message = payload
    steps = path.split(".")
    for i, step in enumerate(steps):
        if step.isdigit():
            continue
        field = getattr(target, step)
        target = field[int(steps[i + 1])] if i + 1 < len(steps) and steps[i + 1].isdigit() else field
    return target
