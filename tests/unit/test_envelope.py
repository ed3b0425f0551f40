"""The event envelope: deterministic ids, packing, batches, time and causation."""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdp.common.v1.envelope_pb2 import Causation, IdentityValue
from cdp_kit.envelope import (
    SCHEMA_VERSION,
    Cause,
    Envelope,
    decode_batch,
    deterministic_id,
    encode_batch,
    from_timestamp,
    is_a,
    make_envelope,
    to_timestamp,
    unpack,
    varint,
)

T0 = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)


def identity_event(n: int, *, cause: Cause | None = None) -> Envelope:
    return make_envelope(
        IdentityValue(namespace="crm_id", value=f"c{n}"),
        event_id=deterministic_id("test", n),
        subject_key="crm",
        occurred_at=T0,
        cause=cause or Cause(command_id=f"cmd{n}"),
        trace_context={"traceparent": f"00-{n:032x}-{n:016x}-01"},
    )


# ------------------------------------------------------------- deterministic_id


def test_deterministic_id_is_stable() -> None:
    assert deterministic_id("a", "b", 1) == deterministic_id("a", "b", 1)


@pytest.mark.parametrize(
    ("left", "right"),
    [
        (("a", "b", 1), ("a", "b", 2)),
        (("a", "b"), ("b", "a")),
        (("a",), ("a", "")),
        (("ab", "c"), ("a", "bc")),
        (("x",), ("y",)),
    ],
)
def test_deterministic_id_differs_for_different_parts(
    left: tuple[str | int, ...], right: tuple[str | int, ...]
) -> None:
    assert deterministic_id(*left) != deterministic_id(*right)


@pytest.mark.parametrize("parts", [("a",), ("cdp.audience.0.memberships", "in:7", 1), ("", 0), ("ü", "€", 99)])
def test_deterministic_id_is_a_uuid_version_8(parts: tuple[str | int, ...]) -> None:
    text = deterministic_id(*parts)
    parsed = uuid.UUID(text)
    assert str(parsed) == text
    assert parsed.variant == uuid.RFC_4122
    assert parsed.version == 8


