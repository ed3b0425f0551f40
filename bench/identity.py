"""Identity resolution throughput: records through the identity processor (decide, fold, SQL
store, fragments appended to JetStream) against scipy's connected_components on the same
edges, in the same run.

``python -m bench identity`` (1M records); ``CDP_BENCH_IDENTITY_RECORDS=100000`` for a quick run.
Records carry 3 identities each: a person's email, one of the person's 2 cookies and the
person's device id; people make 2.5 records on average, so graphs grow and merge as
cookies and devices recur. Ingest messages hold 100 records and the processor applies the
service's default ``CDP_BATCH_SIZE`` (256 messages: 25,600 records per SQL transaction;
``CDP_BENCH_IDENTITY_BATCH_MESSAGES`` changes it, e.g. 20 for 2,000-record transactions). The
rebuild figure drops a second store and rebuilds it from the same log (fold identity's own log,
then replay the input without deciding). Besides wall-clock rates, the CPU time of this process
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

from bench.common import Figure, nats_eventlog, report
from cdp.common.v1.envelope_pb2 import IdentityValue
from cdp.ingest.v1 import events_pb2 as ingest_ev
from cdp.ingest.v1 import ingest_pb2
from cdp_identity.main import build_processor
from cdp_identity.settings import IdentitySettings
from cdp_kit.envelope import Cause, deterministic_id, make_envelope
from cdp_kit.eventlog import EventLog
from cdp_kit.store import make_engine, sqlite_url
from cdp_kit.streams import INGEST_RECORDS

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
    n = len(recs)
    print(f"   processor CPU: {cpu:.1f} s, {cpu / n * 1e6:.0f} us/record ({n / cpu:,.0f} records per CPU second)")
    print(f"   rebuild CPU: {rebuild_cpu:.1f} s, {rebuild_cpu / n * 1e6:.0f} us/record")
    return [
        Figure(f"identity processor (SQLite + JetStream, batch {BATCH})", len(recs), seconds),
        Figure("rebuild: fold own log + replay input", len(recs), rebuild_seconds),
    ]


def run() -> None:
    n = int(os.environ.get("CDP_BENCH_IDENTITY_RECORDS", "1000000"))
    recs = identities(n)
    baseline = scipy_components(recs)
    service, rebuild = asyncio.run(through_service(recs))
    report(f"identity resolution, {n:,} records x 3 identities", baseline, [service, rebuild])
    print(f"   goal 20,000 records/s: {'met' if service.rate >= 20_000 else 'not met'} ({service.rate:,.0f}/s)")


if __name__ == "__main__":
    run()
