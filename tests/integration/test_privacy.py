"""Privacy requests (cdp.privacy.v1) on a real JetStream and real SQLite stores: identity records,
erases and completes them; ingest suppresses and erases (its collect messages included);
segmentation erases the person and makes them exit every audience; rebuilds agree."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import nats.js.errors
import pytest
from sqlalchemy.engine import Engine
from sqlmodel import select

from cdp.common.v1.envelope_pb2 import IdentityValue
from cdp.ingest.v1 import events_pb2 as ingest_ev
from cdp.ingest.v1 import ingest_pb2 as ingest_pb
from cdp.privacy.v1 import privacy_pb2 as pb
from cdp.segmentation.v1 import events_pb2 as seg_ev
from cdp_identity.api import PrivacyServicer
from cdp_identity.privacy import PrivacyApplied, PrivacyHandlers
from cdp_identity.store import KeyRefRow
from cdp_ingest.main import build as build_ingest
from cdp_ingest.privacy import PRIVACY_TABLES as INGEST_PRIVACY_TABLES
from cdp_ingest.privacy import PrivacyApplier as IngestApplier
from cdp_ingest.privacy import PrivacyToIngest
from cdp_ingest.settings import IngestSettings
from cdp_ingest.store import TABLES as INGEST_TABLES
from cdp_kit.deadletters import DEADLETTER_TABLES, DeadLetterRow
from cdp_kit.envelope import Cause, deterministic_id, is_a, make_envelope, unpack, utcnow
from cdp_kit.errors import InvalidInput, NotFound
from cdp_kit.eventlog import EventLog
from cdp_kit.identities import Normaliser
from cdp_kit.privacy import MAX_IDENTITIES, NOTHING_TO_APPLY, NoKeyVault, identity_hash
from cdp_kit.roles import METHOD_ROLES
from cdp_kit.store import canonical_dump, make_engine, sqlite_url, transaction, with_checkpoint
from cdp_kit.streams import (
    COLLECT,
    IDENTITY_FRAGMENTS,
    INGEST_DEADLETTER,
    PRIVACY,
    PRIVACY_REQUESTS,
    SEGMENTATION_MEMBERSHIPS,
    collect_subject,
    privacy_applied_log,
    privacy_appliers,
)
from cdp_kit.telemetry import pii_hash
from cdp_kit.vault import PersonVault, block_of
from cdp_segmentation.handlers import SegmentationHandlers
from cdp_segmentation.main import build_processor as segmentation_processor
from cdp_segmentation.privacy import PRIVACY_TABLES as SEG_PRIVACY_TABLES
from cdp_segmentation.privacy import PrivacyApplier as SegmentationApplier
from cdp_segmentation.privacy import PrivacyToSegmentation
from cdp_segmentation.store import TABLES as SEG_TABLES
from cdp_segmentation.store import FragmentRow, MembershipRow, ProfileRow, realized
from tests.integration.test_identity_graph import Harness
from tests.integration.test_ingest_service import (
    Ingest,
    collect_checkpoint_reaches_end,
    csv_bytes,
    event,
    good_row,
    running_ingest,
)
from tests.integration.test_segmentation_service import DAY, T0, Identity

# ----------------------------------------------------------------------------- helpers


def ident(ns: str, value: str) -> IdentityValue:
    return IdentityValue(namespace=ns, value=value)


async def eventually(check: Callable[[], Awaitable[bool]], what: str, tries: int = 300) -> None:
    for _ in range(tries):
        if await check():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{what} did not happen in {tries / 10:.0f}s")


async def facts(eventlog: EventLog, subject: str, cls: type[Any]) -> list[Any]:
    out = []
    async for msg in eventlog.read(PRIVACY.name, subject, 1):
        out += [unpack(e, cls) for e in msg.events() if is_a(e, cls)]
    return out


async def raw_privacy_bytes(eventlog: EventLog) -> bytes:
    data = b""
    async for msg in eventlog.read(PRIVACY.name, "cdp.privacy.>", 1):
        data += msg.data
    return data


async def request_fact(eventlog: EventLog, requested: pb.PrivacyRequested, *, erasure: bool = False) -> None:
    """Append a request as identity would (ingest's and segmentation's tests stand in for identity):
    with ``erasure``, first on identity's fragments log, in its place among the fragments."""
    requested.at.GetCurrentTime()
    env = make_envelope(
        requested,
        event_id=deterministic_id("privacy-requested", requested.request_id),
        subject_key=requested.request_id,
        occurred_at=utcnow(),
        cause=Cause(command_id=f"privacy:{requested.request_id}"),
    )
    if erasure:
        await eventlog.append(IDENTITY_FRAGMENTS.subject, [env], msg_id=f"erasure-{env.id}")
    await eventlog.append(PRIVACY_REQUESTS.subject, [env], msg_id=env.id)


