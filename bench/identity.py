"""Identity resolution throughput: records through the identity processor (decide, fold, SQL
store, fragments appended to JetStream) against scipy's connected_components on the same
edges, in the same run.

``python -m bench identity`` (1M records); ``CDP_BENCH_IDENTITY_RECORDS=100000`` for a quick run.
Records carry 3 identities each: a person's email, one of the person's 2 cookies and the
person's device id; people make 2.5 records on average, so graphs grow and merge as
cookies and devices recur. Ingest messages hold 100 records and the processor applies the
service's default ``CDP_BATCH_SIZE`` (256 messages: 25,600 records per SQL transaction;
``CDP_BENCH_IDENTITY_BATCH_MESSAGES`` changes it, e.g. 20 for 2,000-record transactions;
``CDP_BENCH_SEALING_ONLY=1`` runs only the crypto-shredding comparison, on
``CDP_BENCH_SEAL_RECORDS`` records). The
rebuild figure drops a second store and rebuilds it from the same log (fold identity's own log,
then replay the input without deciding). The floor figure runs the same input through the
same processor loop doing only what any design of the service must do per record, with no
graph: read, parse and normalise the record, look its identities up in an index and insert
the new ones, store a fragment row, and encode and append the fragment (``FloorHandler``).
Its CPU per record bounds what the service can reach here. Besides wall-clock rates, the CPU time of this process
(``time.process_time``: the processor, SQLite and the NATS client, not nats-server) is printed
per record, which the other work on a shared machine disturbs less.
"""

from __future__ import annotations

import asyncio
import os
import random
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
from scipy.sparse import coo_matrix  # type: ignore[import-untyped]
from scipy.sparse.csgraph import connected_components  # type: ignore[import-untyped]
from sqlmodel import Session

from bench.common import Figure, nats_eventlog, report
from cdp.common.v1.envelope_pb2 import IdentityValue
from cdp.identity.v1 import events_pb2 as ev
from cdp.ingest.v1 import events_pb2 as ingest_ev
from cdp.ingest.v1 import ingest_pb2
from cdp_identity import store
from cdp_identity.bulk import Bulk
from cdp_identity.consumer import RECORD_ACCEPTED, fragment_of
from cdp_identity.domain import Rules, profile_id_for, split_key
from cdp_identity.engine import Maker, Normaliser, kept_and_dropped, resolved
from cdp_identity.main import build_processor, collect_less_often, sqlite_cache
from cdp_identity.settings import IdentitySettings
from cdp_ingest.records import RecordBuilder
from cdp_kit.envelope import Causation, Cause, Envelope, deterministic_id, encode_batch, make_envelope
from cdp_kit.eventlog import EventLog, LogMessage
from cdp_kit.piikey import ephemeral_key
from cdp_kit.processor import Input, Processor, UnitOfWork
from cdp_kit.store import make_engine, sqlite_url
from cdp_kit.streams import IDENTITY_READS_INGEST, INGEST_RECORDS, PROFILE, OwnLog
from cdp_kit.telemetry import configure_pii_hash
from cdp_kit.vault import PersonVault

T0 = datetime(2026, 1, 1, tzinfo=UTC)
# Records per CDP_INGEST message.
PER_MESSAGE = 100
# CDP_BATCH_SIZE: messages per fetched batch, i.e. one SQL transaction; the service's default unless
# CDP_BENCH_IDENTITY_BATCH_MESSAGES says otherwise.
BATCH_MESSAGES = int(os.environ.get("CDP_BENCH_IDENTITY_BATCH_MESSAGES", str(IdentitySettings().batch_size)))
BATCH = PER_MESSAGE * BATCH_MESSAGES  # records per transaction


def identities(n: int, seed: int = 7) -> list[list[tuple[str, str]]]:
    rnd = random.Random(seed)
    people = max(1, int(n / 2.5))
    out = []
    for _ in range(n):
        p = rnd.randrange(people)
        out.append([("email", f"person{p}@example.com"), ("cookie", f"ck-{p}-{rnd.randrange(2)}"), ("gaid", f"g-{p}")])
    return out


