"""A property of the kit on a real nats-server: whatever the widths and counts of the records, the
pipeline drains.

A writer service echoes every input event (padded to a width hypothesis chooses) to its own log; a
downstream service reads that log and echoes each event again. Both run the consumer loop services
run (``Processor.run_input``: durable consumers, fetch batches of a size hypothesis chooses) at the
same time. One input's echoes may add up to several times a NATS message (they then travel as numbered
parts), never one event above ``MAX_MESSAGE_BYTES``. The server has NATS' default max_payload (1 MiB),
as compose.yaml runs it. Both must end with every input applied exactly once, the downstream store
equal to what the inputs determine, and nothing stuck (no error, no dead letter, checkpoints at the end).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from cdp.common.v1.envelope_pb2 import IdentityValue
from cdp_kit.deadletters import DeadLetterRow
from cdp_kit.envelope import Cause, Envelope, deterministic_id, from_timestamp, make_envelope, unpack
from cdp_kit.eventlog import MAX_MESSAGE_BYTES, EventLog, LogMessage
from cdp_kit.natsserver import NatsServer
from cdp_kit.parts import PART_HEADER
from cdp_kit.processor import EVENT_OVERHEAD_BYTES, Input, Processor, UnitOfWork, in_checkpoint
from cdp_kit.store import make_engine, sqlite_url
from cdp_kit.streams import AUDIENCE, DELIVERY, INGEST, ConsumerSpec, OwnLog
from tests.integration.test_processor import (
    T0,
    TABLES,
    EchoProjection,
    InputRow,
    OutputRow,
    bump,
    checkpoints,
    counters,
)

# The widest event: its echo downstream (a few bytes more) must still fit one message alone.
WIDEST = MAX_MESSAGE_BYTES - 4 * EVENT_OVERHEAD_BYTES - 1_000
WIDTHS = st.one_of(st.integers(0, 2_000), st.integers(100_000, 400_000), st.integers(400_000, WIDEST))
# (width of each echo) for each event of each input message
LAYOUTS = st.lists(st.lists(WIDTHS, min_size=1, max_size=4), min_size=1, max_size=5).filter(
    lambda layout: sum(map(sum, layout)) <= 4 * MAX_MESSAGE_BYTES
)
DRAIN_TIMEOUT_S = 60.0
_examples = itertools.count(1)


class PaddedEcho:
    """Observes each input event; decides one echo per event on ``out``, padded to the width the input
    event names (its namespace), or, downstream, as wide as the event it echoes."""

    def __init__(self, name: str, out: OwnLog) -> None:
        self.name = name
        self.out = out

    def observe(self, session: Session, msg: LogMessage, env: Envelope) -> None:
        session.merge(InputRow(event_id=env.id, sequence=msg.sequence, value=unpack(env, IdentityValue).value))
        bump(session, "observed")

    def decide(self, uow: UnitOfWork, msg: LogMessage, env: Envelope) -> None:
        value = unpack(env, IdentityValue)
        width = int(value.namespace) if value.namespace.isdigit() else 0
        echo = make_envelope(
            IdentityValue(namespace="echo", value=value.value.upper() + "x" * width),
            event_id=deterministic_id(self.out.name, env.id),
            subject_key="test",
            occurred_at=from_timestamp(env.occurred_at),
            cause=Cause(self.name, msg.sequence, env.id),
        )
        uow.emit(self.out, [echo])


def service(name: str, engine: Engine, eventlog: EventLog, spec: ConsumerSpec, out: OwnLog, batch: int) -> Processor:
    processor = Processor(
        service=name,
        engine=engine,
        eventlog=eventlog,
        tables=TABLES,
        own_logs=[out],
        projection=EchoProjection(),
        inputs=[Input(spec, PaddedEcho(spec.name, out))],
        batch_size=batch,
    )
    processor.create_store()
    return processor


@pytest.fixture(scope="module")
def payload_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """One nats-server for every example (each example has its own subjects, consumers and stores),
    with NATS' default max_payload of 1 MiB."""
    root = tmp_path_factory.mktemp("drains")
    server = NatsServer(root / "jetstream", log_file=root / "nats.log", max_payload=1024 * 1024)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("drains-stores")


def rows(engine: Engine) -> tuple[set[tuple[str, str]], set[tuple[str, str, str, str]], int]:
    with Session(engine) as session:
        inputs = {(r.event_id, r.value) for r in session.exec(select(InputRow)).all()}
        outputs = {(r.event_id, r.own, r.cause, r.value) for r in session.exec(select(OutputRow)).all()}
        letters = len(session.exec(select(DeadLetterRow)).all())
    return inputs, outputs, letters


@contextlib.asynccontextmanager
async def running(processors: list[Processor]) -> AsyncIterator[list[asyncio.Task[None]]]:
    """Every processor's consumer loop, at once, as the services run them; stopped on exit."""
    for processor in processors:
        await processor.recover()
    tasks = [asyncio.create_task(p.run_input(p.inputs[0])) for p in processors]
    try:
        yield tasks
    finally:
        for processor in processors:
            processor.stop()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def applied(processor: Processor, end: int, tasks: list[asyncio.Task[None]]) -> None:
    """Until ``processor`` has applied its input up to ``end`` (bounded); no loop may have ended."""
    async with asyncio.timeout(DRAIN_TIMEOUT_S):
        while checkpoints(processor.engine).get(in_checkpoint(processor.inputs[0].spec), 0) < end:
            for task in tasks:
                assert not task.done(), task.exception()
            await asyncio.sleep(0.05)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=False)