async def applied_fact(
    eventlog: EventLog, service: str, request_id: str, key_refs: Sequence[str] = (), **counts: int
) -> None:
    applied = pb.PrivacyApplied(request_id=request_id, service=service, counts=counts, key_refs=key_refs)
    env = make_envelope(
        applied,
        event_id=deterministic_id("privacy-applied", service, request_id),
        subject_key=request_id,
        occurred_at=utcnow(),
        cause=Cause(command_id=f"privacy-applied:{request_id}"),
    )
    await eventlog.append(privacy_applied_log(service).subject, [env], msg_id=env.id)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- identity


class Privacy:
    def __init__(self, harness: Harness) -> None:
        self.harness = harness
        processor = harness.processor
        applied = processor.inputs[1].handler
        assert isinstance(applied, PrivacyApplied)
        projection = processor.projection
        self.handlers = PrivacyHandlers(processor, projection.graph, projection.rules, NoKeyVault(), applied)  # type: ignore[attr-defined]
        self.api = PrivacyServicer(self.handlers)

    async def submit(self, mode: int, *identities: tuple[str, str], request_id: str = "") -> pb.PrivacyRequest:
        request = pb.SubmitPrivacyRequest(
            request_id=request_id,
            mode=mode,  # type: ignore[arg-type]
            identities=[ident(ns, v) for ns, v in identities],
        )
        return await self.api.Submit(request, None)  # type: ignore[arg-type]

    async def get(self, request_id: str) -> pb.PrivacyRequest:
        return await self.api.GetRequest(pb.GetPrivacyRequestRequest(request_id=request_id), None)  # type: ignore[arg-type]


@pytest.fixture
async def identity(eventlog: EventLog, sqlite_store_url: str) -> AsyncIterator[Privacy]:
    from cdp_identity.settings import IdentitySettings

    h = Harness(eventlog, sqlite_store_url, IdentitySettings(max_identities=6))
    yield Privacy(h)
    h.engine.dispose()


@pytest.fixture
async def identity_on(eventlog: EventLog, store_url: str) -> AsyncIterator[Privacy]:
    """Identity on SQLite and on PostgreSQL (tests using it run on both)."""
    from cdp_identity.settings import IdentitySettings

    h = Harness(eventlog, store_url, IdentitySettings(max_identities=6))
    yield Privacy(h)
    h.engine.dispose()


ANN = [("crm_id", "C1"), ("email", "ann@example.com"), ("phone", "+33612345678")]
ANN_REF = "0123456789abcdef.feedfacefeedface.00000001"
ANN_REF_GENERATION = "89abcdef01234567.feedfacefeedface.00000002"  # same identity part, another block
VICTIM_REF = "0123456789abcdef.0badc0de0badc0de.00000009"  # somebody else's key


