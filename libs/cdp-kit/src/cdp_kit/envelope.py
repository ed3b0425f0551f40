"""The event envelope: deterministic ids, causation, time, trace context, payload."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from cdp.common.v1 import envelope_pb2

M = TypeVar("M", bound=Message)

Envelope = envelope_pb2.Envelope
EventBatch = envelope_pb2.EventBatch
Causation = envelope_pb2.Causation
IdentityValue = envelope_pb2.IdentityValue

SCHEMA_VERSION = 1


_VARIANT = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}


def deterministic_id(*parts: str | int) -> str:
    """A UUID (version 8) derived from its parts: the same cause always gives the same id.

    The first 16 bytes of SHA-256 over the parts, with the version nibble set to 8 and the
    variant bits to RFC 4122 (``10``), written in hex straight away (a hot path: no ``uuid``)."""
    h = hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()
    return f"{h[:8]}-{h[8:12]}-8{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:32]}"


def to_timestamp(moment: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(moment.astimezone(UTC))
    return ts


def from_timestamp(ts: Timestamp) -> datetime:
    return ts.ToDatetime(tzinfo=UTC)


def utcnow() -> datetime:
    """Wall clock, for edges only (gRPC handlers, recorded-at): projections read time from events."""
    return datetime.now(UTC)


@dataclass(frozen=True)
class Cause:
    """What a producer was handling when it emitted: an input message or a client command."""

    stream: str = ""
    sequence: int = 0
    event_id: str = ""
    command_id: str = ""

    def key(self) -> str:
        if self.stream:
            return f"{self.stream}:{self.sequence}"
        return f"cmd:{self.command_id}"

    def to_proto(self) -> envelope_pb2.Causation:
        return envelope_pb2.Causation(
            stream=self.stream, sequence=self.sequence, event_id=self.event_id, command_id=self.command_id
        )


def make_envelope(
    payload: Message,
    *,
    event_id: str,
    subject_key: str,
    occurred_at: datetime,
    cause: Cause,
    trace_context: dict[str, str] | None = None,
) -> envelope_pb2.Envelope:
    env = envelope_pb2.Envelope(
        id=event_id,
        type=payload.DESCRIPTOR.full_name,
        subject_key=subject_key,
        schema_version=SCHEMA_VERSION,
        causation=cause.to_proto(),
    )
    env.occurred_at.CopyFrom(to_timestamp(occurred_at))
    env.payload.Pack(payload)
    env.trace_context.update(trace_context or {})
    return env


def is_a(env: envelope_pb2.Envelope, cls: type[Message]) -> bool:
    return env.type == cls.DESCRIPTOR.full_name


def unpack(env: envelope_pb2.Envelope, cls: type[M]) -> M:
    msg = cls()
    if not env.payload.Unpack(msg):
        raise TypeError(f"event {env.id} holds {env.type}, not {cls.DESCRIPTOR.full_name}")
    return msg


EncodedEnvelope = bytes
"""An ``Envelope`` already serialized by a service's own encoder (a hot path), without ``recorded_at``."""


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 128:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


VARINTS = [_varint(n) for n in range(16384)]
"""Every varint of one or two bytes, looked up by value (hot encoders index it inline)."""


def varint(n: int) -> bytes:
    """A non-negative integer as a protobuf varint."""
    return VARINTS[n] if n < 16384 else _varint(n)


def encode_batch(events: Sequence[envelope_pb2.Envelope | EncodedEnvelope], recorded_at: datetime) -> bytes:
    """An ``EventBatch`` of the events, each stamped ``recorded_at``. Events may be envelopes or
    envelopes already serialized (their ``recorded_at`` field is appended to their bytes)."""
    stamp = to_timestamp(recorded_at)
    objects = [env for env in events if type(env) is not bytes]
    if len(objects) == len(events):
        for env in objects:
            env.recorded_at.CopyFrom(stamp)  # type: ignore[union-attr]
        return envelope_pb2.EventBatch(events=objects).SerializeToString()  # type: ignore[arg-type]
    raw = stamp.SerializeToString()
    stamp_field = b"\x2a" + varint(len(raw)) + raw  # field 5 (recorded_at), length-delimited
    extra = len(stamp_field)
    table = VARINTS
    parts: list[bytes] = []
    for env in events:
        if type(env) is bytes:
            n = len(env) + extra
            parts += (b"\x0a", table[n] if n < 16384 else _varint(n), env, stamp_field)
        else:
            env.recorded_at.CopyFrom(stamp)  # type: ignore[union-attr]
            body = env.SerializeToString()  # type: ignore[union-attr]
            parts += (b"\x0a", varint(len(body)), body)
    return b"".join(parts)


def decode_batch(data: bytes) -> list[envelope_pb2.Envelope]:
    batch = envelope_pb2.EventBatch()
    batch.ParseFromString(data)
    return list(batch.events)
