"""Retention, on a real nats-server: per-stream max_age as provisioned, history that aged out
before a consumer read it is reported (never silent), and ingest's event-id dedupe horizon."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlmodel import Session, select

from cdp.common.v1.envelope_pb2 import IdentityValue
from cdp_ingest import store as ingest_store
from cdp_ingest.privacy import PRIVACY_TABLES, CollectIdentityRow, index_collect, prune_collect_index
from cdp_kit.envelope import Cause, make_envelope
from cdp_kit.eventlog import EventLog
from cdp_kit.identities import Normaliser
from cdp_kit.store import create_tables, make_engine
from cdp_kit.streams import (
    ALL_STREAMS,
    COLLECT,
    DAY_S,
    DEADLETTER,
    INGEST,
    ConsumerSpec,
    parse_duration_s,
    parse_max_ages,
    with_max_ages,
)


def test_default_retention_keeps_raw_collect_a_day_and_the_facts_for_ever() -> None:
    ages = {spec.name: spec.max_age_s for spec in ALL_STREAMS}
    assert ages[COLLECT.name] == DAY_S
    assert ages[DEADLETTER.name] == 30 * DAY_S
    assert {name for name, age in ages.items() if age == 0} == {
        "CDP_CONFIG",
        "CDP_INGEST",
        "CDP_PROFILE",
        "CDP_AUDIENCE",
        "CDP_DELIVERY",
        "CDP_PRIVACY",
    }


@pytest.mark.parametrize(("text", "seconds"), [("90", 90), ("90s", 90), ("15m", 900), ("6h", 21600), ("2d", 172800)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration_s(text) == seconds


@pytest.mark.parametrize(
    ("text", "named"),
    [("CDP_COLLECT=6x", "6x"), ("CDP_NOPE=1d", "CDP_NOPE"), ("CDP_COLLECT", "CDP_COLLECT"), ("CDP_COLLECT=-1h", "-1h")],
)
def test_a_bad_override_names_its_item(text: str, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        parse_max_ages(text)


def test_overrides_apply_to_their_stream_only() -> None:
    specs = with_max_ages(ALL_STREAMS, parse_max_ages(" cdp_collect=6h , CDP_DELIVERY=0"))
    ages = {spec.name: spec.max_age_s for spec in specs}
    assert ages["CDP_COLLECT"] == 6 * 3600
    assert ages["CDP_DELIVERY"] == 0
    assert ages["CDP_DEADLETTER"] == 30 * DAY_S


async def test_provisioned_streams_carry_their_retention(eventlog: EventLog) -> None:
    # A retention shorter than the 2-minute duplicate window: the window is cut to fit (JetStream
    # refuses a window longer than max_age).
    await eventlog.ensure_streams(with_max_ages(ALL_STREAMS, {"CDP_COLLECT": 60.0}))
    collect = await eventlog.js.stream_info(COLLECT.name)
    assert collect.config.max_age == 60.0
    assert collect.config.duplicate_window == 60.0
    deadletter = await eventlog.js.stream_info(DEADLETTER.name)
    assert deadletter.config.max_age == 30 * DAY_S
    ingest = await eventlog.js.stream_info(INGEST.name)
    assert not ingest.config.max_age


async def test_a_consumer_behind_removed_history_reports_how_much(eventlog: EventLog) -> None:
    subject = "cdp.ingest.0.records"
    for n in range(1, 11):
        env = make_envelope(
            IdentityValue(namespace="crm_id", value=f"c{n}"),
            event_id=f"e{n}",
            subject_key="crm",
            occurred_at=datetime(2026, 1, 1, tzinfo=UTC),
            cause=Cause(command_id=f"c{n}"),
        )
        await eventlog.append(subject, [env], msg_id=f"m{n}")
    spec = ConsumerSpec("retention-probe", INGEST, subject)
    reader = await eventlog.durable(spec, 3)
    assert reader.aged_out == 0
    # What max_age does to old messages, done at once: everything below sequence 8 is gone.
    await eventlog.js.purge_stream(INGEST.name, seq=8)
    reader = await eventlog.durable(spec, 3)
    assert reader.aged_out == 5
    items = await reader.fetch(10, timeout=1.0)
    assert [item.sequence for item, _ in items] == [8, 9, 10]
    # A consumer already past the removed history has nothing to report.
    assert (await eventlog.durable(spec, 9)).aged_out == 0


def test_event_ids_are_forgotten_past_the_dedupe_horizon(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path}/ingest.db")
    create_tables(engine, ingest_store.TABLES)
    horizon = ingest_store.DEDUPE
    saved = horizon.days, horizon.pruned_day
    try:
        horizon.days, horizon.pruned_day = 30, 0
        today = ingest_store.today()
        with Session(engine) as session:
            ingest_store.note_seen(session, "web", "old", today - 30)
            ingest_store.note_seen(session, "web", "edge", today - 29)
            ingest_store.note_seen(session, "web", "new", today)
            # Read before any pruning: the horizon decides, not the cleanup.
            horizon.pruned_day = today + 1
            assert ingest_store.seen_keys(session, "web", ["old", "edge", "new", "never"]) == {"edge", "new"}
            session.commit()
        with Session(engine) as session:
            # Seen again (accepted again past the horizon): it counts from today.
            ingest_store.note_seen(session, "web", "old", today)
            assert ingest_store.seen_keys(session, "web", ["old"]) == {"old"}
            session.commit()
        with Session(engine) as session:
            ingest_store.note_seen(session, "web", "ancient", today - 400)
            horizon.pruned_day = 0  # the day's pruning has not run yet in this process
            ingest_store.note_seen(session, "web", "fresh", today)
            ingest_store.write_seen(session)
            session.commit()
            kept = set(session.exec(select(ingest_store.SeenEventRow.record_key)).all())
            assert kept == {"edge", "new", "old", "fresh"}
        horizon.days = 0  # for ever
        with Session(engine) as session:
            ingest_store.note_seen(session, "web", "ancient", today - 4000)
            assert ingest_store.seen_keys(session, "web", ["ancient"]) == {"ancient"}
    finally:
        horizon.days, horizon.pruned_day = saved
        engine.dispose()


def test_the_collect_index_is_written_at_commit_and_pruned_with_the_stream(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path}/ingest.db")
    create_tables(engine, PRIVACY_TABLES)
    norm = Normaliser.make()
    try:
        with Session(engine) as session:
            for seq in range(1, 6):
                index_collect(session, seq, norm, [("cookie", f"ck-{seq}"), ("email", f"p{seq}@example.com")])
            assert session.exec(select(CollectIdentityRow)).all() == []  # not yet: one insert at commit
            session.commit()
        with Session(engine) as session:
            assert len(session.exec(select(CollectIdentityRow)).all()) == 10
            index_collect(session, 6, norm, [("cookie", "ck-6")])
            session.rollback()  # what a failed batch noted is forgotten with it
            session.commit()
            assert prune_collect_index(session, 4) == 6  # sequences 1-3 are gone from CDP_COLLECT
            session.commit()
            assert sorted({r.sequence for r in session.exec(select(CollectIdentityRow)).all()}) == [4, 5]
            rows = session.exec(select(CollectIdentityRow)).all()
            assert all("example.com" not in r.identity_hash for r in rows)  # keyed hashes only
    finally:
        engine.dispose()
