"""Segmentation on a real JetStream and a real store: profiles as a projection of identity's
fragments, merges and splits; streaming memberships with clock-driven exits; batch SQL; rebuild."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import select

from cdp.common.v1.envelope_pb2 import IdentityValue
from cdp.identity.v1 import events_pb2 as identity_ev
from cdp.segmentation.v1 import segmentation_pb2 as pb
from cdp_kit.envelope import Cause, deterministic_id, make_envelope
from cdp_kit.errors import InvalidInput
from cdp_kit.eventlog import EventLog
from cdp_kit.store import canonical_dump, make_engine, sqlite_url, with_checkpoint
from cdp_kit.streams import IDENTITY_FRAGMENTS
from cdp_segmentation.handlers import SegmentationHandlers
from cdp_segmentation.lookup import ProfileReader
from cdp_segmentation.main import build_processor
from cdp_segmentation.store import EXITED, TABLES, MembershipRow, realized

T0 = datetime(2026, 3, 1, tzinfo=UTC)
DAY = timedelta(days=1)


class Identity:
    """Stands in for the identity service: appends its facts to its own subject."""

    def __init__(self, eventlog: EventLog) -> None:
        self.eventlog = eventlog
        self.n = 0

    async def send(self, payload: Any, at: datetime) -> None:
        self.n += 1
        env = make_envelope(
            payload, event_id=f"id-{self.n}", subject_key="p", occurred_at=at, cause=Cause(command_id=f"c{self.n}")
        )
        await self.eventlog.append(IDENTITY_FRAGMENTS.subject, [env], msg_id=f"identity-{self.n}")

    async def record(self, profile: str, dataset: str, at: datetime, ids: dict[str, str], **attrs: Any) -> str:
        self.n += 0
        source = f"rec-{self.n + 1}"
        frag = identity_ev.ProfileFragment(
            profile_id=profile,
            source_event_id=source,
            dataset=dataset,
            kind="record",
            identities=[IdentityValue(namespace=k, value=v) for k, v in ids.items()],
        )
        frag.attributes.update(attrs)
        frag.occurred_at.FromDatetime(at)
        await self.send(frag, at)
        return source

    async def event(self, profile: str, event_type: str, at: datetime, dataset: str = "web", **fields: Any) -> str:
        source = f"evt-{self.n + 1}"
        frag = identity_ev.ProfileFragment(
            profile_id=profile,
            source_event_id=source,
            dataset=dataset,
            kind="event",
            event_type=event_type,
            identities=[IdentityValue(namespace="cookie", value=f"ck-{profile}")],
        )
        frag.attributes.update(fields)
        frag.occurred_at.FromDatetime(at)
        await self.send(frag, at)
        return source


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = make_engine(sqlite_url(tmp_path / "segmentation.db"))
    yield engine
    engine.dispose()


async def service(engine: Engine, eventlog: EventLog, cap: int = 5000) -> SegmentationHandlers:
    processor, catalog = build_processor(engine, eventlog, event_cap=cap)
    processor.create_store()
    await processor.recover()
    return SegmentationHandlers(processor, catalog)


def profile(handlers: SegmentationHandlers, profile_id: str) -> pb.Profile:
    reader = ProfileReader(handlers.processor.engine, phone_region="US")
    try:
        return reader.read(pb.GetProfileRequest(profile_id=profile_id, with_history=True))
    finally:
        reader.close()


def attrs(p: pb.Profile) -> dict[str, tuple[Any, str]]:
    from google.protobuf import json_format

    return {a.name: (json_format.MessageToDict(a.value), a.source_dataset) for a in p.attributes}


def members(handlers: SegmentationHandlers, name: str) -> list[str]:
    with handlers.processor.read() as session:
        segment_id = deterministic_id("segment", name)
        return realized(session, segment_id)


async def test_merge_policies_recompute_attributes_exactly_from_the_kept_fragments(
    engine: Engine, eventlog: EventLog
) -> None:
    identity = Identity(eventlog)
    await identity.record("p1", "crm", T0, {"email": "a@example.com"}, tier="gold", city="Paris")
    await identity.record("p1", "web_form", T0 + DAY, {"email": "a@example.com"}, tier="silver")
    handlers = await service(engine, eventlog)
    await handlers.processor.catch_up()
    assert attrs(profile(handlers, "p1"))["tier"] == ("silver", "web_form")  # newest wins (default)

    await handlers.set_merge_policy(pb.MergePolicy(kind=pb.MERGE_POLICY_KIND_DATASET_PRECEDENCE, datasets=["crm"]))
    assert attrs(profile(handlers, "p1"))["tier"] == ("gold", "crm")
    await identity.record("p1", "web_form", T0 + 2 * DAY, {"email": "a@example.com"}, tier="bronze", city="Lyon")
    await handlers.processor.catch_up()
    got = attrs(profile(handlers, "p1"))
    assert got["tier"] == ("gold", "crm")
    assert got["city"] == ("Paris", "crm")

    await handlers.set_merge_policy(pb.MergePolicy(kind=pb.MERGE_POLICY_KIND_TIMESTAMP))
    assert attrs(profile(handlers, "p1"))["tier"] == ("bronze", "web_form")
    with pytest.raises(InvalidInput):
        await handlers.set_merge_policy(pb.MergePolicy(kind=pb.MERGE_POLICY_KIND_DATASET_PRECEDENCE))


async def test_merge_and_split_move_fragments_and_memberships(engine: Engine, eventlog: EventLog) -> None:
    identity = Identity(eventlog)
    handlers = await service(engine, eventlog)
    await handlers.create_segment("gold", 'tier = "gold"')
    await handlers.create_segment("buyers", "count(order) >= 2")
    rec_a = await identity.record("pa", "crm", T0, {"crm_id": "A"}, tier="gold")
    ev_a = await identity.event("pa", "order", T0 + DAY)
    ev_b = await identity.event("pb", "order", T0 + DAY)
    await handlers.processor.catch_up()
    assert members(handlers, "gold") == ["pa"]
    assert members(handlers, "buyers") == []

    merged = identity_ev.ProfilesMerged(survivor="pa", absorbed=["pb"], reason="login")
    await identity.send(merged, T0 + 2 * DAY)
    await handlers.processor.catch_up()
    assert members(handlers, "buyers") == ["pa"]
    assert profile(handlers, "pa").events == 2

    split = identity_ev.ProfileSplit(
        profile_id="pa",
        parts=[
            identity_ev.SplitPart(
                profile_id="pa", fragment_ids=[rec_a, ev_a], identities=[IdentityValue(namespace="crm_id", value="A")]
            ),
            identity_ev.SplitPart(
                profile_id="pc", fragment_ids=[ev_b], identities=[IdentityValue(namespace="cookie", value="ck-pb")]
            ),
        ],
    )
    await identity.send(split, T0 + 3 * DAY)
    await handlers.processor.catch_up()
    assert members(handlers, "buyers") == []
    assert members(handlers, "gold") == ["pa"]
    part = profile(handlers, "pc")
    assert part.events == 1
    assert not part.attributes
    assert {(i.namespace, i.value) for i in part.identities} == {("cookie", "ck-pb")}
    sources = {(s.dataset, s.kind, s.fragments) for s in profile(handlers, "pa").sources}
    assert sources == {("crm", "record", 1), ("web", "event", 1)}
    assert [m.segment_name for m in profile(handlers, "pa").memberships if m.status == "realized"] == ["gold"]


async def test_windows_end_on_clock_events_and_a_rebuild_reaches_the_same_store(
    engine: Engine, eventlog: EventLog, tmp_path: Path
) -> None:
    identity = Identity(eventlog)
    handlers = await service(engine, eventlog)
    await handlers.tick(T0)
    await handlers.create_segment("recent_buyer", "count(order) >= 1 within 7d")
    await handlers.create_segment("abandoner", "cart_add not followed by order within 1h")
    await handlers.create_segment("lapsed", "in segment abandoner and not in segment recent_buyer")
    await identity.event("p1", "order", T0 - DAY)
    await identity.event("p2", "cart_add", T0 - timedelta(minutes=30))
    await handlers.processor.catch_up()
    assert members(handlers, "recent_buyer") == ["p1"]
    assert members(handlers, "abandoner") == []

    assert await handlers.tick(T0 + timedelta(hours=1)) == 2  # abandoner and lapsed: the hour passed, no order
    assert members(handlers, "abandoner") == ["p2"]
    assert await handlers.tick(T0 + 5 * DAY) == 0  # nothing is due: no profile was even looked at
    await handlers.tick(T0 + 6 * DAY + timedelta(minutes=1))  # p1's order is now older than 7 days
    assert members(handlers, "recent_buyer") == []
    assert members(handlers, "lapsed") == ["p2"]

    live = canonical_dump(engine, with_checkpoint(TABLES))
    rebuilt = make_engine(sqlite_url(tmp_path / "rebuilt.db"))
    processor, _ = build_processor(rebuilt, eventlog)
    await processor.rebuild()
    assert canonical_dump(rebuilt, with_checkpoint(TABLES)) == live
    rebuilt.dispose()


async def test_a_window_on_a_sequences_first_step_enters_and_expires_on_clock_events(
    engine: Engine, eventlog: EventLog, tmp_path: Path
) -> None:
    """`A within 7d not followed by B within 1h`: an A enters once its hour has passed unanswered and
    leaves when it is 7 days old; an old abandoned A does not count beside a recent answered one.
    Each change comes from a clock event that wakes only the profiles due; a rebuild agrees."""
    identity = Identity(eventlog)
    handlers = await service(engine, eventlog)
    await handlers.tick(T0)
    await handlers.create_segment("abandoned_7d", "add_to_cart within 7d not followed by purchase within 1h")
    await handlers.create_segment("bought_7d", "add_to_cart within 7d followed by purchase within 1h")
    await identity.event("p1", "add_to_cart", T0 - 10 * DAY)  # old, abandoned
    await identity.event("p1", "add_to_cart", T0 - DAY)  # recent, bought
    await identity.event("p1", "purchase", T0 - DAY + timedelta(minutes=30))
    await identity.event("p2", "add_to_cart", T0 - timedelta(minutes=30))  # its hour has not passed
    await handlers.processor.catch_up()
    assert members(handlers, "abandoned_7d") == []
    assert members(handlers, "bought_7d") == ["p1"]

    assert await handlers.tick(T0 + timedelta(hours=1)) == 1  # p2's hour passed, no purchase
    assert members(handlers, "abandoned_7d") == ["p2"]
    assert await handlers.tick(T0 + 5 * DAY) == 0  # nothing is due
    assert await handlers.tick(T0 + 6 * DAY + timedelta(minutes=1)) == 1  # p1's cart is 7 days old
    assert members(handlers, "bought_7d") == []
    assert await handlers.tick(T0 + 7 * DAY) == 1  # p2's cart is 7 days old
    assert members(handlers, "abandoned_7d") == []

    live = canonical_dump(engine, with_checkpoint(TABLES))
    rebuilt = make_engine(sqlite_url(tmp_path / "rebuilt.db"))
    processor, _ = build_processor(rebuilt, eventlog)
    await processor.rebuild()
    assert canonical_dump(rebuilt, with_checkpoint(TABLES)) == live
    rebuilt.dispose()


async def test_a_windowed_segment_defined_after_its_data_is_evaluated_as_of_the_wall_clock(
    engine: Engine, eventlog: EventLog
) -> None:
    """The service ticks the log's clock to the wall clock before evaluating a new windowed
    segment, so it never realizes members that the next tick would exit (and a destination
    never receives an add followed by a remove)."""
    identity = Identity(eventlog)
    await identity.event("old", "order", T0, total=10)
    await identity.event("recent", "order", T0 + 100 * DAY, total=10)
    processor, catalog = build_processor(engine, eventlog)
    processor.create_store()
    await processor.recover()
    now = T0 + 101 * DAY
    handlers = SegmentationHandlers(processor, catalog, wall_clock=lambda: now)
    await processor.catch_up()

    await handlers.create_segment("ordered_30d", "count(order) >= 1 within 30d")

    assert members(handlers, "ordered_30d") == ["recent"]
    with processor.read() as session:
        exits = session.exec(select(MembershipRow).where(MembershipRow.status == EXITED)).all()
    assert exits == []
