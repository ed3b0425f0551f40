"""Ingest: a 1M-row CRM CSV validated and appended, vs a raw JetStream publish of the same
payloads; streaming events through the batched gRPC call and through ``cdp.collect.*``.

The service runs in this process (real gRPC on loopback, SQLite, nats-server); the streaming
publishers (``bench/ingest_client.py``) run in a process of their own, as event publishers do.
Two baselines publish, with ``publish_async`` and no guard, what ingest appended for the batch
(read back from the stream): each record's payload (its envelope) as one message, which is
what a pipeline without validation would send; and the very messages ingest appended, ~8,000
records packed in each, which is only the cost of moving the bytes.
``CDP_BENCH_ROWS`` (default 1,000,000) and ``CDP_BENCH_EVENTS`` (default 20,000) scale it;
``CDP_BENCH_SEALING_ONLY=1`` runs only the crypto-shredding comparison (``CDP_BENCH_SEAL_ROWS``
rows, plain NATS).
"""

from __future__ import annotations

import asyncio
import csv
import io
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import grpc
from google.protobuf import json_format

from bench.common import ABBA, BenchNats, Figure, bench_nats, report, report_security
from cdp.common.v1 import admin_pb2
from cdp.ingest.v1 import ingest_pb2 as pb
from cdp.ingest.v1 import ingest_pb2_grpc as pb_grpc
from cdp_cli.skeleton import CRM_SCHEMA, TIERS, WEB_SCHEMA
from cdp_ingest.main import build
from cdp_ingest.records import RECORD_TYPE
from cdp_ingest.settings import IngestSettings
from cdp_kit.envelope import decode_batch
from cdp_kit.eventlog import EventLog
from cdp_kit.grpc_auth import GRPC_LEAF, LocalSecrets, ServerTls, TokenTable, ensure_local_secrets
from cdp_kit.grpc_server import GrpcServer
from cdp_kit.piikey import ephemeral_key
from cdp_kit.processor import Processor, in_checkpoint
from cdp_kit.store import get_checkpoint, make_engine, sqlite_url
from cdp_kit.streams import INGEST_READS_COLLECT, INGEST_RECORDS, StreamSpec
from cdp_kit.telemetry import configure_pii_hash

ROWS = int(os.environ.get("CDP_BENCH_ROWS", "1000000"))
EVENTS = int(os.environ.get("CDP_BENCH_EVENTS", "20000"))
CHUNK = 256 * 1024
# The baselines publish into a stream of their own (file storage, like the service's), so the
# million messages they add do not weigh on the streams the service appends to afterwards.
RAW = StreamSpec("CDP_BENCH_RAW", ("bench.raw",), "baseline publishes")
RAW_SUBJECT = "bench.raw"


def crm_csv(rows: int) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["crm_id", "email", "first_name", "loyalty_tier", "lifetime_value", "country"])
    for i in range(1, rows + 1):
        writer.writerow(
            [f"C{i:07d}", f"person.{i}@example.com", f"Name{i}", TIERS[i % len(TIERS)], f"{i % 2500}.5", "FR"]
        )
    return out.getvalue().encode()


def chunks(data: bytes, key: str) -> Iterator[pb.IngestFileChunk]:
    yield pb.IngestFileChunk(header=pb.IngestFileHeader(dataset="crm", batch_key=key, format=pb.FILE_FORMAT_CSV))
    for start in range(0, len(data), CHUNK):
        yield pb.IngestFileChunk(data=data[start : start + CHUNK])


async def setup(stub: Any) -> None:
    for schema in (CRM_SCHEMA, WEB_SCHEMA):
        await stub.CreateSchema(pb.CreateSchemaRequest(schema=json_format.ParseDict(schema, pb.Schema())))
    for name, schema_name in (("crm", "crm_person"), ("web", "web_event")):
        await stub.CreateDataset(pb.CreateDatasetRequest(dataset=pb.Dataset(name=name, schema_name=schema_name)))


async def publish_each(log: EventLog, payloads: list[bytes], window: int = 20_000) -> None:
    """Every record's envelope as its own message, ``publish_async`` with acks awaited per window."""
    pending = []
    for message in payloads:
        for env in decode_batch(message):
            if env.type != RECORD_TYPE:
                continue
            pending.append(await log.js.publish_async(RAW_SUBJECT, env.SerializeToString()))
            if len(pending) >= window:
                await asyncio.gather(*pending)
                pending = []
    await asyncio.gather(*pending)


# Bytes the packed baseline keeps unacknowledged. nats-server answers 429 "too many requests"
# (10167) to publishes past a stream's inbound queue (128 MB in 2.11+): a 1M-row run's 490 MB
# published at once was refused in part and the benchmark hung.
BASELINE_WINDOW_BYTES = 64 * 1024 * 1024


