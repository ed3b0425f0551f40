"""Crypto-shredding end to end on a real nats-server: records sealed as ingest seals them are read
by identity, whose fragments are sealed in turn; identity's store knows each identity's key refs;
once those keys are destroyed, a rebuild folds the person's records as erased and nothing of
them comes back, while everyone else is unchanged."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from cdp.common.v1.envelope_pb2 import IdentityValue
from cdp.identity.v1 import events_pb2 as ev
from cdp.identity.v1 import identity_pb2 as pb
from cdp.ingest.v1 import ingest_pb2
from cdp.privacy.v1 import privacy_pb2 as privacy_pb
from cdp_identity.api import IdentityServicer
from cdp_identity.handlers import IdentityHandlers
from cdp_identity.main import build_processor
from cdp_identity.privacy import PrivacyApplied, PrivacyHandlers
from cdp_identity.settings import IdentitySettings
from cdp_identity.store import key_refs_for_profiles
from cdp_ingest.records import RecordBuilder
from cdp_kit.envelope import encode_batch, is_a, unpack, utcnow
from cdp_kit.errors import NotFound
from cdp_kit.eventlog import EventLog
from cdp_kit.natsserver import NatsServer
from cdp_kit.privacy import NoKeyVault
from cdp_kit.processor import Processor
from cdp_kit.store import make_engine, sqlite_url
from cdp_kit.streams import IDENTITY_FRAGMENTS, INGEST_RECORDS, PRIVACY_REQUESTS
from cdp_kit.vault import PersonVault

T0 = datetime(2026, 1, 1, tzinfo=UTC)
ANN = [("crm_id", "C1"), ("email", "ann.secret@example.com")]
BOB = [("crm_id", "C2"), ("email", "bob.other@example.com")]


async def ingest_records(eventlog: EventLog, people: list[list[tuple[str, str]]]) -> PersonVault:
    """Records as ingest writes them: RecordBuilder with the service's vault, keys committed first."""
    vault = await PersonVault.bind(eventlog.js)
    builder = RecordBuilder("crm", ingest_pb2.SCHEMA_CLASS_PROFILE, "b1", T0, keys=vault)
    encoded = [
        builder.encode(record_id=f"r{n}", row=n, values={"first_name": f"Name-{ids[0][1]}"}, identities=ids)
        for n, ids in enumerate(people, 1)
    ]
    await vault.commit()
    await eventlog.append_raw(INGEST_RECORDS.subject, encode_batch(encoded, utcnow()), msg_id="batch-1")
    return vault


def identity(eventlog: EventLog, url: str) -> tuple[Processor, IdentityServicer]:
    processor, projection = build_processor(IdentitySettings(), make_engine(url), eventlog)
    processor.create_store()
    return processor, IdentityServicer(IdentityHandlers(processor, projection))


async def profile_of(api: IdentityServicer, ns: str, value: str) -> str:
    reply = await api.Resolve(pb.ResolveRequest(identity=IdentityValue(namespace=ns, value=value)), None)  # type: ignore[arg-type]
    return reply.profile_id


async def fragments(eventlog: EventLog) -> tuple[bytes, list[ev.ProfileFragment]]:
    msgs = [m async for m in eventlog.read(IDENTITY_FRAGMENTS.stream.name, IDENTITY_FRAGMENTS.subject)]
    opened = await PersonVault.of(eventlog.js).open_messages(msgs)
    found = [unpack(e, ev.ProfileFragment) for m in msgs for e in opened[m.sequence] if is_a(e, ev.ProfileFragment)]
    return b"".join(m.data for m in msgs), found


