"""Table tests of identity graph decisions on a real JetStream and a real store (SQLite; PostgreSQL
for the mixed table). Records go onto CDP_INGEST as ingest would write them; the identity
processor applies them; the answers come from the store and from the events on identity's log."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from cdp.common.v1.envelope_pb2 import IdentityValue
from cdp.identity.v1 import events_pb2 as ev
from cdp.identity.v1 import identity_pb2 as pb
from cdp.ingest.v1 import events_pb2 as ingest_ev
from cdp.ingest.v1 import ingest_pb2
from cdp_identity import store
from cdp_identity.api import IdentityServicer
from cdp_identity.handlers import IdentityHandlers
from cdp_identity.main import build_processor
from cdp_identity.settings import IdentitySettings
from cdp_kit.envelope import Cause, Envelope, deterministic_id, is_a, make_envelope, unpack
from cdp_kit.errors import InvalidInput, NotFound
from cdp_kit.eventlog import EventLog
from cdp_kit.processor import Processor
from cdp_kit.store import StoreSchema, canonical_dump, make_engine, sqlite_url, with_checkpoint
from cdp_kit.streams import IDENTITY_FRAGMENTS, INGEST_RECORDS

T0 = datetime(2026, 1, 1, tzinfo=UTC)
Ident = tuple[str, str]


def record(n: int, identities: Sequence[Ident], *, minutes: int = 0, dataset: str = "crm") -> Envelope:
    rec = ingest_ev.RecordAccepted(
        record_id=f"r{n}",
        dataset=dataset,
        schema_class=ingest_pb2.SCHEMA_CLASS_PROFILE if dataset == "crm" else ingest_pb2.SCHEMA_CLASS_EVENT,
        batch_id=f"b-{dataset}",
        identities=[IdentityValue(namespace=ns, value=v) for ns, v in identities],
    )
    at = T0 + timedelta(minutes=minutes or n)
    rec.occurred_at.FromDatetime(at)
    return make_envelope(
        rec, event_id=deterministic_id("test-record", n), subject_key=dataset, occurred_at=at, cause=Cause("t", n)
    )


@dataclass
class Harness:
    """The identity service in-process: its processor, handlers and servicer on one store."""

    eventlog: EventLog
    url: str
    settings: IdentitySettings
    processor: Processor = field(init=False)
    api: IdentityServicer = field(init=False)
    sent: int = 0

    def __post_init__(self) -> None:
        self.engine = make_engine(self.url)
        self.processor, projection = build_processor(self.settings, self.engine, self.eventlog)
        self.processor.create_store()
        self.api = IdentityServicer(IdentityHandlers(self.processor, projection))

    async def send(self, *records: Sequence[Ident], per_message: int = 1, dataset: str = "crm") -> None:
        envs = []
        for identities in records:
            self.sent += 1
            envs.append(record(self.sent, identities, dataset=dataset))
        for i in range(0, len(envs), per_message):
            chunk = envs[i : i + per_message]
            await self.eventlog.append(INGEST_RECORDS.subject, chunk, msg_id=chunk[0].id)
        await self.processor.catch_up()

    async def profile(self, ns: str, value: str) -> str:
        reply = await self.api.Resolve(pb.ResolveRequest(identity=IdentityValue(namespace=ns, value=value)), None)  # type: ignore[arg-type]
        return reply.profile_id

    async def graph(self, ns: str, value: str) -> pb.Graph:
        return await self.api.GetGraph(pb.GetGraphRequest(identity=IdentityValue(namespace=ns, value=value)), None)  # type: ignore[arg-type]

    async def members(self, ns: str, value: str) -> set[Ident]:
        graph = await self.graph(ns, value)
        return {(n.identity.namespace, n.identity.value) for n in graph.nodes}

    async def unlink(self, a: Ident, b: Ident | None = None) -> pb.UnlinkResponse:
        request = pb.UnlinkRequest(identity=IdentityValue(namespace=a[0], value=a[1]), reason="test")
        if b is not None:
            request.other.CopyFrom(IdentityValue(namespace=b[0], value=b[1]))
        return await self.api.Unlink(request, None)  # type: ignore[arg-type]

    async def events(self, cls: type[Any]) -> list[Any]:
        out = []
        async for msg in self.eventlog.read(IDENTITY_FRAGMENTS.stream.name, IDENTITY_FRAGMENTS.subject, 1):
            out += [unpack(e, cls) for e in msg.events() if is_a(e, cls)]
        return out

    def dump(self) -> dict[str, list[tuple[Any, ...]]]:
        """The store's rows, but for the table-definition fingerprint (it depends on the SQL dialect)."""
        tables = [t for t in with_checkpoint(store.TABLES) if t.name != StoreSchema.__tablename__]
        return canonical_dump(self.engine, tables)


