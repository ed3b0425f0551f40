"""What splitting identity into a resolver and a projector could reach on this machine: the two
halves' least work, run at the same time in two processes on one nats-server.

``python -m bench identity_split`` (1M records; ``CDP_BENCH_IDENTITY_RECORDS`` changes it). The
records are ``bench.identity``'s. This process publishes them and runs the identity processor
over them once (the baseline, and it leaves identity's own log). Then two child processes start
together on the same server:

* ``resolver``: the floor of ``bench.identity`` (``FloorHandler``): parse, normalise, index
  lookups and inserts, fragment rows, fragments encoded and appended, with no deciding at all.
  A real resolver does this and decides too.
* ``projector``: a rebuild of a fresh store from identity's own log (folding fragments, merges and
  decisions into graph documents) and the input replayed without deciding.

Each prints its wall time and CPU per record. A split service runs no faster than its slower
half, so the split's rate here is an upper bound for that design.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

from bench.common import Figure, report
from bench.identity import BATCH_MESSAGES, floor, identities, publish
from cdp_identity.main import build_processor
from cdp_identity.settings import IdentitySettings
from cdp_kit.eventlog import EventLog
from cdp_kit.natsserver import NatsServer
from cdp_kit.piikey import ephemeral_key
from cdp_kit.store import make_engine, sqlite_url
from cdp_kit.telemetry import configure_pii_hash

HALVES = ("resolver", "projector")


async def run_processor(eventlog: EventLog, db: Path, *, rebuild: bool) -> None:
    engine = make_engine(sqlite_url(db))
    processor, _ = build_processor(IdentitySettings(batch_size=BATCH_MESSAGES), engine, eventlog)
    try:
        if rebuild:
            await processor.rebuild()
        else:
            processor.create_store()
            await processor.catch_up()
    finally:
        engine.dispose()


async def half(name: str, url: str, tmp: Path, n: int) -> None:
    """One child process: one half's work; prints ``name seconds cpu``."""
    eventlog = await EventLog.connect(url, f"bench-{name}")
    try:
        started, cpu = time.perf_counter(), time.process_time()
        if name == "resolver":
            await floor(eventlog, tmp, n)
        else:
            await run_processor(eventlog, tmp / "projected.db", rebuild=True)
        print(f"{name} {time.perf_counter() - started} {time.process_time() - cpu}", flush=True)
    finally:
        await eventlog.close()


async def measure(n: int) -> list[Figure]:
    with tempfile.TemporaryDirectory(prefix="cdp-bench-split-") as tmp, NatsServer(Path(tmp) / "js") as server:
        eventlog = await EventLog.connect(server.url, "cdp-bench")
        try:
            await eventlog.ensure_streams()
            await publish(eventlog, identities(n))
            started = time.perf_counter()
            await run_processor(eventlog, Path(tmp) / "identity.db", rebuild=False)
            alone = Figure("identity processor, alone (one process)", n, time.perf_counter() - started)
        finally:
            await eventlog.close()
        children = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bench.identity_split",
                name,
                server.url,
                tmp,
                str(n),
                stdout=asyncio.subprocess.PIPE,
            )
            for name in HALVES
        ]
        outputs = await asyncio.gather(*(child.communicate() for child in children))
    figures = [alone]
    for name, child, (out, _) in zip(HALVES, children, outputs, strict=True):
        if child.returncode != 0:
            raise RuntimeError(f"the {name} half of the split failed (exit {child.returncode})")
        [line] = [x for x in out.decode().splitlines() if x.startswith(f"{name} ")]
        seconds, cpu = map(float, line.split()[1:])
        print(f"   {name}: {cpu / n * 1e6:.0f} us CPU/record while the other half ran")
        figures.append(Figure(f"{name} half, beside the other", n, seconds))
    slower = max(figures[1:], key=lambda f: f.seconds)
    figures.append(Figure("split: the slower half bounds it", n, slower.seconds))
    return figures


def run() -> None:
    configure_pii_hash(ephemeral_key())  # a service composition root would read the key file
    n = int(os.environ.get("CDP_BENCH_IDENTITY_RECORDS", "1000000"))
    alone, *halves = asyncio.run(measure(n))
    report(f"identity resolver/projector split, {n:,} records x 3 identities", alone, halves)


if __name__ == "__main__":
    if len(sys.argv) == 5:
        configure_pii_hash(ephemeral_key())
        asyncio.run(half(sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])))
    else:
        run()
