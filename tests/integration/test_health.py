"""A stall is loud: a consumer that cannot progress shows as stuck in status and metrics, and
the service's readiness turns NOT_SERVING while its liveness stays SERVING.

Everything is real: nats-server with JetStream, a SQLite store, a Processor consuming a durable
consumer, the kit's gRPC server with the runtime's health watch. The consumer is made unable to
progress by a message on which its handler fails transiently (Unavailable, as a store that is
down: retried, never set aside); a poison message (a handler bug) is dead-lettered and passed.
The stall limit is set low. No timing is asserted: tests wait for states.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, NumberDataPoint
from sqlmodel import Session

from cdp.common.v1 import admin_pb2, admin_pb2_grpc
from cdp_kit.envelope import Envelope
from cdp_kit.errors import Unavailable
from cdp_kit.eventlog import EventLog, LogMessage
from cdp_kit.grpc_server import LIVENESS, READINESS, GrpcServer
from cdp_kit.processor import Input, Processor, UnitOfWork
from cdp_kit.runtime import (
    CAUGHT_UP,
    LAGGING,
    RETRYING,
    STARTING,
    STUCK,
    Service,
    Vitals,
    consumer_state,
    filter_last_sequence,
    health_watch,
    service_status,
)
from cdp_kit.store import make_engine, sqlite_url
from cdp_kit.streams import CONFIG, INGEST, ConsumerSpec, OwnLog

HEALTH_IN = ConsumerSpec("health-in", INGEST, "cdp.ingest.7.>")
IN_SUBJECT = "cdp.ingest.7.health"
BLOCKED = b"blocked"
REFUSAL = "store unavailable: this message cannot be applied now"
POISON = b"\xffpoison"
STALL_AFTER_S = 0.5
SERVING = int(health_pb2.HealthCheckResponse.SERVING)
NOT_SERVING = int(health_pb2.HealthCheckResponse.NOT_SERVING)


# ----------------------------------------------------------------------------- the state rule


@pytest.mark.parametrize(
    ("recovered", "stalled_s", "error", "lag", "state"),
    [
        (False, 99.0, "boom", 5, STARTING),  # consumers only run once the service recovered
        (True, 0.2, "", 0, CAUGHT_UP),
        (True, 0.2, "", 3, LAGGING),
        (True, 0.2, "NATS away", 3, RETRYING),  # an error, not yet for the stall limit
        (True, 10.0, "NATS away", 3, STUCK),
        (True, 10.0, "", 0, STUCK),  # no progress at all is stuck, error or not
    ],
)
def test_consumer_state(recovered: bool, stalled_s: float, error: str, lag: int, state: str) -> None:
    got = consumer_state(recovered=recovered, stalled_s=stalled_s, stall_after_s=5.0, error=error, lag=lag)
    assert got == state


# ----------------------------------------------------------------------------- a tiny service


class NoProjection:
    def fold(self, session: Session, own: OwnLog, env: Envelope) -> None:
        """The test service has no own log to fold."""


class Refuser:
    """Applies every raw message except two: on the blocked one it fails as an unavailable store
    does (transient: retried for ever, never set aside), on the poison one as a handler bug does."""

    def observe(self, session: Session, msg: LogMessage, env: Envelope) -> None:
        if msg.data == BLOCKED:
            raise Unavailable(REFUSAL)
        if msg.data == POISON:
            raise ValueError("cannot parse the poison message")

    def decide(self, uow: UnitOfWork, msg: LogMessage, env: Envelope) -> None:
        """Nothing to emit."""


@dataclass
class Running:
    processor: Processor
    vitals: Vitals
    server: GrpcServer
    channel: grpc.aio.Channel
    reader: InMemoryMetricReader

    async def health(self, name: str) -> int:
        reply = await health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(service=name))
        return int(reply.status)

    async def status(self) -> admin_pb2.ServiceStatus:
        return await admin_pb2_grpc.AdminServiceStub(self.channel).GetStatus(admin_pb2.GetStatusRequest())

    def gauge(self, name: str) -> dict[str, float]:
        """The last value of an observable gauge, per consumer."""
        data = self.reader.get_metrics_data()
        assert data is not None
        return {
            str(point.attributes["consumer"]): point.value
            for rm in data.resource_metrics
            for sm in rm.scope_metrics
            for metric in sm.metrics
            if metric.name == name
            for point in metric.data.data_points
            if isinstance(point, NumberDataPoint) and point.attributes is not None
        }


@pytest.fixture
async def running(tmp_path: Path, eventlog: EventLog) -> AsyncIterator[Running]:
    engine = make_engine(sqlite_url(tmp_path / "health.db"))
    spec_input = Input(spec=HEALTH_IN, handler=Refuser(), raw=True)
    processor = Processor(
        service="health",
        engine=engine,
        eventlog=eventlog,
        tables=[],
        own_logs=[],
        projection=NoProjection(),
        inputs=[spec_input],
        batch_size=16,
    )
    processor.create_store()
    reader = InMemoryMetricReader()
    vitals = Vitals(processor, eventlog, STALL_AFTER_S, MeterProvider(metric_readers=[reader]).get_meter("test"))

    async def status() -> admin_pb2.ServiceStatus:
        return await service_status(Service(processor, []), "health", vitals)

    server = GrpcServer("127.0.0.1", 0, [], status)
    await server.start()
    tasks = [asyncio.create_task(processor.run()), asyncio.create_task(health_watch(vitals, server))]
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.bound_port}") as channel:
            yield Running(processor, vitals, server, channel, reader)
    finally:
        processor.stop()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await server.stop(0.5)
        engine.dispose()


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 30.0) -> None:
    """Wait for a state (never for a time): fails only if it never comes."""
    async with asyncio.timeout(timeout_s):
        while not await check():  # noqa: ASYNC110 (the state is another server's: polled, not awaited)
            await asyncio.sleep(0.05)


async def publish(eventlog: EventLog, *payloads: bytes) -> None:
    for payload in payloads:
        await eventlog.append_raw(IN_SUBJECT, payload, msg_id=f"health-{payload!r}")


# ----------------------------------------------------------------------------- the tests


async def test_liveness_serves_from_the_start_readiness_once_recovered(running: Running) -> None:
    assert await running.health(LIVENESS) == SERVING

    async def ready() -> bool:
        return all([await running.health(name) == SERVING for name in ("", READINESS)])

    await until(ready, "readiness SERVING")
    assert await running.health(LIVENESS) == SERVING


async def test_a_caught_up_consumer_is_tidy(running: Running, eventlog: EventLog) -> None:
    await publish(eventlog, b"one", b"two")
    # A message on another subject of the stream, outside the consumer's filter: "last" ignores it.
    await eventlog.append_raw("cdp.ingest.8.other", b"elsewhere", msg_id="elsewhere")

    async def caught_up() -> bool:
        status = await running.status()
        return status.consumers[0].state == CAUGHT_UP and status.consumers[0].applied_sequence == 2

    await until(caught_up, "the consumer caught up")
    status = await running.status()
    [consumer] = status.consumers
    assert consumer.applied_sequence == consumer.stream_last_sequence == 2
    assert consumer.lag == 0
    assert consumer.error == ""  # empty fetches since: nothing to read is not an error
    assert status.ready
    assert status.recovered
    assert status.nats_connected
    assert status.stall_after_seconds == STALL_AFTER_S
    assert running.gauge("cdp.input.stuck") == {"health-in": 0}


async def test_a_stuck_consumer_makes_the_service_not_ready_but_live(running: Running, eventlog: EventLog) -> None:
    await publish(eventlog, b"one")

    async def applied_one() -> bool:
        return (await running.status()).consumers[0].applied_sequence == 1

    await until(applied_one, "the first message applied")
    await publish(eventlog, BLOCKED, b"three")

    async def stuck() -> bool:
        state: str = (await running.status()).consumers[0].state
        return state == STUCK

    await until(stuck, "the consumer to be stuck")
    status = await running.status()
    [consumer] = status.consumers
    assert consumer.error == REFUSAL
    assert consumer.applied_sequence == 1  # nothing queued behind the poison message was applied
    assert consumer.stream_last_sequence == 3
    assert consumer.lag > 0
    assert consumer.stalled_seconds >= STALL_AFTER_S
    assert not status.ready
    assert status.recovered

    async def not_ready() -> bool:
        return await running.health(READINESS) == NOT_SERVING

    await until(not_ready, "readiness NOT_SERVING")
    assert await running.health("") == NOT_SERVING
    assert await running.health(LIVENESS) == SERVING
    assert running.gauge("cdp.input.stuck") == {"health-in": 1}
    assert running.gauge("cdp.input.stalled")["health-in"] >= STALL_AFTER_S


async def test_a_poison_message_is_dead_lettered_counted_and_passed(running: Running, eventlog: EventLog) -> None:
    await publish(eventlog, b"one", POISON, b"three")

    async def caught_up() -> bool:
        status = await running.status()
        return status.consumers[0].state == CAUGHT_UP and status.consumers[0].applied_sequence == 3

    await until(caught_up, "the consumer caught up past the poison")
    status = await running.status()
    [consumer] = status.consumers
    assert consumer.dead_letters == 1
    assert consumer.error == ""
    assert status.ready


async def test_last_sequence_is_the_filters(eventlog: EventLog) -> None:
    """ "last" is the last message on the consumer's filter: a literal subject, a wildcard over
    several subjects (the greatest of their lasts), the whole stream."""
    for n, subject in enumerate(["cdp.config.a", "cdp.config.b", "cdp.config.a", "cdp.config.c"]):
        await eventlog.append_raw(subject, b"x", msg_id=f"cfg-{n}")
    await eventlog.append_raw(IN_SUBJECT, b"x", msg_id="in-1")
    literal = ConsumerSpec("t-a", CONFIG, "cdp.config.a")
    wildcard_ab = ConsumerSpec("t-ab", CONFIG, "cdp.config.*")
    nothing = ConsumerSpec("t-none", CONFIG, "cdp.config.zz.>")
    whole = ConsumerSpec("t-ingest", INGEST, "cdp.ingest.>")
    assert await filter_last_sequence(eventlog, literal) == 3
    assert await filter_last_sequence(eventlog, wildcard_ab) == 4
    assert await filter_last_sequence(eventlog, nothing) == 0
    assert await filter_last_sequence(eventlog, whole) == 1