async def test_a_delete_erases_the_whole_person_and_completes_once_every_applier_applied(
    identity_on: Privacy, tmp_path: Path
) -> None:
    identity = identity_on
    h = identity.harness
    await h.send(ANN[:2], [("email", "ann@example.com"), ("phone", "+33612345678")])
    await h.send([("crm_id", "C2"), ("email", "bob@example.com")])
    person = await h.profile("email", "ann@example.com")
    bob_before = await h.graph("crm_id", "C2")
    # The key Ann's email was sealed with, as the sealing path notes it (this harness seals nothing).
    with transaction(h.engine) as session:
        session.add(KeyRefRow(key_ref=ANN_REF, key="email:ann@example.com"))

    reply = await identity.submit(pb.PRIVACY_MODE_DELETE, ("email", " Ann@Example.com "))
    assert reply.profile_ids == [person]
    assert reply.state == pb.PRIVACY_STATE_RECEIVED
    assert not reply.nothing_held
    assert list(reply.identity_hashes) == [identity_hash("email", "ann@example.com")]
    progress = {s.service: s for s in reply.services}
    assert progress["identity"].applied
    assert progress["identity"].counts["graph_nodes"] == 3
    assert set(progress) == {"identity", *privacy_appliers()}
    for ns, value in ANN:  # the whole person, by every identity it had
        with pytest.raises(NotFound):
            await h.profile(ns, value)
    assert await h.graph("crm_id", "C2") == bob_before  # nobody else is touched

    [requested] = await facts(h.eventlog, PRIVACY_REQUESTS.subject, pb.PrivacyRequested)
    assert sorted(requested.graph_identity_hashes) == sorted(identity_hash(ns, v) for ns, v in ANN)
    raw = await raw_privacy_bytes(h.eventlog)
    assert b"ann@example.com" not in raw
    assert b"612345678" not in raw
    assert b"C1" not in raw

    # Not complete until every applier says it applied the request.
    appliers = privacy_appliers()
    assert {"ingest", "segmentation"} <= set(appliers)
    # Ingest names further keys of the person (its rejected rows', another generation of Ann's
    # email key): destroyed with the person's. Keys of somebody else, or named by a service that
    # never seals rejected rows, are not (a report cannot have another person's keys destroyed).
    assert list(requested.key_refs) == [ANN_REF]
    extra = {
        "ingest": [ANN_REF_GENERATION, VICTIM_REF, "not a ref"],
        "segmentation": ["fedcba9876543210.feedfacefeedface.00000003"],
    }
    for service in appliers[:-1]:
        await applied_fact(h.eventlog, service, reply.request_id, extra.get(service, ()), profiles=1)
    await h.processor.catch_up()
    assert await identity.handlers.complete_pending() == 0
    assert (await identity.get(reply.request_id)).state == pb.PRIVACY_STATE_APPLYING
    await applied_fact(h.eventlog, appliers[-1], reply.request_id, extra.get(appliers[-1], ()), profiles=1)
    await h.processor.catch_up()
    destroyed: list[list[str]] = []

    class Recording(NoKeyVault):
        async def destroy(self, key_refs: Sequence[str]) -> int:
            destroyed.append(list(key_refs))
            return len(key_refs)

    identity.handlers.vault = Recording()
    assert await identity.handlers.complete_pending() == 1
    assert destroyed == [sorted([ANN_REF, ANN_REF_GENERATION])]

    # Activation reports again once its removal batch's outcome is known: the status says so, and
    # the time it applied the request stays the first one.
    first_at = {s.service: s.at.ToMicroseconds() for s in (await identity.get(reply.request_id)).services}
    for status in ("prepared", "delivered"):
        removal = pb.DestinationRemoval(
            destination="klaviyo", plan_id="plan-1", status=status, batch_id=f"privacy:{reply.request_id}:plan-1"
        )
        report = pb.PrivacyApplied(request_id=reply.request_id, service="activation", removals=[removal])
        report.at.GetCurrentTime()
        env = make_envelope(
            report,
            event_id=deterministic_id("report", reply.request_id, status),
            subject_key=reply.request_id,
            occurred_at=utcnow(),
            cause=Cause(command_id=f"report:{status}"),
        )
        await h.eventlog.append(privacy_applied_log("activation").subject, [env], msg_id=env.id)
        await h.processor.catch_up()
        shown = await identity.get(reply.request_id)
        assert [r.status for r in shown.removals] == [status]
        assert {s.service: s.at.ToMicroseconds() for s in shown.services}["activation"] == first_at["activation"]
    done = await identity.get(reply.request_id)
    assert done.state == pb.PRIVACY_STATE_COMPLETED
    assert done.HasField("completed_at")
    assert all(s.applied for s in done.services)
    [completed] = await facts(h.eventlog, PRIVACY_REQUESTS.subject, pb.PrivacyCompleted)
    assert completed.request_id == reply.request_id

    # The person can come back as new data (a delete does not suppress): a fresh profile.
    await h.send([("email", "ann@example.com")])
    assert await h.members("email", "ann@example.com") == {("email", "ann@example.com")}

    # A rebuild from the log reaches the same store.
    live = h.dump()
    rebuilt = Harness(h.eventlog, sqlite_url(tmp_path / "rebuilt.db"), h.settings)
    await rebuilt.processor.rebuild()
    assert rebuilt.dump() == live
    rebuilt.engine.dispose()


async def test_a_delete_completes_when_an_applier_names_forged_key_refs(identity: Privacy) -> None:
    """Refs that are no key ref (a subject wildcard, a space) in a PrivacyApplied: identity's
    completion skips them and destroys the rest, instead of failing on every attempt (which held
    up every later delete)."""
    h = identity.harness
    await h.send(ANN[:2])
    vault = await PersonVault.bind(h.eventlog.js)
    sealed_under = vault.refs_for([("email", "ann@example.com")])  # a key ingest sealed her rejected row under
    await vault.commit()
    # Identity knows another generation of Ann's email key (the records it linked were sealed under it).
    block, person, _generation = sealed_under[0].split(".")
    with transaction(h.engine) as session:
        session.add(KeyRefRow(key_ref=f"{'f' * len(block)}.{person}.00000000", key="email:ann@example.com"))
    reply = await identity.submit(pb.PRIVACY_MODE_DELETE, ("email", "ann@example.com"))
    forged = [">", "*.a.b", "bad block.a.b"]
    appliers = privacy_appliers()
    for service in appliers:
        refs = [*forged, *sealed_under] if service == "ingest" else []
        await applied_fact(h.eventlog, service, reply.request_id, refs, profiles=1)
    await h.processor.catch_up()
    identity.handlers.vault = vault
    assert await identity.handlers.complete_pending() == 1
    done = await identity.get(reply.request_id)
    assert done.state == pb.PRIVACY_STATE_COMPLETED
    [completed] = await facts(h.eventlog, PRIVACY_REQUESTS.subject, pb.PrivacyCompleted)
    assert completed.keys_destroyed == 1  # the good ref's key, and nothing for the forged ones
    with pytest.raises(nats.js.errors.KeyNotFoundError):
        await vault.kv.get(block_of(sealed_under[0]))  # its block held only it: erased whole
    assert await identity.handlers.complete_pending() == 0


