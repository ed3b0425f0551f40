"""Computed attributes on a real JetStream and SQLite (and PostgreSQL for the property): defined as
config events, checked, kept up to date incrementally on every event fragment, expired by the
log's clock through each profile's next due time, recomputed on merges and splits, usable in
segments by name (streaming and SQL agreeing), shown on profiles, and rebuilt to the same store."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from cdp.common.v1.envelope_pb2 import IdentityValue
from cdp.identity.v1 import events_pb2 as identity_ev
from cdp.ingest.v1 import ingest_pb2
from cdp.segmentation.v1 import segmentation_pb2 as pb
from cdp_kit.envelope import Cause, deterministic_id, make_envelope
from cdp_kit.errors import AlreadyExists, InvalidInput
from cdp_kit.eventlog import EventLog, LogMessage
from cdp_kit.processor import UnitOfWork
from cdp_kit.store import canonical_dump, make_engine, sqlite_url, transaction, with_checkpoint
from cdp_segmentation import store
from cdp_segmentation.computed import values
from cdp_segmentation.evaluate import ProfileData, compile_ast
from cdp_segmentation.handlers import SegmentationHandlers
from cdp_segmentation.lookup import ProfileReader
from cdp_segmentation.main import build_processor
from cdp_segmentation.profiles import history
from cdp_segmentation.sql import matching
from cdp_segmentation.store import TABLES, ProfileRow
from tests.integration.test_segmentation_profiles import field, register_schema
from tests.integration.test_segmentation_service import DAY, T0, Identity, engine, members, profile, service

__all__ = ["engine"]
HOUR = timedelta(hours=1)


def computed(p: pb.Profile) -> dict[str, Any]:
    return {c.name: json_format.MessageToDict(c.value) for c in p.computed if c.HasField("value")}


def assert_from_scratch(session: Session, catalog_defs: Any) -> None:
    """Every profile's stored values equal a computation from scratch over its kept events."""
    now = store.clock_ms(session)
    for row in session.exec(select(ProfileRow)).all():
        assert row.computed == values(catalog_defs, history(session, row.profile_id), now), row.profile_id


