"""The publishers of ``bench ingest``'s streaming figures, run as their own process (as event
publishers are): ``python -m bench.ingest_client grpc ADDRESS N FIRST`` sends N events through
``PublishEvents`` (500 per call) and prints the seconds it took (from a ready channel), over TLS
with a bearer token when a CA file and a token file follow;
``python -m bench.ingest_client nats URL N FIRST`` prints the wall-clock time it starts,
publishes N JSON events to ``cdp.collect.web`` and prints the stream sequence of the last one."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import grpc
import nats

from cdp.ingest.v1 import ingest_pb2 as pb
from cdp.ingest.v1 import ingest_pb2_grpc as pb_grpc
from cdp_kit.grpc_auth import ClientAuth
from cdp_kit.natsauth import NatsAuth
from cdp_kit.publishing import Outgoing, publish_bounded
from cdp_kit.streams import collect_subject

PER_CALL = 500


def event(i: int) -> dict[str, str]:
    return {"event_id": f"ev-{i}", "ts": "2026-01-01T10:00:00Z", "type": "page_view", "cookie_id": f"ck-{i % 5000}"}


def grpc_channel(address: str, ca_file: str = "", token_file: str = "") -> grpc.aio.Channel:
    if not ca_file:
        return grpc.aio.insecure_channel(address)
    auth = ClientAuth(Path(ca_file).read_bytes(), Path(token_file).read_text().strip())
    return grpc.aio.secure_channel(address, auth.channel_credentials())


async def through_grpc(address: str, count: int, first: int, *credentials: str) -> None:
    async with grpc_channel(address, *credentials) as channel:
        stub = pb_grpc.IngestServiceStub(channel)
        await asyncio.wait_for(channel.channel_ready(), 30.0)  # a TLS misfit fails, never hangs
        started = time.perf_counter()
        for start in range(first, first + count, PER_CALL):
            request = pb.PublishEventsRequest(dataset="web")
            for i in range(start, min(start + PER_CALL, first + count)):
                request.events.add().update(event(i))
            await stub.PublishEvents(request)
        print(time.perf_counter() - started, flush=True)


async def through_nats(url: str, count: int, first: int, *_: str) -> None:
    nc = await nats.connect(url, **NatsAuth.from_env().connect_options())  # CDP_NATS_* when security is on
    js = nc.jetstream()
    subject = collect_subject("web")
    print(time.time(), flush=True)  # when publishing starts (wall clock, read by the bench)
    seqs: list[int] = []
    # Bounded in flight, and a 429 (JetStream overloaded) published again after a backoff.
    messages = (Outgoing(subject, json.dumps(event(i)).encode()) for i in range(first, first + count))
    await publish_bounded(js, messages, window=1000, on_ack=lambda ack: seqs.append(ack.seq))
    print(max(seqs), flush=True)
    await nc.close()


def main() -> None:
    mode, target, count, first = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    asyncio.run((through_grpc if mode == "grpc" else through_nats)(target, count, first, *sys.argv[5:]))


if __name__ == "__main__":
    main()