async def test_requests_are_idempotent_and_listed_newest_first(identity: Privacy) -> None:
    h = identity.harness
    await h.send(ANN[:2])
    first = await identity.submit(pb.PRIVACY_MODE_SUPPRESS, ("crm_id", "C1"), ("email", "ann@example.com"))
    again = await identity.submit(pb.PRIVACY_MODE_SUPPRESS, ("email", "ANN@example.com"), ("crm_id", "C1"))
    assert again == first  # same mode and identities: the recorded request
    named = await identity.submit(pb.PRIVACY_MODE_DELETE, ("crm_id", "C1"), request_id="ticket-42")
    assert named.request_id == "ticket-42"
    assert await identity.submit(pb.PRIVACY_MODE_UNSUPPRESS, ("crm_id", "C9"), request_id="ticket-42") == named
    assert len(await facts(h.eventlog, PRIVACY_REQUESTS.subject, pb.PrivacyRequested)) == 2
    listed = await identity.api.ListRequests(pb.ListPrivacyRequestsRequest(), None)  # type: ignore[arg-type]
    assert [r.request_id for r in listed.requests] == ["ticket-42", first.request_id]
    with pytest.raises(NotFound):
        await identity.get("nope")


async def test_unknown_identities_complete_at_once_as_nothing_held(identity: Privacy) -> None:
    h = identity.harness
    await h.send(ANN[:2])
    reply = await identity.submit(pb.PRIVACY_MODE_DELETE_AND_SUPPRESS, ("email", "nobody@example.com"))
    assert reply.nothing_held
    assert reply.state == pb.PRIVACY_STATE_COMPLETED
    assert not reply.profile_ids
    # Still recorded: ingest must suppress an identity it has never seen.
    [requested] = await facts(h.eventlog, PRIVACY_REQUESTS.subject, pb.PrivacyRequested)
    assert requested.nothing_held
    assert list(requested.graph_identity_hashes) == [identity_hash("email", "nobody@example.com")]
    assert await h.profile("crm_id", "C1")  # nothing else erased
    # Its status says what is true: nothing to apply, but ingest still has a suppression to record.
    statuses = {s.service: s.status for s in reply.services}
    assert statuses == {
        "identity": "applied",
        "ingest": "pending",
        "segmentation": NOTHING_TO_APPLY,
        "activation": NOTHING_TO_APPLY,
    }
    delete_only = await identity.submit(pb.PRIVACY_MODE_DELETE, ("email", "nobody@example.com"))
    assert {s.service: s.status for s in delete_only.services}["ingest"] == NOTHING_TO_APPLY
    await applied_fact(h.eventlog, "ingest", reply.request_id, suppressed_identities=1)
    await h.processor.catch_up()
    assert {s.service: s.status for s in (await identity.get(reply.request_id)).services}["ingest"] == "applied"


async def test_too_many_or_invalid_identities_are_refused_naming_them_by_keyed_hash(identity: Privacy) -> None:
    many = [("email", f"p{i}@example.com") for i in range(MAX_IDENTITIES + 1)]
    with pytest.raises(InvalidInput) as too_many:
        await identity.submit(pb.PRIVACY_MODE_DELETE, *many)
    assert too_many.value.violations[0].rule == "maximum"
    with pytest.raises(InvalidInput) as bad:
        await identity.submit(pb.PRIVACY_MODE_DELETE, ("email", "not-an-email"), ("email", "ok@example.com"))
    [violation] = bad.value.violations
    assert pii_hash("email:not-an-email") in violation.message
    assert "not-an-email" not in violation.message.replace(pii_hash("email:not-an-email"), "")
    with pytest.raises(InvalidInput):
        await identity.submit(pb.PRIVACY_MODE_UNSPECIFIED, ("email", "ok@example.com"))
    with pytest.raises(InvalidInput):
        await identity.submit(pb.PRIVACY_MODE_DELETE, ("email", "ok@example.com"), request_id="bad id!")
    huge = "c" * 100_000
    with pytest.raises(InvalidInput) as too_long:
        await identity.submit(pb.PRIVACY_MODE_DELETE, ("cookie", huge))
    assert too_long.value.violations[0].rule == "max_length"
    assert huge not in str(too_long.value)
    with pytest.raises(InvalidInput) as bad_id:  # what no request id can be is refused, not echoed
        await identity.get("r" * 100_000)
    assert "r" * 100 not in str(bad_id.value)
    assert await facts(identity.harness.eventlog, PRIVACY_REQUESTS.subject, pb.PrivacyRequested) == []


def test_roles_submit_for_operators_and_admins_reads_for_readers() -> None:
    prefix = "/cdp.privacy.v1.PrivacyService/"
    assert METHOD_ROLES[prefix + "Submit"] == "operator"
    assert METHOD_ROLES[prefix + "GetRequest"] == "reader"
    assert METHOD_ROLES[prefix + "ListRequests"] == "reader"


# ----------------------------------------------------------------------------- ingest


@pytest.fixture
async def ingest(nats_url: str, store_url: str, tmp_path: Path) -> AsyncIterator[Ingest]:
    """Ingest on SQLite and on PostgreSQL (the test runs on both)."""
    async with running_ingest(nats_url, store_url, tmp_path / "data") as harness:
        yield harness


