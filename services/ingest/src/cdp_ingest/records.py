"""Envelopes of accepted records, encoded fast: the hot path of ingestion.

A ``RecordAccepted`` envelope is written straight to protobuf wire bytes: the parts that are
the same for every record of a dataset and batch (type, subject, dataset, class, batch id,
batch time) are encoded once, and each row adds only its id, row number, identities,
attributes and time. No protobuf object is built per row; the bytes parse to exactly the
envelope the protobuf classes would build (a unit test checks it), and they reach the log
as they are (``emit_records``: the kit's ``UnitOfWork.emit_encoded``).

With a key maker (``keys``: the process's ``PersonVault``, or a reader process's ``LocalKeys``)
a record's identities and attributes are not in the payload: they are sealed (``cdp_kit.sealing``)
under the keys of all its identities, one key ref per identity in their order, and travel in the
envelope's ``sealed`` field (10), which the reader's decode boundary merges back. A record without
identities names no one whose keys could erase it: it is not sealed.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

from google.protobuf import struct_pb2

from cdp.common.v1 import envelope_pb2
from cdp.ingest.v1 import events_pb2 as ev
from cdp.ingest.v1 import ingest_pb2 as pb
from cdp_ingest.store import note_seen_all
from cdp_kit.envelope import SCHEMA_VERSION, VARINTS, deterministic_id, varint
from cdp_kit.processor import UnitOfWork
from cdp_kit.streams import INGEST_RECORDS

RECORD_TYPE = ev.RecordAccepted.DESCRIPTOR.full_name
RECORD_TYPE_URL = f"type.googleapis.com/{RECORD_TYPE}"
_DOUBLE = struct.Struct("<d").pack
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _ld(tag: bytes, data: bytes) -> bytes:
    """A length-delimited field."""
    return tag + varint(len(data)) + data


def _text(value: str) -> bytes:
    try:
        return value.encode()
    except UnicodeEncodeError:  # a lone surrogate (e.g. a JSON "\ud800" escape) cannot travel as UTF-8
        return value.encode("utf-8", "replace")


def timestamp_bytes(moment: datetime) -> bytes:
    """A ``google.protobuf.Timestamp`` (seconds, nanos) as wire bytes."""
    delta = moment - _EPOCH
    seconds = delta.days * 86400 + delta.seconds
    nanos = delta.microseconds * 1000
    out = b""
    if seconds:
        out += b"\x08" + varint(seconds if seconds > 0 else seconds + (1 << 64))
    if nanos:
        out += b"\x10" + varint(nanos)
    return out


class KeyMaker(Protocol):
    """What sealing records needs of a vault (``cdp_kit.vault.PersonVault`` or ``LocalKeys``)."""

    def refs_for(self, identities: Iterable[tuple[str, str]]) -> list[str]: ...

    def seal(
        self,
        refs: Sequence[str],
        plaintext: bytes,
        *,
        event_id: str,
        event_type: str,
        path: str = "",
        whole: bool = True,
    ) -> envelope_pb2.Sealed: ...

    def take_made(self) -> dict[str, bytes]: ...

    def adopt(self, keys: dict[str, bytes]) -> None: ...


def record_key(dataset: str, record_id: str) -> str:
    """The envelope id of a record: what the store keeps of every event id seen."""
    return deterministic_id("record", dataset, record_id)


def attributes_of(values: dict[str, Any]) -> struct_pb2.Struct:
    attributes = struct_pb2.Struct()
    attributes.update(values)
    return attributes


class RecordBuilder:
    """``RecordAccepted`` envelopes of one dataset (and batch): ids derive from dataset and record id."""

    def __init__(
        self,
        dataset: str,
        schema_class: int,
        batch_id: str,
        received_at: datetime,
        *,
        record_time: bool = False,
        keys: KeyMaker | None = None,
    ) -> None:
        """``record_time``: each profile record carries its own time (its schema's ``timestamp_field``)
        instead of the batch's; events always do."""
        self.dataset = dataset
        self.keys = keys
        self.schema_class = schema_class
        self.batch_id = batch_id
        self.received_at = received_at
        self.is_event = schema_class == pb.SCHEMA_CLASS_EVENT
        self.timed = self.is_event or record_time
        self._keys: dict[str, bytes] = {}
        payload = _ld(b"\x12", dataset.encode()) + b"\x18" + varint(schema_class)
        if batch_id:
            payload += _ld(b"\x22", batch_id.encode())
        envelope = _ld(b"\x12", RECORD_TYPE.encode()) + _ld(b"\x1a", dataset.encode())
        envelope += b"\x30" + varint(SCHEMA_VERSION)
        if not self.timed:
            stamp = timestamp_bytes(received_at)
            payload += _ld(b"\x42", stamp)
            envelope += _ld(b"\x22", stamp)
        self._payload = payload
        self._envelope = envelope
        self._type_url = _ld(b"\x0a", RECORD_TYPE_URL.encode())
        self._type_url_size = len(self._type_url)
        self._namespaces: dict[str, bytes] = {}

    def adopt(self, keys: dict[str, bytes]) -> None:
        """Keys a reader process made for records of this builder's batch."""
        if self.keys is not None:
            self.keys.adopt(keys)

    def key_of(self, record_id: str) -> str:
        return record_key(self.dataset, record_id)

    def encode(
        self,
        *,
        record_id: str,
        row: int,
        values: dict[str, Any],
        identities: Iterable[tuple[str, str]],
        occurred_at: datetime | None = None,
        event_type: str = "",
    ) -> bytes:
        """One record's envelope as wire bytes (``recorded_at`` is the kit's).

        The hot path of batch ingestion: lengths are looked up in a table inline rather than
        through ``_ld``/``varint`` calls, an identity whose lengths fit one byte is one
        formatting operation, and the parts are joined once.
        """
        v = VARINTS
        rid = _text(record_id)
        n = len(rid)
        parts = main = [b"\x0a", v[n] if n < 16384 else varint(n), rid, self._payload]
        add = parts.append
        if row:
            add(b"\x28")
            add(v[row] if row < 16384 else varint(row))
        keys = self.keys
        if keys is not None:
            identities = list(identities)
            if not identities:
                keys = None  # names no one: nothing to seal it under
        personal: list[bytes] = []
        if keys is not None:
            parts, add = personal, personal.append
        namespaces = self._namespaces
        for namespace, value in identities:
            ns = namespaces.get(namespace)
            if ns is None:
                ns = namespaces[namespace] = _text(namespace)
            val = _text(value)
            a, b = len(ns), len(val)
            inner = a + b + 4
            if inner < 128 and a < 128 and b < 128:
                add(b"\x32%c\x0a%c%b\x12%c%b" % (inner, a, ns, b, val))
                continue
            body = b"".join((b"\x0a", varint(a), ns, b"\x12", varint(b), val))
            add(b"\x32")
            add(varint(len(body)))
            add(body)
        attributes = self._struct(values)
        n = len(attributes)
        add(b"\x3a")
        add(v[n] if n < 16384 else varint(n))
        add(attributes)
        event_id = self.key_of(record_id)
        sealed = b""
        if keys is not None:
            part = keys.seal(keys.refs_for(identities), b"".join(personal), event_id=event_id, event_type=RECORD_TYPE)
            sealed = _ld(b"\x52", part.SerializeToString())
            parts, add = main, main.append
        head = b"\x0a\x24" + event_id.encode() + self._envelope  # an id is 36 characters
        if occurred_at is not None and self.timed:
            stamp = _ld(b"\x42", timestamp_bytes(occurred_at))
            add(stamp)
            head += b"\x22" + stamp[1:]
        if event_type:
            add(_ld(b"\x4a", _text(event_type)))
        payload = b"".join(parts)
        n = len(payload)
        m = self._type_url_size + 1 + (1 if n < 128 else 2 if n < 16384 else len(varint(n))) + n  # the Any
        return b"".join(
            (
                head,
                b"\x4a",
                v[m] if m < 16384 else varint(m),
                self._type_url,
                b"\x12",
                v[n] if n < 16384 else varint(n),
                payload,
                sealed,
            )
        )

    def _struct(self, values: dict[str, Any]) -> bytes:
        """A ``google.protobuf.Struct`` of scalar values, encoded by hand; nested ones by protobuf.

        Each entry is ``0a len(entry) | key prefix | len(value) value``; a string value is
        ``1a len(text) text``, a number ``11`` and 8 bytes, a boolean ``20 00|01``.
        """
        keys = self._keys
        v = VARINTS
        parts: list[bytes] = []
        add = parts.append
        for key, value in values.items():
            prefix = keys.get(key)
            if prefix is None:
                prefix = keys[key] = _ld(b"\x0a", _text(key)) + b"\x12"
            kind = type(value)
            if kind is str:
                try:
                    text = value.encode()
                except UnicodeEncodeError:  # a lone surrogate
                    text = value.encode("utf-8", "replace")
                n = len(text)
                e = len(prefix) + n + 3
                if e < 128:  # every length fits one byte: the common case, in one call
                    add(b"\x0a%c%b%c\x1a%c%b" % (e, prefix, n + 2, n, text))
                    continue
                inner = v[n] if n < 16384 else varint(n)
                m = 1 + len(inner) + n  # the Value message
                mv = v[m] if m < 16384 else varint(m)
                e = len(prefix) + len(mv) + m  # the map entry
                add(b"\x0a")
                add(v[e] if e < 16384 else varint(e))
                add(prefix)
                add(mv)
                add(b"\x1a")
                add(inner)
                add(text)
                continue
            if kind is float or kind is int:
                encoded = b"\x11" + _DOUBLE(value)
            elif kind is bool:
                encoded = b"\x20\x01" if value else b"\x20\x00"
            else:
                add(attributes_of({key: value}).SerializeToString())
                continue
            entry = prefix + v[len(encoded)] + encoded
            add(b"\x0a")
            add(v[len(entry)] if len(entry) < 16384 else varint(len(entry)))
            add(entry)
        return b"".join(parts)


def emit_records(uow: UnitOfWork, dataset: str, encoded: list[bytes], event_keys: Iterable[str]) -> None:
    """Append records as the bytes ``RecordBuilder`` wrote. Folding a record notes its envelope
    id as seen when its dataset holds events (``event_keys``: those ids; none for profile records)."""
    keys = list(event_keys)
    uow.emit_encoded(INGEST_RECORDS, encoded, lambda session: note_seen_all(session, dataset, keys))