async def publish(eventlog: EventLog, recs: list[list[tuple[str, str]]]) -> None:
    for start in range(0, len(recs), PER_MESSAGE):
        envs = []
        for i in range(start, min(start + PER_MESSAGE, len(recs))):
            rec = ingest_ev.RecordAccepted(
                record_id=f"r{i}",
                dataset="web",
                schema_class=ingest_pb2.SCHEMA_CLASS_EVENT,
                batch_id="bench",
                identities=[IdentityValue(namespace=ns, value=v) for ns, v in recs[i]],
                event_type="page_view",
            )
            at = T0 + timedelta(seconds=i)
            rec.occurred_at.FromDatetime(at)
            envs.append(
                make_envelope(
                    rec, event_id=deterministic_id("bench", i), subject_key="web", occurred_at=at, cause=Cause("b", i)
                )
            )
        await eventlog.append(INGEST_RECORDS.subject, envs, msg_id=envs[0].id)


# Where the floor appends its fragments: identity's stream, a subject of its own.
FLOOR_LOG = OwnLog("bench-identity-floor", PROFILE, "cdp.profile.0.bench-floor")


class FloorHandler:
    """Identity's per-record work without the graph, through the real processor loop (one SQL
    transaction per fetched batch, fragments appended one message in flight): parse and normalise
    each record (the service's normaliser and memo), look its identities up in the identity index
    in bulk, give it the profile of the first identity found (or a new one; no merges, guardrails
    or graph documents), insert index rows for new identities and a fragment row, and encode and
    append the fragment as the service does."""

    def __init__(self, rules: Rules) -> None:
        self.rules = rules
        self.normalise = Normaliser()
        self.parsed: dict[str, tuple[ingest_ev.RecordAccepted, list[str], list[ev.DroppedIdentity]]] = {}
        self.index: dict[str, str] = {}
        self.new_nodes: list[tuple[str, str]] = []
        self.fragments: list[tuple[str, str]] = []
        self._cause: Cause | None = None
        self._causation = Causation()

    def prefetch(self, session: Session, envelopes: list[Envelope]) -> None:
        keys: list[str] = []
        for env in envelopes:
            if env.type == RECORD_ACCEPTED:
                record = ingest_ev.RecordAccepted.FromString(env.payload.value)
                raw = [(i.namespace, i.value) for i in record.identities]
                kept, dropped = kept_and_dropped(self.rules, self.normalise, raw)
                self.parsed[env.id] = (record, kept, dropped)
                keys += kept
        self.index = dict(Bulk(session).select_in(store.NODE, ("key", "profile_id"), "key", keys))

    def observe(self, session: Session, msg: LogMessage, env: Envelope) -> None:
        """Nothing to keep."""

    def decide(self, uow: UnitOfWork, msg: LogMessage, env: Envelope) -> None:
        record, kept, dropped = self.parsed.pop(env.id)
        if not kept:
            return
        index = self.index
        pid = next((index[k] for k in kept if k in index), "") or profile_id_for(*split_key(kept[0]))
        for key in kept:
            if key not in index:
                index[key] = pid
                self.new_nodes.append((key, pid))
        self.fragments.append((kept[0], env.id))
        fragment = fragment_of(env.id, record)
        resolved(fragment, pid, kept, dropped)
        if uow.cause is not self._cause:  # one Causation per input message, as the service shares it
            self._cause, self._causation = uow.cause, uow.cause.to_proto()
        make = Maker(env.id, env.occurred_at, uow.cause, env.trace_context, self._causation)
        uow.emit_encoded(FLOOR_LOG, [make.encoded(fragment, pid, "fragment")], lambda session: None)

    def finish(self, session: Session) -> None:
        bulk = Bulk(session)
        bulk.insert(store.NODE, ("key", "profile_id"), sorted(self.new_nodes))
        bulk.insert(store.FRAGMENT, ("anchor", "source_event_id"), sorted(self.fragments))
        self.new_nodes, self.fragments = [], []