@given(parts=st.lists(st.one_of(st.text(max_size=12), st.integers()), min_size=1, max_size=4))
def test_deterministic_id_equals_the_uuid_module_construction(parts: list[str | int]) -> None:
    digest = bytearray(hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x80
    digest[8] = (digest[8] & 0x3F) | 0x80
    assert deterministic_id(*parts) == str(uuid.UUID(bytes=bytes(digest)))


def test_deterministic_ids_do_not_collide_over_many_inputs() -> None:
    ids = {deterministic_id("subject", n) for n in range(2000)}
    assert len(ids) == 2000


# ------------------------------------------------------------- make / unpack


def test_make_envelope_and_unpack_round_trip() -> None:
    cause = Cause(stream="identity-ingest", sequence=42, event_id="e-in")
    env = identity_event(7, cause=cause)

    assert env.id == deterministic_id("test", 7)
    assert env.type == "cdp.common.v1.IdentityValue"
    assert env.subject_key == "crm"
    assert env.schema_version == SCHEMA_VERSION
    assert from_timestamp(env.occurred_at) == T0
    assert env.causation == Causation(stream="identity-ingest", sequence=42, event_id="e-in")
    assert dict(env.trace_context) == {"traceparent": f"00-{7:032x}-{7:016x}-01"}
    assert unpack(env, IdentityValue) == IdentityValue(namespace="crm_id", value="c7")


def test_make_envelope_survives_serialisation() -> None:
    env = identity_event(3)
    again = Envelope.FromString(env.SerializeToString())
    assert again == env
    assert unpack(again, IdentityValue).value == "c3"


def test_make_envelope_without_trace_context() -> None:
    env = make_envelope(
        IdentityValue(namespace="n", value="v"), event_id="e", subject_key="k", occurred_at=T0, cause=Cause()
    )
    assert dict(env.trace_context) == {}


def test_unpack_of_the_wrong_type_raises_type_error() -> None:
    env = identity_event(1)
    with pytest.raises(TypeError, match=r"cdp\.common\.v1\.IdentityValue.*cdp\.common\.v1\.Causation"):
        unpack(env, Causation)


def test_is_a() -> None:
    env = identity_event(1)
    assert is_a(env, IdentityValue)
    assert not is_a(env, Causation)
    assert not is_a(Envelope(), IdentityValue)


# ------------------------------------------------------------- batches


def test_encode_decode_batch_round_trip_sets_recorded_at() -> None:
    events = [identity_event(n) for n in range(1, 4)]
    recorded = T0 + timedelta(minutes=5)

    decoded = decode_batch(encode_batch(events, recorded))

    assert [e.id for e in decoded] == [deterministic_id("test", n) for n in range(1, 4)]
    assert [unpack(e, IdentityValue).value for e in decoded] == ["c1", "c2", "c3"]
    assert all(from_timestamp(e.recorded_at) == recorded for e in decoded)
    assert all(from_timestamp(e.occurred_at) == T0 for e in decoded)
    assert decoded == events


def test_batch_of_envelopes_and_encoded_envelopes_decodes_to_the_same_events() -> None:
    events = [identity_event(n) for n in range(1, 5)]
    recorded = T0 + timedelta(seconds=1, microseconds=250)
    mixed: list[Envelope | bytes] = [events[0], events[1].SerializeToString(), events[2], events[3].SerializeToString()]

    decoded = decode_batch(encode_batch(mixed, recorded))

    assert decoded == decode_batch(encode_batch([identity_event(n) for n in range(1, 5)], recorded))
    assert all(from_timestamp(e.recorded_at) == recorded for e in decoded)
    assert decode_batch(encode_batch([e.SerializeToString() for e in events[:1]], T0))[0].recorded_at == to_timestamp(
        T0
    )


@pytest.mark.parametrize("n", [0, 1, 127, 128, 300, 16383, 16384, 2**31, 2**63])
def test_varint_matches_protobuf(n: int) -> None:
    from google.protobuf.wrappers_pb2 import UInt64Value

    assert varint(n) == (UInt64Value(value=n).SerializeToString()[1:] if n else b"\x00")


def test_empty_batch_round_trip() -> None:
    assert decode_batch(encode_batch([], T0)) == []
    assert decode_batch(b"") == []


# ------------------------------------------------------------- time


@pytest.mark.parametrize(
    "moment",
    [
        T0,
        datetime(1970, 1, 1, tzinfo=UTC),
        datetime(2030, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(2026, 6, 1, 12, 0, tzinfo=timezone(timedelta(hours=-7))),
    ],
)
def test_timestamp_round_trip(moment: datetime) -> None:
    back = from_timestamp(to_timestamp(moment))
    assert back == moment
    assert back.tzinfo is UTC


def test_to_timestamp_normalises_to_utc() -> None:
    local = datetime(2026, 1, 1, 2, 0, tzinfo=timezone(timedelta(hours=2)))
    assert to_timestamp(local) == to_timestamp(datetime(2026, 1, 1, tzinfo=UTC))


# ------------------------------------------------------------- causation


def test_cause_key_of_an_input_message() -> None:
    assert Cause(stream="identity-ingest", sequence=12, event_id="e").key() == "identity-ingest:12"


def test_cause_key_of_a_command() -> None:
    assert Cause(command_id="abc").key() == "cmd:abc"


def test_cause_key_prefers_the_stream() -> None:
    assert Cause(stream="s", sequence=1, command_id="c").key() == "s:1"


def test_cause_to_proto() -> None:
    cause = Cause(stream="s", sequence=3, event_id="e", command_id="c")
    assert cause.to_proto() == Causation(stream="s", sequence=3, event_id="e", command_id="c")