async def publish_packed(log: EventLog, payloads: list[bytes]) -> None:
    """The packed messages again, ``publish_async`` with at most ``BASELINE_WINDOW_BYTES`` in flight."""
    pending: deque[tuple[asyncio.Future[Any], int]] = deque()
    in_flight = 0
    for payload in payloads:
        pending.append((await log.js.publish_async(RAW_SUBJECT, payload), len(payload)))
        in_flight += len(payload)
        while in_flight > BASELINE_WINDOW_BYTES:
            future, size = pending.popleft()
            await future
            in_flight -= size
    await asyncio.gather(*(future for future, _ in pending))


async def batch_figures(stub: Any, log: EventLog) -> tuple[Figure, Figure, Figure]:
    data = crm_csv(ROWS)
    first_seq = await log.last_sequence(INGEST_RECORDS.stream.name) + 1
    started, cpu = time.perf_counter(), time.process_time()
    result = await stub.IngestFile(chunks(data, "bench"))
    cpu = time.process_time() - cpu
    measured = Figure(
        "IngestFile CSV: parsed, validated, appended (rows)", result.rows_accepted, time.perf_counter() - started
    )
    assert result.rows_accepted == ROWS, result
    payloads = [m.data async for m in log.read(INGEST_RECORDS.stream.name, INGEST_RECORDS.subject, first_seq, batch=8)]
    started = time.perf_counter()
    await publish_packed(log, payloads)
    packed = Figure("raw publish_async of the same messages (rows)", ROWS, time.perf_counter() - started)
    started = time.perf_counter()
    await publish_each(log, payloads)
    each = Figure("raw publish_async of each record's payload (rows)", ROWS, time.perf_counter() - started)
    print(
        f"   {len(data) / 1e6:.1f} MB CSV in {len(payloads)} messages ({sum(map(len, payloads)) / 1e6:.1f} MB), "
        f"published again by the baseline with awaited acks; ingest took {measured.seconds:.1f}s "
        f"({cpu:.1f}s CPU of this process, on a shared machine: load {os.getloadavg()[0]:.1f})"
    )
    return packed, each, measured


async def publisher(*args: str | int, env: dict[str, str] | None = None) -> str:
    """Run ``bench.ingest_client`` (the publishers live in their own process); its output."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.ingest_client",
        *map(str, args),
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 600.0)
    except TimeoutError:
        proc.kill()
        raise RuntimeError(f"bench.ingest_client {args[0]} did not finish in 600 s") from None
    if proc.returncode != 0:
        raise RuntimeError(f"bench.ingest_client {args[0]} failed ({proc.returncode})")
    return out.decode()


async def streaming_figures(port: int, nats: BenchNats, processor: Processor) -> list[Figure]:
    seconds = float(await publisher("grpc", f"127.0.0.1:{port}", EVENTS, 0))
    grpc_figure = Figure("PublishEvents, 500 per call (events)", EVENTS, seconds)

    started_at, last = (await publisher("nats", nats.server.url, EVENTS, EVENTS, env=nats.env)).split()
    while True:
        with processor.read() as session:
            if get_checkpoint(session, in_checkpoint(INGEST_READS_COLLECT)) >= int(last):
                break
        await asyncio.sleep(0.01)
    nats_figure = Figure("cdp.collect.web -> validated on the log (events)", EVENTS, time.time() - float(started_at))
    return [grpc_figure, nats_figure]


async def security_figures(stubs: dict[str, Any], addresses: dict[str, str], local: LocalSecrets) -> None:
    """IngestFile and PublishEvents through the plaintext port and the TLS + token port."""
    data = crm_csv(ROWS)
    seconds: dict[str, float] = {"off": 0.0, "on": 0.0}
    for i, mode in enumerate(ABBA):
        started = time.perf_counter()
        result = await stubs[mode].IngestFile(chunks(data, f"bench-security-{i}"))
        seconds[mode] += time.perf_counter() - started
        assert result.rows_accepted == ROWS, result
    report(
        f"gRPC security: IngestFile, {ROWS:,}-row CRM CSV twice each way (goal ratio >= 0.9)",
        Figure("IngestFile, plaintext, no authentication (rows)", 2 * ROWS, seconds["off"]),
        [Figure("IngestFile, TLS + bearer token (rows)", 2 * ROWS, seconds["on"])],
    )
    seconds = {"off": 0.0, "on": 0.0}
    credentials = [str(local.pki.ca_cert), str(local.token_file("publisher"))]
    for i, mode in enumerate(ABBA):
        extra = credentials if mode == "on" else []
        seconds[mode] += float(await publisher("grpc", addresses[mode], EVENTS, (10 + i) * EVENTS, *extra))
    report(
        f"gRPC security: PublishEvents, {EVENTS:,} events twice each way (goal ratio >= 0.9)",
        Figure("PublishEvents, plaintext, no authentication (events)", 2 * EVENTS, seconds["off"]),
        [Figure("PublishEvents, TLS + publisher token (events)", 2 * EVENTS, seconds["on"])],
    )


SEAL_ROWS = int(os.environ.get("CDP_BENCH_SEAL_ROWS", str(ROWS)))
SEALING_ONLY = os.environ.get("CDP_BENCH_SEALING_ONLY", "") == "1"


async def sealing_figures(stub: Any, handlers: Any) -> None:
    """Crypto-shredding's cost (docs/privacy.md): the same service, IngestFile with sealing off and
    on, ABBA. The setting is CDP_SEAL_PERSONAL_DATA; here the service's key maker is switched."""
    vault = handlers.keys
    data = crm_csv(SEAL_ROWS)
    seconds: dict[str, float] = {"off": 0.0, "on": 0.0}
    for i, mode in enumerate(ABBA):
        handlers.keys = vault if mode == "on" else None
        started = time.perf_counter()
        result = await stub.IngestFile(chunks(data, f"bench-seal-{i}"))
        seconds[mode] += time.perf_counter() - started
        assert result.rows_accepted == SEAL_ROWS, result
    handlers.keys = vault
    report(
        f"ingest: crypto-shredding, IngestFile, {SEAL_ROWS:,}-row CRM CSV twice each way (goal ratio >= 0.8)",
        Figure("IngestFile, sealing off (rows)", 2 * SEAL_ROWS, seconds["off"]),
        [Figure("IngestFile, identities and attributes sealed (rows)", 2 * SEAL_ROWS, seconds["on"])],
    )


