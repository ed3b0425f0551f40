"""Publishing under JetStream back-pressure, on a real nats-server whose streams' inbound queue is
tiny (``jetstream { max_buffered_msgs: 20 }``): the server answers 429 Too Many Requests to a burst.
An unbounded ``publish_async`` burst meets 429s (the precondition: this server does refuse), and
``cdp_kit.publishing.publish_bounded`` and ``cdp events publish`` store every message exactly once."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import nats
import nats.js.errors
import pytest
from nats.aio.client import Client
from nats.js import api
from nats.js.client import JetStreamContext

from cdp_cli.cmd_publish import publish_file
from cdp_kit.natsserver import NatsServer
from cdp_kit.publishing import Outgoing, overloaded, publish_bounded

SUBJECT = "cdp.collect.web"
COUNT = 3000


@pytest.fixture
def busy_server(tmp_path: Path) -> Iterator[NatsServer]:
    with NatsServer(store_dir=tmp_path / "nats", config="jetstream { max_buffered_msgs: 20 }") as server:
        yield server


async def stream(url: str) -> tuple[Client, JetStreamContext]:
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(api.StreamConfig(name="CDP_COLLECT", subjects=["cdp.collect.>"]))
    return nc, js


async def stored(js: JetStreamContext) -> int:
    return int((await js.stream_info("CDP_COLLECT")).state.messages)


async def test_an_unbounded_burst_is_refused_with_429(busy_server: NatsServer) -> None:
    nc, js = await stream(busy_server.url)
    try:
        outcomes: Counter[str] = Counter()

        async def one(i: int) -> None:
            try:
                await js.publish(SUBJECT, json.dumps({"event_id": f"e{i}"}).encode(), timeout=10.0)
                outcomes["stored"] += 1
            except nats.js.errors.APIError as exc:
                outcomes["429" if overloaded(exc) else "other"] += 1

        await asyncio.gather(*(one(i) for i in range(COUNT)))
        assert outcomes["429"] > 0, outcomes
        assert outcomes["other"] == 0, outcomes
        assert await stored(js) == outcomes["stored"] < COUNT
    finally:
        await nc.close()


async def test_bounded_publishing_backs_off_and_stores_every_message_once(busy_server: NatsServer) -> None:
    nc, js = await stream(busy_server.url)
    try:
        sequences: list[int] = []
        messages = (
            Outgoing(SUBJECT, json.dumps({"event_id": f"e{i}"}).encode(), {"Nats-Msg-Id": f"web:e{i}"})
            for i in range(COUNT)
        )
        stats = await publish_bounded(js, messages, window=500, on_ack=lambda ack: sequences.append(ack.seq))
        assert stats.published == COUNT
        assert stats.retried > 0  # the server did refuse some: they were published again
        assert await stored(js) == COUNT
        assert sorted(sequences) == list(range(1, COUNT + 1))
    finally:
        await nc.close()


async def test_cdp_events_publish_stores_every_line_under_back_pressure(
    busy_server: NatsServer, tmp_path: Path
) -> None:
    nc, js = await stream(busy_server.url)
    try:
        lines = tmp_path / "events.jsonl"
        lines.write_text("".join(json.dumps({"event_id": f"e{i}", "n": i}) + "\n" for i in range(COUNT)))
        published = await publish_file(lines, "web", busy_server.url, "event_id", 1000, None)
        assert (published.published, published.duplicates, published.bad_count) == (COUNT, 0, 0)
        assert await stored(js) == COUNT
    finally:
        await nc.close()
