"""Helpers for tests that drive data through the whole chain of running services.

Everything is read through the services' own gRPC APIs (status, dead letters, queries) or
straight from the stack's nats-server; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from functools import partial
from typing import TypeVar

import nats
import nats.js.errors

from cdp.common.v1 import admin_pb2, deadletter_pb2_grpc
from cdp.common.v1 import deadletter_pb2 as dl
from cdp_cli.client import SERVICES, Client, check_health
from cdp_cli.skeleton import retrying
from cdp_kit.eventlog import LogMessage
from cdp_kit.streams import ALL_STREAMS, SERVICE_LOGS
from tests.e2e import natsconn
from tests.e2e.natsconn import NatsTarget

T = TypeVar("T")


def wait_for(what: str, probe: Callable[[], T | None], timeout_s: float, interval_s: float = 0.25) -> T:
    """Poll ``probe`` until it returns something other than None (bounded)."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = probe()
        if found is not None:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}")
        time.sleep(interval_s)


def status(client: Client, service: str) -> admin_pb2.ServiceStatus:
    reply: admin_pb2.ServiceStatus = retrying(partial(client.admin(service).GetStatus, admin_pb2.GetStatusRequest()))
    return reply


def dead_letters(client: Client, service: str, consumer: str = "") -> list[dl.DeadLetter]:
    stub = deadletter_pb2_grpc.DeadLetterServiceStub(client.channel(service))
    request = dl.ListDeadLettersRequest(consumer=consumer, include_redriven=True, limit=10_000)
    reply: dl.ListDeadLettersResponse = retrying(partial(stub.ListDeadLetters, request))
    return list(reply.dead_letters)


def healths(client: Client) -> dict[str, str]:
    return {service: check_health(client.address(service), timeout=5.0, auth=client.auth()) for service in SERVICES}


async def _last_sequences(target: NatsTarget, filters: list[tuple[str, str]]) -> dict[tuple[str, str], int]:
    nc = await natsconn.connect(target, connect_timeout=5, max_reconnect_attempts=2)
    try:
        js = nc.jetstream()
        out: dict[tuple[str, str], int] = {}
        for stream, subject in filters:
            try:
                msg = await js.get_last_msg(stream, subject)
                out[(stream, subject)] = msg.seq or 0
            except nats.js.errors.NotFoundError:
                out[(stream, subject)] = 0
        return out
    finally:
        await nc.close()


# Every consumer of every service, and the subjects it reads (from the one declaration of them).
FILTERS = {spec.name: spec.filter_subject for logs in SERVICE_LOGS.values() for spec in logs.inputs}


def drained(client: Client, target: NatsTarget) -> dict[str, tuple[int, int, int, str]] | None:
    """None unless every consumer of every service has applied its subject's last message, with lag 0
    and no error; else (applied, last on the consumer's subjects, lag, error) per consumer."""
    found: dict[str, tuple[int, int, int, str]] = {}
    wanted: list[tuple[str, str]] = []
    statuses = [status(client, service) for service in SERVICES]
    for reply in statuses:
        if not reply.ready:
            return None
        wanted += [(c.stream, FILTERS[c.name]) for c in reply.consumers]
    last = asyncio.run(_last_sequences(target, wanted))
    ok = True
    for reply in statuses:
        for c in reply.consumers:
            end = last[(c.stream, FILTERS[c.name])]
            found[c.name] = (c.applied_sequence, end, c.lag, c.error)
            ok = ok and c.applied_sequence == end and c.lag == 0 and not c.error
    return None if not ok else found


def wait_drained(client: Client, target: NatsTarget, timeout_s: float) -> dict[str, tuple[int, int, int, str]]:
    return wait_for("every consumer to apply its input to the end", lambda: drained(client, target), timeout_s)


async def _read(target: NatsTarget, stream: str, subject: str) -> list[LogMessage]:
    eventlog = await natsconn.eventlog(target, name="cdp-test-reader")
    try:
        return [m async for m in eventlog.read(stream, subject)]
    finally:
        await eventlog.close()


def read_log(target: NatsTarget, stream: str, subject: str) -> list[LogMessage]:
    """Every message on ``subject`` (headers and bytes, not decoded)."""
    assert stream in {s.name for s in ALL_STREAMS}
    return asyncio.run(_read(target, stream, subject))


async def _publish(target: NatsTarget, subject: str, data: bytes, headers: dict[str, str] | None) -> int:
    nc = await natsconn.connect(target, connect_timeout=5, max_reconnect_attempts=2)
    try:
        ack = await nc.jetstream().publish(subject, data, headers=headers, timeout=10.0)
        return int(ack.seq)
    finally:
        await nc.close()


def publish(target: NatsTarget, subject: str, data: bytes, headers: dict[str, str] | None = None) -> int:
    """Publish raw bytes on a JetStream subject as the stack's admin (an operator; with security on
    no one else may write another service's subject); returns the stream sequence."""
    return asyncio.run(_publish(target, subject, data, headers))