@dataclass
class Measured:
    packed: Figure
    each: Figure
    measured: Figure
    streaming: list[Figure]


async def measure(secure: bool) -> Measured | None:
    """Every figure against a fresh nats-server: plain and anonymous, or with TLS and the platform's
    users and permissions (the service connects as ``ingest``, the baselines as the admin, the
    NATS publisher as ``publisher``)."""
    with TemporaryDirectory(prefix="cdp-bench-ingest-") as tmp:
        async with bench_nats(secure, "ingest", Path(tmp)) as nats:
            settings = IngestSettings(
                nats_url=nats.server.url, data_dir=Path(tmp) / "data", store_url=sqlite_url(Path(tmp) / "i.db")
            )
            engine = make_engine(settings.store_url)
            log = nats.admin
            await log.ensure_streams((RAW,))
            service = build(settings, engine, nats.service)
            service.processor.create_store()
            runner = asyncio.create_task(service.processor.run())
            background = [asyncio.create_task(job()) for job in service.background]
            await service.processor.ready.wait()

            async def status() -> admin_pb2.ServiceStatus:
                return admin_pb2.ServiceStatus(service="ingest")

            server = GrpcServer("127.0.0.1", 0, service.registrations, status)
            port = await server.start()
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
            stub = pb_grpc.IngestServiceStub(channel)
            # The same service behind TLS and tokens, as cdp up runs it (gRPC security on vs off).
            local = ensure_local_secrets(Path(tmp) / "data")
            leaf = local.pki.leaf(GRPC_LEAF)
            secure_server = GrpcServer(
                "127.0.0.1",
                0,
                service.registrations,
                status,
                tls=ServerTls.load(leaf.cert, leaf.key),
                tokens=TokenTable.load(local.tokens_file),
            )
            secure_port = await secure_server.start()
            secure_channel = grpc.aio.secure_channel(
                f"127.0.0.1:{secure_port}", local.client("operator").channel_credentials()
            )
            stubs = {"off": stub, "on": pb_grpc.IngestServiceStub(secure_channel)}
            addresses = {"off": f"127.0.0.1:{port}", "on": f"127.0.0.1:{secure_port}"}
            try:
                await setup(stub)
                if SEALING_ONLY:
                    await sealing_figures(stub, service.registrations[0].servicer.handlers)
                    return None
                packed, each, measured = await batch_figures(stub, log)
                streaming = await streaming_figures(port, nats, service.processor)
                if not secure:  # gRPC's and sealing's costs once, on the plain NATS run
                    await security_figures(stubs, addresses, local)
                    await sealing_figures(stub, service.registrations[0].servicer.handlers)
                return Measured(packed, each, measured, streaming)
            finally:
                await channel.close(None)
                await secure_channel.close(None)
                await secure_server.stop(0)
                service.processor.stop()
                await server.stop(0)
                for task in (runner, *background):
                    task.cancel()
                await asyncio.gather(runner, *background, return_exceptions=True)
                engine.dispose()


async def main() -> None:
    title = f"ingest: {ROWS:,}-row CRM CSV (goal 50,000 rows/s, ratio 0.5)"
    if SEALING_ONLY:
        await measure(secure=False)
        return
    print("\n-- NATS security off (plain TCP, anonymous)")
    off = await measure(secure=False)
    print("\n-- NATS security on (TLS, per-service users and permissions)")
    on = await measure(secure=True)
    assert off is not None
    assert on is not None
    for label, figures in (("security off", off), ("security on", on)):
        report(f"{title}, {label}", figures.each, [figures.measured])
        report(f"{title}, {label}, against the packed messages", figures.packed, [figures.measured])
        report(f"ingest: streaming events, {label}", figures.each, figures.streaming)
    report_security("ingest", [off.measured, *off.streaming], [on.measured, *on.streaming])


def run() -> None:
    configure_pii_hash(ephemeral_key())  # a service composition root would read the key file
    asyncio.run(main())