async def test_computed_attributes_are_checked_kept_incrementally_and_shown_on_profiles(
    engine: Engine, eventlog: EventLog, tmp_path: Path
) -> None:
    identity = Identity(eventlog)
    await register_schema(
        eventlog,
        ingest_pb2.Schema(
            name="orders",
            schema_class=ingest_pb2.SCHEMA_CLASS_EVENT,
            fields=[
                field("amount", ingest_pb2.FIELD_TYPE_NUMBER),
                field("channel", ingest_pb2.FIELD_TYPE_STRING),
                field("sku", ingest_pb2.FIELD_TYPE_STRING),
            ],
        ),
    )
    await register_schema(
        eventlog,
        ingest_pb2.Schema(
            name="person",
            schema_class=ingest_pb2.SCHEMA_CLASS_PROFILE,
            fields=[field("tier", ingest_pb2.FIELD_TYPE_STRING)],
        ),
    )
    await identity.event("p1", "store_order", T0 - 100 * DAY, amount=500, channel="store", sku="old")
    handlers = await service(engine, eventlog)
    await handlers.processor.catch_up()  # the schemas learnt from ingest's config log
    await handlers.tick(T0)
    await handlers.create_computed("orders_90d", "sum(store_order.amount) within 90d")
    await handlers.create_computed("store_orders", 'count(store_order where channel = "store")')
    await handlers.create_computed("cheapest", "min(store_order.amount) within 90d")
    await handlers.create_computed("dearest", "max(store_order.amount)")
    await handlers.create_computed("last_sku", "most_recent(store_order.sku) within 90d")

    # Bad definitions: clear errors with line, column and a hint; nothing is saved.
    bad = {
        "avg_order": ("avg(store_order.amount)", "count(TYPE), sum|min|max|most_recent"),
        "no_field": ("sum(store_order)", "sum needs a field of the event"),
        "unknown": ("sum(store_order.amont)", "did you mean amount"),
        "not_numeric": ("max(store_order.sku)", "needs a numeric event field; sku is a string"),
        "no_unit": ("count(store_order) within 90", "a window needs a unit"),
        "tier": ("count(store_order)", "is a profile attribute a schema declares"),
        "Bad-Name": ("count(store_order)", "lower_snake_case"),
        "within": ("count(store_order)", "is a word of the audience language"),
    }
    for name, (definition, hint) in bad.items():
        with pytest.raises(InvalidInput) as error:  # noqa: PT012
            await handlers.create_computed(name, definition)
            pytest.fail(f"{name} was accepted")
        assert hint in str(error.value) + str(error.value.violations), name
    with pytest.raises(AlreadyExists):
        await handlers.create_computed("orders_90d", "count(store_order)")
    assert [a.name for a in handlers.computed_attributes()] == [
        "cheapest",
        "dearest",
        "last_sku",
        "orders_90d",
        "store_orders",
    ]

    # Segments use them by name, type-checked like attributes.
    with pytest.raises(InvalidInput, match="orders_90d is a number"):
        await handlers.create_segment("bad", 'orders_90d > "abc"')
    with pytest.raises(InvalidInput) as refused:
        await handlers.create_segment("bad", "orders_90d exists")
    assert "compare its value instead, e.g. orders_90d > 0" in refused.value.violations[0].message
    explained = await handlers.explain("orders_90d >= 100")
    assert "computed:orders_90d" in explained.reads
    assert "event:store_order" in explained.reads
    assert explained.evaluation == pb.EVALUATION_STREAMING
    await handlers.create_segment("big_spender", "orders_90d >= 100")
    await handlers.create_segment("sku_b", 'last_sku = "b"')

    await identity.event("p1", "store_order", T0 - 10 * DAY, amount=40, channel="store", sku="a")
    await identity.event("p1", "store_order", T0 - 5 * DAY, amount=70, channel="web", sku="b")
    await identity.event("p1", "page_view", T0 - DAY, page="/")
    await identity.event("p2", "store_order", T0 - 2 * DAY, amount=30, channel="store")
    await handlers.processor.catch_up()
    got = computed(profile(handlers, "p1"))
    assert got == {
        "orders_90d": 110.0,
        "store_orders": 2.0,
        "cheapest": 40.0,
        "dearest": 500.0,
        "last_sku": "b",
    }
    assert computed(profile(handlers, "p2")) == {
        "orders_90d": 30.0,
        "store_orders": 1.0,
        "cheapest": 30.0,
        "dearest": 30.0,
    }  # p2's order has no sku: no most recent value
    assert members(handlers, "big_spender") == ["p1"]
    assert members(handlers, "sku_b") == ["p1"]
    with handlers.processor.read() as session:
        assert_from_scratch(session, handlers.catalog.computed(session))

    # Defined after p1's first event: a rebuild (definitions replayed among the inputs) agrees.
    live = canonical_dump(engine, with_checkpoint(TABLES))
    rebuilt = make_engine(sqlite_url(tmp_path / "rebuilt.db"))
    processor, _ = build_processor(rebuilt, eventlog)
    await processor.rebuild()
    assert canonical_dump(rebuilt, with_checkpoint(TABLES)) == live
    rebuilt.dispose()