@pytest.fixture
async def harness(eventlog: EventLog, sqlite_store_url: str) -> AsyncIterator[Harness]:
    h = Harness(eventlog, sqlite_store_url, IdentitySettings(max_identities=6))
    yield h
    h.engine.dispose()


async def test_a_cookie_seen_before_the_login_ends_in_the_persons_profile(harness: Harness) -> None:
    await harness.send([("cookie", "ck1")], [("cookie", "ck1")], dataset="web")  # page views, anonymous
    await harness.send([("crm_id", "C1"), ("email", "ann@example.com")])
    anonymous = await harness.profile("cookie", "ck1")
    await harness.send([("cookie", "ck1"), ("email", "ANN@example.com ")], dataset="web")  # the login: a late link
    crm_profile = (await harness.events(ev.ProfileFragment))[2].profile_id
    person = await harness.profile("crm_id", "C1")
    assert await harness.profile("cookie", "ck1") == person
    [merge] = await harness.events(ev.ProfilesMerged)
    # the cookie's profile was created first (older), so it survives and the CRM profile is absorbed
    assert (merge.survivor, list(merge.absorbed)) == (anonymous, [crm_profile])
    assert person == anonymous
    fragments = await harness.events(ev.ProfileFragment)
    assert [f.profile_id for f in fragments] == [anonymous, anonymous, crm_profile, person]
    assert fragments[-1].anchor == IdentityValue(namespace="email", value="ann@example.com")


async def test_junk_and_invalid_identities_are_dropped_and_counted_while_the_rest_resolves(
    harness: Harness,
) -> None:
    await harness.send(
        [("email", "test@test.com"), ("crm_id", "C1")],
        [("email", "not-an-email"), ("crm_id", "C2"), ("phone", "0000000000")],
        [("email", "NULL"), ("crm_id", "unknown")],
        [("email_sha256", "ABC"), ("email_sha256", "a" * 64), ("shoe_size", "42")],
    )
    assert await harness.members("crm_id", "C1") == {("crm_id", "C1")}
    assert await harness.members("crm_id", "C2") == {("crm_id", "C2")}
    assert await harness.members("email_sha256", "a" * 64) == {("email_sha256", "a" * 64)}
    with pytest.raises(NotFound) as missing:
        await harness.profile("email", "Ann@Example.com")
    assert missing.value.message == "email not found"  # neither the value nor a hash of it
    with pytest.raises(InvalidInput):
        await harness.profile("email", "test@test.com")
    stats = await harness.api.GetStats(pb.GetStatsRequest(), None)  # type: ignore[arg-type]
    counts = {(d.namespace, d.rule): d.count for d in stats.dropped}
    assert counts == {
        ("email", "blocklist"): 2,
        ("email", "invalid"): 1,
        ("phone", "blocklist"): 1,
        ("crm_id", "blocklist"): 1,
        ("email_sha256", "invalid"): 1,
        ("shoe_size", "unknown_namespace"): 1,
        ("*", "no_identities"): 1,  # the third record linked no one
    }
    [fragment] = [f for f in await harness.events(ev.ProfileFragment) if f.record_id == "r1"]
    assert [(d.namespace, d.rule) for d in fragment.dropped] == [("email", "blocklist")]
    assert "test@test.com" not in str(fragment.dropped)  # only a hash of the junk value travels


async def test_phones_become_e164_with_the_default_region_and_emails_are_normalised(
    eventlog: EventLog, sqlite_store_url: str
) -> None:
    h = Harness(eventlog, sqlite_store_url, IdentitySettings(default_phone_region="GB"))
    await h.send([("phone", "020 7946 0958"), ("email", "  Ann.Smith@Example.COM ")])
    assert await h.members("phone", "+442079460958") == {("phone", "+442079460958"), ("email", "ann.smith@example.com")}
    assert await h.profile("phone", "+44 20 7946 0958") == await h.profile("email", "ann.smith@example.com")
    h.engine.dispose()


async def test_a_shared_device_never_joins_two_crm_ids_and_the_first_link_wins(harness: Harness) -> None:
    await harness.send([("crm_id", "C1"), ("idfa", "dev-1")])
    await harness.send([("crm_id", "C2"), ("idfa", "dev-1"), ("email", "bob@example.com")])
    assert await harness.members("crm_id", "C1") == {("crm_id", "C1"), ("idfa", "dev-1")}
    assert await harness.members("crm_id", "C2") == {("crm_id", "C2"), ("email", "bob@example.com")}
    graph = await harness.graph("crm_id", "C1")
    [decision] = [d for d in graph.decisions if d.rule == "unique_namespace"]
    assert decision.effect == "refused"
    assert decision.identity == IdentityValue(namespace="idfa", value="dev-1")
    assert {(x.a.value, x.b.value) for x in decision.links} == {("C2", "dev-1"), ("bob@example.com", "dev-1")}


