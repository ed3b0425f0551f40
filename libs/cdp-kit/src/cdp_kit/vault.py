"""Per-identity keys for crypto-shredding, in the NATS KV bucket ``CDP_KEYS``.

The invariant this module keeps: **once a person's keys are destroyed, no byte of them is left
in the bucket's store, and every record sealed with them reads as erased, on every replay.**

* **A key ref** names ONE key generation of one identity: ``<block>.<16 hex of
  pii_hash("keyref:ns:value")>.<8 random hex>``. A destroyed key is never re-created: the next
  record of that identity gets a new generation (a new ref), so old records stay unreadable. Refs
  travel in clear in each sealed part (``Sealed.key_refs``): a reader never recomputes a ref from
  a plain value (services may even run with different PII hash keys).
* **Key blocks.** The KV key is the block (16 random hex); its value holds every key a producer
  made in one commit (at most ``BLOCK_KEYS``): for each, the ref's length, the ref, 32 key bytes.
  One message per block instead of one per key: ingest writes a few messages per batch, and a
  reader's one fetch brings the keys of the records around the one it needed.
* **Producers** (ingest) call ``refs_for(identities)`` (synchronous, in the fold's transaction):
  a cached generation, or a new one made in memory; ``commit()`` writes the new ones to the
  bucket (a block each, ``Nats-Expected-Last-Subject-Sequence: 0``) *before* the events sealed
  with them are appended, so a record on the log always has its keys in the bucket. A process
  keeps a bounded cache (``cache_size``) of identity -> generation; an identity that falls out of
  it, a restart or a CSV reader process (``LocalKeys``, adopted by the service) gives it a new
  generation: more keys, never a wrong one (identity remembers every ref of every identity it
  links, so a delete destroys them all). A block is written once: the vault starts a new one after
  each commit, a ``LocalKeys`` after each ``take_made`` (what it hands over may be written before
  the next keys are adopted).
* **Set keys**: sealing derives one key per set of refs (``cdp_kit.sealing``, format v2) and keeps
  it (``SetKeys``); the cache is emptied when a ref is revoked or found destroyed.
* **Consumers** call ``prefetch(refs)`` (or ``open_messages``) once per fetched batch: the blocks
  of the keys not cached come in direct batch gets (``multi_last``, ``FETCH_BATCH`` blocks a
  request, ``FETCH_PARALLEL`` in flight); a ref its block does not hold is remembered as destroyed.
  ``open_envelope`` then opens each sealed part at the decode boundary, so handlers see plain
  payloads. Sealing keys not at hand raises ``KeysNeeded``: the processor fetches and retries.
* **Erasure**: ``revoke(refs)`` (the privacy request applied in this process): from now on,
  parts sealed with any of these refs read as erased and producers stop using them.
  ``destroy(refs)`` (identity, after every service applied the request) writes each block again
  without those keys (guarded by its last sequence), then deletes the previous message by
  sequence with JetStream's **erase** (``STREAM.MSG.DELETE`` without ``no_erase``: the server
  overwrites the stored bytes with random data; a KV delete or purge only drops the index and
  leaves the bytes until compaction). The bucket's stream is therefore made by provisioning with
  deletes allowed (nats-py's ``create_key_value`` denies them) and 2 messages per subject, so a
  block being rewritten is never absent (its old version lives only until it is erased).
* **Unreadable records** are folded as erased and counted (``erased``, ``erased_fields``, the
  ``cdp.vault.erased`` metric and the service status).
* **Hostile bytes.** Any key maker may write any block, and a forged part may reach a log. A block
  is read exactly or not at all (``decode_block``: an unreadable block's refs read as destroyed,
  ``key_block_unreadable`` logged once per block); a block's keys for another block's refs are
  refused; a ref not of the ref shape (``sealing.REF_PATTERN``) never reaches a subject (not
  fetched, skipped by ``destroy``); a part no sealer writes raises ``sealing.MalformedPart``
  (poison: ``open_messages`` hands it to the reader, which dead-letters or sets it aside).
* **Sealing off** (``CDP_SEAL_PERSONAL_DATA=false``) exists for benches only: nothing is sealed;
  records already sealed are still opened.

Backups: the bucket holds the only copy of every key. Back it up like the streams (a JetStream
snapshot of ``KV_CDP_KEYS``), but a restore brings back the keys of people erased since that
backup: replay the privacy requests (CDP_PRIVACY) and destroy again after any restore.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
import secrets
from collections import ChainMap, OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Protocol

import nats.errors
import nats.js.errors
from google.protobuf.message import DecodeError
from nats.aio.msg import Msg
from nats.js import api
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from cdp.common.v1 import envelope_pb2
from cdp_kit.errors import Unavailable
from cdp_kit.keyring import KEY_BYTES
from cdp_kit.sealing import (
    REF_PATTERN,
    Erased,
    MalformedPart,
    SetKeys,
    check_part,
    merge_parts,
    open_part,
    random_bytes,
    seal,
    seal_with,
    valid_ref,
)
from cdp_kit.streams import KEY_BUCKET, KEY_STREAM, KEY_SUBJECT_PREFIX
from cdp_kit.telemetry import get_logger, meter, pii_hash_key

# Keys per block (one KV entry, ~80 bytes a key), blocks per direct batch get, batches in flight.
BLOCK_KEYS = 4096
FETCH_BATCH = 16  # a block holds up to ~330 KB: a request answers at most ~5 MB
FETCH_PARALLEL = 4
FETCH_TIMEOUT_S = 10.0
CREATE_TIMEOUT_S = 10.0
BUCKET = KEY_BUCKET
STREAM = KEY_STREAM
SUBJECT_PREFIX = KEY_SUBJECT_PREFIX
Envelope = envelope_pb2.Envelope
log = get_logger(__name__)
_REF_BYTES = re.compile(REF_PATTERN.encode())
# Unreadable blocks already logged by this process (``key_block_unreadable`` once per block).
UNREADABLE_LOGGED = 1024


class LogMessage(Protocol):
    """What the vault reads of a message (``cdp_kit.eventlog.LogMessage``)."""

    @property
    def sequence(self) -> int: ...

    def events(self) -> list[Envelope]: ...


def key_bucket_config(*, replicas: int = 1, memory: bool = False) -> api.StreamConfig:
    """The bucket's stream as provisioning creates it: a KV bucket (history 1) whose messages may
    be deleted by sequence, so a destroy can erase them."""
    return api.StreamConfig(
        name=STREAM,
        description="per-identity keys of personal data (crypto-shredding; cdp_kit.vault)",
        subjects=[f"{SUBJECT_PREFIX}>"],
        allow_direct=True,
        allow_rollup_hdrs=True,
        deny_delete=False,
        deny_purge=False,
        discard=api.DiscardPolicy.NEW,
        max_msgs_per_subject=2,  # a block being rewritten by a destroy: the new version, then the old erased
        num_replicas=replicas,
        storage=api.StorageType.MEMORY if memory else api.StorageType.FILE,
        duplicate_window=120.0,
    )


class _RefHash:
    """HMAC-SHA256 keyed by the PII hash key (``cdp_kit.telemetry.pii_hash``'s) over
    ``keyref:<ns>:<value>``, with the keyed state computed once per process (a hot path of ingest)."""

    key: bytes | None = None
    mac: hmac.HMAC | None = None


def identity_hash(namespace: str, value: str) -> str:
    key = pii_hash_key()
    if _RefHash.key is not key:
        _RefHash.key, _RefHash.mac = key, hmac.new(key, b"keyref:", hashlib.sha256)
    assert _RefHash.mac is not None
    mac = _RefHash.mac.copy()
    mac.update(f"{namespace}:{value}".encode("utf-8", "surrogatepass"))
    return mac.hexdigest()[:16]


def new_block() -> str:
    return secrets.token_hex(8)


def block_of(ref: str) -> str:
    """The key block (the bucket's KV key) a ref's key is stored in."""
    return ref.partition(".")[0]


def encode_block(keys: Iterable[tuple[str, bytes]]) -> bytes:
    """A block's value: for each key, the length of its ref (1 byte), the ref, the 32 key bytes."""
    entries = []
    for ref, key in sorted(keys):
        raw = ref.encode()
        entries.append(b"%c%b%b" % (len(raw), raw, key))
    return b"".join(entries)


def decode_block(data: bytes, block: str | None = None) -> dict[str, bytes] | None:
    """A block's keys by ref, or None when the bytes are not exactly what ``encode_block`` writes
    (a ref not of the ref shape, or of another block than ``block``, a ref twice, an entry cut
    short, bytes left over): a block anyone could have overwritten is read whole or not at all, and
    its refs then read as destroyed. Never raises."""
    keys: dict[str, bytes] = {}
    at, end = 0, len(data)
    prefix = f"{block}.".encode() if block is not None else None
    while at < end:
        n = data[at]
        stop = at + 1 + n + KEY_BYTES
        if stop > end:
            return None  # an entry cut short
        raw = data[at + 1 : at + 1 + n]
        if _REF_BYTES.fullmatch(raw) is None or (prefix is not None and not raw.startswith(prefix)):
            return None
        ref = raw.decode("ascii")  # hex and dots only: cannot fail
        if ref in keys:
            return None
        keys[ref] = data[at + 1 + n : stop]
        at = stop
    return keys


class _Lru(OrderedDict[str, bytes]):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def keep(self, key: str, value: bytes) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)

    def keep_all(self, items: Mapping[str, bytes]) -> None:
        """``keep`` of each item, in order (in bulk: ingest adopts a reader's keys by the thousand)."""
        for key in items.keys() & self.keys():
            self.move_to_end(key)
        self.update(items)
        while len(self) > self.size:
            self.popitem(last=False)


class KeysNeeded(Exception):
    """Sealing needs keys this process has not fetched: fetch them (``PersonVault.fetch_needed``)
    and run the work again. Raised inside a transaction, which is then rolled back."""

    def __init__(self, refs: Sequence[str]) -> None:
        super().__init__(f"{len(refs)} keys to fetch")
        self.refs = list(refs)


class LocalKeys:
    """Keys made away from the bucket (ingest's CSV reader processes, one batch each): the process
    that owns the vault adopts them (``PersonVault.adopt``) before anything they seal is appended."""

    def __init__(self) -> None:
        self.keys: dict[str, bytes] = {}
        self._current: dict[tuple[str, str], str] = {}
        self._made: dict[str, bytes] = {}
        self._block, self._in_block = new_block(), 0
        self._sets = SetKeys()

    def refs_for(self, identities: Iterable[tuple[str, str]]) -> list[str]:
        refs: list[str] = []
        for identity in identities:
            ref = self._current.get(identity)
            if ref is None:
                if self._in_block >= BLOCK_KEYS:
                    self._block, self._in_block = new_block(), 0
                self._in_block += 1
                ref, key = new_key(self._block, *identity)
                self._current[identity] = ref
                self.keys[ref] = self._made[ref] = key
            refs.append(ref)
        return refs

    def seal(
        self,
        refs: Sequence[str],
        plaintext: bytes,
        *,
        event_id: str,
        event_type: str,
        path: str = "",
        whole: bool = True,
    ) -> envelope_pb2.Sealed:
        return seal(
            self.keys,
            refs,
            plaintext,
            event_id=event_id,
            event_type=event_type,
            path=path,
            whole=whole,
            cache=self._sets,
        )

    def take_made(self) -> dict[str, bytes]:
        """The keys made since the last call. The next key goes to a new block: the service may
        write these (``PersonVault.commit``) before it adopts the next ones, and a block is written
        once (a second create of it would be taken for a retry, and its new keys lost)."""
        made, self._made = self._made, {}
        if self._in_block:
            self._block, self._in_block = new_block(), 0
        return made

    def adopt(self, keys: dict[str, bytes]) -> None:
        self.keys.update(keys)


def new_key(block: str, namespace: str, value: str) -> tuple[str, bytes]:
    """A new key generation of one identity, stored in ``block``: its ref and its key."""
    random = random_bytes(KEY_BYTES + 4)
    return f"{block}.{identity_hash(namespace, value)}.{random[KEY_BYTES:].hex()}", random[:KEY_BYTES]


class _AtHand(Mapping[str, bytes]):
    """The keys of the batch being opened, then the cache."""

    def __init__(self, batch: dict[str, bytes], cache: _Lru) -> None:
        self.batch = batch
        self.cache = cache

    def __getitem__(self, ref: str) -> bytes:
        found = self.batch.get(ref)
        return found if found is not None else self.cache[ref]

    def __iter__(self) -> Iterator[str]:
        return iter(self.cache)

    def __len__(self) -> int:
        return len(self.cache)


class PersonVault:
    """Per-identity keys: made by producers, fetched in batches by consumers, revoked and destroyed
    by a privacy delete. ``kv`` is the bound bucket (``PersonVault.bind``)."""

    def __init__(self, kv: KeyValue, js: JetStreamContext, *, seal: bool = True, cache_size: int = 200_000) -> None:
        self.kv = kv
        self.js = js
        self.sealing = seal
        self._keys = _Lru(cache_size)  # ref -> key bytes (made here or fetched)
        self._current: OrderedDict[tuple[str, str], str] = OrderedDict()  # identity -> its generation here
        self._cache_size = cache_size
        self._pending: dict[str, bytes] = {}  # made here, not yet in the bucket
        self._gone = _Lru(cache_size)  # refs the bucket does not hold (destroyed)
        self._revoked: set[str] = set()
        self._batch: dict[str, bytes] = {}  # the keys of the batch being opened, whatever the cache evicts
        self._at_hand = _AtHand(self._batch, self._keys)
        self._needed: set[str] = set()  # fetched for a KeysNeeded: kept at hand for the retry
        self._block, self._in_block = new_block(), 0  # where the next keys made here go
        self._sets = SetKeys()  # v2 set keys derived here (cdp_kit.sealing); cleared on revoke and destroy
        self._unreadable: OrderedDict[str, None] = OrderedDict()  # blocks logged as unreadable here
        self.unreadable_blocks = 0
        self.erased = 0
        self.erased_fields = 0
        counters = meter("cdp.vault")
        self._erased_counter = counters.create_counter(
            "cdp.vault.erased", unit="{event}", description="Events folded as erased: a sealed part whose key is gone"
        )

    @classmethod
    def of(cls, js: JetStreamContext, *, seal: bool = True, cache_size: int = 200_000) -> PersonVault:
        """The vault on the provisioned bucket, without a round trip (``runtime.connect`` checks it exists)."""
        kv = KeyValue(name=BUCKET, stream=STREAM, pre=SUBJECT_PREFIX, js=js, direct=True)
        return cls(kv, js, seal=seal, cache_size=cache_size)

    @classmethod
    async def bind(cls, js: JetStreamContext, *, seal: bool = True, cache_size: int = 200_000) -> PersonVault:
        try:
            kv = await js.key_value(BUCKET)
        except nats.js.errors.NotFoundError:
            raise Unavailable(
                f"key bucket {BUCKET} does not exist: provision with `cdp admin provision` (admin credentials)"
            ) from None
        return cls(kv, js, seal=seal, cache_size=cache_size)

    # ------------------------------------------------------------------ producers
    def known(self) -> Mapping[str, bytes]:
        """The keys this process holds (made or fetched), by ref: read-only use (e.g. ingest opens
        the records it just sealed to match a suppression list)."""
        return ChainMap(self._pending, self._keys)

    def refs_for(self, identities: Iterable[tuple[str, str]]) -> list[str]:
        """One key ref per identity (in order), made in memory when this process has none."""
        refs: list[str] = []
        current = self._current
        for identity in identities:
            ref = current.get(identity)
            if ref is None or ref in self._revoked or ref in self._gone:
                if self._in_block >= BLOCK_KEYS:
                    self._block, self._in_block = new_block(), 0
                self._in_block += 1
                ref, key = new_key(self._block, *identity)
                self._pending[ref] = key
                self._keys.keep(ref, key)
                current[identity] = ref
                if len(current) > self._cache_size:
                    current.popitem(last=False)
            refs.append(ref)
        return refs

    def seal(
        self,
        refs: Sequence[str],
        plaintext: bytes,
        *,
        event_id: str,
        event_type: str,
        path: str = "",
        whole: bool = True,
    ) -> envelope_pb2.Sealed:
        """Seal with the keys of ``refs`` (made or fetched by this process: ``refs_for`` or ``prefetch``).
        ``Erased`` if one of them is revoked or destroyed; ``KeysNeeded`` if some are not at hand
        (the processor fetches them and applies the batch or command again)."""
        if self._revoked and any(ref in self._revoked for ref in refs):
            raise Erased()
        aead = self._sets.cached(refs)
        if aead is not None:  # derived here, and none of its refs revoked or found destroyed since
            return seal_with(aead, refs, plaintext, event_id=event_id, event_type=event_type, path=path, whole=whole)
        missing = [ref for ref in refs if ref not in self._batch and ref not in self._keys]
        if missing:
            if any(ref in self._gone for ref in missing):
                raise Erased()
            raise KeysNeeded(missing)
        try:
            return seal(
                self._at_hand,
                refs,
                plaintext,
                event_id=event_id,
                event_type=event_type,
                path=path,
                whole=whole,
                cache=self._sets,
            )
        except KeyError:
            raise Erased() from None

    def can_seal(self, refs: Iterable[str]) -> bool:
        return all(ref in self._keys and ref not in self._revoked for ref in refs)

    def take_made(self) -> dict[str, bytes]:
        return {}  # made here: pending already

    def adopt(self, keys: dict[str, bytes]) -> None:
        """Keys made by ``LocalKeys`` elsewhere: written by the next ``commit``."""
        if self._revoked:
            keys = {ref: key for ref, key in keys.items() if ref not in self._revoked}
        self._pending.update(keys)
        self._keys.keep_all(keys)

    def forget_pending(self) -> int:
        """Forget the keys made here and never committed: what a standby's read-only replay made for
        decisions it then dropped (``Processor.follow``). Kept, they would pile up in memory and be
        written to the bucket with the first append after a takeover, never used. Returns how many."""
        made = self._pending
        if not made:
            return 0
        self._pending = {}
        for ref in made:
            self._keys.pop(ref, None)
        for identity in [identity for identity, ref in self._current.items() if ref in made]:
            del self._current[identity]
        return len(made)

    async def commit(self) -> int:
        """Write the keys made since the last commit to the bucket, a message per block, before the
        events they seal. A block is written once (``Nats-Expected-Last-Subject-Sequence: 0``);
        keys made after it was written go to a new block."""
        if not self._pending:
            return 0
        blocks: dict[str, list[tuple[str, bytes]]] = {}
        for ref, key in self._pending.items():
            blocks.setdefault(block_of(ref), []).append((ref, key))
        acks = [await self._create(block, encode_block(keys)) for block, keys in blocks.items()]
        for ack in acks:
            await self._created(ack)
        made = len(self._pending)
        self._pending = {}
        if self._in_block:
            self._block, self._in_block = new_block(), 0
        return made

    async def _create(self, block: str, value: bytes) -> asyncio.Future[api.PubAck]:
        try:
            return await self.js.publish_async(
                SUBJECT_PREFIX + block, value, stream=STREAM, headers={"Nats-Expected-Last-Subject-Sequence": "0"}
            )
        except (TimeoutError, nats.errors.NoRespondersError, nats.errors.ConnectionClosedError) as exc:
            raise Unavailable(f"key create failed: {type(exc).__name__}") from exc

    @staticmethod
    async def _created(ack: asyncio.Future[api.PubAck]) -> None:
        try:
            await asyncio.wait_for(ack, CREATE_TIMEOUT_S)
        except nats.js.errors.APIError as exc:
            if exc.err_code != 10071:  # wrong last sequence: a retry of a create that went through
                raise Unavailable(f"key create failed: {exc.description}") from exc
        except (TimeoutError, nats.errors.NoRespondersError, nats.errors.ConnectionClosedError) as exc:
            raise Unavailable(f"key create failed: {type(exc).__name__}") from exc

    # ------------------------------------------------------------------ consumers
    async def prefetch(self, refs: Iterable[str], *, checked: bool = False) -> None:
        """Fetch the blocks of the refs whose keys are not cached: a block brings every key in it.
        A ref not of the ref shape (``sealing.valid_ref``) is never fetched (it could be a subject
        wildcard): no key exists for it, it reads as destroyed (``checked``: the caller matched
        every ref already)."""
        wanted = [
            r for r in dict.fromkeys(refs) if r not in self._keys and r not in self._gone and r not in self._revoked
        ]
        if not wanted:
            return
        invalid = [] if checked else [ref for ref in wanted if not valid_ref(ref)]
        if invalid:
            log.warning("vault_invalid_key_refs_ignored", refs=len(invalid))
            for ref in invalid:
                self._gone.keep(ref, b"")
            wanted = [ref for ref in wanted if valid_ref(ref)]
            if not wanted:
                return
        blocks = list(dict.fromkeys(block_of(ref) for ref in wanted))
        chunks = [blocks[start : start + FETCH_BATCH] for start in range(0, len(blocks), FETCH_BATCH)]
        for start in range(0, len(chunks), FETCH_PARALLEL):
            await asyncio.gather(*(self._fetch_blocks(chunk) for chunk in chunks[start : start + FETCH_PARALLEL]))
        for ref in wanted:
            if ref not in self._batch:
                self._gone.keep(ref, b"")  # its block does not hold it: destroyed
                self._sets.clear()

    async def _fetch_blocks(self, blocks: list[str]) -> None:
        """Blocks in one direct batch get (``multi_last``, nats-server 2.11+): the server answers each
        block it holds, then an end-of-batch status."""
        nc = self.js._nc
        inbox = nc.new_inbox()
        answers: asyncio.Queue[Msg] = asyncio.Queue()

        async def collect(msg: Msg) -> None:
            answers.put_nowait(msg)

        wanted = set(blocks)
        request = json.dumps({"multi_last": [SUBJECT_PREFIX + block for block in blocks], "batch": len(blocks)})
        sub = await nc.subscribe(inbox, cb=collect)
        try:
            await nc.publish(f"$JS.API.DIRECT.GET.{STREAM}", request.encode(), reply=inbox)
            while True:
                try:
                    msg = await asyncio.wait_for(answers.get(), FETCH_TIMEOUT_S)
                except TimeoutError as exc:
                    raise Unavailable("key fetch timed out") from exc
                headers = msg.headers or {}
                if not msg.data and headers.get("Status"):
                    if headers["Status"] not in ("204", "404"):
                        raise Unavailable(f"key fetch failed: {headers['Status']} {headers.get('Description', '')}")
                    break
                block = headers.get("Nats-Subject", "").removeprefix(SUBJECT_PREFIX)
                keys = decode_block(msg.data, block) if block in wanted else None
                if keys is None:  # its refs are not found: they read as destroyed
                    self._block_unreadable(block if block in wanted else "?")
                    continue
                for ref, key in keys.items():
                    if ref not in self._revoked:
                        self._keys.keep(ref, key)
                        self._batch[ref] = key
        finally:
            await sub.unsubscribe()

    def _block_unreadable(self, block: str) -> None:
        """A fetched block that does not decode: counted, and logged once per block in this process."""
        self.unreadable_blocks += 1
        if block in self._unreadable:
            return
        self._unreadable[block] = None
        if len(self._unreadable) > UNREADABLE_LOGGED:
            self._unreadable.popitem(last=False)
        log.error("key_block_unreadable", block=block, hint="its keys read as destroyed; written by a key maker")

    def open_envelope(self, env: Envelope, *, checked: bool = False) -> bool:
        """Open the envelope's sealed parts in place. False: it is erased as a whole (skip it).
        ``MalformedPart`` for a part no sealer writes (``sealing.check_part``; ``checked``: done
        already) or whose opened bytes do not merge into the payload: poison, not an erasure."""
        opened: list[tuple[str, bytes]] = []
        done: list[envelope_pb2.Sealed] = []
        for part in env.sealed:
            if not part.ciphertext:
                continue  # opened already
            if not checked:
                check_part(part, self._keys)
            try:
                if self._revoked and any(ref in self._revoked for ref in part.key_refs):
                    raise Erased()
                plaintext = open_part(
                    self._at_hand, part, event_id=env.id, event_type=env.type, cache=self._sets, checked=True
                )
            except Erased:
                if part.whole:
                    self._count_erased()
                    return False
                self.erased_fields += 1
                part.ciphertext = b""
                continue
            opened.append((part.path, plaintext))
            done.append(part)
        try:
            merge_parts(env, opened)  # the payload parsed and serialized once, whatever the number of parts
        except Exception as exc:  # a path or type that is not there, bytes that do not parse
            raise MalformedPart("payload_merge_failed", type(exc).__name__) from None
        for part in done:
            part.ciphertext = b""
        return True

    async def fetch_needed(self, needed: KeysNeeded) -> None:
        """Fetch the keys a seal needed and keep them at hand while the work is applied again."""
        self._needed = set(needed.refs)
        self._batch.update((ref, self._keys[ref]) for ref in needed.refs if ref in self._keys)
        await self.prefetch(needed.refs)
        for ref in needed.refs:
            if ref not in self._batch and ref not in self._keys and ref not in self._gone:
                self._gone.keep(ref, b"")  # not in the bucket: destroyed
                self._sets.clear()

    def _count_erased(self) -> None:
        self.erased += 1
        self._erased_counter.add(1)

    async def open_messages(
        self, msgs: Sequence[LogMessage], malformed: dict[int, MalformedPart] | None = None
    ) -> dict[int, list[Envelope]]:
        """Every message's envelopes opened, erased ones left out, by sequence (one prefetch). A
        message that does not decode is not in the answer: its reader meets the error where it
        sets poison aside. Nor is a message with a malformed part (``sealing.check_part``, checked
        before any of its refs is used): its ``MalformedPart`` goes to ``malformed`` by sequence,
        for the reader to raise where it sets poison aside (without ``malformed``, it is raised)."""
        decoded: dict[int, list[Envelope]] = {}
        known = self._keys  # refs of keys made here or read from a block: valid (``decode_block``)
        for msg in msgs:
            try:
                envs = msg.events()
                for env in envs:
                    for part in env.sealed:
                        if part.ciphertext:
                            check_part(part, known)
            except DecodeError:
                continue
            except MalformedPart as exc:
                if malformed is None:
                    raise
                malformed[msg.sequence] = exc
                continue
            decoded[msg.sequence] = envs
        refs = dict.fromkeys(ref for envs in decoded.values() for env in envs for p in env.sealed for ref in p.key_refs)
        self._batch.clear()
        keys = self._keys
        self._batch.update((ref, keys[ref]) for ref in [*refs, *self._needed] if ref in keys)
        await self.prefetch(refs, checked=True)  # every ref matched (``check_part``) above
        opened: dict[int, list[Envelope]] = {}
        for seq, envs in decoded.items():
            try:
                opened[seq] = [env for env in envs if self.open_envelope(env, checked=True)]
            except MalformedPart as exc:  # opened bytes that do not merge into the payload
                if malformed is None:
                    raise
                malformed[seq] = exc
        return opened

    # ------------------------------------------------------------------ erasure
    def revoke(self, key_refs: Sequence[str]) -> None:
        """From now on, in this process, records sealed with any of these refs fold as erased."""
        self._revoked.update(key_refs)
        self._sets.clear()  # no set key derived from one of them may open or seal anything more
        for ref in key_refs:
            self._keys.pop(ref, None)
            self._batch.pop(ref, None)
            self._pending.pop(ref, None)

    async def destroy(self, key_refs: Sequence[str]) -> int:
        """Erase the keys for good; returns how many existed. Each block holding some of them is
        written again without them (guarded by its last sequence), then its previous message is
        deleted with erase (its bytes overwritten), so no copy of a destroyed key is left.
        A ref not of the ref shape (``sealing.valid_ref``) names no key: it is skipped (counted in a
        warning, never used in a subject), and the others are destroyed."""
        invalid = [ref for ref in key_refs if not valid_ref(ref)]
        if invalid:
            log.warning("vault_destroy_invalid_refs_skipped", refs=len(invalid), kept=len(key_refs) - len(invalid))
            key_refs = [ref for ref in key_refs if valid_ref(ref)]
        self.revoke(key_refs)
        by_block: dict[str, set[str]] = {}
        for ref in key_refs:
            by_block.setdefault(block_of(ref), set()).add(ref)
        found = 0
        for block, refs in by_block.items():
            found += await self._destroy_in(block, refs)
            for ref in refs:
                self._gone.keep(ref, b"")
        if found:
            log.info("vault_keys_destroyed", keys=found)
        return found

    async def _destroy_in(self, block: str, refs: set[str]) -> int:
        for _attempt in range(5):
            try:
                entry = await self.kv.get(block)
            except nats.js.errors.KeyNotFoundError:
                return 0
            # A key maker may have overwritten the block (the bucket keeps 2 versions): the version
            # before the last may hold the keys still. No reader reads it: it is erased whole.
            erased = await self._erase_previous(block, refs, entry.revision or 0)
            keys = decode_block(entry.value or b"", block)
            if keys is None:  # no key of it can be read
                self._block_unreadable(block)
                return len(erased)
            doomed = refs & keys.keys()
            if not doomed:
                return len(erased)
            kept = [(ref, key) for ref, key in keys.items() if ref not in doomed]
            try:
                if kept:  # the block stays readable throughout: the new version first (history 2)
                    await self.js.publish(
                        SUBJECT_PREFIX + block,
                        encode_block(kept),
                        stream=STREAM,
                        headers={"Nats-Expected-Last-Subject-Sequence": str(entry.revision)},
                    )
                await self.js.delete_msg(STREAM, entry.revision or 0)  # erase: overwritten with random bytes
            except nats.js.errors.APIError as exc:
                if exc.err_code == 10071:
                    continue  # another destroy rewrote the block meanwhile: read it again
                raise Unavailable(f"key destroy failed: {exc.description}") from exc
            return len(doomed | erased)
        raise Unavailable(f"key block {block} kept changing while keys were destroyed")

    async def _erase_previous(self, block: str, refs: set[str], latest: int) -> set[str]:
        """Erase the block's version before ``latest`` if it holds keys of ``refs`` (which of them).
        Read by a direct batch get up to the sequence before (the one request every service may
        make on the bucket besides a get of the last version)."""
        if latest <= 1:
            return set()
        request = json.dumps({"multi_last": [SUBJECT_PREFIX + block], "up_to_seq": latest - 1, "batch": 1})
        nc = self.js._nc
        try:
            answers = await nc.request(f"$JS.API.DIRECT.GET.{STREAM}", request.encode(), timeout=FETCH_TIMEOUT_S)
        except (TimeoutError, nats.errors.NoRespondersError) as exc:
            raise Unavailable(f"key destroy failed: {type(exc).__name__}") from exc
        headers = answers.headers or {}
        if not answers.data or headers.get("Nats-Subject") != SUBJECT_PREFIX + block:
            return set()  # no earlier version (a status), or not this block's
        doomed = refs & (decode_block(answers.data, block) or {}).keys()
        sequence = headers.get("Nats-Sequence", "")
        if not doomed or not sequence.isdigit():
            return set()
        try:
            await self.js.delete_msg(STREAM, int(sequence))
        except nats.js.errors.NotFoundError:
            return set()  # erased meanwhile
        except nats.js.errors.APIError as exc:
            raise Unavailable(f"key destroy failed: {exc.description}") from exc
        return doomed