class NoFold:
    def fold(self, session: Session, own: OwnLog, env: Envelope) -> None:
        """The floor keeps nothing of its own events."""


async def floor(eventlog: EventLog, tmp: Path, n: int) -> Figure:
    engine = make_engine(sqlite_url(tmp / "floor.db"))
    sqlite_cache(engine)
    collect_less_often()
    processor = Processor(
        service="identity-floor",
        engine=engine,
        eventlog=eventlog,
        tables=[store.NODE, store.FRAGMENT],
        own_logs=[FLOOR_LOG],
        projection=NoFold(),
        inputs=[Input(IDENTITY_READS_INGEST, FloorHandler(IdentitySettings().rules()))],
        batch_size=BATCH_MESSAGES,
    )
    processor.create_store()
    started, cpu = time.perf_counter(), time.process_time()
    await processor.catch_up()
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    engine.dispose()
    print(f"   floor CPU: {cpu:.1f} s, {cpu / n * 1e6:.0f} us/record (the most one core allows: {n / cpu:,.0f}/s)")
    return Figure("floor: the same work without a graph", n, seconds)


def scipy_components(recs: list[list[tuple[str, str]]]) -> Figure:
    started = time.perf_counter()
    index: dict[str, int] = {}
    rows: list[int] = []
    cols: list[int] = []
    for rec in recs:
        ids = [index.setdefault(f"{ns}:{v}", len(index)) for ns, v in rec]
        for i, a in enumerate(ids):
            for b in ids[i + 1 :]:
                rows.append(a)
                cols.append(b)
    n = len(index)
    graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(n, n)).tocsr()
    count, _labels = connected_components(graph, directed=False)
    seconds = time.perf_counter() - started
    print(f"   scipy: {count:,} components over {n:,} identities and {len(rows):,} edges")
    return Figure("scipy connected_components (index + solve)", len(recs), seconds)


async def through_service(recs: list[list[tuple[str, str]]]) -> list[Figure]:
    async with nats_eventlog() as eventlog:
        await publish(eventlog, recs)
        with tempfile.TemporaryDirectory(prefix="cdp-bench-identity-") as tmp:
            engine = make_engine(sqlite_url(Path(tmp) / "identity.db"))
            settings = IdentitySettings(batch_size=BATCH_MESSAGES)
            processor, _ = build_processor(settings, engine, eventlog)
            processor.create_store()
            started, cpu = time.perf_counter(), time.process_time()
            await processor.catch_up()
            seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
            with engine.connect() as conn:
                profiles = conn.exec_driver_sql("select count(*) from identity_profile where merged_into = ''").scalar()
            print(f"   service: {profiles:,} live profiles")
            rebuilt_engine = make_engine(sqlite_url(Path(tmp) / "rebuilt.db"))
            rebuilt, _ = build_processor(settings, rebuilt_engine, eventlog)
            started, rebuild_cpu = time.perf_counter(), time.process_time()
            await rebuilt.rebuild()
            rebuild_seconds, rebuild_cpu = time.perf_counter() - started, time.process_time() - rebuild_cpu
            engine.dispose()
            rebuilt_engine.dispose()
            floor_figure = await floor(eventlog, Path(tmp), len(recs))
    n = len(recs)
    print(f"   processor CPU: {cpu:.1f} s, {cpu / n * 1e6:.0f} us/record ({n / cpu:,.0f} records per CPU second)")
    print(f"   rebuild CPU: {rebuild_cpu:.1f} s, {rebuild_cpu / n * 1e6:.0f} us/record")
    return [
        Figure(f"identity processor (SQLite + JetStream, batch {BATCH})", len(recs), seconds),
        Figure("rebuild: fold own log + replay input", len(recs), rebuild_seconds),
        floor_figure,
    ]