async def test_windows_expire_on_clock_ticks_merges_splits_and_a_rebuild_reaches_the_same_store(
    engine: Engine, eventlog: EventLog, tmp_path: Path
) -> None:
    identity = Identity(eventlog)
    handlers = await service(engine, eventlog)
    await handlers.tick(T0)
    await handlers.create_computed("orders_7d", "sum(order.amount) within 7d")
    await handlers.create_computed("orders_2d", "count(order) within 2d")
    await handlers.create_computed("orders_3d", "sum(order.amount) within 3d")  # read by no segment
    await handlers.create_segment("spender", "orders_7d >= 100")
    await handlers.create_segment("active", "orders_2d >= 1")
    ev_a = await identity.event("pa", "order", T0 - DAY, amount=60)
    await identity.event("pa", "order", T0 - 3 * DAY, amount=50)
    ev_b = await identity.event("pb", "order", T0 - 4 * DAY, amount=80)
    await handlers.processor.catch_up()
    assert computed(profile(handlers, "pa")) == {"orders_7d": 110.0, "orders_2d": 1.0, "orders_3d": 60.0}
    assert members(handlers, "spender") == ["pa"]
    assert members(handlers, "active") == ["pa"]

    # pa's order of T0-1d leaves the 2-day window at T0+1d: only pa is due, nothing is scanned.
    assert await handlers.tick(T0 + DAY + HOUR) == 1
    assert computed(profile(handlers, "pa")) == {"orders_7d": 110.0, "orders_2d": 0.0, "orders_3d": 60.0}
    assert members(handlers, "active") == []
    # The same order leaves the 3-day window of an attribute no segment reads: pa is woken for it.
    assert await handlers.tick(T0 + 2 * DAY + HOUR) == 0
    assert computed(profile(handlers, "pa")) == {"orders_7d": 110.0, "orders_2d": 0.0, "orders_3d": 0.0}
    # pa's T0-3d order leaves the 7-day window at T0+4d: 60 < 100.
    await handlers.tick(T0 + 4 * DAY + HOUR)
    assert computed(profile(handlers, "pa")) == {"orders_7d": 60.0, "orders_2d": 0.0, "orders_3d": 0.0}
    assert computed(profile(handlers, "pb")) == {"orders_7d": 0.0, "orders_2d": 0.0, "orders_3d": 0.0}
    assert members(handlers, "spender") == []

    # A new order (incremental) and a merge (recomputed from the kept events of both).
    ev_c = await identity.event("pb", "order", T0 + 4 * DAY + 2 * HOUR, amount=45)
    await handlers.processor.catch_up()
    assert computed(profile(handlers, "pb")) == {"orders_7d": 45.0, "orders_2d": 1.0, "orders_3d": 45.0}
    await identity.send(identity_ev.ProfilesMerged(survivor="pa", absorbed=["pb"], reason="login"), T0 + 5 * DAY)
    await handlers.processor.catch_up()
    assert computed(profile(handlers, "pa")) == {"orders_7d": 105.0, "orders_2d": 1.0, "orders_3d": 45.0}
    assert members(handlers, "spender") == ["pa"]

    # A split gives pb's events back: both sides recomputed.
    split = identity_ev.ProfileSplit(
        profile_id="pa",
        parts=[
            identity_ev.SplitPart(profile_id="pa", fragment_ids=[ev_a]),
            identity_ev.SplitPart(
                profile_id="pc",
                fragment_ids=[ev_b, ev_c],
                identities=[IdentityValue(namespace="cookie", value="ck-pb")],
            ),
        ],
    )
    await identity.send(split, T0 + 5 * DAY + HOUR)
    await handlers.processor.catch_up()
    assert computed(profile(handlers, "pa"))["orders_7d"] == 60.0
    assert computed(profile(handlers, "pc"))["orders_7d"] == 45.0
    assert members(handlers, "spender") == []
    with handlers.processor.read() as session:
        assert_from_scratch(session, handlers.catalog.computed(session))
        # The SQL evaluator reads the same stored values.
        by_id = {r.id: store.segment_of(r) for r in store.all_segments(session)}
        for segment in by_id.values():
            in_sql = matching(session.connection(), segment.ast, store.clock_ms(session), by_id)
            assert in_sql == set(store.realized(session, segment.id)), segment.name

    live = canonical_dump(engine, with_checkpoint(TABLES))
    rebuilt = make_engine(sqlite_url(tmp_path / "rebuilt.db"))
    processor, _ = build_processor(rebuilt, eventlog)
    await processor.rebuild()
    assert canonical_dump(rebuilt, with_checkpoint(TABLES)) == live
    rebuilt.dispose()