async def collect_cookies(eventlog: EventLog) -> dict[int, str]:
    found = {}
    async for msg in eventlog.read(COLLECT.name, "cdp.collect.>", 1):
        found[msg.sequence] = json.loads(msg.data)["cookie_id"]
    return found


async def test_ingest_erases_collect_messages_suppresses_and_unsuppresses(ingest: Ingest, tmp_path: Path) -> None:
    js = ingest.eventlog.js
    for i, cookie in enumerate(["ck-ann", "ck-bob", "ck-ann"], 1):
        await js.publish(collect_subject("web"), json.dumps(event(i, cookie_id=cookie)).encode())

    async def recorded(*ids: str) -> bool:
        return set(ids) <= {r.record_id for r in await ingest.records()}

    await eventually(lambda: recorded("e1", "e2", "e3"), "the collected events recorded")
    bad = good_row(1)
    bad[3] = "platinum"  # not a tier: the row is rejected and kept, with the person's values
    kept = await ingest.upload(csv_bytes([bad, good_row(3)]), "k0", threshold=1.0)
    assert kept.rows_kept == 1
    ann = identity_hash("cookie", "ck-ann")
    crm = identity_hash("crm_id", Normaliser.make().normalise("crm_id", "C00001")[0] or "")
    await request_fact(
        ingest.eventlog,
        pb.PrivacyRequested(
            request_id="r1",
            mode=pb.PRIVACY_MODE_DELETE_AND_SUPPRESS,
            identity_hashes=[ann],
            graph_identity_hashes=[ann, crm],
            profile_ids=["p-ann"],
        ),
    )

    async def applied() -> list[pb.PrivacyApplied]:
        return await facts(ingest.eventlog, privacy_applied_log("ingest").subject, pb.PrivacyApplied)

    # The service's applier (a background task of the running service) is run here by hand.
    handler = ingest.processor.inputs[-1].handler
    assert isinstance(handler, PrivacyToIngest)
    applier = IngestApplier(ingest.processor, handler)

    async def applies(n: int) -> bool:
        await applier.apply_pending()
        return len(await applied()) >= n

    await eventually(lambda: applies(1), "ingest's PrivacyApplied")
    [done] = await applied()
    assert done.request_id == "r1"
    assert done.service == "ingest"
    assert done.counts["collect_messages"] == 2
    assert done.counts["batch_errors"] == 1
    errors = await ingest.stub.ListBatchErrors(ingest_pb.ListBatchErrorsRequest(batch_id=kept.batch_id))
    assert list(errors.errors) == []
    assert sorted((await collect_cookies(ingest.eventlog)).values()) == ["ck-bob"]  # read back: gone

    # Suppressed: a collected event, a published event and a file row carrying the identity are dropped.
    await js.publish(collect_subject("web"), json.dumps(event(4, cookie_id="ck-ann")).encode())
    await js.publish(collect_subject("web"), json.dumps(event(5, cookie_id="ck-bob")).encode())
    await eventually(lambda: recorded("e5"), "the unsuppressed event recorded")
    assert "e4" not in {r.record_id for r in await ingest.records()}
    request = ingest_pb.PublishEventsRequest(dataset="web")
    request.events.add().update(event(6, cookie_id="ck-ann"))
    [result] = (await ingest.stub.PublishEvents(request)).results
    assert result.status == ingest_pb.EVENT_STATUS_REJECTED
    assert [(e.rule, e.message) for e in result.errors] == [
        ("suppressed", f"identity {ann} is suppressed by a privacy request")
    ]
    report = await ingest.upload(csv_bytes([good_row(1), good_row(2)]), "k1", threshold=1.0)
    assert report.rows_accepted == 1
    assert report.rows_rejected == 1
    assert report.rows_kept == 0
    assert [(g.field, g.rule, g.count) for g in report.rejects] == [("identity", "suppressed", 1)]

    # Unsuppressed: accepted again.
    await request_fact(
        ingest.eventlog,
        pb.PrivacyRequested(request_id="r2", mode=pb.PRIVACY_MODE_UNSUPPRESS, graph_identity_hashes=[ann]),
    )
    await eventually(lambda: applies(2), "the second PrivacyApplied")
    await js.publish(collect_subject("web"), json.dumps(event(7, cookie_id="ck-ann")).encode())
    await eventually(lambda: recorded("e7"), "the unsuppressed identity's event recorded")

    # A rebuild from the log reaches the same store (suppressions, index, erased rejects included).
    await assert_a_rebuild_equals_the_live_store(ingest, tmp_path / "rb.db")


async def assert_a_rebuild_equals_the_live_store(ingest: Ingest, store: Path) -> None:
    """Once ingest has read all it collected, a store rebuilt from the log equals its live store."""
    await collect_checkpoint_reaches_end(ingest.engine, ingest.eventlog)
    settings = IngestSettings(nats_url=ingest.nats_url, data_dir=store.with_suffix(""), store_url=sqlite_url(store))
    engine = make_engine(settings.store_url)
    try:
        rebuilt = build_ingest(settings, engine, ingest.eventlog)
        await rebuilt.processor.rebuild()
        tables = with_checkpoint([*INGEST_TABLES, *INGEST_PRIVACY_TABLES, *DEADLETTER_TABLES])
        assert canonical_dump(engine, tables) == canonical_dump(ingest.engine, tables)
    finally:
        engine.dispose()


