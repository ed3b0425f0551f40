"""Segmentation: streaming profile updates through the service with 50 active segments, and batch
SQL evaluation of 20 segments over many profiles and events, each against a Python baseline run
in the same process.

``python -m bench segmentation``. Sizes (environment):

* ``CDP_BENCH_SEG_UPDATES`` (default 50,000) fragments over ``CDP_BENCH_SEG_PROFILES`` (10,000)
  profiles, published on JetStream as identity does (``CDP_BENCH_SEG_PER_MESSAGE``, 100 a message)
  and applied by the segmentation processor (observe + decide + fold + append + commit). Baseline:
  the same updates kept in Python dicts and every segment evaluated after each update.
* ``CDP_BENCH_SEG_COMPUTED`` (default 0, at most 5): run the streaming benchmark again with that
  many computed attributes defined, against the run without them as the baseline.
* ``CDP_BENCH_SEG_BATCH_PROFILES`` (default 100,000) profiles with ``CDP_BENCH_SEG_BATCH_EVENTS``
  (1,000,000) events, written in bulk straight into a SQLite store; the 20 segments compiled to SQL
  and run inside the store, all in one query (``matching_all``) and, for comparison, one query each.
  Baseline: every profile read from the same store and evaluated in Python
  by the streaming evaluator. The issue's size is 1,000,000 / 10,000,000.
  ``CDP_BENCH_SEG_BATCH=0`` runs the streaming part only.

gRPC security on against off: after the streaming run, ``CDP_BENCH_SEG_READS`` (default 500)
``GetProfile`` calls and a ``ListMembers`` per segment go to the same servicer through a plaintext
port and through TLS with a reader's token, in the order off, on, on, off; the ratio on/off is
the cost of TLS and authentication on the service's small reads.

Streaming reports wall-clock rates and, less disturbed by the other work of a shared machine,
the CPU seconds per update of this process (``time.process_time``) for both runs.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlmodel import func, select

from bench.common import ABBA, Figure, bench_nats, grpc_on_and_off, report, report_security
from cdp.common.v1.envelope_pb2 import IdentityValue
from cdp.identity.v1 import events_pb2 as identity_ev
from cdp.segmentation.v1 import segmentation_pb2 as pb
from cdp.segmentation.v1 import segmentation_pb2_grpc as pb_grpc
from cdp_kit.envelope import Cause, deterministic_id, make_envelope
from cdp_kit.eventlog import EventLog
from cdp_kit.grpc_server import Registration
from cdp_kit.store import create_tables, make_engine, sqlite_url
from cdp_kit.streams import IDENTITY_FRAGMENTS
from cdp_segmentation import store
from cdp_segmentation.api import SegmentationServicer
from cdp_segmentation.evaluate import Event, ProfileData, matches
from cdp_segmentation.handlers import SegmentationHandlers
from cdp_segmentation.language import parse
from cdp_segmentation.main import build_processor
from cdp_segmentation.sql import FRAGMENT, IDENTITY, PROFILE, batch_session, matching, matching_all

T0 = datetime(2026, 6, 1, tzinfo=UTC)
T0_MS = int(T0.timestamp() * 1000)
TIERS = ["bronze", "silver", "gold", "platinum"]
COUNTRIES = ["FR", "DE", "ES", "IT", "US"]
CHANNELS = ["web", "store", "app"]
PAGES = ["shoes", "hats", "bags", "home"]


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, str(default)))


# ------------------------------------------------------------------------------- definitions
def streaming_definitions() -> dict[str, str]:
    """50 segments: attributes, windowed counts and sums, sequences, identities, consent, nesting."""
    defs: dict[str, str] = {}
    for i, tier in enumerate(TIERS):
        defs[f"tier_{tier}"] = f'tier = "{tier}"'
        defs[f"tier_{tier}_rich"] = f'tier = "{tier}" and lifetime_value >= {250 * (i + 1)}'
    for country in COUNTRIES:
        defs[f"country_{country.lower()}"] = f'country = "{country}"'
        defs[f"country_{country.lower()}_opt_in"] = f'country = "{country}" and consent email_marketing = "y"'
    for n, days in enumerate((1, 7, 30, 90, 365)):
        defs[f"buyer_{days}d"] = f"count(order) >= 1 within {days}d"
        defs[f"repeat_{days}d"] = f'count(order where channel = "store") >= {n + 2} within {days}d'
        defs[f"spender_{days}d"] = f"sum(order.total) > {100 * (n + 1)} within {days}d"
    for page in PAGES:
        defs[f"viewed_{page}"] = f'count(view where page = "{page}") >= 1 within 7d'
    defs["abandoner"] = "cart_add not followed by order within 1h"
    defs["converter"] = "cart_add followed by order within 1d"
    defs["lapsed"] = "count(order) = 0 within 180d and lifetime_value > 0"
    defs["has_email"] = "has email"
    defs["vip"] = "vip = true"
    defs["big_basket"] = "max(order.total) >= 400 within 30d"
    defs["cheap_basket"] = "min(order.total) < 20 within 30d"
    defs["avg_basket"] = "avg(order.total) >= 150 within 90d"
    defs["named_a"] = 'name starts_with "a"'
    defs["tagged_sale"] = 'tags contains "sale"'
    defs["gold_buyer"] = "in segment tier_gold and in segment buyer_30d"
    defs["gold_spender_fr"] = "in segment gold_buyer and in segment country_fr"
    defs["score_mid"] = "score >= 3 and score < 7"
    assert len(defs) == 50, len(defs)
    return defs


def batch_definitions() -> dict[str, str]:
    """20 segments of the batch kind: attributes, windowed aggregates, sequences."""
    defs = {
        "b_gold": 'tier = "gold"',
        "b_rich_fr": 'country = "FR" and lifetime_value >= 1000',
        "b_opt_in": 'consent email_marketing = "y" and has email',
        "b_tier_in": 'tier in ["gold", "platinum"] and not name starts_with "a"',
        "b_buyer_7d": "count(order) >= 1 within 7d",
        "b_store_2": 'count(order where channel = "store") >= 2 within 90d',
        "b_spender": "sum(order.total) > 500 within 365d",
        "b_shoes": 'count(view where page = "shoes") >= 1 within 7d',
        "b_no_order": "count(order) = 0 within 180d",
        "b_abandoner": "cart_add not followed by order within 1h",
        "b_converter": "cart_add followed by order within 1d",
        "b_big": "max(order.total) >= 400 within 30d",
        "b_cheap": "min(order.total) < 20 within 30d",
        "b_avg": "avg(order.total) >= 150 within 90d",
        "b_viewers": "count(view) >= 5",
        "b_vip_buyer": "vip = true and count(order) >= 1 within 30d",
        "b_quiet_gold": 'tier = "gold" and count(view) = 0 within 30d',
        "b_tagged": 'tags contains "sale" or score > 8',
        "b_q1": "count(order) >= 1 between 2026-01-01 and 2026-03-31",
        "b_web_spend": 'sum(order.total where channel = "web") >= 200 within 90d',
    }
    assert len(defs) == 20
    return defs


def attributes(rnd: random.Random, i: int) -> dict[str, Any]:
    return {
        "tier": rnd.choice(TIERS),
        "country": rnd.choice(COUNTRIES),
        "lifetime_value": rnd.randrange(0, 2500),
        "name": rnd.choice(["ann", "bob", "carl", "alice", "dora"]),
        "vip": rnd.random() < 0.1,
        "score": rnd.randrange(0, 10),
        "tags": rnd.sample(["sale", "new", "kids"], rnd.randrange(0, 3)),
        "consents": {"email_marketing": rnd.choice(["y", "n"])},
    }


def event_of(rnd: random.Random) -> tuple[str, dict[str, Any]]:
    kind = rnd.choices(["view", "order", "cart_add"], weights=[5, 2, 2])[0]
    if kind == "view":
        return kind, {"page": rnd.choice(PAGES), "channel": rnd.choice(CHANNELS)}
    if kind == "order":
        return kind, {"total": rnd.randrange(5, 500), "channel": rnd.choice(CHANNELS)}
    return kind, {"price": rnd.randrange(1, 200)}


# ------------------------------------------------------------------------------- streaming
def updates(n: int, profiles: int, seed: int = 11) -> list[identity_ev.ProfileFragment]:
    """n fragments in log order: a record first for each profile, then a mix of 1-3 attribute
    changes (30%) and events (70%) spread over the last 30 days of the clock."""
    rnd = random.Random(seed)
    out: list[identity_ev.ProfileFragment] = []
    started: set[int] = set()
    span_ms = 30 * 86_400_000
    for i in range(n):
        p = rnd.randrange(profiles)
        at = T0 - timedelta(milliseconds=span_ms - span_ms * i // max(n, 1))
        pid = f"p{p:07d}"
        if p not in started or rnd.random() < 0.3:
            full = attributes(rnd, p)
            attrs = full if p not in started else dict(rnd.sample(sorted(full.items()), rnd.randrange(1, 4)))
            frag = identity_ev.ProfileFragment(profile_id=pid, source_event_id=f"f{i}", dataset="crm", kind="record")
            frag.attributes.update(attrs)
            if p not in started:
                frag.identities.append(IdentityValue(namespace="crm_id", value=f"C{p}"))
                if p % 3:
                    frag.identities.append(IdentityValue(namespace="email", value=f"person{p}@example.com"))
            started.add(p)
        else:
            kind, fields = event_of(rnd)
            frag = identity_ev.ProfileFragment(
                profile_id=pid, source_event_id=f"f{i}", dataset="web", kind="event", event_type=kind
            )
            frag.attributes.update(fields)
        frag.occurred_at.FromDatetime(at)
        out.append(frag)
    return out


async def publish(eventlog: EventLog, frags: list[identity_ev.ProfileFragment], per_message: int) -> None:
    for start in range(0, len(frags), per_message):
        envs = [
            make_envelope(
                f,
                event_id=deterministic_id("bench-frag", f.source_event_id),
                subject_key=f.profile_id,
                occurred_at=T0,
                cause=Cause("identity-ingest", start + 1),
            )
            for f in frags[start : start + per_message]
        ]
        await eventlog.append(IDENTITY_FRAGMENTS.subject, envs, msg_id=f"bench-{start}")


def python_streaming(frags: list[identity_ev.ProfileFragment], asts: list[pb.Expression]) -> tuple[Figure, int]:
    """The baseline: profiles in dicts, every segment evaluated in Python after each update."""
    from google.protobuf import json_format

    started = time.perf_counter()
    attrs: dict[str, dict[str, Any]] = defaultdict(dict)
    evs: dict[str, list[Event]] = defaultdict(list)
    names: dict[str, set[str]] = defaultdict(set)
    inside: dict[str, set[int]] = defaultdict(set)
    changes = 0
    for frag in frags:
        pid = frag.profile_id
        fields = json_format.MessageToDict(frag.attributes)
        if frag.kind == "event":
            evs[pid].append(Event(frag.event_type, frag.occurred_at.ToMilliseconds(), fields))
        else:
            attrs[pid].update(fields)
        names[pid].update(i.namespace for i in frag.identities)
        data = ProfileData(attrs[pid], names[pid], set(), lambda pid=pid: evs[pid])  # type: ignore[misc]
        now = {i for i, ast in enumerate(asts) if matches(ast, data, T0_MS)}
        changes += len(now ^ inside[pid])
        inside[pid] = now
    return Figure("Python dicts, every segment after each update", len(frags), time.perf_counter() - started), changes


COMPUTED = {
    "orders_30d": "count(order) within 30d",
    "spend_90d": "sum(order.total) within 90d",
    "cheapest_7d": "min(order.total) within 7d",
    "biggest": "max(order.total)",
    "last_page": "most_recent(view.page) within 1d",
}


async def grpc_reads(handlers: SegmentationHandlers, profile_ids: list[str], segments: list[str]) -> None:
    """GetProfile and ListMembers through plaintext and through TLS + token (see the module docstring)."""
    name = pb.DESCRIPTOR.services_by_name["SegmentationService"].full_name
    servicer = SegmentationServicer(handlers, phone_region="US")
    registration = Registration(name, pb_grpc.add_SegmentationServiceServicer_to_server, servicer)
    async with grpc_on_and_off([registration], "reader") as channels:
        seconds = {"off": 0.0, "on": 0.0}
        calls = 0
        for mode in ABBA:
            stub = pb_grpc.SegmentationServiceStub(channels[mode])
            started = time.perf_counter()
            for pid in profile_ids:
                await stub.GetProfile(pb.GetProfileRequest(profile_id=pid))
            for segment in segments:
                await stub.ListMembers(pb.ListMembersRequest(segment=segment, limit=1000))
            seconds[mode] += time.perf_counter() - started
            calls = len(profile_ids) + len(segments)
    report(
        f"gRPC security: {calls:,} segmentation reads (GetProfile, ListMembers) twice each way (goal ratio >= 0.9)",
        Figure("plaintext, no authentication (calls)", 2 * calls, seconds["off"]),
        [Figure("TLS + reader token (calls)", 2 * calls, seconds["on"])],
    )


async def streaming(
    n: int, profiles: int, per_message: int, computed: int = 0, *, secure: bool = False
) -> tuple[Figure, int, int, float]:
    """The updates applied by the processor: (wall-clock figure, membership rows, messages on
    CDP_AUDIENCE, CPU seconds of this process while applying them). ``secure``: nats-server with
    TLS and the platform's users and permissions, the processor connected as ``segmentation`` and
    the fragments published by the admin (in identity's place)."""
    frags = updates(n, profiles)
    with tempfile.TemporaryDirectory(prefix="cdp-bench-seg-") as tmp:
        async with bench_nats(secure, "segmentation", Path(tmp)) as nats:
            eventlog = nats.service
            engine = make_engine(sqlite_url(Path(tmp) / "segmentation.db"))
            processor, catalog = build_processor(engine, eventlog)
            processor.create_store()
            await processor.recover()
            handlers = SegmentationHandlers(processor, catalog)
            await handlers.tick(T0)
            for name, function in list(COMPUTED.items())[:computed]:
                await handlers.create_computed(name, function)
            for name, query in streaming_definitions().items():
                await handlers.create_segment(name, query)
            await publish(nats.admin, frags, per_message)
            started, cpu = time.perf_counter(), time.process_time()
            await processor.catch_up()
            seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
            with processor.read() as session:
                memberships = int(session.exec(select(func.count()).select_from(store.MembershipRow)).one())
                changes = await eventlog.last_sequence("CDP_AUDIENCE")
            reads = env_int("CDP_BENCH_SEG_READS", 500)
            if reads and not computed and not secure:  # gRPC's cost once, on the plain NATS run
                sample = list(dict.fromkeys(f.profile_id for f in frags))[:reads]
                await grpc_reads(handlers, sample, list(streaming_definitions())[:10])
            engine.dispose()
    return Figure("segmentation processor (SQLite + JetStream)", n, seconds), memberships, changes, cpu


# ------------------------------------------------------------------------------- batch
def bulk_rows(profiles: int, events: int, seed: int = 5) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """(table, rows) chunks: profiles with attributes and identities, then events spread over a year."""
    rnd = random.Random(seed)
    chunk = 20_000
    for start in range(0, profiles, chunk):
        rows, idents = [], []
        for p in range(start, min(start + chunk, profiles)):
            pid = f"p{p:08d}"
            attrs = json.dumps(attributes(rnd, p))
            rows.append({"profile_id": pid, "attributes": attrs, "sources": "{}", "events": 0, "computed": "{}"})
            idents.append({"namespace": "crm_id", "value": f"C{p}", "profile_id": pid})
            if p % 3:
                idents.append({"namespace": "email", "value": f"person{p}@example.com", "profile_id": pid})
        yield "profile", rows
        yield "identity", idents
    year_ms = 365 * 86_400_000
    for start in range(0, events, chunk * 5):
        rows = []
        for e in range(start, min(start + chunk * 5, events)):
            kind, fields = event_of(rnd)
            rows.append(
                {
                    "source_event_id": f"e{e:09d}",
                    "profile_id": f"p{rnd.randrange(profiles):08d}",
                    "dataset": "web",
                    "kind": "event",
                    "event_type": kind,
                    "ts_ms": T0_MS - rnd.randrange(year_ms),
                    "seq": e,
                    "pos": 0,
                    "attributes": json.dumps(fields),
                }
            )
        yield "fragment", rows


def load_store(engine: sa.Engine, profiles: int, events: int) -> float:
    """Bulk inserts (executemany of the raw DB-API) into the service's own tables."""
    started = time.perf_counter()
    tables = {"profile": PROFILE, "identity": IDENTITY, "fragment": FRAGMENT}
    with engine.begin() as conn:
        for table, rows in bulk_rows(profiles, events):
            conn.exec_driver_sql(_insert_sql(tables[table], rows[0]), [tuple(r.values()) for r in rows])
        conn.execute(
            sa.text("INSERT INTO seg_state (key, value) VALUES ('clock', :v)"), {"v": json.dumps({"ms": T0_MS})}
        )
    with engine.begin() as conn:
        conn.exec_driver_sql("ANALYZE")
    return time.perf_counter() - started


def _insert_sql(table: sa.Table, row: dict[str, Any]) -> str:
    columns = list(row)
    return f"INSERT INTO {table.name} ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)})"


def known_segments(defs: dict[str, str]) -> dict[str, pb.Segment]:
    return {
        deterministic_id("segment", name): pb.Segment(id=deterministic_id("segment", name), name=name, ast=parse(q))
        for name, q in defs.items()
    }


def sql_batch(engine: sa.Engine, segments: dict[str, pb.Segment], profiles: int) -> tuple[Figure, dict[str, int]]:
    """The service's batch query for all 20 segments at once (``matching_all``: one grouped pass
    over the events for every segment's aggregates), in a session with the batch pragmas."""
    started = time.perf_counter()
    with engine.connect() as conn:
        batch_session(conn)
        found = matching_all(conn, {s.name: s.ast for s in segments.values()}, T0_MS, segments)
    sizes = {name: len(ids) for name, ids in found.items()}
    seconds = time.perf_counter() - started
    return Figure("SQL in the store, one query for 20 segments", profiles, seconds), sizes


def sql_per_segment(engine: sa.Engine, segments: dict[str, pb.Segment], profiles: int) -> tuple[Figure, dict[str, int]]:
    """The previous way: one query (with its own passes over the events) per segment."""
    sizes: dict[str, int] = {}
    started = time.perf_counter()
    with engine.connect() as conn:
        for segment in segments.values():
            sizes[segment.name] = len(matching(conn, segment.ast, T0_MS, segments))
    seconds = time.perf_counter() - started
    return Figure("SQL in the store, one query per segment", profiles, seconds), sizes


def python_batch(engine: sa.Engine, segments: dict[str, pb.Segment], profiles: int) -> tuple[Figure, dict[str, int]]:
    """The baseline: every profile (attributes, identities, events) read from the same store in
    profile order and evaluated by the streaming evaluator in Python."""
    sizes = dict.fromkeys((s.name for s in segments.values()), 0)
    started = time.perf_counter()
    with engine.connect() as conn:
        idents: dict[str, set[str]] = defaultdict(set)
        for pid, ns in conn.exec_driver_sql("SELECT profile_id, namespace FROM seg_profile_identity"):
            idents[pid].add(ns)
        events = conn.exec_driver_sql(
            "SELECT profile_id, event_type, ts_ms, attributes FROM seg_fragment WHERE kind = 'event' "
            "ORDER BY profile_id"
        )
        pending = next(events, None)
        for pid, attrs in conn.exec_driver_sql("SELECT profile_id, attributes FROM seg_profile ORDER BY profile_id"):
            mine: list[Event] = []
            while pending is not None and pending[0] <= pid:
                if pending[0] == pid:
                    mine.append(Event(pending[1], int(pending[2]), json.loads(pending[3])))
                pending = next(events, None)
            data = ProfileData(json.loads(attrs), idents.get(pid, set()), set(), lambda mine=mine: mine)  # type: ignore[misc]
            for segment in segments.values():
                if matches(segment.ast, data, T0_MS):
                    sizes[segment.name] += 1
    seconds = time.perf_counter() - started
    return Figure("Python, one bulk scan of the store", profiles, seconds), sizes


def python_per_profile(engine: sa.Engine, segments: dict[str, pb.Segment], sample: int) -> Figure:
    """The second baseline: each profile read by the store's own per-profile queries (what the
    streaming evaluator does for one profile) and evaluated in Python; on the first ``sample`` profiles."""
    from sqlmodel import Session, col

    from cdp_segmentation.membership import profile_data
    from cdp_segmentation.store import ProfileRow

    started = time.perf_counter()
    with Session(engine) as session:
        rows = session.exec(select(ProfileRow).order_by(col(ProfileRow.profile_id)).limit(sample)).all()
        for row in rows:
            data = profile_data(session, row)
            for segment in segments.values():
                matches(segment.ast, data, T0_MS)
    seconds = time.perf_counter() - started
    return Figure(f"Python, each profile queried ({sample:,} profiles)", sample, seconds)


def batch(profiles: int, events: int) -> None:
    segments = known_segments(batch_definitions())
    with tempfile.TemporaryDirectory(prefix="cdp-bench-seg-batch-") as tmp:
        engine = make_engine(sqlite_url(Path(tmp) / "segmentation.db"))
        create_tables(engine, store.TABLES)
        loaded = load_store(engine, profiles, events)
        print(f"\n   loaded {profiles:,} profiles and {events:,} events into SQLite in {loaded:.1f} s")
        sql_figure, sql_sizes = sql_batch(engine, segments, profiles)
        old_figure, old_sizes = sql_per_segment(engine, segments, profiles)
        assert old_sizes == sql_sizes, (old_sizes, sql_sizes)
        py_figure, py_sizes = python_batch(engine, segments, profiles)
        each_figure = python_per_profile(engine, segments, min(profiles, env_int("CDP_BENCH_SEG_SAMPLE", 20_000)))
        engine.dispose()
    title = f"batch evaluation, {profiles:,} profiles, {events:,} events, {len(segments)} segments"
    report(title, each_figure, [py_figure, old_figure, sql_figure])
    print(
        f"   SQL: {sql_figure.seconds:.1f} s for {profiles:,} profiles (goal < 60 s at 1M/10M; "
        f"one query per segment: {old_figure.seconds:.1f} s); "
        f"Python bulk scan: {py_figure.seconds:.1f} s ({py_figure.seconds / sql_figure.seconds:.1f}x slower); "
        f"Python querying each profile: {profiles / each_figure.rate:.1f} s at its measured rate "
        f"({sql_figure.rate / each_figure.rate:.1f}x slower; goal >= 10x)"
    )
    assert sql_sizes == py_sizes, (sql_sizes, py_sizes)
    print("   sizes agree: " + ", ".join(f"{k}={v:,}" for k, v in sorted(sql_sizes.items())))


def run() -> None:
    n = env_int("CDP_BENCH_SEG_UPDATES", 50_000)
    profiles = env_int("CDP_BENCH_SEG_PROFILES", 10_000)
    per_message = env_int("CDP_BENCH_SEG_PER_MESSAGE", 100)
    asts = [parse(q) for q in streaming_definitions().values() if "in segment" not in q]
    frags = updates(n, profiles)
    cpu = time.process_time()
    baseline, _ = python_streaming(frags, asts)
    baseline_cpu = time.process_time() - cpu
    figure, memberships, log_messages, figure_cpu = asyncio.run(streaming(n, profiles, per_message))
    report(f"streaming, {n:,} profile updates over {profiles:,} profiles, 50 segments", baseline, [figure])
    print(
        f"   CPU per update: processor {figure_cpu / n * 1e6:.0f} us ({n / figure_cpu:,.0f} updates per CPU second), "
        f"Python dicts {baseline_cpu / n * 1e6:.0f} us; CPU ratio {baseline_cpu / figure_cpu:.2f}"
    )
    print(f"   {memberships:,} membership rows; {log_messages:,} messages on CDP_AUDIENCE")
    print(f"   goal 10,000 updates/s: {'met' if figure.rate >= 10_000 else 'not met'} ({figure.rate:,.0f}/s)")
    secured, secured_memberships, _, _ = asyncio.run(streaming(n, profiles, per_message, secure=True))
    assert secured_memberships == memberships, (secured_memberships, memberships)
    report_security("segmentation streaming", [figure], [secured])
    computed = env_int("CDP_BENCH_SEG_COMPUTED", 0)  # also kept up to date: that many computed attributes
    if computed:
        with_computed, _, _, _ = asyncio.run(streaming(n, profiles, per_message, computed))
        with_computed = Figure(f"the same with {computed} computed attributes", n, with_computed.seconds)
        report(f"streaming with {computed} computed attributes kept up to date", figure, [with_computed])
    if env_int("CDP_BENCH_SEG_BATCH", 1):
        batch(env_int("CDP_BENCH_SEG_BATCH_PROFILES", 100_000), env_int("CDP_BENCH_SEG_BATCH_EVENTS", 1_000_000))


if __name__ == "__main__":
    run()