# --------------------------------------------------------------------------- the property
MS0 = int(T0.timestamp() * 1000)
DEFINITIONS = {
    "n_3d": "count(order) within 3d",
    "spend_3d": "sum(order.amount) within 3d",
    "store_min_2d": 'min(order.amount where channel = "store") within 2d',
    "max_ever": "max(order.amount)",
    "last_page_1d": "most_recent(view.page) within 1d",
}
SEGMENTS = {
    "spender": "spend_3d >= 50 and n_3d >= 2",
    "page_b": 'last_page_1d = "b" or store_min_2d < 10',
}
PROFILES = ["p0", "p1", "p2"]
event_step = st.tuples(
    st.just("event"),
    st.sampled_from(PROFILES),
    st.sampled_from(["order", "view"]),
    st.integers(-96, 24),  # hours from the clock: out of order, some already outside windows
    st.integers(0, 40),
    st.sampled_from(["store", "web"]),
    st.sampled_from(["a", "b", None]),
)
tick_step = st.tuples(st.just("tick"), st.integers(1, 60))
merge_step = st.tuples(st.just("merge"), st.sampled_from(PROFILES), st.sampled_from(PROFILES))
steps = st.lists(st.one_of(event_step, event_step, event_step, tick_step, merge_step), min_size=1, max_size=25)


class Driver:
    """The service's streaming path, one transaction per step (the appends to NATS left out)."""

    def __init__(self, engine: Engine, eventlog: EventLog) -> None:
        self.engine = engine
        self.processor, self.catalog = build_processor(engine, eventlog, event_cap=4)
        self.processor.drop_store()
        self.processor.create_store()
        self.handler = self.processor.inputs[1].handler
        self.handlers = SegmentationHandlers(self.processor, self.catalog)
        self.n = 0
        self.clock = T0

    def config(self, payload: Any, key: str) -> None:
        with transaction(self.engine) as session:
            uow = UnitOfWork(session, self.processor, Cause(command_id=key))
            env = make_envelope(payload, event_id=key, subject_key=key, occurred_at=T0, cause=uow.cause)
            from cdp_kit.streams import SEGMENTATION_CONFIG

            uow.emit(SEGMENTATION_CONFIG, [env])
        self.catalog.invalidate()

    def tick(self, hours: int) -> None:
        self.clock += timedelta(hours=hours)
        ms = int(self.clock.timestamp() * 1000)
        first, more = True, True
        while more:
            with transaction(self.engine) as session:
                uow = UnitOfWork(session, self.processor, Cause(command_id=f"tick-{ms}"))
                _, more = self.handlers._tick_page(uow, at=self.clock, ms=ms, first=first)
            first = False

    def send(self, payload: Any) -> None:
        self.n += 1
        with transaction(self.engine) as session:
            uow = UnitOfWork(session, self.processor, Cause("segmentation-profile", self.n))
            env = make_envelope(
                payload, event_id=f"e{self.n}", subject_key="p", occurred_at=self.clock, cause=uow.cause
            )
            msg = LogMessage(
                stream="CDP_PROFILE", subject="cdp.profile.0.fragments", sequence=self.n, data=b"", headers={}
            )
            self.handler.observe(session, msg, env)
            self.handler.decide(uow, msg, env)


def define_all(driver: Driver) -> dict[str, pb.Segment]:
    from cdp.segmentation.v1 import events_pb2 as ev
    from cdp_segmentation.analysis import classify, resolve_computed
    from cdp_segmentation.language import parse, parse_computed

    known: dict[str, pb.ComputedAttribute] = {}
    for name, definition in DEFINITIONS.items():
        attribute = parse_computed(definition)
        attribute.name, attribute.definition = name, definition
        attribute.id = deterministic_id("computed", name)
        known[name] = attribute
        driver.config(ev.ComputedAttributeDefined(attribute=attribute), f"computed-{name}")
    segments: dict[str, pb.Segment] = {}
    for name, query in SEGMENTS.items():
        ast = parse(query)
        resolve_computed(ast, known)
        evaluation, reason = classify(ast, "", {})
        segment = pb.Segment(
            id=deterministic_id("segment", name),
            name=name,
            query=query,
            ast=ast,
            evaluation=evaluation,  # type: ignore[arg-type]
            evaluation_reason=reason,
        )
        segments[segment.id] = segment
        driver.config(ev.SegmentDefined(segment=segment), f"segment-{name}")
    return segments