async def deadletter_messages(eventlog: EventLog) -> list[Any]:
    return [m async for m in eventlog.read(INGEST_DEADLETTER.stream.name, INGEST_DEADLETTER.subject, 1)]


async def test_rejected_rows_are_sealed_or_masked_on_the_log_and_a_delete_erases_them_there_too(
    nats_url: str, tmp_path: Path
) -> None:
    """BatchRowsRejected on cdp.deadletter.ingest: a rejected row with a valid identity keeps its raw
    values sealed under that identity's key (the store and the raw report still show them); a row
    with none reaches the log masked. A delete erases the person's row from the store, hands its
    keys to identity (PrivacyApplied.key_refs) and, once they are destroyed, the row reads as erased
    from the log: a rebuild equals the live store."""
    url = sqlite_url(tmp_path / "ingest.db")
    async with running_ingest(nats_url, url, tmp_path / "data", allow_raw_rejects=True) as ingest:
        ann, bob, nobody = good_row(1), good_row(2), good_row(3)
        ann[3] = bob[3] = "platinum"  # not a tier: rejected, with valid identities
        nobody[0], nobody[1], nobody[2] = "", "zebedee-at-nowhere", "Zebedee"  # no usable identity
        report = await ingest.upload(csv_bytes([ann, bob, nobody, good_row(4)]), "rj", threshold=1.0)
        assert report.rows_kept == 3

        raw_log = b"".join(m.data for m in await deadletter_messages(ingest.eventlog))
        assert b"BatchRowsRejected" in raw_log
        for plain in (b"p1@example.com", b"Name1", b"C00001", b"p2@example.com", b"zebedee-at-nowhere", b"Zebedee"):
            assert plain not in raw_log, plain

        def by_row(reply: Any) -> dict[int, Any]:
            return {e.row: e for e in reply.errors}

        raw = by_row(
            await ingest.stub.ListBatchErrors(ingest_pb.ListBatchErrorsRequest(batch_id=report.batch_id, raw=True))
        )
        assert raw[1].values["email"] == "p1@example.com"  # opened on fold: the store keeps what it kept
        assert raw[1].values["first_name"] == "Name1"
        assert [e.field for e in raw[1].errors] == ["tier"]
        assert raw[3].values["email"] == pii_hash("zebedee-at-nowhere")  # masked before the log: all there is
        assert raw[3].values["first_name"] == "xxxxxxx"  # its shape
        assert raw[3].errors  # still names field and rule
        masked = by_row(await ingest.stub.ListBatchErrors(ingest_pb.ListBatchErrorsRequest(batch_id=report.batch_id)))
        assert masked[1].values["email"] == pii_hash("p1@example.com")
        assert masked[3].values["email"] == pii_hash("zebedee-at-nowhere")  # not masked twice

        norm = Normaliser.make()
        hashes = [
            identity_hash("crm_id", norm.normalise("crm_id", "C00001")[0] or ""),
            identity_hash("email", "p1@example.com"),
        ]
        await request_fact(
            ingest.eventlog,
            pb.PrivacyRequested(
                request_id="rj1", mode=pb.PRIVACY_MODE_DELETE, identity_hashes=hashes[1:], graph_identity_hashes=hashes
            ),
        )
        handler = ingest.processor.inputs[-1].handler
        assert isinstance(handler, PrivacyToIngest)
        applier = IngestApplier(ingest.processor, handler)

        async def applied() -> list[pb.PrivacyApplied]:
            await applier.apply_pending()
            return await facts(ingest.eventlog, privacy_applied_log("ingest").subject, pb.PrivacyApplied)

        await eventually(lambda: _nonempty(applied()), "ingest's PrivacyApplied")
        [done] = await applied()
        assert done.counts["batch_errors"] == 1
        assert len(done.key_refs) == 2  # the row's crm_id and email keys: identity destroys them
        left = by_row(await ingest.stub.ListBatchErrors(ingest_pb.ListBatchErrorsRequest(batch_id=report.batch_id)))
        assert sorted(left) == [2, 3]

        vault = ingest.processor.vault
        assert vault is not None
        assert await vault.destroy(list(done.key_refs)) == 2  # what identity does at completion
        reader = PersonVault.of(ingest.eventlog.js)
        msgs = await deadletter_messages(ingest.eventlog)
        opened = await reader.open_messages(msgs)
        rows = [
            item
            for m in msgs
            for env in opened[m.sequence]
            if is_a(env, ingest_ev.BatchRowsRejected)
            for item in unpack(env, ingest_ev.BatchRowsRejected).rows
        ]
        assert {r.row: bool(r.values.fields) for r in rows} == {1: False, 2: True, 3: True}

        await assert_a_rebuild_equals_the_live_store(ingest, tmp_path / "rb.db")
        assert b"p1@example.com" not in (tmp_path / "rb.db").read_bytes()


