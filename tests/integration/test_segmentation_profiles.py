"""Segmentation profiles and schedules on a real JetStream and SQLite: dataset precedence over
several datasets, the event cap, dataset retention on the log's clock, the cron schedule of batch
segments, and the in-memory batch path agreeing with a rebuild."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta
from pathlib import Path

import pytest
from google.protobuf import json_format
from sqlalchemy.engine import Engine

from cdp.ingest.v1 import events_pb2 as ingest_ev
from cdp.ingest.v1 import ingest_pb2
from cdp.segmentation.v1 import segmentation_pb2 as pb
from cdp_kit.envelope import Cause, make_envelope
from cdp_kit.errors import InvalidInput, Unavailable
from cdp_kit.eventlog import EventLog
from cdp_kit.store import canonical_dump, make_engine, sqlite_url, with_checkpoint
from cdp_kit.streams import INGEST_CONFIG
from cdp_segmentation import store
from cdp_segmentation.handlers import SegmentationHandlers
from cdp_segmentation.main import build_processor
from cdp_segmentation.store import TABLES, SegmentRow
from tests.integration.test_segmentation_service import DAY, T0, Identity, engine, members, profile, service

__all__ = ["engine"]


def sources(p: pb.Profile) -> dict[str, tuple[object, str]]:
    return {a.name: (json_format.MessageToDict(a.value), a.source_dataset) for a in p.attributes}


async def create_dataset(eventlog: EventLog, name: str, retention_seconds: int) -> None:
    dataset = ingest_pb2.Dataset(name=name, schema_name="web_event", retention_seconds=retention_seconds)
    env = make_envelope(
        ingest_ev.DatasetCreated(dataset=dataset),
        event_id=f"dataset-{name}",
        subject_key=name,
        occurred_at=T0 - 30 * DAY,
        cause=Cause(command_id=f"dataset-{name}"),
    )
    await eventlog.append(INGEST_CONFIG.subject, [env], msg_id=f"dataset-{name}")


async def test_dataset_precedence_orders_several_datasets_and_unlisted_ones_fall_back_to_time(
    engine: Engine, eventlog: EventLog
) -> None:
    identity = Identity(eventlog)
    ids = {"email": "a@example.com"}
    await identity.record("p1", "web_form", T0 + 3 * DAY, ids, tier="bronze", city="Nice", phone_type="ios")
    await identity.record("p1", "loyalty", T0 + 2 * DAY, ids, tier="silver", city="Lyon")
    await identity.record("p1", "crm", T0, ids, tier="gold")
    await identity.record("p1", "survey", T0 + 4 * DAY, ids, phone_type="android")
    handlers = await service(engine, eventlog)
    await handlers.create_segment("gold", 'tier = "gold"')
    await handlers.processor.catch_up()
    assert sources(profile(handlers, "p1"))["tier"] == ("bronze", "web_form")
    assert members(handlers, "gold") == []

    policy = pb.MergePolicy(kind=pb.MERGE_POLICY_KIND_DATASET_PRECEDENCE, datasets=["crm", "loyalty"])
    await handlers.set_merge_policy(policy)
    got = sources(profile(handlers, "p1"))
    assert got["tier"] == ("gold", "crm")  # crm first
    assert got["city"] == ("Lyon", "loyalty")  # crm has no city: the next listed dataset
    assert got["phone_type"] == ("android", "survey")  # neither listed: the newest wins
    assert members(handlers, "gold") == ["p1"]  # the new policy re-evaluated the segment

    await identity.record("p1", "loyalty", T0 + 5 * DAY, ids, tier="platinum", city="Paris")
    await handlers.processor.catch_up()
    got = sources(profile(handlers, "p1"))
    assert got["tier"] == ("gold", "crm")
    assert got["city"] == ("Paris", "loyalty")


async def test_the_event_cap_drops_the_oldest_events_and_segments_see_only_the_kept_ones(
    engine: Engine, eventlog: EventLog, tmp_path: Path
) -> None:
    identity = Identity(eventlog)
    handlers = await service(engine, eventlog, cap=3)
    await handlers.create_segment("had_signup", "count(signup) >= 1")
    await identity.event("p1", "signup", T0)
    for hour in range(1, 5):
        await identity.event("p1", "view", T0 + timedelta(hours=hour), page=f"page{hour}")
    await handlers.processor.catch_up()
    got = profile(handlers, "p1")
    assert got.events == 3
    assert [e.fields["page"] for e in got.recent_events] == ["page4", "page3", "page2"]
    assert members(handlers, "had_signup") == []  # the signup was the oldest: dropped

    live = canonical_dump(engine, with_checkpoint(TABLES))
    rebuilt = make_engine(sqlite_url(tmp_path / "rebuilt.db"))
    processor, _ = build_processor(rebuilt, eventlog, event_cap=3)
    await processor.rebuild()
    assert canonical_dump(rebuilt, with_checkpoint(TABLES)) == live
    rebuilt.dispose()


async def test_dataset_retention_drops_events_as_the_log_clock_passes_and_refuses_expired_ones(
    engine: Engine, eventlog: EventLog, tmp_path: Path
) -> None:
    identity = Identity(eventlog)
    await create_dataset(eventlog, "web", retention_seconds=2 * 86_400)
    handlers = await service(engine, eventlog)
    await handlers.processor.catch_up()  # a definition waits for ingest's config to be applied
    await handlers.tick(T0)
    await handlers.create_segment("viewer", "count(view) >= 1")
    await identity.event("p1", "view", T0 - DAY, dataset="web")
    await identity.event("p1", "view", T0 - 3 * DAY, dataset="web")  # already past its retention
    await identity.event("p2", "view", T0 - DAY, dataset="app")  # no retention: kept forever
    await handlers.processor.catch_up()
    assert profile(handlers, "p1").events == 1
    assert members(handlers, "viewer") == ["p1", "p2"]

    await handlers.tick(T0 + DAY + timedelta(minutes=1))  # p1's last view is now 2 days old
    assert profile(handlers, "p1").events == 0
    assert members(handlers, "viewer") == ["p2"]

    live = canonical_dump(engine, with_checkpoint(TABLES))
    rebuilt = make_engine(sqlite_url(tmp_path / "rebuilt.db"))
    processor, _ = build_processor(rebuilt, eventlog)
    await processor.rebuild()
    assert canonical_dump(rebuilt, with_checkpoint(TABLES)) == live
    rebuilt.dispose()


async def test_a_scheduled_segment_is_evaluated_in_sql_when_the_clock_passes_its_cron(
    engine: Engine, eventlog: EventLog
) -> None:
    identity = Identity(eventlog)
    handlers = await service(engine, eventlog)
    await handlers.tick(T0 + timedelta(seconds=30))
    segment = await handlers.create_segment("nightly_gold", 'tier = "gold"', schedule="0 3 * * *")
    assert segment.evaluation == pb.EVALUATION_BATCH
    assert "scheduled" in segment.evaluation_reason
    await identity.record("p1", "crm", T0, {"crm_id": "1"}, tier="gold")
    await handlers.processor.catch_up()
    assert members(handlers, "nightly_gold") == []  # batch segments do not move on fragments

    await handlers.tick(T0 + timedelta(hours=2))
    await handlers.run_schedules()
    assert members(handlers, "nightly_gold") == []  # 03:00 has not come yet

    await handlers.tick(T0 + timedelta(hours=3, minutes=1))
    await handlers.run_schedules()
    assert members(handlers, "nightly_gold") == ["p1"]
    with handlers.processor.read() as session:
        row = session.get(SegmentRow, segment.id)
        assert row is not None
        first_run = row.last_run_ms
    assert first_run == int((T0 + timedelta(hours=3, minutes=1)).timestamp() * 1000)

    await identity.record("p2", "crm", T0 + DAY, {"crm_id": "2"}, tier="gold")
    await handlers.processor.catch_up()
    await handlers.tick(T0 + timedelta(hours=4))
    await handlers.run_schedules()  # already ran for today's 03:00
    assert members(handlers, "nightly_gold") == ["p1"]
    await handlers.tick(T0 + DAY + timedelta(hours=3))
    await handlers.run_schedules()
    assert members(handlers, "nightly_gold") == ["p1", "p2"]


async def test_the_clock_loop_ticks_the_log_clock_and_runs_due_schedules(engine: Engine, eventlog: EventLog) -> None:
    identity = Identity(eventlog)
    handlers = await service(engine, eventlog)
    handlers.clock_interval_s = 0.05
    await handlers.tick(T0)  # the schedule last ran long before the wall clock's current minute
    await handlers.create_segment("every_minute", 'tier = "gold"', schedule="* * * * *")
    await identity.record("p1", "crm", T0, {"crm_id": "1"}, tier="gold")
    await handlers.processor.catch_up()
    assert members(handlers, "every_minute") == []
    handlers.processor.ready.set()
    loop = asyncio.create_task(handlers.clock_loop())
    try:
        for _ in range(400):
            if members(handlers, "every_minute") == ["p1"]:
                break
            await asyncio.sleep(0.05)
    finally:
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop
    assert members(handlers, "every_minute") == ["p1"]
    with handlers.processor.read() as session:
        assert store.clock_ms(session) > int((T0 + DAY).timestamp() * 1000)  # moved to the wall clock


async def register_schema(eventlog: EventLog, schema: ingest_pb2.Schema) -> None:
    env = make_envelope(
        ingest_ev.SchemaRegistered(schema=schema),
        event_id=f"schema-{schema.name}",
        subject_key=schema.name,
        occurred_at=T0,
        cause=Cause(command_id=f"schema-{schema.name}"),
    )
    await eventlog.append(INGEST_CONFIG.subject, [env], msg_id=f"schema-{schema.name}")


def field(name: str, kind: int, *nested: ingest_pb2.Field) -> ingest_pb2.Field:
    return ingest_pb2.Field(name=name, type=kind, fields=list(nested))  # type: ignore[arg-type]


async def test_definitions_are_checked_against_the_schemas_learnt_from_ingest(
    engine: Engine, eventlog: EventLog
) -> None:
    handlers = await service(engine, eventlog)
    await handlers.create_segment("before_schemas", "agee > 3")  # no schema known yet: names are not checked
    person = ingest_pb2.Schema(
        name="crm_person",
        schema_class=ingest_pb2.SCHEMA_CLASS_PROFILE,
        fields=[
            field("age", ingest_pb2.FIELD_TYPE_INTEGER),
            field("first_name", ingest_pb2.FIELD_TYPE_STRING),
            field("vip", ingest_pb2.FIELD_TYPE_BOOLEAN),
            field("birth_date", ingest_pb2.FIELD_TYPE_DATE),
            field("tags", ingest_pb2.FIELD_TYPE_ARRAY),
            field("loyalty", ingest_pb2.FIELD_TYPE_OBJECT, field("tier", ingest_pb2.FIELD_TYPE_STRING)),
            field("extra", ingest_pb2.FIELD_TYPE_OBJECT),
        ],
    )
    order = ingest_pb2.Schema(
        name="orders",
        schema_class=ingest_pb2.SCHEMA_CLASS_EVENT,
        fields=[field("total", ingest_pb2.FIELD_TYPE_NUMBER), field("channel", ingest_pb2.FIELD_TYPE_STRING)],
    )
    await register_schema(eventlog, person)
    await register_schema(eventlog, order)
    await handlers.processor.catch_up()

    refused = {
        'age > "abc"': ("1:7", "type", "age is an integer, not a string: compare it with an integer, e.g. age > 30"),
        "vip = true and\n  agee > 3": ("2:3", "field", "did you mean age"),
        'loyalty.teir = "gold"': ("1:1", "field", "did you mean loyalty.tier"),
        "vip = 1": ("1:7", "type", "vip is a boolean, not a number"),
        'age in [1, "x"]': ("1:12", "type", "age is an integer, not a string"),
        "sum(order.channel) > 3": ("1:11", "type", "needs a numeric event field; channel is a string"),
        'count(order where chanel = "web") >= 1': ("1:19", "field", "event field 'chanel'; did you mean channel"),
        '(order where chanel = "web") within 7d not followed by order within 1h': ("1:14", "field", "did you mean"),
        "zzz exists": ("1:1", "field", "declared: age, birth_date"),
    }
    for query, (place, rule, hint) in refused.items():
        with pytest.raises(InvalidInput) as caught:
            await handlers.create_segment("refused", query)
        [violation] = caught.value.violations
        assert (violation.field, violation.rule) == (f"query:{place}", rule), query
        assert hint in violation.message, (query, violation.message)
    for n, query in enumerate(
        (
            'age >= 30 and first_name starts_with "a" and birth_date < "2000-01-01"',
            'loyalty.tier in ["gold", "silver"] and tags contains "x" and extra.anything = 3',
            'sum(order.total where channel = "web") > 100 within 30d',
            '(order where channel = "web") within 7d not followed by (order where total > 0) within 1h',
        )
    ):
        await handlers.create_segment(f"ok_{n}", query)
    with handlers.processor.read() as session:
        assert store.vocabulary(session).attributes["loyalty.tier"] == "string"


def event_schema(name: str, types: list[str], **fields: int) -> ingest_pb2.Schema:
    return ingest_pb2.Schema(
        name=name,
        schema_class=ingest_pb2.SCHEMA_CLASS_EVENT,
        fields=[
            field("event_id", ingest_pb2.FIELD_TYPE_STRING),
            field("ts", ingest_pb2.FIELD_TYPE_TIMESTAMP),
            field("type", ingest_pb2.FIELD_TYPE_STRING),
            *(field(n, kind) for n, kind in fields.items()),
        ],
        event_id_field="event_id",
        timestamp_field="ts",
        event_type_field="type",
        event_types=types,
    )


async def refusal(handlers: SegmentationHandlers, query: str) -> str:
    with pytest.raises(InvalidInput) as caught:
        await handlers.create_segment("refused", query)
    [violation] = caught.value.violations
    return violation.message


async def test_event_fields_are_typed_per_event_type_by_the_schemas_declaring_it(
    engine: Engine, eventlog: EventLog
) -> None:
    """The site sends amount as a string; store orders as a number: `order.amount` is a number."""
    handlers = await service(engine, eventlog)
    string, number = ingest_pb2.FIELD_TYPE_STRING, ingest_pb2.FIELD_TYPE_NUMBER
    await register_schema(eventlog, event_schema("web_events", ["page_view", "add_to_cart"], amount=string))
    await register_schema(eventlog, event_schema("store_orders", ["order"], amount=number, channel=string))
    crm = ingest_pb2.Schema(
        name="crm",
        schema_class=ingest_pb2.SCHEMA_CLASS_PROFILE,
        fields=[
            field("crm_id", string),
            ingest_pb2.Field(name="email_consent", type=string, consent_for="email_marketing"),
        ],
    )
    await register_schema(eventlog, crm)
    await handlers.processor.catch_up()

    await handlers.create_segment("big_store", 'sum(order.amount where channel = "store") > 500 within 365d')
    await handlers.create_segment("emailable", 'consent_email_marketing = "y" and consent email_marketing = "y"')
    assert "amount is a string in add_to_cart events" in await refusal(handlers, "sum(add_to_cart.amount) > 3")
    assert "(fields of page_view events)" in await refusal(handlers, 'count(page_view where channel = "x") >= 1')
    # No schema lists `click` and none is for any type: it has no fields.
    assert "no event schema declares the event type 'click'" in await refusal(handlers, "sum(click.amount) > 1")

    # A schema for any event type: its fields apply to types no schema lists, not over those that do.
    await register_schema(eventlog, event_schema("legacy", [], amount=string, channel=string))
    # A second schema listing `order` with another type for amount: conditions on it name both.
    await register_schema(eventlog, event_schema("pos_orders", ["order"], amount=string))
    await handlers.processor.catch_up()
    assert "amount is a string in click events" in await refusal(handlers, "sum(click.amount) > 1")
    await handlers.create_segment("store_count", 'count(order where channel = "store") >= 2')
    message = await refusal(handlers, "sum(order.amount) > 500")
    assert "schemas declaring order disagree on the type of amount" in message
    assert "a number in store_orders" in message
    assert "a string in pos_orders" in message


async def test_a_definition_waits_for_ingests_schemas_and_says_when_they_are_not_yet_known(
    engine: Engine, eventlog: EventLog
) -> None:
    processor, catalog = build_processor(engine, eventlog)
    processor.create_store()
    await processor.recover()
    # Nothing applies ingest's config (no input runs): the wait ends with UNAVAILABLE.
    handlers = SegmentationHandlers(processor, catalog, schema_wait_s=0.2)
    await register_schema(eventlog, event_schema("web_events", ["page_view"], page=ingest_pb2.FIELD_TYPE_STRING))
    for attempt in (handlers.create_segment("s", "count(page_view) >= 1"), handlers.explain("count(page_view) >= 1")):
        with pytest.raises(Unavailable) as caught:
            await attempt
        assert "schema not yet known" in str(caught.value)
        assert "config position 0 of 1" in str(caught.value)
    # With the inputs running, the same definition waits for the schema and is checked against it.
    running = asyncio.create_task(processor.run())
    try:
        await register_schema(eventlog, event_schema("orders", ["order"], amount=ingest_pb2.FIELD_TYPE_STRING))
        assert "amount is a string in order events" in await refusal(handlers, "sum(order.amount) > 1")
        await handlers.create_segment("viewed", 'count(page_view where page = "/") >= 1')
    finally:
        processor.stop()
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
