"""Sealing personal fields: round trip, the shared-device rule, tampering, no plaintext."""

from __future__ import annotations

import os

import pytest

from cdp.common.v1.envelope_pb2 import Envelope, IdentityValue
from cdp.identity.v1 import events_pb2 as identity_ev
from cdp.ingest.v1 import events_pb2 as ingest_ev
from cdp_kit.sealing import Erased, merge_part, open_part, seal, split_fields
from cdp_kit.vault import block_of, decode_block, encode_block

ANN, BOB = "aaaa.0001", "bbbb.0002"
KEYS = {ANN: os.urandom(32), BOB: os.urandom(32)}
EMAIL = "ann.person@example.com"


def record() -> ingest_ev.RecordAccepted:
    rec = ingest_ev.RecordAccepted(record_id="r1", dataset="crm", row=3)
    rec.identities.add(namespace="email", value=EMAIL)
    rec.identities.add(namespace="device", value="dev-42")
    rec.attributes.update({"first_name": "Annabel", "score": 7})
    return rec


def sealed_envelope(refs: list[str]) -> tuple[Envelope, ingest_ev.RecordAccepted]:
    rec = record()
    env = Envelope(id="ev-1", type=rec.DESCRIPTOR.full_name)
    stripped, personal = split_fields(rec, ["identities", "attributes"])
    env.payload.Pack(stripped)
    env.sealed.append(seal(KEYS, refs, personal, event_id=env.id, event_type=env.type))
    return env, rec


def open_all(env: Envelope, keys: dict[str, bytes]) -> None:
    for part in env.sealed:
        merge_part(env, part.path, open_part(keys, part, event_id=env.id, event_type=env.type))


def test_round_trip_restores_the_payload() -> None:
    env, rec = sealed_envelope([ANN, BOB])
    clear = ingest_ev.RecordAccepted()
    env.payload.Unpack(clear)
    assert not clear.identities
    assert not clear.attributes.fields
    assert clear.record_id == "r1"
    open_all(env, KEYS)
    opened = ingest_ev.RecordAccepted()
    env.payload.Unpack(opened)
    assert opened == rec


def test_sealed_bytes_hold_no_plaintext() -> None:
    env, _ = sealed_envelope([ANN, BOB])
    wire = env.SerializeToString()
    for secret in (EMAIL, "Annabel", "dev-42", "first_name"):
        assert secret.encode() not in wire


@pytest.mark.parametrize("erased", [ANN, BOB])
def test_shared_device_rule_either_person_erased_erases_the_record(erased: str) -> None:
    env, _ = sealed_envelope([ANN, BOB])
    remaining = {ref: key for ref, key in KEYS.items() if ref != erased}
    with pytest.raises(Erased):
        open_all(env, remaining)


def test_a_key_of_another_generation_does_not_open() -> None:
    env, _ = sealed_envelope([ANN])
    with pytest.raises(Erased):
        open_all(env, {ANN: os.urandom(32)})


@pytest.mark.parametrize("field", ["ciphertext", "salt", "key_refs", "path", "event_id"])
def test_tampering_reads_as_erased(field: str) -> None:
    env, _ = sealed_envelope([ANN, BOB])
    part = env.sealed[0]
    if field == "ciphertext":
        part.ciphertext = part.ciphertext[:-1] + bytes([part.ciphertext[-1] ^ 1])
    elif field == "salt":
        part.salt = os.urandom(16)
    elif field == "key_refs":
        del part.key_refs[1]
    elif field == "path":
        part.path = "identities"
    else:
        env.id = "ev-2"  # a part copied into another event
    with pytest.raises(Erased):
        open_all(env, KEYS)


def test_a_part_inside_a_repeated_message_merges_back_in_place() -> None:
    split = identity_ev.ProfileSplit(profile_id="p1")
    for pid, value in (("p1", "ann@example.com"), ("p2", "bob@example.com")):
        part = split.parts.add(profile_id=pid, fragment_ids=["f-" + pid])
        part.identities.append(IdentityValue(namespace="email", value=value))
    env = Envelope(id="ev-9", type=split.DESCRIPTOR.full_name)
    stripped = identity_ev.ProfileSplit()
    stripped.CopyFrom(split)
    for i, (part, ref) in enumerate(zip(split.parts, (ANN, BOB), strict=True)):
        bare, personal = split_fields(part, ["identities"])
        stripped.parts[i].CopyFrom(bare)
        env.sealed.append(
            seal(KEYS, [ref], personal, event_id=env.id, event_type=env.type, path=f"parts.{i}", whole=False)
        )
    env.payload.Pack(stripped)
    open_all(env, KEYS)
    opened = identity_ev.ProfileSplit()
    env.payload.Unpack(opened)
    assert opened == split


def test_a_key_block_round_trips_and_a_truncated_one_yields_only_whole_keys() -> None:
    keys = {f"b1.{i:016x}.0000000{i}": os.urandom(32) for i in range(3)}
    data = encode_block(keys.items())
    assert decode_block(data) == keys
    assert decode_block(data[:-1]) == dict(sorted(keys.items())[:2])
    assert {block_of(ref) for ref in keys} == {"b1"}
