"""The event log: guarded, de-duplicated appends of event batches vs raw JetStream publishes.

Both sides publish the same serialized bytes to the same stream; the baseline is
``js.publish_async`` with no guard (pipelined), the measured path is ``EventLog.append``
(one awaited append per cause, guarded by the expected subject sequence, as services do).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from bench.common import best_of, nats_eventlog, report
from cdp.common.v1.envelope_pb2 import IdentityValue
from cdp_kit.envelope import Cause, Envelope, deterministic_id, encode_batch, make_envelope

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


def run() -> None:
    asyncio.run(main())