async def _nonempty(found: Awaitable[list[Any]]) -> bool:
    return bool(await found)


# ----------------------------------------------------------------------------- segmentation


@pytest.fixture
def seg_engine(store_url: str) -> Any:
    """Segmentation's store on SQLite and on PostgreSQL (the test runs on both)."""
    engine = make_engine(store_url)
    yield engine
    engine.dispose()


def seg_dump(engine: Engine) -> Any:
    return canonical_dump(engine, with_checkpoint([*SEG_TABLES, *SEG_PRIVACY_TABLES]))


async def test_segmentation_erases_the_person_who_exits_every_audience_and_a_rebuild_agrees(
    seg_engine: Engine, eventlog: EventLog, tmp_path: Path
) -> None:
    identity = Identity(eventlog)
    processor, catalog = segmentation_processor(seg_engine, eventlog)
    processor.create_store()
    await processor.recover()
    handlers = SegmentationHandlers(processor, catalog)
    await handlers.create_segment("gold", 'tier = "gold"')
    await handlers.create_segment("buyers", "count(order) >= 1")
    await identity.record("p-ann", "crm", T0, {"email": "ann@example.com"}, tier="gold")
    await identity.event("p-ann", "order", T0 + DAY)
    await identity.record("p-bob", "crm", T0, {"email": "bob@example.com"}, tier="gold")
    await processor.catch_up()

    def members(name: str) -> list[str]:
        with processor.read() as session:
            return realized(session, deterministic_id("segment", name))

    assert members("gold") == ["p-ann", "p-bob"]
    assert members("buyers") == ["p-ann"]

    await request_fact(
        eventlog,
        pb.PrivacyRequested(request_id="r1", mode=pb.PRIVACY_MODE_DELETE, profile_ids=["p-ann"]),
        erasure=True,
    )
    await processor.catch_up()
    with processor.read() as session:  # erased as soon as the profile input reads identity's erasure
        assert session.get(ProfileRow, "p-ann") is None
    privacy = processor.inputs[-1].handler
    assert isinstance(privacy, PrivacyToSegmentation)
    assert await SegmentationApplier(processor, catalog, privacy).apply_pending() == 1

    assert members("gold") == ["p-bob"]
    assert members("buyers") == []
    with processor.read() as session:
        assert session.get(ProfileRow, "p-ann") is None
        assert not session.exec(FragmentRow.__table__.select().where(FragmentRow.profile_id == "p-ann")).all()  # type: ignore[attr-defined]
        assert not session.exec(MembershipRow.__table__.select().where(MembershipRow.profile_id == "p-ann")).all()  # type: ignore[attr-defined]
        assert session.get(ProfileRow, "p-bob") is not None
    exits = []
    async for msg in eventlog.read(SEGMENTATION_MEMBERSHIPS.stream.name, SEGMENTATION_MEMBERSHIPS.subject, 1):
        for env in msg.events():
            if not is_a(env, seg_ev.MembershipChanged):
                continue
            change = unpack(env, seg_ev.MembershipChanged)
            if change.cause == "privacy:r1":
                exits.append((change.segment_id, change.status))
    assert sorted(exits) == sorted(
        (deterministic_id("segment", name), seg_ev.MEMBERSHIP_STATUS_EXITED) for name in ("gold", "buyers")
    )
    [applied] = await facts(eventlog, privacy_applied_log("segmentation").subject, pb.PrivacyApplied)
    assert applied.counts["profiles"] == 1
    assert applied.counts["events"] == 1
    assert applied.counts["exits"] == 2

    # Ann comes back (a delete does not suppress): a new profile, and a rebuild keeps it too.
    await identity.record("p-ann", "crm", T0 + 2 * DAY, {"email": "ann@example.com"}, tier="gold")
    await processor.catch_up()
    assert members("gold") == ["p-ann", "p-bob"]
    live = seg_dump(seg_engine)
    rebuilt = make_engine(sqlite_url(tmp_path / "rebuilt.db"))
    again, _ = segmentation_processor(rebuilt, eventlog)
    await again.rebuild()
    assert seg_dump(rebuilt) == live
    rebuilt.dispose()


def test_every_sqlite_store_overwrites_deleted_rows(tmp_path: Path) -> None:
    engine = make_engine(sqlite_url(tmp_path / "store.db"))
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA secure_delete").scalar() == 1
    finally:
        engine.dispose()