@pytest.fixture(scope="module")
def pg_engine(embedded_postgres: Any) -> Any:
    name, url = embedded_postgres.create_database()
    engine = make_engine(url)
    yield engine
    engine.dispose()
    embedded_postgres.drop_database(name)


def check(driver: Driver, segments: dict[str, pb.Segment]) -> None:
    """Stored values == from scratch; streaming memberships == SQL == the values evaluated afresh."""
    with Session(driver.engine) as session:
        defs = driver.catalog.computed(session)
        now = store.clock_ms(session)
        assert_from_scratch(session, defs)
        rows = {r.profile_id: r for r in session.exec(select(ProfileRow)).all()}
        for segment in segments.values():
            test = compile_ast(segment.ast)
            fresh = {
                pid
                for pid in rows
                if test(ProfileData({}, set(), set(), computed=values(defs, history(session, pid), now)), now)
            }
            assert set(store.realized(session, segment.id)) == fresh, (driver.engine.dialect.name, segment.query)
            assert matching(session.connection(), segment.ast, now, segments) == fresh, segment.query
        in_segments = {s.name: set(store.realized(session, s.id)) for s in segments.values()}
    reader = ProfileReader(driver.engine, phone_region="US")  # GetProfile's read model, on this engine too
    try:
        for pid, row in rows.items():
            got = reader.read(pb.GetProfileRequest(profile_id=pid, with_history=True))
            computed = {c.name: json_format.MessageToDict(c.value) for c in got.computed if c.HasField("value")}
            assert computed == {k: v for k, v in row.computed.items() if v is not None}, driver.engine.dialect.name
            assert set(got.segments) == {name for name, pids in in_segments.items() if pid in pids}
            assert got.events == row.events
    finally:
        reader.close()


@pytest.mark.postgres
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(plan=steps)
async def test_incremental_values_equal_a_from_scratch_computation_and_segments_agree(
    plan: list[Any], eventlog: EventLog, pg_engine: Engine, tmp_path_factory: Any
) -> None:
    sqlite = make_engine(f"sqlite:///{tmp_path_factory.mktemp('computed')}/s.db")
    try:
        for engine in (sqlite, pg_engine):
            driver = Driver(engine, eventlog)
            driver.tick(0)
            segments = define_all(driver)
            merged: dict[str, str] = {}
            for n, step in enumerate(plan):
                if step[0] == "event":
                    _, pid, etype, hours, amount, channel, page = step
                    pid = merged.get(pid, pid)
                    frag = identity_ev.ProfileFragment(
                        profile_id=pid, source_event_id=f"f{n}", dataset="web", kind="event", event_type=etype
                    )
                    fields: dict[str, Any] = {"amount": amount, "channel": channel}
                    if page is not None:
                        fields["page"] = page
                    frag.attributes.update(fields)
                    frag.occurred_at.FromDatetime(driver.clock + timedelta(hours=hours))
                    driver.send(frag)
                elif step[0] == "tick":
                    driver.tick(step[1])
                    check(driver, segments)
                else:
                    survivor, absorbed = merged.get(step[1], step[1]), merged.get(step[2], step[2])
                    if survivor == absorbed:
                        continue
                    driver.send(identity_ev.ProfilesMerged(survivor=survivor, absorbed=[absorbed]))
                    merged = {k: (survivor if v == absorbed else v) for k, v in merged.items()}
                    merged[absorbed] = survivor
            check(driver, segments)
    finally:
        sqlite.dispose()
