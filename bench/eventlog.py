"""The event log: guarded, de-duplicated appends of event batches vs raw JetStream publishes.

Both sides publish the same serialized bytes to the same stream; the baseline is
``js.publish_async`` with no guard (pipelined), the measured path is ``EventLog.append``
(one awaited append per cause, guarded by the expected subject sequence, as services do).

Then the cost of the ``always`` durability profile (``sync_interval: always``: an fsync before
every acknowledgement) against the default (an fsync every 2 minutes), on one server and on a
3-node cluster with the stream at R3, in the same run: the same guarded appends and the same
pipelined publishes on a fresh server (or cluster) per profile, in the order default, always,
always, default (the best of each kept). ``CDP_BENCH_DURABILITY_MESSAGES`` sets the messages
per round (default 1,000, each of ``EVENTS_PER_MESSAGE`` events); ``CDP_BENCH_DURABILITY_DIR``
where the stores live (default: the system's temporary folder; fsync costs what that disk costs).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from tempfile import TemporaryDirectory

from bench.common import Figure, best_of, nats_eventlog, report
from cdp.common.v1.envelope_pb2 import IdentityValue
from cdp_kit.envelope import Cause, Envelope, deterministic_id, encode_batch, make_envelope
from cdp_kit.eventlog import EventLog
from cdp_kit.natsserver import ALWAYS, DEFAULT_DURABILITY, NatsCluster, NatsServer, durability_config
from cdp_kit.streams import INGEST

EVENTS_PER_MESSAGE = 100
MESSAGES = 300
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def batch(n: int) -> list[Envelope]:
    return [
        make_envelope(
            IdentityValue(namespace="email", value=f"user{n}-{i}@example.com"),
            event_id=deterministic_id("bench", n, i),
            subject_key="bench",
            occurred_at=T0,
            cause=Cause(command_id=str(n)),
        )
        for i in range(EVENTS_PER_MESSAGE)
    ]


async def main() -> None:
    batches = [batch(n) for n in range(MESSAGES)]
    payloads = [encode_batch(b, T0) for b in batches]
    async with nats_eventlog() as log:
        round_no = 0

        async def raw() -> None:
            nonlocal round_no
            round_no += 1
            futures = [await log.js.publish_async(f"cdp.ingest.9.raw{round_no}", p) for p in payloads]
            await asyncio.gather(*futures)

        async def guarded() -> None:
            nonlocal round_no
            round_no += 1
            subject = f"cdp.ingest.8.guarded{round_no}"
            expected = 0
            for n, events in enumerate(batches):
                appended = await log.append(
                    subject, events, msg_id=f"{subject}:{n}", expected_last_subject_sequence=expected
                )
                expected = appended.sequence

        items = MESSAGES * EVENTS_PER_MESSAGE
        baseline = await best_of(3, "raw publish_async, no guard (events)", items, raw)
        measured = [await best_of(3, "EventLog.append, guarded + msg id (events)", items, guarded)]
    report("event log append", baseline, measured)
    figure = measured[0]
    print(f"   {figure.items} events in {MESSAGES} messages: {figure.seconds:.2f}s")


DURABILITY_MESSAGES = int(os.environ.get("CDP_BENCH_DURABILITY_MESSAGES", "1000"))
PROFILE_ORDER = (DEFAULT_DURABILITY, ALWAYS, ALWAYS, DEFAULT_DURABILITY)


@contextlib.asynccontextmanager
async def nats_with(durability: str, nodes: int, root: Path) -> AsyncIterator[EventLog]:
    """A fresh server (``nodes`` 1) or cluster with ``durability``, the streams at R``nodes``."""
    with contextlib.ExitStack() as stack:
        if nodes == 1:
            # A configuration (even a comment) makes the server probed on its monitoring port.
            config = durability_config(durability) or "# default durability"
            url = stack.enter_context(NatsServer(root / "js", config=config)).url
        else:
            url = stack.enter_context(NatsCluster(root / "cluster", nodes, durability=durability)).url
        log = await EventLog.connect(url, "cdp-bench", connect_timeout=10.0)
        try:
            await log.ensure_streams((INGEST,), replicas=nodes)
            yield log
        finally:
            await log.close()


async def measure_profile(durability: str, nodes: int, payloads: list[bytes]) -> tuple[float, float]:
    """Seconds for the guarded appends and for the pipelined publishes (best of 2 each)."""
    with TemporaryDirectory(prefix="cdp-bench-sync-", dir=os.environ.get("CDP_BENCH_DURABILITY_DIR")) as tmp:
        async with nats_with(durability, nodes, Path(tmp)) as log:
            round_no = 0

            async def guarded() -> None:
                nonlocal round_no
                round_no += 1
                subject, expected = f"cdp.ingest.7.sync{round_no}", 0
                for n, payload in enumerate(payloads):
                    appended = await log.append_raw(
                        subject, payload, msg_id=f"{subject}:{n}", expected_last_subject_sequence=expected
                    )
                    expected = appended.sequence

            async def pipelined() -> None:
                nonlocal round_no
                round_no += 1
                futures = [await log.js.publish_async(f"cdp.ingest.6.sync{round_no}", p) for p in payloads]
                await asyncio.gather(*futures)

            items = len(payloads) * EVENTS_PER_MESSAGE
            one = await best_of(2, "guarded", items, guarded)
            many = await best_of(2, "pipelined", items, pipelined)
            return one.seconds, many.seconds


async def durability_cost() -> None:
    payloads = [encode_batch(batch(n), T0) for n in range(DURABILITY_MESSAGES)]
    items = len(payloads) * EVENTS_PER_MESSAGE
    for nodes, label in ((1, "1 server"), (3, "3-node cluster, R3")):
        best: dict[str, tuple[float, float]] = {}
        for durability in PROFILE_ORDER:
            guarded_s, pipelined_s = await measure_profile(durability, nodes, payloads)
            old = best.get(durability, (float("inf"), float("inf")))
            best[durability] = (min(old[0], guarded_s), min(old[1], pipelined_s))
        for kind, index, how in (
            ("guarded appends", 0, "one awaited append per message, as services write"),
            ("pipelined publishes", 1, "publish_async, all in flight, as a bulk publisher"),
        ):
            baseline = Figure(f"{kind}, sync_interval default (events)", items, best[DEFAULT_DURABILITY][index])
            measured = Figure(f"{kind}, sync_interval always (events)", items, best[ALWAYS][index])
            report(f"durability, {label}: {how}", baseline, [measured])
            per_message_ms = 1000 * (measured.seconds - baseline.seconds) / len(payloads)
            print(
                f"   {len(payloads)} messages of {EVENTS_PER_MESSAGE} events: always adds {per_message_ms:.2f} ms each"
            )


def run() -> None:
    asyncio.run(main())
    asyncio.run(durability_cost())