async def test_a_delete_whose_record_meets_a_guard_conflict_is_recorded_with_its_erasure(
    identity: Privacy,
) -> None:
    """The erasure goes on the fragments log, then the request on cdp.privacy.requests. When the
    second append meets a guard conflict (another writer, an acknowledgement lost and retried),
    recovery folds the erasure first: the retry must record that erasure, not decide again on a
    graph that is gone and record the delete as "nothing held" (its keys never destroyed)."""
    h = identity.harness
    await h.send(ANN[:2], [("email", "ann@example.com"), ("phone", "+33612345678")])
    person = await h.profile("email", "ann@example.com")
    with transaction(h.engine) as session:
        session.add(KeyRefRow(key_ref=ANN_REF, key="email:ann@example.com"))
    # Somebody else's message on identity's request subject: identity's guard is now behind.
    await h.eventlog.append(PRIVACY_REQUESTS.subject, [], msg_id="another-writer")

    reply = await identity.submit(pb.PRIVACY_MODE_DELETE, ("email", "ann@example.com"), request_id="del-ann")
    assert not reply.nothing_held
    assert list(reply.profile_ids) == [person]
    assert {s.service: s.counts["graph_nodes"] for s in reply.services if s.service == "identity"} == {"identity": 3}
    [requested] = await facts(h.eventlog, PRIVACY_REQUESTS.subject, pb.PrivacyRequested)
    assert not requested.nothing_held
    assert list(requested.key_refs) == [ANN_REF]
    erasures = [
        unpack(e, pb.PrivacyRequested)
        async for m in h.eventlog.read(IDENTITY_FRAGMENTS.stream.name, IDENTITY_FRAGMENTS.subject, 1)
        for e in m.events()
        if is_a(e, pb.PrivacyRequested)
    ]
    assert [e.request_id for e in erasures] == ["del-ann"]  # erased once
    assert requested == erasures[0]
    for ns, value in ANN:
        with pytest.raises(NotFound):
            await h.profile(ns, value)


async def test_a_request_no_identity_could_record_is_dead_lettered_and_the_next_one_applied(
    ingest: Ingest,
) -> None:
    """A forged ``PrivacyRequested`` (a 100 KB request id, an unknown mode, a key ref of another
    shape) could never be applied: acknowledging it does not even fit a message header. It is set
    aside with its reason, and the genuine request after it is applied as usual."""
    bad = [
        pb.PrivacyRequested(request_id="x" * 100_000, mode=pb.PRIVACY_MODE_DELETE),
        pb.PrivacyRequested(request_id="mode-99", mode=99),  # type: ignore[arg-type]
        pb.PrivacyRequested(request_id="bad-ref", mode=pb.PRIVACY_MODE_DELETE, key_refs=["*.a.b"]),
    ]
    for requested in bad:
        await request_fact(ingest.eventlog, requested)
    good = pb.PrivacyRequested(
        request_id="genuine", mode=pb.PRIVACY_MODE_SUPPRESS, identity_hashes=[identity_hash("email", "a@b.co")]
    )
    await request_fact(ingest.eventlog, good)

    handler = ingest.processor.inputs[-1].handler
    assert isinstance(handler, PrivacyToIngest)
    applier = IngestApplier(ingest.processor, handler)  # the service's background task, run by hand

    async def applied() -> bool:
        await applier.apply_pending()
        found = await facts(ingest.eventlog, privacy_applied_log("ingest").subject, pb.PrivacyApplied)
        return any(a.request_id == "genuine" for a in found)

    await eventually(applied, "the genuine request applied by ingest")
    with ingest.processor.read() as session:
        letters = session.exec(select(DeadLetterRow)).all()
    reasons = [d.error for d in letters if d.consumer.endswith("privacy-requests")]
    assert len(reasons) == 3, reasons
    assert any("request_id" in r and "pattern" in r for r in reasons), reasons
    assert any("mode" in r and "enum" in r for r in reasons)
    assert any("key_refs" in r for r in reasons)
    assert all(len(r) < 2_000 for r in reasons)  # the 100 KB id is not echoed


async def test_a_request_whose_keys_cannot_be_destroyed_holds_up_no_other(identity: Privacy) -> None:
    h = identity.harness
    await h.send(ANN[:2])
    await h.send([("crm_id", "C2"), ("email", "bob@example.com")])
    with transaction(h.engine) as session:
        session.add(KeyRefRow(key_ref=ANN_REF, key="email:ann@example.com"))
    ann = await identity.submit(pb.PRIVACY_MODE_DELETE, ("email", "ann@example.com"), request_id="del-ann")
    bob = await identity.submit(pb.PRIVACY_MODE_DELETE, ("email", "bob@example.com"), request_id="del-bob")
    for service in privacy_appliers():
        for reply in (ann, bob):
            await applied_fact(h.eventlog, service, reply.request_id, profiles=1)
    await h.processor.catch_up()

    class Failing(NoKeyVault):
        async def destroy(self, key_refs: Sequence[str]) -> int:
            if ANN_REF in key_refs:
                raise ValueError("this vault cannot destroy that key")
            return len(key_refs)

    identity.handlers.vault = Failing()
    assert await identity.handlers.complete_pending() == 1
    assert (await identity.get("del-bob")).state == pb.PRIVACY_STATE_COMPLETED
    assert (await identity.get("del-ann")).state == pb.PRIVACY_STATE_APPLYING
    identity.handlers.vault = NoKeyVault()
    assert await identity.handlers.complete_pending() == 1
    assert (await identity.get("del-ann")).state == pb.PRIVACY_STATE_COMPLETED
