"""Identity encodes its fragment envelopes itself (a hot path): the bytes must decode to exactly
the Envelope that ``Maker`` builds as a protobuf object, and survive the kit's batch encoding."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from google.protobuf import struct_pb2

from cdp.common.v1.envelope_pb2 import IdentityValue
from cdp.identity.v1 import events_pb2 as ev
from cdp_identity.engine import Maker
from cdp_kit.envelope import Cause, Envelope, decode_batch, encode_batch, to_timestamp

T0 = datetime(2026, 3, 1, 12, 30, 15, 250_000, tzinfo=UTC)


def fragment() -> ev.ProfileFragment:
    attributes = struct_pb2.Struct()
    attributes.update({"plan": "gold", "visits": 3, "tags": ["a", "b"], "nested": {"x": True}})
    return ev.ProfileFragment(
        profile_id="p-0123456789abcdef01234567",
        source_event_id="4e0c7d0e-1111-8222-9333-444455556666",
        record_id="r-17",
        dataset="web",
        kind="event",
        identities=[
            IdentityValue(namespace="email", value="ann@example.com"),
            IdentityValue(namespace="cookie", value="ck-1"),
        ],
        attributes=attributes,
        occurred_at=to_timestamp(T0 - timedelta(days=2)),
        event_type="page_view",
        batch_id="b-9",
        anchor=IdentityValue(namespace="email", value="ann@example.com"),
        dropped=[ev.DroppedIdentity(namespace="phone", rule="invalid", value_hash="h", detail="not a phone number")],
    )


@pytest.mark.parametrize(
    ("cause", "trace"),
    [
        (Cause("identity-reads-ingest", 42), {}),
        (Cause(command_id="unlink-1"), {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}),
    ],
)
@pytest.mark.parametrize("kind", ["fragment", "decision"])
def test_an_encoded_envelope_decodes_to_the_envelope_maker_builds(
    cause: Cause, trace: dict[str, str], kind: str
) -> None:
    payload = fragment() if kind == "fragment" else ev.GraphDecision(rule="unlinked", reason="r", profile_id="p-1")
    built = Maker("source-1", T0, cause, trace)(payload, "p-subject", kind)
    encoded = Maker("source-1", T0, cause, trace).encoded(payload, "p-subject", kind)
    assert Envelope.FromString(encoded) == built
    recorded = datetime(2026, 3, 2, tzinfo=UTC)
    [decoded] = decode_batch(encode_batch([encoded], recorded))
    assert decoded.recorded_at.ToDatetime(UTC) == recorded
    decoded.ClearField("recorded_at")
    assert decoded == built


def test_each_event_of_a_cause_gets_its_own_id_whether_encoded_or_not() -> None:
    cause = Cause("identity-reads-ingest", 7)
    built, encoded = Maker("s", T0, cause, {}), Maker("s", T0, cause, {})
    for kind in ("decision", "merge", "decision"):
        payload = ev.GraphDecision(rule=kind)
        assert Envelope.FromString(encoded.encoded(payload, "k", kind)).id == built(payload, "k", kind).id
