"""Lookup: ``GetProfile`` by cookie (the personalisation call) against a store of 100,000
profiles, open loop at 1,000 calls/s and closed loop with 8, 16 and 32 callers, vs the gRPC
health check of the same server under the same load (a round trip that reads no store).

The stack is the CLI's (``cdp_cli.stack.Stack``) with ingest, identity and segmentation (the
lookup needs no activation); the profiles are a CSV of ``CDP_BENCH_LOOKUP_PROFILES`` rows
(default 100,000; ``crm_id`` and ``cookie_id`` identities and two attributes) ingested with
``IngestFile`` and waited for in segmentation, until every service has applied all its input.
A call that fails (e.g. a 5 s timeout, under overload) counts in the percentiles with the time it
waited, and the failures are printed. The callers run in a process of their own
(``bench/lookup_client.py``); each load lasts ``CDP_BENCH_LOOKUP_SECONDS`` (default 10) for the
lookup and again for its baseline. ``CDP_BENCH_LOOKUP_RATE`` (default 1,000) sets the open
loop's rate, ``CDP_BENCH_LOOKUP_TIMEOUT_S`` (default 1,200) bounds the whole run.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.connect import client, use_stack
from bench.e2e import global_timeout, percentile
from cdp.common.v1 import admin_pb2
from cdp.ingest.v1 import ingest_pb2 as ing
from cdp.segmentation.v1 import segmentation_pb2 as seg
from cdp_cli.client import Client
from cdp_cli.skeleton import ensure_datasets, retrying
from cdp_cli.stack import Stack

PROFILES = int(os.environ.get("CDP_BENCH_LOOKUP_PROFILES", "100000"))
SECONDS = float(os.environ.get("CDP_BENCH_LOOKUP_SECONDS", "10"))
RATE = int(os.environ.get("CDP_BENCH_LOOKUP_RATE", "1000"))
TIMEOUT_S = float(os.environ.get("CDP_BENCH_LOOKUP_TIMEOUT_S", "1200"))
CALLERS = (8, 16, 32)
SERVICES = ("ingest", "identity", "segmentation")
GOAL_P99_S, GOAL_CLOSED = 0.010, 3_000
CHUNK = 256 * 1024
SCHEMA = {
    "name": "bench_visitor",
    "schema_class": "SCHEMA_CLASS_PROFILE",
    "fields": [
        {"name": "crm_id", "type": "FIELD_TYPE_STRING", "required": True, "identity_namespace": "crm_id"},
        {"name": "cookie_id", "type": "FIELD_TYPE_STRING", "identity_namespace": "cookie"},
        {"name": "first_name", "type": "FIELD_TYPE_STRING"},
        {"name": "tier", "type": "FIELD_TYPE_STRING"},
    ],
}


def visitors_csv(rows: int) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["crm_id", "cookie_id", "first_name", "tier"])
    for i in range(rows):
        writer.writerow([f"V{i:07d}", f"ck-{i}", f"Name{i}", ("gold", "silver", "bronze")[i % 3]])
    return out.getvalue().encode()


def load_profiles(cdp: Client) -> float:
    """Ingest the visitors and wait (bounded) until segmentation holds each as a profile; seconds taken."""
    return load_csv(cdp, "visitors", SCHEMA, visitors_csv(PROFILES), PROFILES, SERVICES)


def load_csv(
    cdp: Client, dataset: str, schema: dict[str, Any], data: bytes, rows: int, services: tuple[str, ...]
) -> float:
    """Ingest a CSV of ``rows`` profiles into ``dataset`` (made with ``schema`` if missing) with
    ``IngestFile`` and wait (bounded) until segmentation holds them all and every one of
    ``services`` has applied all its input; seconds taken."""
    ensure_datasets(cdp, {dataset: schema})
    header = ing.IngestFileHeader(dataset=dataset, batch_key=f"bench-{dataset}", format=ing.FILE_FORMAT_CSV)

    def chunks() -> Iterator[ing.IngestFileChunk]:
        yield ing.IngestFileChunk(header=header)
        for start in range(0, len(data), CHUNK):
            yield ing.IngestFileChunk(data=data[start : start + CHUNK])

    started = time.monotonic()
    result = cdp.ingest.IngestFile(chunks(), timeout=max(600.0, rows / 500))
    if result.rows_accepted != rows:
        raise RuntimeError(f"ingest accepted {result.rows_accepted} of {rows} rows ({result.failure})")
    deadline = started + max(120.0, rows / 100)
    while True:
        stats = retrying(lambda: cdp.segmentation.GetStats(seg.GetStatsRequest()))
        if stats.profiles >= rows and settled(cdp, services):
            return time.monotonic() - started
        if time.monotonic() > deadline:
            raise TimeoutError(f"segmentation holds {stats.profiles} of {rows} profiles in time")
        time.sleep(1.0)


def settled(cdp: Client, services: tuple[str, ...] = SERVICES) -> bool:
    """Every consumer of every service has applied its input to the end (nothing left in the background)."""
    for service in services:
        reply = retrying(lambda: cdp.admin(service).GetStatus(admin_pb2.GetStatusRequest()))  # noqa: B023
        if not reply.ready or any(c.lag for c in reply.consumers):
            return False
    return True


def callers(address: str, call: str, mode: str, n: int) -> dict[str, Any]:
    """Run the load process (bounded); its figures."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.lookup_client", address, call, mode, str(n), str(SECONDS), str(PROFILES)],
        capture_output=True,
        timeout=SECONDS + 120.0,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"bench.lookup_client failed ({done.returncode}): {done.stderr.decode()[-2000:]}")
    figures: dict[str, Any] = json.loads(done.stdout.decode().strip().splitlines()[-1])
    return figures