async def publish_sealed(eventlog: EventLog, recs: list[list[tuple[str, str]]]) -> None:
    """The records as ingest writes them with sealing on: identities and attributes sealed under
    per-identity keys made by a vault (``RecordBuilder``), the keys committed before the append."""
    vault = await PersonVault.bind(eventlog.js)
    builder = RecordBuilder("web", ingest_pb2.SCHEMA_CLASS_EVENT, "bench", T0, keys=vault)
    for start in range(0, len(recs), PER_MESSAGE):
        encoded = [
            builder.encode(
                record_id=f"r{i}",
                row=0,
                values={},
                identities=recs[i],
                occurred_at=T0 + timedelta(seconds=i),
                event_type="page_view",
            )
            for i in range(start, min(start + PER_MESSAGE, len(recs)))
        ]
        await vault.commit()
        await eventlog.append_raw(INGEST_RECORDS.subject, encode_batch(encoded, T0), msg_id=f"sealed-{start}")


async def sealed_or_not(recs: list[list[tuple[str, str]]], seal: bool) -> tuple[Figure, float]:
    """The identity processor on records sealed by ingest (and sealing its fragments), or on plain
    records with sealing off; a fresh nats-server and store each."""
    async with nats_eventlog() as eventlog:
        await (publish_sealed(eventlog, recs) if seal else publish(eventlog, recs))
        with tempfile.TemporaryDirectory(prefix="cdp-bench-identity-seal-") as tmp:
            engine = make_engine(sqlite_url(Path(tmp) / "identity.db"))
            settings = IdentitySettings(batch_size=BATCH_MESSAGES, seal_personal_data=seal)
            processor, _ = build_processor(settings, engine, eventlog)
            processor.create_store()
            started, cpu = time.perf_counter(), time.process_time()
            await processor.catch_up()
            seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
            engine.dispose()
    label = "on (records and fragments sealed)" if seal else "off"
    return Figure(f"identity processor, sealing {label}", len(recs), seconds), cpu


def run() -> None:
    configure_pii_hash(ephemeral_key())  # a service composition root would read the key file
    n = int(os.environ.get("CDP_BENCH_IDENTITY_RECORDS", "1000000"))
    if os.environ.get("CDP_BENCH_SEALING_ONLY", "") == "1":
        sealing(identities(int(os.environ.get("CDP_BENCH_SEAL_RECORDS", str(n)))))
        return
    recs = identities(n)
    baseline = scipy_components(recs)
    service, rebuild, floor_figure = asyncio.run(through_service(recs))
    report(f"identity resolution, {n:,} records x 3 identities", baseline, [service, rebuild, floor_figure])
    print(f"   the service runs at {service.rate / floor_figure.rate:.2f} of the floor's rate")
    print(f"   goal 20,000 records/s: {'met' if service.rate >= 20_000 else 'not met'} ({service.rate:,.0f}/s)")
    sealing(recs[: int(os.environ.get("CDP_BENCH_SEAL_RECORDS", str(n)))])


def sealing(recs: list[list[tuple[str, str]]]) -> None:
    """Crypto-shredding's cost (docs/privacy.md): the same records, sealing off then on."""
    off, off_cpu = asyncio.run(sealed_or_not(recs, seal=False))
    on, on_cpu = asyncio.run(sealed_or_not(recs, seal=True))
    report(f"identity: crypto-shredding, {len(recs):,} records x 3 identities (goal ratio >= 0.8)", off, [on])
    n = len(recs)
    print(
        f"   processor CPU: {off_cpu / n * 1e6:.0f} us/record off, {on_cpu / n * 1e6:.0f} on: "
        f"CPU ratio {off_cpu / on_cpu:.2f} (steadier than wall clock on a shared machine)"
    )


if __name__ == "__main__":
    run()
