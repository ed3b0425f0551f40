"""Sealing personal fields: round trip, the shared-device rule, tampering, no plaintext."""

from __future__ import annotations

import os
from typing import Any, cast

import pytest

from cdp.common.v1.envelope_pb2 import Envelope, IdentityValue
from cdp.identity.v1 import events_pb2 as identity_ev
from cdp.ingest.v1 import events_pb2 as ingest_ev
from cdp_kit.sealing import (
    FORMAT_V2,
    Erased,
    MalformedPart,
    SetKeys,
    check_part,
    merge_part,
    merge_parts,
    open_part,
    random_bytes,
    seal,
    seal_v1,
    split_fields,
    valid_ref,
)
from cdp_kit.vault import LocalKeys, PersonVault, block_of, decode_block, encode_block

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


@pytest.mark.parametrize("field", ["ciphertext", "key_refs", "path", "event_id", "format"])
def test_tampering_reads_as_erased(field: str) -> None:
    env, _ = sealed_envelope([ANN, BOB])
    part = env.sealed[0]
    assert part.format == FORMAT_V2
    if field == "ciphertext":
        part.ciphertext = part.ciphertext[:-1] + bytes([part.ciphertext[-1] ^ 1])
    elif field == "format":
        part.format = 0  # read as v1: another key
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


def test_a_key_block_round_trips_and_a_block_not_exactly_encoded_holds_no_readable_key() -> None:
    keys = {f"b1.{i:016x}.0000000{i}": os.urandom(32) for i in range(3)}
    data = encode_block(keys.items())
    assert decode_block(data) == keys
    assert decode_block(data, "b1") == keys
    assert decode_block(b"") == {}
    assert {block_of(ref) for ref in keys} == {"b1"}
    entry = b"%c%b%b" % (len(b"b1.00.01"), b"b1.00.01", os.urandom(32))
    hostile = {
        "truncated": data[:-1],
        "trailing bytes": data + b"\x00",
        "ref not utf-8": b"\x04\xff\xfe\xfd\xfc" + os.urandom(32),
        "ref a wildcard": b"\x01>" + os.urandom(32),
        "ref with a space": b"\x05b1 .0" + os.urandom(32),
        "empty ref": b"\x00" + os.urandom(32),
        "a ref twice": entry + entry,
        "a length past the end": b"\xff" + b"a" * 40,
        "random": os.urandom(5000),
    }
    for name, garbage in hostile.items():
        assert decode_block(garbage) is None, name
    # A block holding a key of a ref of another block: not what a maker writes (and a reader must
    # not take a forged key for someone else's ref from it).
    assert decode_block(encode_block([("b2.00.01", os.urandom(32))]), "b1") is None


def test_refs_are_validated_before_any_use() -> None:
    vault_ref = unbound_vault().refs_for([("email", EMAIL)])[0]
    for ref in (vault_ref, ANN, "0123456789abcdef.0123456789abcdef"):
        assert valid_ref(ref), ref
    forged = (">", "*.a.b", "aa.*", "aa.>", "", "aa", "aa..bb", "aa.bb.cc.dd", "AA.BB", "aa.bb ", "a.b\u00e9", "a" * 40)
    for ref in forged:
        assert not valid_ref(ref), ref


def sealed_part() -> Any:
    return seal(KEYS, [ANN, BOB], b"\x0a\x03ann", event_id="ev-1", event_type="t")


@pytest.mark.parametrize(
    ("rule", "tamper"),
    [
        ("format_unknown", lambda p: setattr(p, "format", 99)),
        ("v2_has_salt", lambda p: setattr(p, "salt", os.urandom(16))),
        ("v1_salt_length", lambda p: setattr(p, "format", 0)),
        ("ciphertext_too_short", lambda p: setattr(p, "ciphertext", p.ciphertext[:27])),
        ("key_refs_empty", lambda p: p.ClearField("key_refs")),
        ("key_ref_invalid", lambda p: p.key_refs.append(">")),
        ("key_ref_invalid", lambda p: p.key_refs.append("*.a.b")),
        ("key_refs_too_many", lambda p: p.key_refs.extend(f"{i:016x}.00.00" for i in range(20_000))),
    ],
)
def test_a_part_no_sealer_writes_is_malformed_not_erased(rule: str, tamper: Any) -> None:
    part = sealed_part()
    assert open_part(KEYS, part, event_id="ev-1", event_type="t") == b"\x0a\x03ann"
    tamper(part)
    with pytest.raises(MalformedPart) as caught:
        open_part(KEYS, part, event_id="ev-1", event_type="t")
    assert caught.value.rule == rule
    assert str(caught.value).startswith(f"sealed part malformed: {rule}")
    assert "*" not in str(caught.value)  # never what the forger wrote
    assert ">" not in str(caught.value)
    vault = unbound_vault()
    env = Envelope(id="ev-1", type="t")
    env.sealed.append(part)
    with pytest.raises(MalformedPart):
        vault.open_envelope(env)
    assert vault.erased == 0