async def test_a_destroyed_person_is_erased_on_rebuild_and_everyone_else_stays(
    eventlog: EventLog, tmp_path: Path
) -> None:
    producer = await ingest_records(eventlog, [ANN, BOB])
    processor, api = identity(eventlog, sqlite_url(tmp_path / "live.db"))
    await processor.catch_up()
    ann = await profile_of(api, "email", "ann.secret@example.com")
    bob = await profile_of(api, "email", "bob.other@example.com")
    assert ann != bob

    raw, frags = await fragments(eventlog)
    assert len(frags) == 2
    for plain in (b"ann.secret@example.com", b"Name-C1", b"C1", b"first_name"):
        assert plain not in raw  # fragments on the log are sealed
    assert {i.value for f in frags for i in f.identities} >= {"ann.secret@example.com", "C2"}
    assert {f.attributes["first_name"] for f in frags} == {"Name-C1", "Name-C2"}

    with processor.read() as session:
        ann_refs = key_refs_for_profiles(session, [ann])
        assert len(key_refs_for_profiles(session, [ann, bob])) == 4
    assert ann_refs == sorted(producer.refs_for(ANN))  # one ref per identity of the person

    assert processor.vault is not None
    assert await processor.vault.destroy(ann_refs) == 2

    rebuilt, rebuilt_api = identity(eventlog, sqlite_url(tmp_path / "rebuilt.db"))
    await rebuilt.rebuild()
    for ns, value in ANN:
        with pytest.raises(NotFound):
            await profile_of(rebuilt_api, ns, value)
    assert await profile_of(rebuilt_api, "crm_id", "C2") == bob
    assert rebuilt.vault is not None
    assert rebuilt.vault.erased == 2  # her fragment (own log) and her record (input, replayed)
    _, left = await fragments(eventlog)
    assert [f.profile_id for f in left] == [bob]  # any reader: Ann's fragment no longer opens
    for db in ("rebuilt.db",):
        assert b"ann.secret" not in (tmp_path / db).read_bytes()


