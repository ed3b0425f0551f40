"""Hostile bytes against the key vault, on a real nats-server: a key maker may write any block of
CDP_KEYS and a service's log may carry a forged sealed part. Nothing of it may crash a reader (on an
input or on its own log), widen a key fetch to other blocks, or pass for an erasure when it is
poison; a destroyed key still folds as erased, and the next good message flows."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from nats.aio.msg import Msg
from sqlmodel import col, select

from cdp.common.v1.envelope_pb2 import IdentityValue, Sealed
from cdp.identity.v1 import events_pb2 as identity_ev
from cdp.identity.v1 import identity_pb2 as pb
from cdp.ingest.v1 import events_pb2 as ingest_ev
from cdp.ingest.v1 import ingest_pb2
from cdp_identity.api import IdentityServicer
from cdp_identity.handlers import IdentityHandlers
from cdp_identity.main import build_processor
from cdp_identity.settings import IdentitySettings
from cdp_ingest.records import RecordBuilder
from cdp_kit.deadletters import DeadLetterRow
from cdp_kit.envelope import Cause, Envelope, encode_batch, make_envelope, utcnow
from cdp_kit.errors import NotFound, Unavailable
from cdp_kit.eventlog import EventLog
from cdp_kit.natsserver import NatsServer
from cdp_kit.processor import Processor, own_checkpoint
from cdp_kit.sealing import MalformedPart, seal
from cdp_kit.store import get_checkpoint, make_engine, sqlite_url
from cdp_kit.streams import IDENTITY_FRAGMENTS, INGEST_RECORDS
from cdp_kit.vault import STREAM, SUBJECT_PREFIX, PersonVault, block_of
from tests.integration.test_vault import committed_keys

T0 = datetime(2026, 1, 1, tzinfo=UTC)
PEOPLE = [("email", "ann@example.com"), ("phone", "+15550001111")]
GARBAGE_BLOCK = "0badb10c0badb10c"
GARBAGE_REF = f"{GARBAGE_BLOCK}.{'0' * 16}.{'0' * 8}"  # the shape of a ref: its block does not decode
NOT_UTF8 = b"\x05\xff\xfe\xfd\xfc\xfb" + b"\x00" * 32  # what r1_min.py wrote: the old decoder raised


class DirectGets:
    """Every direct get the key bucket is asked (a plain subscription beside the server's): which
    KV subjects a reader requested."""

    def __init__(self) -> None:
        self.subjects: list[str] = []

    async def start(self, eventlog: EventLog) -> None:
        async def seen(msg: Msg) -> None:
            if msg.subject == f"$JS.API.DIRECT.GET.{STREAM}":
                self.subjects += json.loads(msg.data)["multi_last"]
            else:  # $JS.API.DIRECT.GET.<stream>.<subject>: one key (kv.get)
                self.subjects.append(msg.subject.removeprefix(f"$JS.API.DIRECT.GET.{STREAM}."))

        await eventlog.nc.subscribe(f"$JS.API.DIRECT.GET.{STREAM}", cb=seen)
        await eventlog.nc.subscribe(f"$JS.API.DIRECT.GET.{STREAM}.>", cb=seen)
        await eventlog.nc.flush()

    async def blocks(self, eventlog: EventLog) -> set[str]:
        await eventlog.nc.flush()
        return {subject.removeprefix(SUBJECT_PREFIX) for subject in self.subjects}


async def write_block(eventlog: EventLog, block: str, data: bytes) -> None:
    """What any key maker (ingest, identity, activation) may do: write a block's KV subject."""
    await eventlog.js.publish(SUBJECT_PREFIX + block, data, stream=STREAM)


def thing(event_id: str, part: Sealed | None = None) -> Envelope:
    env = Envelope(id=event_id, type="cdp.test.Thing")
    env.payload.type_url = "type.googleapis.com/cdp.test.Thing"
    if part is not None:
        env.sealed.append(part)
    return env


class OneMessage:
    """A log message holding one event (what ``PersonVault.open_messages`` reads)."""

    def __init__(self, sequence: int, env: Envelope) -> None:
        self.sequence = sequence
        self.env = env

    def events(self) -> list[Envelope]:
        copy = Envelope()
        copy.CopyFrom(self.env)
        return [copy]


def garbage_part(event_id: str, event_type: str, refs: list[str] | None = None) -> Sealed:
    """A well-formed v2 part under refs whose keys no reader can have (the block is garbage)."""
    refs = refs or [GARBAGE_REF]
    keys = {ref: os.urandom(32) for ref in refs}
    return seal(keys, refs, b"\x0a\x03ann", event_id=event_id, event_type=event_type)


MALFORMED: dict[str, Callable[[Sealed], None]] = {
    "format_unknown": lambda p: setattr(p, "format", 99),
    "v2_has_salt": lambda p: setattr(p, "salt", os.urandom(16)),
    "ciphertext_too_short": lambda p: setattr(p, "ciphertext", b"\x00" * 20),
    "key_refs_empty": lambda p: p.ClearField("key_refs"),
    "key_ref_invalid": lambda p: p.key_refs.extend([">", "*.a.b"]),
    "key_refs_too_many": lambda p: p.key_refs.extend(f"{i:x}.0.0" for i in range(20_000)),
}


def malformed_part(rule: str, event_id: str, event_type: str) -> Sealed:
    part = garbage_part(event_id, event_type)
    MALFORMED[rule](part)
    return part


async def test_an_undecodable_block_reads_as_erased_and_never_raises(eventlog: EventLog) -> None:
    producer = await PersonVault.bind(eventlog.js)
    refs = producer.refs_for(PEOPLE)
    await producer.commit()
    good = thing("e-good", producer.seal(refs, b"\x0a\x03ann", event_id="e-good", event_type="cdp.test.Thing"))
    await write_block(eventlog, GARBAGE_BLOCK, NOT_UTF8)

    reader = await PersonVault.bind(eventlog.js)
    hostile = thing("e-bad", garbage_part("e-bad", "cdp.test.Thing"))
    opened = await reader.open_messages([OneMessage(1, good), OneMessage(2, hostile), OneMessage(3, good)])
    assert [len(opened[seq]) for seq in (1, 2, 3)] == [1, 0, 1]
    assert opened[1][0].payload.value == b"\x0a\x03ann"
    assert reader.erased == 1
    assert reader.unreadable_blocks == 1

    # A real block overwritten with garbage (by any key maker): its people read as erased, no error.
    await write_block(eventlog, block_of(refs[0]), b"\x01>" + os.urandom(40))
    fresh = await PersonVault.bind(eventlog.js)
    assert await fresh.open_messages([OneMessage(4, good)]) == {4: []}
    assert fresh.erased == 1
    assert fresh.unreadable_blocks == 1


async def test_a_block_holding_a_key_for_another_blocks_ref_is_not_believed(eventlog: EventLog) -> None:
    """A key maker writing block X with a key for a ref of block Y must not plant that key in a
    reader (which would then open, or seal for the forger, under a key the forger knows)."""
    producer = await PersonVault.bind(eventlog.js)
    refs = producer.refs_for(PEOPLE)
    await producer.commit()
    good = thing("e-good", producer.seal(refs, b"\x0a\x03ann", event_id="e-good", event_type="cdp.test.Thing"))
    forged = b"".join(b"%c%b%b" % (len(ref), ref.encode(), os.urandom(32)) for ref in sorted(refs))
    await write_block(eventlog, GARBAGE_BLOCK, forged)
    reader = await PersonVault.bind(eventlog.js)
    other = thing("e-other", garbage_part("e-other", "cdp.test.Thing"))
    # The forged block is fetched first (same batch): its keys are refused, the real ones kept.
    opened = await reader.open_messages([OneMessage(1, other), OneMessage(2, good)])
    assert [len(opened[seq]) for seq in (1, 2)] == [0, 1]
    assert opened[2][0].payload.value == b"\x0a\x03ann"
    assert reader.unreadable_blocks == 1


async def test_wildcard_refs_never_reach_a_subject(eventlog: EventLog) -> None:
    producer = await PersonVault.bind(eventlog.js)
    refs = producer.refs_for(PEOPLE)
    await producer.commit()
    others = producer.refs_for([("email", "bob@example.com")])
    await producer.commit()  # another block, which nothing below names
    assert block_of(others[0]) != block_of(refs[0])
    gets = DirectGets()
    await gets.start(eventlog)

    reader = await PersonVault.bind(eventlog.js)
    for forged in ([">"], ["*.a.b"], [refs[0], ">"]):
        part = producer.seal(refs, b"\x0a\x03ann", event_id="e-1", event_type="cdp.test.Thing")
        del part.key_refs[:]
        part.key_refs.extend(forged)
        with pytest.raises(MalformedPart) as caught:
            await reader.open_messages([OneMessage(1, thing("e-1", part))])
        assert caught.value.rule == "key_ref_invalid"
    await reader.prefetch([">", "*.a.b", "aa.>", "*"])  # straight to prefetch (e.g. refs from a store)
    assert await gets.blocks(eventlog) == set()  # nothing was requested at all

    await reader.prefetch([refs[0], ">"])
    assert await gets.blocks(eventlog) == {block_of(refs[0])}  # its block, and no other

    # A privacy request naming forged refs: they are skipped, the good one is destroyed.
    assert await producer.destroy([">", "*.a.b", "", refs[0]]) == 1
    assert await gets.blocks(eventlog) == {block_of(refs[0])}
    fresh = await PersonVault.bind(eventlog.js)
    env = thing("e-2", producer.seal(others, b"\x0a\x03bob", event_id="e-2", event_type="cdp.test.Thing"))
    assert len((await fresh.open_messages([OneMessage(2, env)]))[2]) == 1  # bob's block untouched
    gone = thing("e-3", garbage_part("e-3", "cdp.test.Thing", [refs[0]]))
    assert await fresh.open_messages([OneMessage(3, gone)]) == {3: []}  # destroyed: erased, no error
    assert fresh.erased == 1


@pytest.mark.parametrize(
    ("overwrite", "other_left"),
    [("undecodable", 0), ("empty", 0), ("copied", 1)],
)
async def test_destroying_keys_of_an_overwritten_block_erases_its_previous_version(
    nats_server: NatsServer, overwrite: str, other_left: int
) -> None:
    """A key maker overwrote a real block (with garbage, with an empty block, or with a copy): the
    bucket's history still holds the previous version with the real keys. A destroy erases that
    version too, so no byte of the destroyed key is left in the store directory."""
    eventlog = await EventLog.connect(nats_server.url, "cdp-test")
    try:
        vault, refs, keys = await committed_keys(eventlog)
        block = block_of(refs[0])
        real = (await vault.kv.get(block)).value or b""
        await write_block(eventlog, block, {"undecodable": NOT_UTF8, "empty": b"", "copied": real}[overwrite])
        assert await vault.destroy(refs[:1]) == 1
        assert await vault.destroy(refs[:1]) == 0
    finally:
        await eventlog.close()
    nats_server.stop()  # flushed and closed: what is on disk is all there is
    stored = b"".join(p.read_bytes() for p in sorted(nats_server.store_dir.rglob("*")) if p.is_file())
    assert stored.count(keys[0]) == 0
    # The other key: in the copy rewritten without the destroyed one; else erased with the old
    # version (no reader could read it since the overwrite).
    assert stored.count(keys[1]) == other_left


# ---------------------------------------------------------------- a service: identity


def identity(eventlog: EventLog, url: str) -> tuple[Processor, IdentityServicer]:
    processor, projection = build_processor(IdentitySettings(), make_engine(url), eventlog)
    processor.create_store()
    return processor, IdentityServicer(IdentityHandlers(processor, projection))


async def ingest(eventlog: EventLog, batch: str, people: list[list[tuple[str, str]]]) -> list[str]:
    """Records as ingest writes them; the key refs it made."""
    vault = await PersonVault.bind(eventlog.js)
    builder = RecordBuilder("crm", ingest_pb2.SCHEMA_CLASS_PROFILE, batch, T0, keys=vault)
    encoded = [
        builder.encode(record_id=f"{batch}-r{n}", row=n, values={"first_name": "X"}, identities=ids)
        for n, ids in enumerate(people, 1)
    ]
    await vault.commit()
    await eventlog.append_raw(INGEST_RECORDS.subject, encode_batch(encoded, utcnow()), msg_id=batch)
    return vault.refs_for(ids for ids_of in people for ids in ids_of)


async def append_one(eventlog: EventLog, subject: str, env: Envelope) -> None:
    await eventlog.append_raw(subject, encode_batch([env], utcnow()), msg_id=f"hostile-{env.id}")


def record(event_id: str, part: Sealed) -> Envelope:
    env = make_envelope(
        ingest_ev.RecordAccepted(record_id=event_id, dataset="crm"),
        event_id=event_id,
        subject_key="crm",
        occurred_at=T0,
        cause=Cause(command_id=event_id),
    )
    env.sealed.append(part)
    return env


def fragment(event_id: str, part: Sealed) -> Envelope:
    env = make_envelope(
        identity_ev.ProfileFragment(profile_id=f"p-{event_id}", source_event_id=event_id),
        event_id=event_id,
        subject_key=f"p-{event_id}",
        occurred_at=T0,
        cause=Cause(command_id=event_id),
    )
    env.sealed.append(part)
    return env


async def resolves(api: IdentityServicer, ns: str, value: str) -> str:
    reply = await api.Resolve(pb.ResolveRequest(identity=IdentityValue(namespace=ns, value=value)), None)  # type: ignore[arg-type]
    return reply.profile_id


def letters(processor: Processor, consumer: str) -> dict[int, tuple[str, str]]:
    with processor.read() as session:
        rows = session.exec(select(DeadLetterRow).where(col(DeadLetterRow.consumer) == consumer)).all()
        return {row.sequence: (row.error_class, row.error) for row in rows}


async def test_a_service_sets_hostile_parts_aside_on_inputs_and_own_log_and_goes_on(
    eventlog: EventLog, tmp_path: Path
) -> None:
    await write_block(eventlog, GARBAGE_BLOCK, NOT_UTF8)
    gets = DirectGets()
    await gets.start(eventlog)
    ann_refs = await ingest(eventlog, "b1", [[("crm_id", "C1"), ("email", "ann@example.com")]])
    record_type = ingest_ev.RecordAccepted.DESCRIPTOR.full_name
    # On identity's input: a record under a garbage block (erased), then one of each malformed part.
    await append_one(eventlog, INGEST_RECORDS.subject, record("rec-garbage", garbage_part("rec-garbage", record_type)))
    for rule in MALFORMED:
        await append_one(
            eventlog, INGEST_RECORDS.subject, record(f"rec-{rule}", malformed_part(rule, "x", record_type))
        )
    await ingest(eventlog, "b2", [[("crm_id", "C2"), ("email", "bob@example.com")]])

    processor, api = identity(eventlog, sqlite_url(tmp_path / "live.db"))
    await processor.catch_up()
    assert await resolves(api, "email", "bob@example.com")  # the next good message went through
    assert await resolves(api, "email", "ann@example.com")
    dead = letters(processor, "identity-ingest")
    assert sorted(error.split(": ")[1].split(" ")[0] for _cls, error in dead.values()) == sorted(MALFORMED)
    assert {cls for cls, _error in dead.values()} == {"MalformedPart"}
    assert all(">" not in error and "*" not in error for _cls, error in dead.values())
    # A redrive of a malformed part fails again (opened as a batch is), one attempt more: it is
    # never applied with its part unopened.
    [format_99] = [seq for seq, (_cls, error) in dead.items() if "format_unknown" in error]
    assert await processor.request_redrive("identity-ingest", [format_99], "redrive-1") == 1
    assert await processor.redrive(processor.inputs[0]) == 0
    with processor.read() as session:
        row = session.get(DeadLetterRow, ("identity-ingest", format_99))
        assert row is not None
        assert (row.state, row.redrives, row.error_class) == ("dead", 1, "MalformedPart")
    assert processor.vault is not None
    # The record under the garbage block: erased, not poison (counted once per opening: the batch
    # was opened again, unit by unit, to isolate the poison).
    assert processor.vault.erased >= 1
    erased = processor.vault.erased

    # On identity's own log (what a forger with identity's credentials, or a bug, could append).
    fragment_type = identity_ev.ProfileFragment.DESCRIPTOR.full_name
    await append_one(eventlog, IDENTITY_FRAGMENTS.subject, fragment("frag-garbage", garbage_part("y", fragment_type)))
    await append_one(
        eventlog, IDENTITY_FRAGMENTS.subject, fragment("frag-99", malformed_part("format_unknown", "z", fragment_type))
    )
    await append_one(
        eventlog,
        IDENTITY_FRAGMENTS.subject,
        fragment("frag-refs", malformed_part("key_ref_invalid", "z", fragment_type)),
    )
    tail = await eventlog.last_sequence(IDENTITY_FRAGMENTS.stream.name, IDENTITY_FRAGMENTS.subject)
    assert await processor.recover() >= 1  # no crash: recovery folds what it can and sets aside the rest
    aside = letters(processor, f"own:{IDENTITY_FRAGMENTS.name}")
    assert sorted(error for _cls, error in aside.values()) == [
        "sealed part malformed: format_unknown (format 99)",
        "sealed part malformed: key_ref_invalid (ref 2 of 3)",
    ]
    with processor.read() as session:
        assert get_checkpoint(session, own_checkpoint(IDENTITY_FRAGMENTS)) == tail
    assert processor.vault.erased > erased  # the fragment under the garbage block

    # The own log flows on: a new record's fragment is appended after the hostile ones (the guard
    # holds because the checkpoint moved past them).
    await ingest(eventlog, "b3", [[("crm_id", "C3"), ("email", "cy@example.com")]])
    await processor.catch_up()
    assert await resolves(api, "email", "cy@example.com")
    assert await eventlog.last_sequence(IDENTITY_FRAGMENTS.stream.name, IDENTITY_FRAGMENTS.subject) > tail

    # A key maker overwrites Ann's real block (r10_block_overwrite.py): a rebuild meets her record
    # and her fragment (own log) under it, and every hostile byte above, and does not crash: Ann
    # folds as erased, the poison is set aside as the live service decided, everyone else stays.
    await write_block(eventlog, block_of(ann_refs[0]), NOT_UTF8)
    rebuilt, rebuilt_api = identity(eventlog, sqlite_url(tmp_path / "rebuilt.db"))
    await rebuilt.rebuild()
    with pytest.raises(NotFound):
        await resolves(rebuilt_api, "email", "ann@example.com")
    assert await resolves(rebuilt_api, "email", "bob@example.com") == await resolves(api, "email", "bob@example.com")
    assert await resolves(rebuilt_api, "email", "cy@example.com") == await resolves(api, "email", "cy@example.com")
    assert letters(rebuilt, f"own:{IDENTITY_FRAGMENTS.name}").keys() == aside.keys()
    assert letters(rebuilt, "identity-ingest").keys() == dead.keys()
    assert all(">" not in block and "*" not in block for block in await gets.blocks(eventlog))


async def test_recovery_sets_aside_a_message_whose_opening_fails_and_retries_a_transient_failure(
    eventlog: EventLog, tmp_path: Path
) -> None:
    """Should opening an own-log batch fail on some bytes in a way no check foresaw, recovery opens
    and folds message by message and sets the failing one aside; a transient failure (the bucket
    unavailable) is raised for recovery to try again, with nothing set aside."""
    await ingest(eventlog, "b1", [[("crm_id", "C1"), ("email", "ann@example.com")]])
    processor, _api = identity(eventlog, sqlite_url(tmp_path / "live.db"))
    await processor.catch_up()
    fragment_type = identity_ev.ProfileFragment.DESCRIPTOR.full_name
    for name in ("trip", "after"):
        await append_one(
            eventlog, IDENTITY_FRAGMENTS.subject, fragment(f"frag-{name}", garbage_part(name, fragment_type))
        )
    tail = await eventlog.last_sequence(IDENTITY_FRAGMENTS.stream.name, IDENTITY_FRAGMENTS.subject)
    vault = processor.vault
    assert vault is not None
    real = vault.open_messages
    fault: list[Exception] = [Unavailable("key bucket unavailable")]

    async def faulty(
        msgs: Sequence[Any], malformed: dict[int, MalformedPart] | None = None
    ) -> dict[int, list[Envelope]]:
        if any(msg.sequence == tail - 1 for msg in msgs):  # the "trip" fragment
            raise fault[0]
        return await real(msgs, malformed)

    vault.open_messages = faulty  # type: ignore[method-assign]
    with pytest.raises(Unavailable):
        await processor.recover()
    assert letters(processor, f"own:{IDENTITY_FRAGMENTS.name}") == {}
    with processor.read() as session:
        assert get_checkpoint(session, own_checkpoint(IDENTITY_FRAGMENTS)) < tail - 1

    fault[0] = RuntimeError("injected: bytes nothing foresaw")
    erased = vault.erased
    await processor.recover()
    assert letters(processor, f"own:{IDENTITY_FRAGMENTS.name}") == {
        tail - 1: ("RuntimeError", "injected: bytes nothing foresaw")
    }
    with processor.read() as session:
        assert get_checkpoint(session, own_checkpoint(IDENTITY_FRAGMENTS)) == tail
    assert vault.erased > erased  # the message after it was folded (erased: its block is garbage)