def test_a_sealer_refuses_a_part_no_reader_would_open() -> None:
    refs = [f"{i:016x}.00.00" for i in range(4097)]
    keys = dict.fromkeys(refs, os.urandom(32))
    with pytest.raises(MalformedPart) as caught:
        seal(keys, refs, b"x", event_id="ev-1", event_type="t")
    assert caught.value.rule == "key_refs_too_many"
    part = seal(keys, refs[:4096], b"x", event_id="ev-1", event_type="t")
    assert open_part(keys, part, event_id="ev-1", event_type="t") == b"x"


def test_a_destroyed_key_still_reads_as_erased_not_malformed() -> None:
    part = sealed_part()
    check_part(part)
    with pytest.raises(Erased):
        open_part({ANN: KEYS[ANN]}, part, event_id="ev-1", event_type="t")


def test_a_v1_part_written_before_v2_still_opens_and_still_erases() -> None:
    rec = record()
    stripped, personal = split_fields(rec, ["identities", "attributes"])
    part = seal_v1(KEYS, [ANN, BOB], personal, event_id="ev-1", event_type=rec.DESCRIPTOR.full_name)
    assert part.format == 0
    assert len(part.salt) == 16
    env = Envelope(id="ev-1", type=rec.DESCRIPTOR.full_name)
    env.payload.Pack(stripped)
    env.sealed.append(part)
    open_all(env, KEYS)
    opened = ingest_ev.RecordAccepted()
    env.payload.Unpack(opened)
    assert opened == rec
    with pytest.raises(Erased):
        open_part({ANN: KEYS[ANN]}, part, event_id="ev-1", event_type=rec.DESCRIPTOR.full_name)
    tampered = envelope_copy(part)
    tampered.salt = os.urandom(16)
    with pytest.raises(Erased):
        open_part(KEYS, tampered, event_id="ev-1", event_type=rec.DESCRIPTOR.full_name)


def envelope_copy(part: Any) -> Any:
    copy = type(part)()
    copy.CopyFrom(part)
    return copy


def test_v2_parts_under_one_set_have_distinct_nonces_and_open_through_a_shared_cache() -> None:
    cache = SetKeys()
    parts = [seal(KEYS, [BOB, ANN], b"same", event_id=f"e{i}", event_type="t", cache=cache) for i in range(200)]
    assert len(cache) == 1  # one derivation for the set, whatever the order of its refs
    assert len({p.ciphertext[:12] for p in parts}) == 200
    assert len({p.ciphertext for p in parts}) == 200
    reader = SetKeys()
    for i, part in enumerate(parts):
        assert open_part(KEYS, part, event_id=f"e{i}", event_type="t", cache=reader) == b"same"
        assert open_part(KEYS, part, event_id=f"e{i}", event_type="t") == b"same"  # no cache: the same key
    cache.clear()
    with pytest.raises(Erased):  # a key gone and nothing cached: erased
        open_part({ANN: KEYS[ANN]}, parts[0], event_id="e0", event_type="t", cache=cache)


def unbound_vault() -> PersonVault:
    """A vault whose keys are made in memory (no bucket: nothing here commits or fetches)."""
    return PersonVault(cast(Any, None), cast(Any, None))


def test_a_revoked_key_stops_a_v2_part_opening_even_after_its_set_key_was_cached() -> None:
    vault = unbound_vault()
    refs = vault.refs_for([("email", EMAIL), ("device", "dev-42")])
    env = Envelope(id="ev-1", type="cdp.test.Thing")
    env.sealed.append(vault.seal(refs, b"\x0a\x03ann", event_id=env.id, event_type=env.type))
    first = Envelope()
    first.CopyFrom(env)
    assert vault.open_envelope(first)  # the set key is now cached
    assert first.payload.value == b"\x0a\x03ann"
    vault.revoke(refs[1:])  # the shared-device rule: either person's key erases the part
    # The revoked-ref check below comes first, so only this sees the cache: no key derived from a
    # revoked ref stays in memory.
    assert len(vault._sets) == 0
    again = Envelope()
    again.CopyFrom(env)
    assert not vault.open_envelope(again)
    assert vault.erased == 1
    with pytest.raises(Erased):
        vault.seal(refs, b"x", event_id="ev-2", event_type=env.type)
    # Not even the pure function with the remaining key opens it.
    with pytest.raises(Erased):
        open_part(dict(vault.known()), env.sealed[0], event_id=env.id, event_type=env.type)