async def test_a_record_joining_two_crm_graphs_merges_only_what_does_not_clash(harness: Harness) -> None:
    await harness.send([("crm_id", "C1"), ("email", "ann@example.com")], [("crm_id", "C2"), ("phone", "+14155550101")])
    await harness.send([("email", "ann@example.com"), ("phone", "+14155550101"), ("cookie", "ck9")])
    # the email (stronger than the phone) anchors the record: C1's graph takes the cookie, C2's keeps its phone
    assert await harness.members("crm_id", "C1") == {("crm_id", "C1"), ("email", "ann@example.com"), ("cookie", "ck9")}
    assert await harness.members("crm_id", "C2") == {("crm_id", "C2"), ("phone", "+14155550101")}
    assert await harness.events(ev.ProfilesMerged) == []


async def test_a_graph_over_the_size_limit_sheds_its_oldest_cookies_first(harness: Harness) -> None:
    # limit 6: a person with a CRM id, an email, a device and cookies seen one after another
    await harness.send([("crm_id", "C1"), ("email", "ann@example.com"), ("idfa", "dev-1")])
    for i in range(1, 5):
        await harness.send([("email", "ann@example.com"), ("cookie", f"ck{i}")], dataset="web")
    members = await harness.members("crm_id", "C1")
    # the 7th identity (ck4) pushed the graph over 6: the least recently seen cookie went, not the device
    assert members == {("crm_id", "C1"), ("email", "ann@example.com"), ("idfa", "dev-1")} | {
        ("cookie", f"ck{i}") for i in (2, 3, 4)
    }
    split = (await harness.events(ev.ProfileSplit))[-1]
    person = await harness.profile("crm_id", "C1")
    assert split.profile_id == person
    assert split.parts[0].profile_id == person
    alone = await harness.profile("cookie", "ck1")
    assert alone != person
    assert await harness.members("cookie", "ck1") == {("cookie", "ck1")}
    ck1_views = [f.source_event_id for f in await harness.events(ev.ProfileFragment) if f.anchor.value == "ck1"]
    assert {p.profile_id: list(p.fragment_ids) for p in split.parts}[alone] == ck1_views
    decisions = [d for d in (await harness.graph("cookie", "ck1")).decisions if d.rule == "max_identities"]
    assert decisions
    assert decisions[0].effect == "removed"


async def test_unlinking_a_link_splits_the_graph_and_moves_fragments_with_their_anchor(harness: Harness) -> None:
    await harness.send([("cookie", "ck1")], dataset="web")
    await harness.send([("crm_id", "C1"), ("email", "ann@example.com")])
    await harness.send([("email", "ann@example.com"), ("cookie", "ck1")], dataset="web")
    person = await harness.profile("crm_id", "C1")
    reply = await harness.unlink(("email", "ann@example.com"), ("cookie", "ck1"))
    assert reply.changed
    assert reply.decision.rule == "unlink_link"
    parts = {p.founder.value: p for p in reply.split.parts}
    # the cookie founded the profile (it was seen first), so its part keeps the id; the CRM part gets a new one
    cookie_part = parts["ck1"]
    assert cookie_part.profile_id == person == reply.split.parts[0].profile_id
    assert await harness.profile("crm_id", "C1") == parts["C1"].profile_id != person
    fragments = await harness.events(ev.ProfileFragment)
    page_view = fragments[0].source_event_id
    assert list(cookie_part.fragment_ids) == [page_view]
    assert set(parts["C1"].fragment_ids) == {f.source_event_id for f in fragments[1:]}
    # remembered: the same pair seen again does not re-link
    await harness.send([("email", "ann@example.com"), ("cookie", "ck1")], dataset="web")
    assert await harness.profile("cookie", "ck1") != await harness.profile("crm_id", "C1")
    again = await harness.unlink(("email", "ann@example.com"), ("cookie", "ck1"))
    assert not again.changed
    assert not again.HasField("split")


