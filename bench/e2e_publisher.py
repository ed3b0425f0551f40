"""The event publisher of ``bench e2e``, a process of its own (as event publishers are):
``python -m bench.e2e_publisher URL SUBJECT PREFIX COUNT RATE`` publishes COUNT page views,
each by a new cookie ``PREFIX-<i>``, as JSON on SUBJECT with JetStream acknowledgements.

RATE > 0: open loop at RATE events/s; event i is due at ``start + i / RATE`` and carries that
due time in ``sent_at`` (so a publisher or server falling behind shows as latency, not as a
slower schedule). RATE = 0: as fast as acknowledgements allow; ``sent_at`` is the time of the
publish call. Prints one JSON line: start, end (last acknowledgement), count, last sequence."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

from bench.connect import nats_connect
from cdp_kit.publishing import Outgoing, publish_bounded

# Publishes awaiting their acknowledgement at most (nats-server refuses past its inbound queue).
WINDOW = 2_000
ACK_TIMEOUT_S = 30.0


def event(prefix: str, i: int, sent_at: float) -> bytes:
    return json.dumps(
        {
            "event_id": f"{prefix}-{i}",
            "ts": "2026-12-01T10:00:00Z",
            "type": "page_view",
            "cookie_id": f"{prefix}-{i}",
            "sent_at": sent_at,
        }
    ).encode()


async def publish(url: str, subject: str, prefix: str, count: int, rate: float) -> dict[str, Any]:
    nc = await nats_connect(url, publisher=subject.startswith("cdp.collect."))
    js = nc.jetstream()
    seqs: list[int] = [0]
    start = time.time()

    async def paced() -> AsyncIterator[Outgoing]:
        for i in range(count):
            if rate > 0:
                due = start + i / rate
                delay = due - time.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                stamp = due
            else:
                stamp = time.time()
            yield Outgoing(subject, event(prefix, i, stamp))

    try:
        # At most WINDOW awaiting their ack; a 429 (JetStream overloaded) is published again after a backoff.
        await publish_bounded(
            js, paced(), window=WINDOW, on_ack=lambda ack: seqs.append(ack.seq), timeout_s=ACK_TIMEOUT_S
        )
        return {"start": start, "end": time.time(), "count": count, "last_seq": max(seqs)}
    finally:
        await nc.close()


def main() -> None:
    url, subject, prefix, count, rate = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
    print(json.dumps(asyncio.run(publish(url, subject, prefix, count, rate))), flush=True)


if __name__ == "__main__":
    main()