def test_local_keys_start_a_new_block_after_their_keys_are_taken() -> None:
    """The service may write a reader's keys (a block each) before it adopts the next ones: a key
    made after ``take_made`` must not go to a block that may be written already."""
    local = LocalKeys()
    first = local.refs_for([("email", "a@example.com"), ("email", "b@example.com")])
    made = local.take_made()
    assert set(made) == set(first)
    assert len({block_of(ref) for ref in first}) == 1
    later = local.refs_for([("email", "c@example.com")])
    assert block_of(later[0]) != block_of(first[0])
    assert local.refs_for([("email", "a@example.com")]) == first[:1]  # the generation is kept


def test_pooled_randomness_is_not_shared_with_a_forked_child() -> None:
    random_bytes(16)  # the parent has a pool
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next bytes, sent to the parent
        try:
            os.write(write, random_bytes(32))
        finally:
            os._exit(0)
    os.close(write)
    child = os.read(read, 32)
    os.close(read)
    os.waitpid(pid, 0)
    assert len(child) == 32
    assert child != random_bytes(32)  # a shared pool would hand both the same bytes


def split_with_parts(people: int) -> tuple[identity_ev.ProfileSplit, Envelope, list[tuple[str, bytes]], PersonVault]:
    """A ProfileSplit whose every part is sealed (``parts.<i>``) by a vault, with the plaintexts."""
    vault = unbound_vault()
    split = identity_ev.ProfileSplit(profile_id="p0")
    for i in range(people):
        part = split.parts.add(profile_id=f"p{i}", fragment_ids=[f"f{i}"])
        part.identities.append(IdentityValue(namespace="email", value=f"person{i}@example.com"))
        part.founder.CopyFrom(part.identities[0])
    env = Envelope(id="ev-split", type=split.DESCRIPTOR.full_name)
    stripped = identity_ev.ProfileSplit()
    stripped.CopyFrom(split)
    plain: list[tuple[str, bytes]] = []
    for i, part in enumerate(split.parts):
        bare, personal = split_fields(part, ["identities", "founder"])
        stripped.parts[i].CopyFrom(bare)
        refs = vault.refs_for([("email", f"person{i}@example.com")])
        path = f"parts.{i}"
        env.sealed.append(vault.seal(refs, personal, event_id=env.id, event_type=env.type, path=path, whole=False))
        plain.append((path, personal))
    env.payload.Pack(stripped)
    return split, env, plain, vault


def test_merging_every_part_at_once_equals_merging_them_in_turn() -> None:
    split, env, plain, _vault = split_with_parts(5)
    one_by_one = Envelope()
    one_by_one.CopyFrom(env)
    for path, plaintext in plain:
        merge_part(one_by_one, path, plaintext)
    at_once = Envelope()
    at_once.CopyFrom(env)
    merge_parts(at_once, plain)
    for opened in (one_by_one, at_once):
        payload = identity_ev.ProfileSplit()
        opened.payload.Unpack(payload)
        assert payload == split


def test_the_vault_opens_a_many_part_event_whole_and_leaves_an_erased_persons_part_empty() -> None:
    split, env, _plain, vault = split_with_parts(300)
    opened = Envelope()
    opened.CopyFrom(env)
    assert vault.open_envelope(opened)
    payload = identity_ev.ProfileSplit()
    opened.payload.Unpack(payload)
    assert payload == split
    assert all(not part.ciphertext for part in opened.sealed)

    vault.revoke(list(env.sealed[7].key_refs))  # one person erased: their part only stays empty
    again = Envelope()
    again.CopyFrom(env)
    assert vault.open_envelope(again)
    payload = identity_ev.ProfileSplit()
    again.payload.Unpack(payload)
    assert not payload.parts[7].identities
    assert not payload.parts[7].HasField("founder")
    assert payload.parts[8] == split.parts[8]
    assert vault.erased_fields == 1