async def test_unlinking_an_identity_detaches_it_for_good(harness: Harness) -> None:
    await harness.send([("crm_id", "C1"), ("email", "ann@example.com"), ("idfa", "shared")])
    reply = await harness.unlink(("idfa", "shared"))
    assert reply.decision.rule == "unlink_identity"
    assert len(reply.split.parts) == 2
    assert await harness.members("idfa", "shared") == {("idfa", "shared")}
    await harness.send([("email", "ann@example.com"), ("idfa", "shared")])
    assert await harness.members("crm_id", "C1") == {("crm_id", "C1"), ("email", "ann@example.com")}
    with pytest.raises(NotFound):
        await harness.unlink(("idfa", "never-seen"))
    with pytest.raises(InvalidInput):
        await harness.unlink(("email", "null"))


async def test_custom_namespaces_are_created_once_and_then_link(harness: Harness) -> None:
    await harness.send([("member_no", "M1"), ("email", "ann@example.com")])
    assert await harness.members("email", "ann@example.com") == {("email", "ann@example.com")}
    created = await harness.api.CreateNamespace(
        pb.CreateNamespaceRequest(name="member_no", type=pb.NAMESPACE_TYPE_CROSS_DEVICE, unique=True, priority=5),
        None,  # type: ignore[arg-type]
    )
    assert created.unique
    assert not created.standard
    with pytest.raises(Exception, match="exists"):
        await harness.api.CreateNamespace(
            pb.CreateNamespaceRequest(name="member_no", type=pb.NAMESPACE_TYPE_CUSTOM),
            None,  # type: ignore[arg-type]
        )
    with pytest.raises(InvalidInput):
        await harness.api.CreateNamespace(pb.CreateNamespaceRequest(name="Bad Name"), None)  # type: ignore[arg-type]
    await harness.send(
        [("member_no", "M1"), ("email", "ann@example.com")], [("member_no", "M2"), ("email", "ann@example.com")]
    )
    assert await harness.members("email", "ann@example.com") == {("email", "ann@example.com"), ("member_no", "M1")}
    resolved = await harness.api.Resolve(
        pb.ResolveRequest(identity=IdentityValue(namespace="email", value="ann@example.com")),
        None,  # type: ignore[arg-type]
    )
    assert resolved.primary == IdentityValue(namespace="member_no", value="M1")  # priority 5 beats email (30)
    listed = await harness.api.ListNamespaces(pb.ListNamespacesRequest(), None)  # type: ignore[arg-type]
    assert [n.name for n in listed.namespaces][:2] == ["member_no", "crm_id"]


async def test_the_graph_shows_links_first_and_last_seen_and_sources(harness: Harness) -> None:
    await harness.send([("crm_id", "C1"), ("email", "ann@example.com")])
    await harness.send([("email", "ann@example.com"), ("cookie", "ck1")], dataset="web")
    await harness.send([("email", "ann@example.com"), ("crm_id", "C1")])
    graph = await harness.graph("email", "ann@example.com")
    assert graph.primary == IdentityValue(namespace="crm_id", value="C1")
    links = {(x.a.value, x.b.value): x for x in graph.links}
    assert set(links) == {("C1", "ann@example.com"), ("ck1", "ann@example.com")}
    crm = links[("C1", "ann@example.com")]
    assert (crm.dataset, crm.batch_id, crm.last_dataset) == ("crm", "b-crm", "crm")
    assert crm.last_seen.ToDatetime(UTC) - crm.first_seen.ToDatetime(UTC) == timedelta(minutes=2)
    assert links[("ck1", "ann@example.com")].dataset == "web"


@pytest.mark.parametrize("per_message", [1, 4])
async def test_a_rebuilt_store_equals_the_live_one_on_postgres_and_sqlite(
    eventlog: EventLog, postgres_url: str, tmp_path: Any, per_message: int
) -> None:
    live = Harness(eventlog, postgres_url, IdentitySettings(max_identities=4))
    await live.send(
        [("cookie", "ck1")],
        [("crm_id", "C1"), ("email", "ann@example.com")],
        [("cookie", "ck1"), ("email", "ann@example.com")],
        [("crm_id", "C2"), ("cookie", "ck1")],
        [("email", "ann@example.com"), ("cookie", "ck2"), ("cookie", "ck3"), ("gaid", "g1")],
        [("email", "null"), ("phone", "12")],
        per_message=per_message,
    )
    await live.unlink(("email", "ann@example.com"), ("crm_id", "C1"))
    await live.send([("crm_id", "C1"), ("phone", "+14155550101")], [("cookie", "ck2"), ("idfa", "i1")])
    rebuilt = Harness(eventlog, sqlite_url(tmp_path / "rebuilt.db"), IdentitySettings(max_identities=4))
    await rebuilt.processor.rebuild()
    assert rebuilt.dump() == live.dump()
    with live.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(store.DECISION)).scalar()
    live.engine.dispose()
    rebuilt.engine.dispose()