async def test_merges_splits_and_decisions_name_no_one_in_clear_and_erase_with_the_person(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    eventlog = await EventLog.connect(nats_server.url, "cdp-test")
    try:
        await eventlog.ensure_streams()
        cookie = ("cookie", "ck-ann-device-9")
        # Ann's CRM record, an anonymous cookie, then a record joining them (a merge), and Bob.
        await ingest_records(eventlog, [ANN, [cookie], [ANN[1], cookie], BOB])
        processor, api = identity(eventlog, sqlite_url(tmp_path / "live.db"))
        await processor.catch_up()
        ann = await profile_of(api, *cookie)
        assert ann == await profile_of(api, *ANN[0])
        # An operator unlinks the cookie: a decision and a split, sealed under the keys at hand or fetched.
        reply = await api.Unlink(pb.UnlinkRequest(identity=IdentityValue(namespace=cookie[0], value=cookie[1])), None)  # type: ignore[arg-type]
        assert reply.changed
        assert await profile_of(api, *cookie) != ann

        kinds = await event_kinds(eventlog)
        assert {"ProfilesMerged", "GraphDecision", "ProfileSplit"} <= kinds
        raw, _ = await fragments(eventlog)
        for plain in (b"ann.secret@example.com", b"ck-ann-device-9", b"bob.other@example.com"):
            assert plain not in raw, await leaking(eventlog, plain)

        with processor.read() as session:
            refs = key_refs_for_profiles(session, [ann, await profile_of(api, *cookie)])
        assert processor.vault is not None
        assert await processor.vault.destroy(refs) == 3

        rebuilt, rebuilt_api = identity(eventlog, sqlite_url(tmp_path / "rebuilt.db"))
        await rebuilt.rebuild()
        for ns, value in [*ANN, cookie]:
            with pytest.raises(NotFound):
                await profile_of(rebuilt_api, ns, value)
        assert await profile_of(rebuilt_api, *BOB[1])
        assert rebuilt.vault is not None
        assert rebuilt.vault.erased_fields >= 3  # the merge's via, the decision, the split's part
        for db in ("rebuilt.db",):
            assert b"ck-ann-device-9" not in (tmp_path / db).read_bytes()
    finally:
        await eventlog.close()
    nats_server.stop()
    store = b"".join(p.read_bytes() for p in nats_server.store_dir.rglob("*") if p.is_file())
    for plain in (b"ann.secret@example.com", b"ck-ann-device-9", b"Name-C1"):
        assert plain not in store  # every byte JetStream holds: the log and the key bucket


async def event_kinds(eventlog: EventLog) -> set[str]:
    msgs = [m async for m in eventlog.read(IDENTITY_FRAGMENTS.stream.name, IDENTITY_FRAGMENTS.subject)]
    return {e.type.rsplit(".", 1)[-1] for m in msgs for e in m.events()}


async def leaking(eventlog: EventLog, plain: bytes) -> list[str]:
    """The events on identity's log whose bytes hold ``plain`` (what the assertion shows)."""
    msgs = [m async for m in eventlog.read(IDENTITY_FRAGMENTS.stream.name, IDENTITY_FRAGMENTS.subject)]
    return [f"{e.type} sealed={len(e.sealed)}" for m in msgs for e in m.events() if plain in e.SerializeToString()]


async def test_a_process_without_the_keys_fetches_them_to_seal_an_unlink(eventlog: EventLog, tmp_path: Path) -> None:
    """The keys an unlink's decision and split need are not at hand in a fresh process: sealing raises
    KeysNeeded, the processor fetches them and runs the command again; nothing goes out in clear."""
    cookie = ("cookie", "ck-bob-phone-1")
    await ingest_records(eventlog, [[*BOB, cookie]])
    url = sqlite_url(tmp_path / "identity.db")
    live, _ = identity(eventlog, url)
    await live.catch_up()
    restarted, api = identity(eventlog, url)  # the same store, a new process: an empty key cache
    await restarted.recover()
    reply = await api.Unlink(pb.UnlinkRequest(identity=IdentityValue(namespace=cookie[0], value=cookie[1])), None)  # type: ignore[arg-type]
    assert reply.changed
    assert reply.decision.identity.value == cookie[1]  # the operator's answer is plain
    raw, _ = await fragments(eventlog)
    for plain in (b"ck-bob-phone-1", b"bob.other@example.com"):
        assert plain not in raw, await leaking(eventlog, plain)
    assert {"GraphDecision", "ProfileSplit"} <= await event_kinds(eventlog)


async def test_only_a_delete_names_the_person_s_keys_to_destroy(eventlog: EventLog, tmp_path: Path) -> None:
    """A suppression keeps what is held (on the log too): its request names no key, so completing
    it destroys none; a delete names every key of the person."""
    producer = await ingest_records(eventlog, [ANN, BOB])
    processor, _api = identity(eventlog, sqlite_url(tmp_path / "live.db"))
    await processor.catch_up()
    applied = processor.inputs[1].handler
    assert isinstance(applied, PrivacyApplied)
    projection = processor.projection
    handlers = PrivacyHandlers(processor, projection.graph, projection.rules, NoKeyVault(), applied)  # type: ignore[attr-defined]
    email = [IdentityValue(namespace="email", value="ann.secret@example.com")]
    suppress = await handlers.submit(
        privacy_pb.SubmitPrivacyRequest(mode=privacy_pb.PRIVACY_MODE_SUPPRESS, identities=email)
    )
    delete = await handlers.submit(
        privacy_pb.SubmitPrivacyRequest(mode=privacy_pb.PRIVACY_MODE_DELETE, identities=email)
    )
    assert not suppress.nothing_held
    assert not delete.nothing_held
    requested: dict[str, list[str]] = {}
    async for msg in eventlog.read(PRIVACY_REQUESTS.stream.name, PRIVACY_REQUESTS.subject):
        for env in msg.events():
            if is_a(env, privacy_pb.PrivacyRequested):
                req = unpack(env, privacy_pb.PrivacyRequested)
                requested[req.request_id] = list(req.key_refs)
    assert requested[suppress.request_id] == []
    assert requested[delete.request_id] == sorted(producer.refs_for(ANN))