@given(layout=LAYOUTS, writer_batch=st.integers(1, 6), down_batch=st.integers(1, 6))
@example(layout=[[WIDEST, WIDEST, 300_000], [10], [WIDEST]], writer_batch=3, down_batch=1)
@example(layout=[[200_000] * 4, [400_000] * 4], writer_batch=1, down_batch=5)
async def test_the_pipeline_drains_whatever_the_widths_and_counts(
    layout: list[list[int]], writer_batch: int, down_batch: int, payload_server: NatsServer, stores: Path
) -> None:
    n = next(_examples)
    in_subject = f"cdp.ingest.h{n}.in"
    writer_out = OwnLog(f"hw{n}-out", AUDIENCE, f"cdp.audience.h{n}.out")
    down_out = OwnLog(f"hd{n}-out", DELIVERY, f"cdp.delivery.h{n}.out")
    writer_in = ConsumerSpec(f"hw{n}-in", INGEST, in_subject)
    down_in = ConsumerSpec(f"hd{n}-in", AUDIENCE, writer_out.subject)
    eventlog = await EventLog.connect(payload_server.url, f"drains-{n}")
    writer_engine = make_engine(sqlite_url(stores / f"writer-{n}.db"))
    down_engine = make_engine(sqlite_url(stores / f"down-{n}.db"))
    try:
        await eventlog.ensure_streams(memory=True)
        inputs: list[tuple[str, str, int]] = []  # (event id, value, echo width)
        last_in = 0
        for m, widths in enumerate(layout):
            events = []
            for k, width in enumerate(widths):
                event_id = deterministic_id("drain-input", n, m, k)
                value = f"v{m}.{k}"
                inputs.append((event_id, value, width))
                events.append(
                    make_envelope(
                        IdentityValue(namespace=str(width), value=value),
                        event_id=event_id,
                        subject_key="test",
                        occurred_at=T0,
                        cause=Cause(command_id=f"upstream-{n}-{m}"),
                    )
                )
            last_in = (await eventlog.append(in_subject, events, msg_id=f"drain-{n}-{m}")).sequence

        writer = service(f"hw{n}", writer_engine, eventlog, writer_in, writer_out, writer_batch)
        down = service(f"hd{n}", down_engine, eventlog, down_in, down_out, down_batch)
        async with running([writer, down]) as tasks:  # downstream reads while the writer writes
            await applied(writer, last_in, tasks)
            last_out = await eventlog.last_sequence(AUDIENCE.name, writer_out.subject)
            await applied(down, last_out, tasks)

        # The writer: every input observed and echoed once, nothing set aside, nothing stuck.
        echo_ids = {event_id: deterministic_id(writer_out.name, event_id) for event_id, _v, _w in inputs}
        widened = {event_id: value.upper() + "x" * width for event_id, value, width in inputs}
        w_inputs, w_outputs, w_letters = rows(writer_engine)
        assert w_inputs == {(event_id, value) for event_id, value, _w in inputs}
        assert w_outputs == {(echo_ids[e], writer_out.name, e, widened[e]) for e, _v, _w in inputs}
        assert counters(writer_engine) == {"observed": len(inputs), f"folded:{writer_out.name}": len(inputs)}
        assert w_letters == 0
        assert writer.failures == {}
        assert checkpoints(writer_engine)[in_checkpoint(writer_in)] == last_in

        # What the writer's log holds: each echo exactly once; causes over a message went out in parts.
        written = [m async for m in eventlog.read(AUDIENCE.name, writer_out.subject)]
        assert sorted(e.id for msg in written for e in msg.events()) == sorted(echo_ids.values())
        if any(sum(w + 100 for w in widths) > MAX_MESSAGE_BYTES for widths in layout):
            assert any(PART_HEADER in msg.headers for msg in written)

        # Downstream: every echo applied exactly once, its store what the inputs determine.
        d_inputs, d_outputs, d_letters = rows(down_engine)
        assert d_inputs == {(echo_ids[e], widened[e]) for e, _v, _w in inputs}
        assert d_outputs == {
            (deterministic_id(down_out.name, echo_ids[e]), down_out.name, echo_ids[e], widened[e].upper())
            for e, _v, _w in inputs
        }
        assert counters(down_engine) == {"observed": len(inputs), f"folded:{down_out.name}": len(inputs)}
        assert d_letters == 0
        assert down.failures == {}
        assert checkpoints(down_engine)[in_checkpoint(down_in)] == last_out
        echoed = [m async for m in eventlog.read(DELIVERY.name, down_out.subject)]
        assert len([e for msg in echoed for e in msg.events()]) == len(inputs)
    finally:
        writer_engine.dispose()
        down_engine.dispose()
        await eventlog.close()
