"""GetProfile's read model (cdp_segmentation.lookup): what it answers by identity and by id, that
the history is read only when asked, that what changes shows at the next call (computed
definitions, namespaces, memberships), and that a lookup runs off the event loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from google.protobuf import json_format, struct_pb2
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy.engine import Engine
from sqlmodel import Session

from cdp.common.v1.envelope_pb2 import IdentityValue
from cdp.segmentation.v1 import segmentation_pb2 as pb
from cdp_kit.errors import InvalidInput, NotFound
from cdp_kit.eventlog import EventLog
from cdp_kit.namespaces import NamespaceRow
from cdp_kit.store import make_engine
from cdp_segmentation.lookup import ProfileReader, set_value
from cdp_segmentation.store import ComputedRow, ProfileIdentityRow
from tests.integration.test_segmentation_service import DAY, T0, Identity, engine, service

__all__ = ["engine"]  # the fixture

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.integers(-(2**53), 2**53)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@given(JSON)
def test_set_value_is_json_format_parse_dict(value: Any) -> None:
    expected = json_format.ParseDict(value, struct_pb2.Value())
    got = struct_pb2.Value()
    set_value(got, value)
    assert got == expected


def by_identity(namespace: str, value: str, *, history: bool = False) -> pb.GetProfileRequest:
    return pb.GetProfileRequest(identity=IdentityValue(namespace=namespace, value=value), with_history=history)


async def test_a_profile_by_any_identity_and_its_history_only_when_asked(engine: Engine, eventlog: EventLog) -> None:
    identity = Identity(eventlog)
    await identity.record("p1", "crm", T0, {"email": "ann@example.com", "crm_id": "C1"}, tier="gold", tags=["a", "b"])
    await identity.event("p1", "view", T0 + DAY, page="home")
    await identity.record("p2", "crm", T0, {"email": "bob@example.com"}, tier="silver")
    handlers = await service(engine, eventlog)
    await handlers.create_segment("gold", 'tier = "gold"')
    await handlers.processor.catch_up()
    reader = ProfileReader(engine, phone_region="US")
    try:
        by_email = await reader.get(by_identity("email", " Ann@Example.COM "))  # normalised as identity does
        by_crm = await reader.get(by_identity("crm_id", "C1"))
        by_id = await reader.get(pb.GetProfileRequest(profile_id="p1"))
        assert by_email == by_crm == by_id
        assert by_email.profile_id == "p1"
        assert {(i.namespace, i.value) for i in by_email.identities} == {
            ("email", "ann@example.com"),
            ("crm_id", "C1"),
            ("cookie", "ck-p1"),
        }
        attributes: dict[str, Any] = {a.name: json_format.MessageToDict(a.value) for a in by_email.attributes}
        assert attributes == {
            "tier": "gold",
            "tags": ["a", "b"],
        }
        assert all(a.source_dataset == "crm" and a.HasField("updated_at") for a in by_email.attributes)
        assert list(by_email.segments) == ["gold"]
        assert [(m.segment_name, m.status) for m in by_email.memberships] == [("gold", "realized")]
        assert by_email.events == 1
        assert not by_email.recent_events
        assert not by_email.sources

        full = await reader.get(by_identity("email", "ann@example.com", history=True))
        assert [(e.event_type, e.fields["page"]) for e in full.recent_events] == [("view", "home")]
        assert {(s.dataset, s.kind, s.fragments) for s in full.sources} == {("crm", "record", 1), ("web", "event", 1)}
        assert (await reader.get(by_identity("email", "bob@example.com"))).segments == []
    finally:
        reader.close()


async def test_not_found_and_invalid_name_no_value(engine: Engine, eventlog: EventLog) -> None:
    handlers = await service(engine, eventlog)
    await handlers.processor.catch_up()
    reader = ProfileReader(engine, phone_region="US")
    try:
        with pytest.raises(NotFound) as missing:
            await reader.get(by_identity("email", "secret.person@example.com"))
        assert "secret" not in str(missing.value)
        assert "email" in str(missing.value)
        with pytest.raises(InvalidInput, match="unknown namespace"):
            await reader.get(by_identity("loyalty_card", "123"))
        with pytest.raises(InvalidInput, match="missing key"):
            await reader.get(pb.GetProfileRequest())
        with pytest.raises(NotFound):
            await reader.get(pb.GetProfileRequest(profile_id="nobody"))
        with pytest.raises(InvalidInput, match="invalid profile id") as too_long:
            await reader.get(pb.GetProfileRequest(profile_id="p" * 100_000))
        assert "ppp" not in str(too_long.value)  # a 100 KB id is refused, not echoed
    finally:
        reader.close()


async def test_what_changes_shows_at_the_next_call(engine: Engine, eventlog: EventLog) -> None:
    """The reader keeps parsed computed definitions and namespaces: a new definition, a new
    namespace and a new membership show at the next call, not after some cache expires."""
    identity = Identity(eventlog)
    await identity.record("p1", "crm", T0, {"crm_id": "C1"}, tier="gold")
    handlers = await service(engine, eventlog)
    await handlers.processor.catch_up()
    reader = ProfileReader(engine, phone_region="US")
    try:
        first = await reader.get(pb.GetProfileRequest(profile_id="p1"))
        assert not first.computed
        assert not first.segments
        with pytest.raises(InvalidInput):
            await reader.get(by_identity("loyalty_card", "L-1"))

        await handlers.create_computed("views", "count(view)")
        await handlers.create_segment("gold", 'tier = "gold"')
        await identity.event("p1", "view", T0 + DAY)
        await handlers.processor.catch_up()
        with Session(engine) as session:  # as identity's config log would teach it
            session.add(NamespaceRow(name="loyalty_card", type=7))  # NAMESPACE_TYPE_CUSTOM
            session.commit()
        again = await reader.get(pb.GetProfileRequest(profile_id="p1"))
        computed: list[tuple[str, str, Any]] = [
            (c.name, c.definition, json_format.MessageToDict(c.value)) for c in again.computed
        ]
        assert computed == [("views", "count(view)", 1)]
        assert list(again.segments) == ["gold"]
        with pytest.raises(NotFound, match="loyalty_card"):  # a known namespace now, holding no such value
            await reader.get(by_identity("loyalty_card", "L-1"))
        with Session(engine) as session:  # a definition's body changed in place: parsed again
            row = session.get(ComputedRow, "views")
            assert row is not None
            row.body = {**row.body, "definition": "count(view) "}
            session.add(row)
            session.commit()
        changed = await reader.get(pb.GetProfileRequest(profile_id="p1"))
        assert [c.definition for c in changed.computed] == ["count(view) "]
    finally:
        reader.close()


async def test_a_lookup_runs_off_the_event_loop(engine: Engine, eventlog: EventLog) -> None:
    """While a lookup waits on its read, the event loop goes on (folds, health, status)."""
    identity = Identity(eventlog)
    await identity.record("p1", "crm", T0, {"crm_id": "C1"}, tier="gold")
    handlers = await service(engine, eventlog)
    await handlers.processor.catch_up()
    release = threading.Event()
    threads: list[str] = []

    class Held(ProfileReader):
        def read(self, request: pb.GetProfileRequest) -> pb.Profile:
            threads.append(threading.current_thread().name)
            assert release.wait(10.0)
            return super().read(request)

    reader = Held(engine, phone_region="US")
    try:
        lookup = asyncio.create_task(reader.get(pb.GetProfileRequest(profile_id="p1")))
        for _ in range(100):  # the loop keeps turning while the read is held
            await asyncio.sleep(0.01)
            if threads:
                break
        assert threads
        assert not lookup.done()
        release.set()
        assert (await asyncio.wait_for(lookup, 10.0)).profile_id == "p1"
        assert threads
        assert threads[0] != threading.current_thread().name
    finally:
        release.set()
        reader.close()


@pytest.fixture(scope="module")
def pg_engine(embedded_postgres: Any) -> Iterator[Engine]:
    name, url = embedded_postgres.create_database()
    engine = make_engine(url)
    yield engine
    engine.dispose()
    embedded_postgres.drop_database(name)


async def test_a_lookup_reads_one_committed_state(engine: Engine, eventlog: EventLog) -> None:
    """What commits while a lookup runs is not in its answer: the profile row and its identities
    and memberships are of the same state (SQLite runs a bare SELECT in a read transaction of its
    own unless one is begun, so each of the call's reads could see a later commit than the last)."""
    await one_committed_state(engine, eventlog)


@pytest.mark.postgres
async def test_a_lookup_reads_one_committed_state_on_postgresql(pg_engine: Engine, eventlog: EventLog) -> None:
    """The same on PostgreSQL, where READ COMMITTED takes a snapshot per statement."""
    await one_committed_state(pg_engine, eventlog)


async def one_committed_state(engine: Engine, eventlog: EventLog) -> None:
    identity = Identity(eventlog)
    await identity.record("p1", "crm", T0, {"crm_id": "C1"}, tier="gold")
    handlers = await service(engine, eventlog)
    await handlers.processor.catch_up()

    class Interleaved(ProfileReader):
        def _row(self, conn: Any, request: pb.GetProfileRequest) -> Any:
            row = super()._row(conn, request)
            with Session(engine) as session:  # a fold commits between the call's reads
                session.add(ProfileIdentityRow(namespace="crm_id", value="C2", profile_id="p1"))
                session.commit()
            return row

    reader = Interleaved(engine, phone_region="US")
    try:
        first = await reader.get(pb.GetProfileRequest(profile_id="p1"))
        assert {(i.namespace, i.value) for i in first.identities} == {("crm_id", "C1")}
    finally:
        reader.close()
    again = ProfileReader(engine, phone_region="US")
    try:  # the commit is there for the next call
        later = await again.get(pb.GetProfileRequest(profile_id="p1"))
        assert ("crm_id", "C2") in {(i.namespace, i.value) for i in later.identities}
    finally:
        again.close()