def line(label: str, figures: dict[str, Any]) -> str:
    lat = figures["latencies"]
    rate = figures["answered"] / figures["seconds"]
    cells = " ".join(f"{percentile(lat, q) * 1e3:8.2f} ms" for q in (50, 95, 99))
    codes = ", ".join(f"{n} {code}" for code, n in sorted(figures["codes"].items()))
    errors = f"   failed: {codes} ({figures['first_error'][:80]})" if figures["errors"] else ""
    return f"   {label:<44} {cells} {rate:>10,.0f}/s{errors}"


def main() -> None:
    with (
        tempfile.TemporaryDirectory(prefix="cdp-bench-lookup-") as tmp,
        Stack(Path(tmp) / "cdp", services=SERVICES, ready_timeout_s=120.0) as stack,
        client(stack.data_dir, stack.addresses, timeout_s=60.0) as cdp,
    ):
        use_stack(stack.data_dir)
        took = load_profiles(cdp)
        address = stack.addresses["segmentation"]
        print(f"\n== lookup: GetProfile by cookie, {PROFILES:,} profiles (loaded and settled in {took:.0f}s)")
        print(f"   {'':<44} {'p50':>11} {'p95':>11} {'p99':>11} {'calls':>12}")
        results: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
        loads = [("open", RATE), *(("closed", n) for n in CALLERS)]
        for mode, n in loads:
            label = f"open loop {n:,}/s" if mode == "open" else f"closed loop, {n} callers"
            baseline = callers(address, "health", mode, n)
            measured = callers(address, "profile", mode, n)
            print(line(f"{label}: health (baseline)", baseline))
            print(line(f"{label}: GetProfile", measured))
            ratio = (measured["answered"] / measured["seconds"]) / max(1e-9, baseline["answered"] / baseline["seconds"])
            p99 = percentile(measured["latencies"], 99) / max(1e-9, percentile(baseline["latencies"], 99))
            print(f"   {'':<44} ratio p99 {p99:.1f}, calls/s {ratio:.2f}")
            results.append((label, baseline, measured))
        opened = results[0][2]
        widest = results[-1][2]
        p99 = percentile(opened["latencies"], 99)
        rate = widest["answered"] / widest["seconds"]
        print(
            f"   goal p99 < {GOAL_P99_S * 1e3:g} ms at {RATE:,}/s: {'meets' if p99 < GOAL_P99_S else 'MISSES'} "
            f"({p99 * 1e3:.1f} ms)"
        )
        print(
            f"   goal >= {GOAL_CLOSED:,} lookups/s with {CALLERS[-1]} callers: "
            f"{'meets' if rate >= GOAL_CLOSED else 'MISSES'} ({rate:,.0f}/s)"
        )
        failed = sum(m["errors"] for _, _, m in results)
        print(f"   (load {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; {failed} failed lookups)")


def run() -> None:
    with global_timeout(TIMEOUT_S):
        main()
