"""The projector loop on a real JetStream and a real store (SQLite, and PostgreSQL where cheap).

A tiny echo service lives in this module: it records every input event it observes,
decides one own event per input event (a deterministic id derived from the input
event id), and folds its own events into a table. Counters of observe/fold calls
make a double application visible in the store itself.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nats.js.errors
import pytest
import sqlalchemy as sa
from nats.aio.msg import Msg
from sqlalchemy.engine import Engine
from sqlmodel import Field, Session, SQLModel, select

from cdp.common.v1.envelope_pb2 import IdentityValue
from cdp_kit.deadletters import DEADLETTER_TABLES, DeadLetterRow
from cdp_kit.envelope import (
    Cause,
    Envelope,
    deterministic_id,
    encode_batch,
    from_timestamp,
    make_envelope,
    unpack,
)
from cdp_kit.errors import Conflict
from cdp_kit.eventlog import MAX_MESSAGE_BYTES, AppendConflict, Appended, DuplicateAppend, EventLog, LogMessage
from cdp_kit.natsserver import NatsServer
from cdp_kit.parts import PART_HEADER
from cdp_kit.processor import (
    CAUSE_HEADER,
    Input,
    MixedOwnLogs,
    OversizedCause,
    Processor,
    ReplayWouldAppend,
    UnitOfWork,
    emitted_checkpoint,
    in_checkpoint,
    own_checkpoint,
)
from cdp_kit.store import Checkpoint, StoreSchema, all_checkpoints, canonical_dump, make_engine, sqlite_url, transaction
from cdp_kit.streams import AUDIENCE, DELIVERY, INGEST, ConsumerSpec, OwnLog

T0 = datetime(2026, 1, 1, tzinfo=UTC)

IN = ConsumerSpec("test-in", INGEST, "cdp.ingest.>")
IN_SUBJECT = "cdp.ingest.9.test"
OUT = OwnLog("test-out", AUDIENCE, "cdp.audience.9.test")
OUT_B = OwnLog("test-out-b", DELIVERY, "cdp.delivery.9.test")

# Input messages: (message number, events it carries). Message 3 carries two events.
INPUT_LAYOUT: list[int] = [1, 1, 2, 1, 1, 1, 1]

# An echo event of ~150 KB: the outputs of two input events reach the flush threshold of an input batch.
BIG = 150_000
FLUSH_BYTES = MAX_MESSAGE_BYTES // 4


# ===================================================================== the test service


class InputRow(SQLModel, table=True):
    __tablename__ = "test_processor_input"

    event_id: str = Field(primary_key=True)
    sequence: int
    value: str


class OutputRow(SQLModel, table=True):
    __tablename__ = "test_processor_output"

    event_id: str = Field(primary_key=True)
    own: str
    cause: str
    value: str


class CounterRow(SQLModel, table=True):
    __tablename__ = "test_processor_counter"

    name: str = Field(primary_key=True)
    count: int = 0


TABLES: list[sa.Table] = [
    SQLModel.metadata.tables[InputRow.__tablename__],
    SQLModel.metadata.tables[OutputRow.__tablename__],
    SQLModel.metadata.tables[CounterRow.__tablename__],
]
ALL_TABLES: list[sa.Table] = [*TABLES, SQLModel.metadata.tables[Checkpoint.__tablename__]]


def bump(session: Session, name: str) -> None:
    row = session.get(CounterRow, name)
    if row is None:
        row = CounterRow(name=name, count=0)
    row.count += 1
    session.add(row)


class EchoProjection:
    """Folds own events: one row per event (idempotent) plus a fold counter (not idempotent)."""

    def fold(self, session: Session, own: OwnLog, env: Envelope) -> None:
        value = unpack(env, IdentityValue)
        session.merge(OutputRow(event_id=env.id, own=own.name, cause=env.causation.event_id, value=value.value))
        bump(session, f"folded:{own.name}")


def echo(own: OwnLog, msg: LogMessage, env: Envelope, *, size: int = 0) -> Envelope:
    value = unpack(env, IdentityValue).value
    return make_envelope(
        IdentityValue(namespace="echo", value=value.upper() + "x" * size),
        event_id=deterministic_id(own.name, env.id),
        subject_key="test",
        occurred_at=from_timestamp(env.occurred_at),
        cause=Cause(IN.name, msg.sequence, env.id),
    )


class EchoHandler:
    """Observes each input event into a table; decides one own event per input event on each own log.

    Each echo event is padded with ``size`` bytes, or ``sizes[input message sequence]`` where given;
    ``routes[input message sequence]`` names the one own log it goes to, where given."""

    def __init__(
        self,
        outs: Sequence[OwnLog] = (OUT,),
        *,
        size: int = 0,
        sizes: Mapping[int, int] | None = None,
        routes: Mapping[int, OwnLog] | None = None,
    ) -> None:
        self.outs = list(outs)
        self.size = size
        self.sizes = dict(sizes or {})
        self.routes = dict(routes or {})
        self.decided: list[str] = []
        self.observed: list[str] = []
        self.causes: list[tuple[int, Cause]] = []  # (input message sequence, uow.cause) at each decide

    def observe(self, session: Session, msg: LogMessage, env: Envelope) -> None:
        self.observed.append(env.id)
        value = unpack(env, IdentityValue).value
        session.merge(InputRow(event_id=env.id, sequence=msg.sequence, value=value))
        bump(session, "observed")

    def decide(self, uow: UnitOfWork, msg: LogMessage, env: Envelope) -> None:
        self.decided.append(env.id)
        self.causes.append((msg.sequence, uow.cause))
        size = self.sizes.get(msg.sequence, self.size)
        for own in [self.routes[msg.sequence]] if self.routes else self.outs:
            uow.emit(own, [echo(own, msg, env, size=size)])


def make_processor(
    engine: Engine,
    eventlog: EventLog,
    handler: EchoHandler | None = None,
    *,
    own_logs: Sequence[OwnLog] = (OUT,),
    with_input: bool = True,
    batch_size: int = 3,
) -> Processor:
    processor = Processor(
        service="test",
        engine=engine,
        eventlog=eventlog,
        tables=TABLES,
        own_logs=own_logs,
        projection=EchoProjection(),
        inputs=[Input(IN, handler or EchoHandler(own_logs))] if with_input else [],
        batch_size=batch_size,
    )
    processor.create_store()
    return processor


def handler_of(processor: Processor) -> EchoHandler:
    handler = processor.inputs[0].handler
    assert isinstance(handler, EchoHandler)
    return handler


# ===================================================================== helpers


def input_id(msg_no: int, k: int) -> str:
    return deterministic_id("input", msg_no, k)


def all_input_ids(layout: Sequence[int] = INPUT_LAYOUT) -> list[str]:
    return [input_id(n, k) for n, count in enumerate(layout, 1) for k in range(count)]


def input_event(msg_no: int, k: int) -> Envelope:
    return make_envelope(
        IdentityValue(namespace="crm_id", value=f"v{msg_no}.{k}"),
        event_id=input_id(msg_no, k),
        subject_key="crm",
        occurred_at=T0,
        cause=Cause(command_id=f"upstream-{msg_no}"),
    )


async def append_inputs(eventlog: EventLog, layout: Sequence[int] = INPUT_LAYOUT, *, first: int = 1) -> None:
    for n, count in enumerate(layout, first):
        await eventlog.append(IN_SUBJECT, [input_event(n, k) for k in range(count)], msg_id=f"in-{n}")


async def input_messages(eventlog: EventLog) -> list[LogMessage]:
    return [m async for m in eventlog.read(IN.stream.name, IN_SUBJECT)]


async def outputs(eventlog: EventLog, own: OwnLog = OUT) -> list[tuple[str, list[str]]]:
    """(Cdp-Cause header, event ids) of every message on an own log."""
    return [
        (m.headers.get(CAUSE_HEADER, ""), [e.id for e in m.events()])
        async for m in eventlog.read(own.stream.name, own.subject)
    ]


def output_ids(own: OwnLog = OUT, layout: Sequence[int] = INPUT_LAYOUT) -> list[str]:
    return [deterministic_id(own.name, i) for i in all_input_ids(layout)]


def dump(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    return canonical_dump(engine, ALL_TABLES)


def counters(engine: Engine) -> dict[str, int]:
    with Session(engine) as session:
        return {row.name: row.count for row in session.exec(select(CounterRow)).all()}


def checkpoints(engine: Engine) -> dict[str, int]:
    with Session(engine) as session:
        return all_checkpoints(session)


class SimulatedCrash(BaseException):  # a process death, not an error a consumer could handle
    """The process 'dies' here: after an append reached JetStream, before the SQL commit."""


class CrashAfterAppend(EventLog):
    """Shares a connection; the ``crash_on``-th append reaches the log, then the caller 'dies'."""

    def __init__(self, eventlog: EventLog, crash_on: int) -> None:
        super().__init__(eventlog.nc)
        self.crash_on = crash_on
        self.appends = 0

    async def append(self, subject: str, events: Sequence[Envelope | bytes], **kwargs: Any) -> Appended:
        appended = await super().append(subject, events, **kwargs)
        self.appends += 1
        if self.appends == self.crash_on:
            raise SimulatedCrash(f"after append #{self.appends} (sequence {appended.sequence}), before commit")
        return appended


class RacingWriter(EventLog):
    """Another writer slips a foreign event onto the subject just before each of our appends."""

    def __init__(self, eventlog: EventLog) -> None:
        super().__init__(eventlog.nc)
        self.races = 0

    async def append(self, subject: str, events: Sequence[Envelope | bytes], **kwargs: Any) -> Appended:
        self.races += 1
        name = f"race-{self.races}"
        await self.append_raw(subject, foreign_batch(name), msg_id=name, headers={})
        return await super().append(subject, events, **kwargs)


def foreign_event(name: str) -> Envelope:
    return make_envelope(
        IdentityValue(namespace="foreign", value=name),
        event_id=deterministic_id("foreign", name),
        subject_key="test",
        occurred_at=T0,
        cause=Cause(command_id=name),
    )


def foreign_batch(name: str) -> bytes:
    return encode_batch([foreign_event(name)], T0)


def cmd_event(value: str, cause: Cause, own: OwnLog = OUT, *, size: int = 0) -> Envelope:
    return make_envelope(
        IdentityValue(namespace="cmd", value=value + "x" * size),
        event_id=deterministic_id(own.name, "cmd", value),
        subject_key="test",
        occurred_at=T0,
        cause=cause,
    )


async def failure_of_run_input(processor: Processor) -> str:
    """Run the input's consumer as the service does until it records a failure; check that it is still
    running (waiting to retry, not crashed), then stop it. Returns the recorded failure."""
    task = asyncio.create_task(processor.run_input(processor.inputs[0]))
    try:
        async with asyncio.timeout(15):
            while IN.name not in processor.failures:
                if task.done():
                    task.result()  # raises what crashed it
                    raise AssertionError("run_input returned before recording a failure")
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        assert not task.done()
        return processor.failures[IN.name]
    finally:
        processor.stop()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def command(value: str, calls: list[str], own_logs: Sequence[OwnLog] = (OUT,)) -> Callable[[UnitOfWork], str]:
    """A client command's decide: emit one event per own log, return the first event's id."""

    def decide(uow: UnitOfWork) -> str:
        calls.append(value)
        events = [cmd_event(value, uow.cause, own) for own in own_logs]
        for own, env in zip(own_logs, events, strict=True):
            uow.emit(own, [env])
        return events[0].id

    return decide


# ===================================================================== fixtures


@pytest.fixture
def engine(store_url: str) -> Iterator[Engine]:
    engine = make_engine(store_url)
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture
def sqlite_engine(sqlite_store_url: str) -> Iterator[Engine]:
    engine = make_engine(sqlite_store_url)
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture
def reference_engine(tmp_path: Path) -> Iterator[Engine]:
    """A second, fresh SQLite store for the no-crash reference run."""
    engine = make_engine(f"sqlite:///{tmp_path / 'reference.db'}")
    try:
        yield engine
    finally:
        engine.dispose()


async def serve_eventlog(tmp_path: Path, name: str, **options: Any) -> AsyncIterator[EventLog]:
    server = NatsServer(tmp_path / f"jetstream-{name}", log_file=tmp_path / f"nats-{name}.log", **options)
    server.start()
    try:
        log = await EventLog.connect(server.url, f"cdp-test-{name}")
        await log.ensure_streams()
        try:
            yield log
        finally:
            await log.close()
    finally:
        server.stop()


@pytest.fixture
async def reference_log(tmp_path: Path) -> AsyncIterator[EventLog]:
    """A second, fresh nats-server for the no-crash reference run."""
    async for log in serve_eventlog(tmp_path, "reference"):
        yield log


@pytest.fixture
async def default_payload_log(tmp_path: Path) -> AsyncIterator[EventLog]:
    """A nats-server with NATS' default max_payload (1 MiB), as compose.yaml runs it (the test server
    and `cdp stack` allow 8 MiB)."""
    async for log in serve_eventlog(tmp_path, "default-payload", max_payload=1024 * 1024):
        yield log


async def reference_run(
    engine: Engine,
    eventlog: EventLog,
    *,
    own_logs: Sequence[OwnLog] = (OUT,),
    layout: Sequence[int] = INPUT_LAYOUT,
    size: int = 0,
    routes: Mapping[int, OwnLog] | None = None,
    batch_size: int = 3,
) -> dict[str, list[tuple[Any, ...]]]:
    await append_inputs(eventlog, layout)
    handler = EchoHandler(own_logs, size=size, routes=routes)
    processor = make_processor(engine, eventlog, handler, own_logs=own_logs, batch_size=batch_size)
    await processor.catch_up()
    return dump(engine)


# ===================================================================== (a) processing


async def test_catch_up_applies_every_input_once(engine: Engine, eventlog: EventLog) -> None:
    await append_inputs(eventlog)
    processor = make_processor(engine, eventlog, batch_size=3)

    await processor.catch_up()

    handler = handler_of(processor)
    assert handler.observed == all_input_ids()
    assert handler.decided == all_input_ids()
    assert counters(engine) == {"observed": 8, "folded:test-out": 8}
    with processor.read() as session:
        rows = session.exec(select(InputRow)).all()
        assert sorted((r.sequence, r.value) for r in rows) == [
            (1, "v1.0"),
            (2, "v2.0"),
            (3, "v3.0"),
            (3, "v3.1"),
            (4, "v4.0"),
            (5, "v5.0"),
            (6, "v6.0"),
            (7, "v7.0"),
        ]
        out = {r.event_id: (r.own, r.cause, r.value) for r in session.exec(select(OutputRow)).all()}
    assert out[deterministic_id("test-out", input_id(3, 1))] == ("test-out", input_id(3, 1), "V3.1")
    assert sorted(out) == sorted(output_ids())

    # One output message per fetched batch (3 + 3 + 1 messages), caused by the batch's last message.
    ids = output_ids()
    assert await outputs(eventlog) == [
        ("test-in:3", ids[0:4]),
        ("test-in:6", ids[4:7]),
        ("test-in:7", ids[7:8]),
    ]
    assert checkpoints(engine) == {
        in_checkpoint(IN): 7,
        emitted_checkpoint(IN): 7,
        own_checkpoint(OUT): 3,
    }


async def test_catch_up_with_nothing_to_do(sqlite_engine: Engine, eventlog: EventLog) -> None:
    processor = make_processor(sqlite_engine, eventlog)
    await processor.catch_up()
    assert counters(sqlite_engine) == {}
    assert await outputs(eventlog) == []


async def test_catch_up_continues_from_the_checkpoint(sqlite_engine: Engine, eventlog: EventLog) -> None:
    await append_inputs(eventlog, [1, 1])
    processor = make_processor(sqlite_engine, eventlog, batch_size=10)
    await processor.catch_up()
    await append_inputs(eventlog, [1, 1], first=3)

    await processor.catch_up()

    assert handler_of(processor).decided == all_input_ids([1, 1, 1, 1])
    assert [cause for cause, _ in await outputs(eventlog)] == ["test-in:2", "test-in:4"]
    assert counters(sqlite_engine) == {"observed": 4, "folded:test-out": 4}


# ===================================================================== (b) re-delivery


async def test_redelivery_of_applied_messages_changes_nothing(engine: Engine, eventlog: EventLog) -> None:
    await append_inputs(eventlog)
    processor = make_processor(engine, eventlog)
    await processor.catch_up()
    handler = handler_of(processor)
    before = dump(engine)
    before_outputs = await outputs(eventlog)
    decided = list(handler.decided)
    observed = list(handler.observed)

    msgs = await input_messages(eventlog)
    applied = await processor.apply_input_batch(processor.inputs[0], [(m, None) for m in msgs])

    assert applied == 0
    assert handler.decided == decided
    assert handler.observed == observed
    assert dump(engine) == before
    assert await outputs(eventlog) == before_outputs


async def test_redelivered_batch_with_a_new_message_applies_only_the_new_one(
    sqlite_engine: Engine, eventlog: EventLog
) -> None:
    await append_inputs(eventlog)
    processor = make_processor(sqlite_engine, eventlog)
    await processor.catch_up()
    handler = handler_of(processor)
    await append_inputs(eventlog, [1], first=8)
    msgs = await input_messages(eventlog)

    applied = await processor.apply_input_batch(processor.inputs[0], [(m, None) for m in msgs[-3:]])

    assert applied == 1
    assert handler.decided == [*all_input_ids(), input_id(8, 0)]
    assert counters(sqlite_engine) == {"observed": 9, "folded:test-out": 9}
    assert (await outputs(eventlog))[-1] == ("test-in:8", [deterministic_id("test-out", input_id(8, 0))])
    assert checkpoints(sqlite_engine)[in_checkpoint(IN)] == 8


# ===================================================================== (c) crash between append and commit


@pytest.mark.parametrize("crash_on", [1, 2, 3])
async def test_crash_between_append_and_commit_recovers_to_the_no_crash_state(
    engine: Engine,
    eventlog: EventLog,
    reference_engine: Engine,
    reference_log: EventLog,
    crash_on: int,
) -> None:
    expected = await reference_run(reference_engine, reference_log)
    expected_outputs = await outputs(reference_log)

    await append_inputs(eventlog)
    crashing = make_processor(engine, CrashAfterAppend(eventlog, crash_on), batch_size=3)
    with pytest.raises(SimulatedCrash):
        await crashing.catch_up()
    # The crashed batch's outputs are on the log, but its transaction rolled back.
    assert len(await outputs(eventlog)) == crash_on
    assert checkpoints(engine).get(own_checkpoint(OUT), 0) == crash_on - 1

    restarted = make_processor(engine, eventlog, batch_size=3)
    await restarted.catch_up()

    # The crashed batch is observed again but not decided again.
    batches = [[1, 2, 3], [4, 5, 6], [7]]
    redecided = [input_id(n, k) for b in batches[crash_on:] for n in b for k in range(INPUT_LAYOUT[n - 1])]
    assert handler_of(restarted).decided == redecided
    assert dump(engine) == expected
    got = await outputs(eventlog)
    assert got == expected_outputs
    emitted = [i for _, ids in got for i in ids]
    assert len(emitted) == len(set(emitted)) == 8
    assert emitted == output_ids()


async def test_restart_without_crash_changes_nothing(sqlite_engine: Engine, eventlog: EventLog) -> None:
    await append_inputs(eventlog)
    await make_processor(sqlite_engine, eventlog).catch_up()
    before = dump(sqlite_engine)
    before_outputs = await outputs(eventlog)

    restarted = make_processor(sqlite_engine, eventlog)
    assert await restarted.recover() == 0
    await restarted.catch_up()

    assert handler_of(restarted).decided == []
    assert handler_of(restarted).observed == []
    assert dump(sqlite_engine) == before
    assert await outputs(eventlog) == before_outputs


# ===================================================================== (d) one message per cause


def letters(engine: Engine) -> list[tuple[int, str, str, int]]:
    """(sequence, error class, state, redrives) of every dead letter of the test input."""
    with Session(engine) as session:
        rows = session.exec(select(DeadLetterRow).order_by(DeadLetterRow.sequence)).all()  # type: ignore[arg-type]
        return [(r.sequence, r.error_class, r.state, r.redrives) for r in rows if r.consumer == IN.name]


async def test_a_handler_bug_dead_letters_each_message_it_raises_on_and_a_redrive_applies_them_after_a_fix(
    sqlite_engine: Engine, eventlog: EventLog, reference_engine: Engine
) -> None:
    """Emitting one cause's events to two own logs is a programming error (MixedOwnLogs). It must
    not stop the input: each message it raises on is set aside with its exception class, nothing
    of it reaches the log or the store, and once the handler is fixed a redrive applies them. A
    rebuild then makes the same decisions."""
    both = (OUT, OUT_B)
    await append_inputs(eventlog)
    handler = EchoHandler(both)
    processor = make_processor(sqlite_engine, eventlog, handler, own_logs=both, batch_size=3)
    await processor.recover()
    msgs = await input_messages(eventlog)

    applied = await processor.apply_input_batch(processor.inputs[0], [(m, None) for m in msgs[:3]])

    assert applied == 0
    assert await outputs(eventlog, OUT) == []
    assert await outputs(eventlog, OUT_B) == []
    assert counters(sqlite_engine) == {}  # every observation rolled back with its message
    assert letters(sqlite_engine) == [(n, "MixedOwnLogs", "dead", 0) for n in (1, 2, 3)]
    assert checkpoints(sqlite_engine)[in_checkpoint(IN)] == 3

    handler.outs = [OUT]  # the fix
    assert await processor.request_redrive(IN.name, [], "fix-1") == 3
    assert letters(sqlite_engine) == [(n, "MixedOwnLogs", "redrive_requested", 0) for n in (1, 2, 3)]
    assert await processor.redrive(processor.inputs[0]) == 3

    assert letters(sqlite_engine) == [(n, "MixedOwnLogs", "redriven", 1) for n in (1, 2, 3)]
    assert [cause for cause, _ in await outputs(eventlog, OUT)] == [f"cmd:redrive:test-in:{n}:1" for n in (1, 2, 3)]
    await processor.catch_up()  # the rest, with the fixed handler
    assert sorted(i for _c, ids in await outputs(eventlog) for i in ids) == sorted(output_ids())
    assert counters(sqlite_engine) == {"observed": 8, "folded:test-out": 8}

    live = canonical_dump(sqlite_engine, [*ALL_TABLES, *DEADLETTER_TABLES])
    rebuilt = make_processor(reference_engine, eventlog, EchoHandler((OUT,)), own_logs=both)
    await rebuilt.rebuild()
    assert canonical_dump(reference_engine, [*ALL_TABLES, *DEADLETTER_TABLES]) == live


async def test_garbage_between_valid_messages_is_dead_lettered_and_the_input_moves_on(
    sqlite_engine: Engine, eventlog: EventLog
) -> None:
    """Bytes that are no event batch at all, and a batch whose event holds the wrong payload type,
    sit between valid messages. The consumer, run as the service runs it, sets both aside with
    their reason and a masked excerpt, applies every valid message once, and records no error."""
    await append_inputs(eventlog, [1, 1])
    await eventlog.append_raw(IN_SUBJECT, b"\xff\xfe not protobuf: ann@example.com 4155550100", msg_id="junk-1")
    wrong = make_envelope(
        Cause().to_proto(), event_id="wrong", subject_key="x", occurred_at=T0, cause=Cause(command_id="w")
    )
    await eventlog.append(IN_SUBJECT, [wrong], msg_id="junk-2")
    await append_inputs(eventlog, [1, 1], first=5)
    processor = make_processor(sqlite_engine, eventlog, batch_size=4)
    await processor.recover()

    await run_until_applied(processor, 6)

    assert [(seq, state) for seq, _cls, state, _n in letters(sqlite_engine)] == [(3, "dead"), (4, "dead")]
    assert [cls for _seq, cls, _s, _n in letters(sqlite_engine)] == ["DecodeError", "TypeError"]
    with Session(sqlite_engine) as session:
        junk = session.get(DeadLetterRow, (IN.name, 3))
        assert junk is not None
        assert "example" not in junk.excerpt
        assert "4155550100" not in junk.excerpt
        assert "xxx@xxxxxxx.xxx 9999999999" in junk.excerpt
        assert (junk.stream, junk.subject) == (IN.stream.name, IN_SUBJECT)
    # every valid message once, in order (the handler also saw the rolled-back first attempt)
    assert [i for _cause, ids in await outputs(eventlog) for i in ids] == [
        deterministic_id(OUT.name, input_id(n, 0)) for n in (1, 2, 5, 6)
    ]
    assert counters(sqlite_engine) == {"observed": 4, "folded:test-out": 4}
    assert processor.failures == {}


# Inputs 1-2 go to OUT, 3-4 to OUT_B, 5-7 to OUT again: one cause, one own log each.
ROUTES: dict[int, OwnLog] = {1: OUT, 2: OUT, 3: OUT_B, 4: OUT_B, 5: OUT, 6: OUT, 7: OUT}


def routed_ids(own: OwnLog, msg_nos: Sequence[int]) -> list[str]:
    return [deterministic_id(own.name, input_id(n, k)) for n in msg_nos for k in range(INPUT_LAYOUT[n - 1])]


async def test_consecutive_inputs_writing_different_own_logs_are_sent_in_order(
    engine: Engine, eventlog: EventLog
) -> None:
    both = (OUT, OUT_B)
    await append_inputs(eventlog)
    processor = make_processor(engine, eventlog, EchoHandler(routes=ROUTES), own_logs=both, batch_size=10)
    await processor.recover()
    msgs = await input_messages(eventlog)

    applied = await processor.apply_input_batch(processor.inputs[0], [(m, None) for m in msgs])  # one batch

    assert applied == 7
    assert handler_of(processor).decided == all_input_ids()
    # Consecutive causes share a message while they write the same own log; each message names the
    # last cause it completes.
    assert await outputs(eventlog, OUT) == [
        ("test-in:2", routed_ids(OUT, [1, 2])),
        ("test-in:7", routed_ids(OUT, [5, 6, 7])),
    ]
    assert await outputs(eventlog, OUT_B) == [("test-in:4", routed_ids(OUT_B, [3, 4]))]
    assert counters(engine) == {"observed": 8, "folded:test-out": 5, "folded:test-out-b": 3}
    assert checkpoints(engine) == {
        in_checkpoint(IN): 7,
        emitted_checkpoint(IN): 7,
        own_checkpoint(OUT): 2,
        own_checkpoint(OUT_B): 1,
    }


@pytest.mark.parametrize("crash_on", [1, 2, 3])
async def test_crash_between_the_own_logs_of_one_batch_recovers_to_the_no_crash_state(
    sqlite_engine: Engine,
    eventlog: EventLog,
    reference_engine: Engine,
    reference_log: EventLog,
    crash_on: int,
) -> None:
    both = (OUT, OUT_B)
    expected = await reference_run(reference_engine, reference_log, own_logs=both, routes=ROUTES, batch_size=10)
    expected_out = await outputs(reference_log, OUT)
    expected_out_b = await outputs(reference_log, OUT_B)
    assert [c for c, _ in expected_out] == ["test-in:2", "test-in:7"]
    assert [c for c, _ in expected_out_b] == ["test-in:4"]

    await append_inputs(eventlog)
    crashing = make_processor(
        sqlite_engine, CrashAfterAppend(eventlog, crash_on), EchoHandler(routes=ROUTES), own_logs=both, batch_size=10
    )
    with pytest.raises(SimulatedCrash):
        await crashing.catch_up()
    # Appended in cause order: OUT test-in:2, OUT_B test-in:4, OUT test-in:7; the batch rolled back.
    assert len(await outputs(eventlog, OUT)) + len(await outputs(eventlog, OUT_B)) == crash_on
    assert checkpoints(sqlite_engine) == {}

    restarted = make_processor(sqlite_engine, eventlog, EchoHandler(routes=ROUTES), own_logs=both, batch_size=10)
    await restarted.catch_up()

    covered = [2, 4, 7][crash_on - 1]  # recovery takes the highest cause found on either own log's tail
    assert handler_of(restarted).decided == [
        input_id(n, k) for n, count in enumerate(INPUT_LAYOUT, 1) if n > covered for k in range(count)
    ]
    assert dump(sqlite_engine) == expected
    assert await outputs(eventlog, OUT) == expected_out
    assert await outputs(eventlog, OUT_B) == expected_out_b


async def test_big_outputs_of_one_batch_are_appended_as_several_messages_at_input_boundaries(
    engine: Engine, eventlog: EventLog
) -> None:
    assert BIG < FLUSH_BYTES <= 2 * BIG
    await append_inputs(eventlog)
    processor = make_processor(engine, eventlog, EchoHandler(size=BIG), batch_size=10)
    await processor.recover()
    msgs = await input_messages(eventlog)

    applied = await processor.apply_input_batch(processor.inputs[0], [(m, None) for m in msgs])  # one batch

    assert applied == 7
    handler = handler_of(processor)
    assert handler.observed == all_input_ids()
    assert handler.decided == all_input_ids()
    assert counters(engine) == {"observed": 8, "folded:test-out": 8}
    # A flush whenever two inputs' outputs are pending, each message caused by the last input it covers.
    ids = output_ids()
    assert await outputs(eventlog) == [
        ("test-in:2", ids[0:2]),
        ("test-in:3", ids[2:4]),
        ("test-in:5", ids[4:6]),
        ("test-in:7", ids[6:8]),
    ]
    assert checkpoints(engine) == {
        in_checkpoint(IN): 7,
        emitted_checkpoint(IN): 7,
        own_checkpoint(OUT): 4,
    }
    with processor.read() as session:
        values = {r.event_id: r.value for r in session.exec(select(OutputRow)).all()}
    assert values[ids[3]] == "V3.1" + "x" * BIG


@pytest.mark.parametrize("crash_on", [1, 2, 4])
async def test_crash_between_the_messages_of_one_batch_recovers_to_the_no_crash_state(
    sqlite_engine: Engine,
    eventlog: EventLog,
    reference_engine: Engine,
    reference_log: EventLog,
    crash_on: int,
) -> None:
    expected = await reference_run(reference_engine, reference_log, size=BIG, batch_size=10)
    expected_outputs = await outputs(reference_log)
    assert [cause for cause, _ in expected_outputs] == ["test-in:2", "test-in:3", "test-in:5", "test-in:7"]

    await append_inputs(eventlog)
    crashing = make_processor(sqlite_engine, CrashAfterAppend(eventlog, crash_on), EchoHandler(size=BIG), batch_size=10)
    with pytest.raises(SimulatedCrash):
        await crashing.catch_up()
    # The first crash_on messages of the batch are on the log; the whole batch's transaction rolled back.
    assert await outputs(eventlog) == expected_outputs[:crash_on]
    assert checkpoints(sqlite_engine) == {}
    assert counters(sqlite_engine) == {}

    restarted = make_processor(sqlite_engine, eventlog, EchoHandler(size=BIG), batch_size=10)
    await restarted.catch_up()

    # Inputs whose outputs reached the log are observed again but not decided again.
    covered = [2, 3, 5, 7][crash_on - 1]
    assert handler_of(restarted).observed == all_input_ids()
    assert handler_of(restarted).decided == [
        input_id(n, k) for n, count in enumerate(INPUT_LAYOUT, 1) if n > covered for k in range(count)
    ]
    assert dump(sqlite_engine) == expected
    got = await outputs(eventlog)
    assert got == expected_outputs
    emitted = [i for _, ids in got for i in ids]
    assert len(emitted) == len(set(emitted)) == 8
    assert emitted == output_ids()


async def test_a_refused_message_in_flight_stops_the_batch_before_the_next_is_published(
    sqlite_engine: Engine, eventlog: EventLog, reference_engine: Engine, reference_log: EventLog
) -> None:
    """Mid-batch messages go out while the batch goes on deciding; one that JetStream refuses
    (another writer got there first) fails the batch at the next send: nothing after it is
    published and the batch's transaction rolls back. Recovery then ends where a run without
    the intruder would, plus the intruder."""
    expected = await outputs_of_reference(reference_engine, reference_log)
    await append_inputs(eventlog)
    racing = RacingWriter(eventlog)
    processor = make_processor(sqlite_engine, racing, EchoHandler(size=BIG), batch_size=10)
    await processor.recover()
    msgs = await input_messages(eventlog)

    with pytest.raises(AppendConflict):
        await processor.apply_input_batch(processor.inputs[0], [(m, None) for m in msgs])

    assert racing.races == 1  # the second message was never sent
    assert [cause for cause, _ in await outputs(eventlog)] == [""]  # only the intruder
    assert checkpoints(sqlite_engine) == {}
    assert counters(sqlite_engine) == {}

    restarted = make_processor(sqlite_engine, eventlog, EchoHandler(size=BIG), batch_size=10)
    await restarted.catch_up()
    got = await outputs(eventlog)
    assert got[0][0] == ""
    assert got[1:] == expected


async def outputs_of_reference(engine: Engine, eventlog: EventLog) -> list[tuple[str, list[str]]]:
    await reference_run(engine, eventlog, size=BIG, batch_size=10)
    return await outputs(eventlog)


DOWN = ConsumerSpec("test-down", AUDIENCE, OUT.subject)
PART_SIZE = 600_000  # one input message with two events, each echoed as ~600 KB: one cause > MAX_MESSAGE_BYTES


async def parts_of(eventlog: EventLog, own: OwnLog = OUT) -> list[tuple[str, str]]:
    """(Cdp-Cause, Cdp-Part) of every message on an own log."""
    return [
        (m.headers.get(CAUSE_HEADER, ""), m.headers.get(PART_HEADER, ""))
        async for m in eventlog.read(own.stream.name, own.subject)
    ]


def downstream(engine: Engine, eventlog: EventLog) -> Processor:
    """A second service that reads OUT as its input (and echoes to OUT_B)."""
    processor = Processor(
        service="down",
        engine=engine,
        eventlog=eventlog,
        tables=TABLES,
        own_logs=[OUT_B],
        projection=EchoProjection(),
        inputs=[Input(DOWN, EchoHandler((OUT_B,)))],
        batch_size=1,
    )
    processor.create_store()
    return processor


async def test_one_input_whose_outputs_exceed_one_message_is_appended_as_parts_and_applied_whole(
    sqlite_engine: Engine, eventlog: EventLog, reference_engine: Engine
) -> None:
    """No valid input may cause more than a message holds: its outputs go out as numbered parts,
    the writer's store folds them, and a downstream consumer fetching one message at a time
    applies the cause only when its last part is there, in one transaction."""
    assert PART_SIZE < MAX_MESSAGE_BYTES < 2 * PART_SIZE
    await append_inputs(eventlog, [2, 1])
    processor = make_processor(sqlite_engine, eventlog, EchoHandler(sizes={1: PART_SIZE}))
    await processor.catch_up()

    assert await parts_of(eventlog) == [("test-in:1", "1/2"), ("test-in:1", "2/2"), ("test-in:2", "")]
    assert sorted(i for _c, ids in await outputs(eventlog) for i in ids) == sorted(output_ids(layout=[2, 1]))
    assert counters(sqlite_engine) == {"observed": 3, "folded:test-out": 3}

    down = downstream(reference_engine, eventlog)
    msgs = [m async for m in eventlog.read(DOWN.stream.name, DOWN.filter_subject)]
    assert await down.apply_input_batch(down.inputs[0], [(msgs[0], None)]) == 0  # half a cause: nothing
    assert checkpoints(reference_engine).get(in_checkpoint(DOWN), 0) == 0
    await down.catch_up()
    assert counters(reference_engine) == {"observed": 3, "folded:test-out-b": 3}
    # The cause is the unit's last part (stream sequence 2); its echoes are big too, so in parts again.
    assert await parts_of(eventlog, OUT_B) == [("test-down:2", "1/2"), ("test-down:2", "2/2"), ("test-down:3", "")]


@pytest.mark.parametrize("crash_on", [1, 2])
async def test_a_crash_between_the_parts_of_a_cause_ends_equal_to_the_no_crash_run(
    sqlite_engine: Engine,
    eventlog: EventLog,
    reference_engine: Engine,
    reference_log: EventLog,
    tmp_path: Path,
    crash_on: int,
) -> None:
    """kill -9 after the first part (an aborted attempt stays on the log) or after the last part
    (before the commit). The restarted writer and a downstream consumer end equal to a run
    without the crash; the aborted part is folded by no one."""
    layout = [2, 1]
    expected = await reference_run(reference_engine, reference_log, layout=layout, size=PART_SIZE)
    ref_down_engine = make_engine(sqlite_url(tmp_path / "ref-down.db"))
    ref_down = downstream(ref_down_engine, reference_log)
    await ref_down.catch_up()

    await append_inputs(eventlog, layout)
    crashing = make_processor(sqlite_engine, CrashAfterAppend(eventlog, crash_on), EchoHandler(size=PART_SIZE))
    with pytest.raises(SimulatedCrash):
        await crashing.catch_up()
    assert len(await parts_of(eventlog)) == crash_on

    restarted = make_processor(sqlite_engine, eventlog, EchoHandler(size=PART_SIZE))
    await restarted.catch_up()

    # Equal but for where the own log ends: an aborted part more on the log after crash 1.
    aborted = 2 - crash_on
    state = dump(sqlite_engine)
    assert checkpoints(sqlite_engine) == {**checkpoints(reference_engine), "own:test-out": 3 + aborted}
    assert {k: v for k, v in state.items() if k != "cdp_checkpoint"} == {
        k: v for k, v in expected.items() if k != "cdp_checkpoint"
    }
    got = await parts_of(eventlog)
    if crash_on == 1:  # the aborted part, then the cause again, whole, then the next input
        assert got == [("test-in:1", "1/2"), ("test-in:1", "1/2"), ("test-in:1", "2/2"), ("test-in:2", "")]
    else:
        assert got == await parts_of(reference_log)
    down_engine = make_engine(sqlite_url(tmp_path / "down.db"))
    down = downstream(down_engine, eventlog)
    await down.catch_up()
    assert counters(down_engine) == counters(ref_down_engine) == {"observed": 3, "folded:test-out-b": 3}
    got_down, ref = canonical_dump(down_engine, TABLES), canonical_dump(ref_down_engine, TABLES)
    assert got_down["test_processor_output"] == ref["test_processor_output"]
    # the same events observed (at stream sequences one further on after the aborted part)
    assert [(e, v) for e, _seq, v in got_down["test_processor_input"]] == [
        (e, v) for e, _seq, v in ref["test_processor_input"]
    ]
    rebuilt = make_processor(reference_engine, eventlog, EchoHandler(size=PART_SIZE))
    await rebuilt.rebuild()
    assert dump(reference_engine) == state
    down_engine.dispose()
    ref_down_engine.dispose()


@pytest.mark.parametrize("crash", [False, True])
async def test_a_big_cause_after_pending_smaller_ones_is_appended_in_its_own_message(
    sqlite_engine: Engine, eventlog: EventLog, crash: bool
) -> None:
    """The size limit is per cause: what earlier inputs left pending (below the flush threshold) is
    flushed first, in its own message, rather than the big cause being refused."""
    small, big = 200_000, 900_000  # input 1 stays pending (< FLUSH_BYTES); input 2 alone fits one message
    assert small < FLUSH_BYTES
    assert big < MAX_MESSAGE_BYTES < small + big
    await append_inputs(eventlog, [1, 1])
    handler = EchoHandler(sizes={1: small, 2: big})
    if crash:  # die after input 1's message is on the log, before input 2's is
        crashing = make_processor(sqlite_engine, CrashAfterAppend(eventlog, 1), handler, batch_size=10)
        with pytest.raises(SimulatedCrash):
            await crashing.catch_up()
        assert checkpoints(sqlite_engine) == {}
        handler = EchoHandler(sizes={1: small, 2: big})
    processor = make_processor(sqlite_engine, eventlog, handler, batch_size=10)

    await processor.catch_up()

    assert handler.decided == (all_input_ids([1, 1])[1:] if crash else all_input_ids([1, 1]))
    ids = output_ids(layout=[1, 1])
    assert await outputs(eventlog) == [("test-in:1", ids[:1]), ("test-in:2", ids[1:])]
    assert counters(sqlite_engine) == {"observed": 2, "folded:test-out": 2}
    assert checkpoints(sqlite_engine) == {
        in_checkpoint(IN): 2,
        emitted_checkpoint(IN): 2,
        own_checkpoint(OUT): 2,
    }


async def test_uow_cause_is_the_input_message_being_decided(sqlite_engine: Engine, eventlog: EventLog) -> None:
    """Handlers stamp uow.cause as their events' causation (cdp_identity does): it must name the input
    message being decided, not the first message of the fetched batch."""
    await append_inputs(eventlog)
    processor = make_processor(sqlite_engine, eventlog, batch_size=3)

    await processor.catch_up()

    causes = handler_of(processor).causes
    assert [seq for seq, _ in causes] == [1, 2, 3, 3, 4, 5, 6, 7]
    assert [(seq, cause.stream, cause.sequence) for seq, cause in causes] == [(seq, IN.name, seq) for seq, _ in causes]


# ===================================================================== (e) rebuild


async def test_rebuild_gives_the_same_store(engine: Engine, eventlog: EventLog) -> None:
    await append_inputs(eventlog)
    processor = make_processor(engine, eventlog)
    await processor.catch_up()
    await processor.execute("c1", command("one", []))
    await append_inputs(eventlog, [1, 2], first=8)
    await processor.catch_up()
    before = dump(engine)
    before_outputs = await outputs(eventlog)
    handler = handler_of(processor)
    decided = list(handler.decided)
    assert counters(engine) == {"observed": 11, "folded:test-out": 12}

    await processor.rebuild()

    assert dump(engine) == before
    assert handler.decided == decided  # replay observes and folds, decides nothing
    assert await outputs(eventlog) == before_outputs


async def test_a_projection_prefetches_each_folded_batch_of_its_own_log_once(
    engine: Engine, eventlog: EventLog
) -> None:
    await append_inputs(eventlog)
    processor = make_processor(engine, eventlog)
    await processor.catch_up()
    before = dump(engine)
    seen: list[list[str]] = []

    class PrefetchingProjection(EchoProjection):
        def prefetch(self, session: Session, own: OwnLog, envelopes: list[Envelope]) -> None:
            seen.append([env.id for env in envelopes])

    replica = make_processor(engine, eventlog, batch_size=2)
    replica.projection = PrefetchingProjection()
    await replica.rebuild()

    own_events = [event_id for _, ids in await outputs(eventlog) for event_id in ids]
    assert [event_id for batch in seen for event_id in batch] == own_events  # each once, in log order
    assert len(seen) > 1  # once per folded batch, not once per rebuild
    assert all(batch for batch in seen)
    assert dump(engine) == before


async def test_rebuild_into_a_fresh_store_equals_the_live_store(
    sqlite_engine: Engine, eventlog: EventLog, reference_engine: Engine
) -> None:
    await append_inputs(eventlog)
    processor = make_processor(sqlite_engine, eventlog, batch_size=2)
    await processor.catch_up()

    replica = make_processor(reference_engine, eventlog, batch_size=5)
    await replica.rebuild()

    assert dump(reference_engine) == dump(sqlite_engine)
    assert handler_of(replica).decided == []


async def test_a_rebuild_never_appends_it_stops_where_a_replay_would_decide_something_new(
    sqlite_engine: Engine, eventlog: EventLog, reference_engine: Engine
) -> None:
    """A live service that has not decided all its input yet: a rebuild beside it must not decide
    (append) in its place. It stops, loudly, and the log is left as it was."""
    await append_inputs(eventlog, layout=[2, 2])
    processor = make_processor(sqlite_engine, eventlog, batch_size=1)
    await processor.catch_up()
    await append_inputs(eventlog, layout=[2], first=3)  # not yet decided by the live service
    before = await outputs(eventlog)

    replica = make_processor(reference_engine, eventlog, batch_size=5)
    with pytest.raises(ReplayWouldAppend, match="while rebuilding"):
        await replica.rebuild()

    assert await outputs(eventlog) == before
    assert not replica.replay_only  # a later serve of that store may append again
    await processor.catch_up()  # the live service decides the rest, once
    assert len(await outputs(eventlog)) == len(before) + 1  # one output message for the new input message


# ===================================================================== (f) commands


async def test_execute_appends_folds_and_commits(engine: Engine, eventlog: EventLog) -> None:
    processor = make_processor(engine, eventlog, with_input=False)
    await processor.recover()
    calls: list[str] = []

    result = await processor.execute("c1", command("one", calls))

    assert result == deterministic_id("test-out", "cmd", "one")
    assert calls == ["one"]
    assert await outputs(eventlog) == [("cmd:c1", [result])]
    assert counters(engine) == {"folded:test-out": 1}
    assert checkpoints(engine) == {own_checkpoint(OUT): 1}


async def test_encoded_envelopes_travel_in_order_and_their_bulk_fold_equals_a_rebuild(
    engine: Engine, eventlog: EventLog
) -> None:
    processor = make_processor(engine, eventlog, with_input=False)
    await processor.recover()
    projection = EchoProjection()

    def decide(uow: UnitOfWork) -> None:
        first = cmd_event("first", uow.cause, OUT)
        rest = [cmd_event(f"bulk{i}", uow.cause, OUT) for i in range(3)]
        uow.emit(OUT, [first])

        def fold(session: Session) -> None:  # what folding them one by one does, at once
            for env in rest:
                projection.fold(session, OUT, env)

        uow.emit_encoded(OUT, [env.SerializeToString() for env in rest], fold)
        uow.emit(OUT, [cmd_event("last", uow.cause, OUT)])

    await processor.execute("c1", decide)

    (message,) = [m async for m in eventlog.read(OUT.stream.name, OUT.subject)]
    values = [unpack(e, IdentityValue).value for e in message.events()]
    assert values == ["first", "bulk0", "bulk1", "bulk2", "last"]
    assert all(e.HasField("recorded_at") for e in message.events())
    assert counters(engine) == {"folded:test-out": 5}
    before = dump(engine)
    await processor.rebuild()
    assert dump(engine) == before


async def test_a_store_left_by_code_with_other_tables_is_rebuilt_from_the_log_on_start(
    engine: Engine, eventlog: EventLog
) -> None:
    processor = make_processor(engine, eventlog, with_input=False)
    await processor.recover()
    calls: list[str] = []
    await processor.execute("c1", command("one", calls))
    await processor.execute("c2", command("two", calls))
    before = dump(engine)
    with transaction(engine) as session:  # as if an older version had created the tables
        session.merge(StoreSchema(service="test", fingerprint="older"))

    restarted = make_processor(engine, eventlog, with_input=False)  # create_store: emptied, not kept
    assert counters(engine) == {}
    assert checkpoints(engine) == {}
    await restarted.recover()

    assert dump(engine) == before
    assert restarted.create_store() is False


async def test_execute_recovers_from_a_foreign_append_and_retries(engine: Engine, eventlog: EventLog) -> None:
    processor = make_processor(engine, eventlog, with_input=False)
    await processor.recover()
    calls: list[str] = []
    first = await processor.execute("c1", command("one", calls))
    foreign = foreign_event("intruder")
    await eventlog.append(OUT.subject, [foreign], msg_id="intruder", expected_last_subject_sequence=1)

    second = await processor.execute("c2", command("two", calls))

    assert calls == ["one", "two", "two"]  # the guard refused the first try of c2
    assert await outputs(eventlog) == [("cmd:c1", [first]), ("", [foreign.id]), ("cmd:c2", [second])]
    with processor.read() as session:
        folded = {r.event_id: r.value for r in session.exec(select(OutputRow)).all()}
    assert folded == {first: "one", foreign.id: "intruder", second: "two"}
    assert counters(engine) == {"folded:test-out": 3}
    assert checkpoints(engine) == {own_checkpoint(OUT): 3}

    before = dump(engine)
    await processor.rebuild()
    assert dump(engine) == before


async def test_garbage_on_an_own_log_is_set_aside_by_recovery_and_the_writer_goes_on(
    sqlite_engine: Engine, eventlog: EventLog
) -> None:
    """Bytes this service never wrote land on its own subject (possible until NATS permissions keep
    others out). The next append is refused by the guard; recovery cannot fold the bytes, sets them
    aside (listed with the dead letters), and the retried command lands behind them."""
    processor = make_processor(sqlite_engine, eventlog, with_input=False)
    await processor.recover()
    calls: list[str] = []
    first = await processor.execute("c1", command("one", calls))
    await eventlog.append_raw(OUT.subject, b"\x0a\xff garbage", msg_id="junk", expected_last_subject_sequence=1)

    second = await processor.execute("c2", command("two", calls))

    assert calls == ["one", "two", "two"]
    assert [ids for _c, ids in await outputs_skipping_garbage(eventlog)] == [[first], [second]]
    assert checkpoints(sqlite_engine) == {own_checkpoint(OUT): 3}
    with Session(sqlite_engine) as session:
        [row] = session.exec(select(DeadLetterRow)).all()
    assert (row.consumer, row.sequence, row.error_class) == ("own:test-out", 2, "DecodeError")
    before = canonical_dump(sqlite_engine, [*ALL_TABLES, *DEADLETTER_TABLES])
    await processor.rebuild()
    assert canonical_dump(sqlite_engine, [*ALL_TABLES, *DEADLETTER_TABLES]) == before


async def outputs_skipping_garbage(eventlog: EventLog) -> list[tuple[str, list[str]]]:
    out = []
    async for m in eventlog.read(OUT.stream.name, OUT.subject):
        with contextlib.suppress(Exception):
            out.append((m.headers.get(CAUSE_HEADER, ""), [e.id for e in m.events()]))
    return out


async def test_execute_gives_up_after_a_second_conflict(sqlite_engine: Engine, eventlog: EventLog) -> None:
    processor = make_processor(sqlite_engine, RacingWriter(eventlog), with_input=False)
    await processor.recover()
    calls: list[str] = []

    with pytest.raises(AppendConflict):
        await processor.execute("c1", command("one", calls))

    assert calls == ["one", "one"]
    assert [cause for cause, _ in await outputs(eventlog)] == ["", ""]
    with processor.read() as session:
        folded = {r.value for r in session.exec(select(OutputRow)).all()}
    assert folded == {"race-1"}  # the first race was recovered; the second is not folded yet
    await processor.recover()
    assert counters(sqlite_engine) == {"folded:test-out": 2}


async def test_execute_rolls_back_when_decide_raises(sqlite_engine: Engine, eventlog: EventLog) -> None:
    processor = make_processor(sqlite_engine, eventlog, with_input=False)
    await processor.recover()

    def decide(uow: UnitOfWork) -> None:
        command("one", [])(uow)
        raise ValueError("refused")

    with pytest.raises(ValueError, match="refused"):
        await processor.execute("c1", decide)

    assert counters(sqlite_engine) == {}
    assert await outputs(eventlog) == []


async def test_re_executed_command_is_refused_and_keeps_the_store_equal_to_its_log(
    sqlite_engine: Engine, eventlog: EventLog, reference_engine: Engine
) -> None:
    processor = make_processor(sqlite_engine, eventlog, with_input=False)
    await processor.recover()
    calls: list[str] = []
    first = await processor.execute("c1", command("one", calls))
    after_first = dump(sqlite_engine)

    # A client retry of the same command: JetStream de-duplicates the append (same Nats-Msg-Id).
    with pytest.raises(DuplicateAppend, match="already holds") as refused:
        await processor.execute("c1", command("one", calls))

    assert isinstance(refused.value, Conflict)
    assert calls == ["one", "one", "one"]  # refused, recovered, retried once, refused again
    assert await outputs(eventlog) == [("cmd:c1", [first])]
    assert dump(sqlite_engine) == after_first  # both tries rolled back: folded once, not twice
    assert counters(sqlite_engine) == {"folded:test-out": 1}

    replica = make_processor(reference_engine, eventlog, with_input=False)
    await replica.rebuild()
    assert dump(reference_engine) == dump(sqlite_engine)


async def test_execute_emitting_to_two_own_logs_is_refused(sqlite_engine: Engine, eventlog: EventLog) -> None:
    both = (OUT, OUT_B)
    processor = make_processor(sqlite_engine, eventlog, own_logs=both, with_input=False)
    await processor.recover()
    calls: list[str] = []

    with pytest.raises(MixedOwnLogs, match="one own log"):
        await processor.execute("c1", command("one", calls, both))

    assert calls == ["one"]  # a programming error: not retried
    assert await outputs(eventlog, OUT) == []
    assert await outputs(eventlog, OUT_B) == []
    assert counters(sqlite_engine) == {}
    assert checkpoints(sqlite_engine) == {}

    # One own log per command is fine, whichever it is.
    a = await processor.execute("c2", command("two", calls, (OUT,)))
    b = await processor.execute("c3", command("three", calls, (OUT_B,)))
    assert await outputs(eventlog, OUT) == [("cmd:c2", [a])]
    assert await outputs(eventlog, OUT_B) == [("cmd:c3", [b])]
    assert checkpoints(sqlite_engine) == {own_checkpoint(OUT): 1, own_checkpoint(OUT_B): 1}  # two streams


async def test_a_consumer_acknowledges_the_aborted_parts_it_drops(
    sqlite_engine: Engine, eventlog: EventLog, reference_engine: Engine
) -> None:
    """Parts of an aborted attempt are never applied; the live consumer must still acknowledge them,
    or JetStream keeps them pending and redelivers them every ack_wait for ever (seen after a
    nats-server restart mid-load: the lag never went back to 0)."""
    await append_inputs(eventlog, [2, 1])
    crashing = make_processor(sqlite_engine, CrashAfterAppend(eventlog, 1), EchoHandler(size=PART_SIZE))
    with pytest.raises(SimulatedCrash):
        await crashing.catch_up()
    await make_processor(sqlite_engine, eventlog, EchoHandler(size=PART_SIZE)).catch_up()
    assert [part for _cause, part in await parts_of(eventlog)] == ["1/2", "1/2", "2/2", ""]

    down = downstream(reference_engine, eventlog)
    await down.recover()
    task = asyncio.create_task(down.run_input(down.inputs[0]))
    try:
        async with asyncio.timeout(20):
            while True:
                await asyncio.sleep(0.05)
                with contextlib.suppress(nats.js.errors.NotFoundError):  # not created yet
                    info = await eventlog.js.consumer_info(DOWN.stream.name, DOWN.name)
                    if info.ack_floor.stream_seq == 4 and not info.num_ack_pending and not info.num_pending:
                        break
    finally:
        down.stop()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert counters(reference_engine) == {"observed": 3, "folded:test-out-b": 3}


async def test_an_ack_lost_in_flight_is_sent_again_once_the_consumer_is_idle(
    sqlite_engine: Engine, eventlog: EventLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every ack the consumer publishes is lost (as with a connection the server dropped). Once
    idle, the reader finds the server's ack floor short of its last ack and sends it again, so no
    message waits out ack_wait."""

    async def lost(msg: Msg) -> None:
        msg._ackd = True  # the client believes it acknowledged; the server never heard it

    monkeypatch.setattr(Msg, "ack", lost)
    await append_inputs(eventlog)
    processor = make_processor(sqlite_engine, eventlog)
    await processor.recover()
    task = asyncio.create_task(processor.run_input(processor.inputs[0]))
    try:
        async with asyncio.timeout(20):
            while True:
                await asyncio.sleep(0.05)
                with contextlib.suppress(nats.js.errors.NotFoundError):
                    info = await eventlog.js.consumer_info(IN.stream.name, IN.name)
                    if info.ack_floor.stream_seq == len(INPUT_LAYOUT) and not info.num_ack_pending:
                        break
    finally:
        processor.stop()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert counters(sqlite_engine) == {"observed": 8, "folded:test-out": 8}


async def test_execute_appends_a_command_whose_events_exceed_one_message_as_parts(
    sqlite_engine: Engine, eventlog: EventLog
) -> None:
    processor = make_processor(sqlite_engine, eventlog, with_input=False)
    await processor.recover()

    def decide(uow: UnitOfWork) -> None:
        uow.emit(OUT, [cmd_event("one", uow.cause, size=PART_SIZE)])
        uow.emit(OUT, [cmd_event("two", uow.cause, size=PART_SIZE)])

    await processor.execute("c1", decide)

    assert await parts_of(eventlog) == [("cmd:c1", "1/2"), ("cmd:c1", "2/2")]
    assert counters(sqlite_engine) == {"folded:test-out": 2}


async def test_one_event_bigger_than_a_message_is_refused(sqlite_engine: Engine, eventlog: EventLog) -> None:
    processor = make_processor(sqlite_engine, eventlog, with_input=False)
    await processor.recover()

    def decide(uow: UnitOfWork) -> None:
        uow.emit(OUT, [cmd_event("huge", uow.cause, size=MAX_MESSAGE_BYTES)])

    with pytest.raises(OversizedCause, match="one event of"):
        await processor.execute("c1", decide)
    assert await outputs(eventlog) == []
    assert counters(sqlite_engine) == {}


async def test_an_encoded_event_bigger_than_a_message_is_refused_and_nothing_is_appended(
    sqlite_engine: Engine, eventlog: EventLog
) -> None:
    """emit_encoded (ingest's hot path) checks sizes in bulk: one event too big refuses the whole
    call before anything of it is held."""
    processor = make_processor(sqlite_engine, eventlog, with_input=False)
    await processor.recover()

    def decide(uow: UnitOfWork) -> None:
        small = cmd_event("small", uow.cause).SerializeToString()
        huge = cmd_event("huge", uow.cause, size=MAX_MESSAGE_BYTES).SerializeToString()
        uow.emit_encoded(OUT, [small, huge], lambda session: None)

    with pytest.raises(OversizedCause, match="one event of"):
        await processor.execute("c1", decide)
    assert await outputs(eventlog) == []


def small_events(cause: Cause, count: int) -> list[Envelope]:
    return [cmd_event(f"s{i}", cause) for i in range(count)]


async def test_many_small_events_beyond_one_message_travel_in_parts_each_within_max_payload(
    sqlite_engine: Engine, default_payload_log: EventLog
) -> None:
    """A cause's size is estimated as appended (recorded_at stamped, batch framing), so many small events
    that only overflow once encoded are split into parts that each fit, on NATS' default max_payload of
    1 MiB (as compose.yaml runs it)."""
    eventlog = default_payload_log
    cause = Cause(command_id="c1")
    bare = [e.ByteSize() + 8 for e in small_events(cause, 8000)]
    count = next(n for n in range(len(bare)) if sum(bare[: n + 1]) > MAX_MESSAGE_BYTES)
    assert len(encode_batch(small_events(cause, count), T0)) > eventlog.nc.max_payload == 1024 * 1024
    processor = make_processor(sqlite_engine, eventlog, with_input=False)
    await processor.recover()

    def decide(uow: UnitOfWork) -> None:
        uow.emit(OUT, small_events(uow.cause, count))

    await processor.execute("c1", decide)

    assert await parts_of(eventlog) == [("cmd:c1", "1/2"), ("cmd:c1", "2/2")]
    assert counters(sqlite_engine) == {"folded:test-out": count}


async def test_an_append_jetstream_refuses_is_retried_never_dead_lettered(
    sqlite_engine: Engine, eventlog: EventLog
) -> None:
    """The output stream refuses messages over 64 bytes (an operator's limit). That is not the
    input's fault: the input waits, with the refusal as its error, and goes through once the
    limit is lifted; nothing is set aside."""
    info = await eventlog.js.stream_info(OUT.stream.name)
    limited = info.config
    limited.max_msg_size = 64
    await eventlog.js.update_stream(limited)
    await append_inputs(eventlog, [1, 1])
    processor = make_processor(sqlite_engine, eventlog)
    await processor.recover()

    failure = await failure_of_run_input(processor)

    assert "append to cdp.audience.9.test failed" in failure
    assert letters(sqlite_engine) == []
    assert checkpoints(sqlite_engine).get(in_checkpoint(IN), 0) == 0
    limited.max_msg_size = -1
    await eventlog.js.update_stream(limited)
    processor = make_processor(sqlite_engine, eventlog)
    await processor.recover()
    await run_until_applied(processor, 2)
    assert letters(sqlite_engine) == []
    assert counters(sqlite_engine) == {"observed": 2, "folded:test-out": 2}


# ===================================================================== gap-free consumption


class ThievingLog(EventLog):
    """Shares a connection; right after the first durable consumer is created, another subscriber
    takes its first ``steal`` deliveries, as a dropped connection loses what was in flight."""

    def __init__(self, eventlog: EventLog, steal: int) -> None:
        super().__init__(eventlog.nc)
        self.steal = steal
        self.stolen: list[int] = []

    async def durable(self, spec: ConsumerSpec, start_sequence: int) -> Any:
        reader = await super().durable(spec, start_sequence)
        if self.steal and not self.stolen:
            thief = await self.js.pull_subscribe_bind(durable=spec.name, stream=spec.stream.name)
            self.stolen = [m.metadata.sequence.stream for m in await thief.fetch(self.steal, timeout=5)]
            await thief.unsubscribe()
        return reader


async def run_until_applied(processor: Processor, sequence: int) -> None:
    task = asyncio.create_task(processor.run_input(processor.inputs[0]))
    try:
        async with asyncio.timeout(20):
            while checkpoints(processor.engine).get(in_checkpoint(IN), 0) < sequence:
                assert not task.done(), task.exception()
                await asyncio.sleep(0.05)
    finally:
        processor.stop()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_deliveries_lost_in_flight_are_read_again_before_anything_later_is_applied(
    sqlite_engine: Engine, eventlog: EventLog, reference_engine: Engine
) -> None:
    """The first two deliveries never reach the consumer (JetStream counts them as delivered and
    would redeliver them only after ack_wait). The consumer must notice the gap at the third
    delivery and read again from its checkpoint, so the store ends equal to an undisturbed run."""
    await append_inputs(eventlog)
    thieving = ThievingLog(eventlog, steal=2)
    processor = make_processor(sqlite_engine, thieving)
    await processor.recover()

    await run_until_applied(processor, len(INPUT_LAYOUT))

    assert thieving.stolen == [1, 2]
    assert processor.health[IN.name].gaps >= 1
    handler = handler_of(processor)
    assert handler.decided == all_input_ids()  # every input once, in stream order
    assert counters(sqlite_engine) == {"observed": 8, "folded:test-out": 8}
    assert [ids for _cause, ids in await outputs(eventlog)] != []
    assert sorted(i for _c, ids in await outputs(eventlog) for i in ids) == sorted(output_ids())


async def test_deliveries_lost_at_the_end_of_the_stream_are_read_again_without_waiting_for_ack_wait(
    sqlite_engine: Engine, eventlog: EventLog
) -> None:
    """Every delivery is lost (the last ones of the stream, as when a connection drops after the
    load ended): no later delivery reveals the gap, and JetStream would redeliver only after
    ack_wait (300 s). The consumer must find it from what the server says it delivered."""
    await append_inputs(eventlog)
    thieving = ThievingLog(eventlog, steal=len(INPUT_LAYOUT))
    processor = make_processor(sqlite_engine, thieving)
    await processor.recover()

    await run_until_applied(processor, len(INPUT_LAYOUT))

    assert len(thieving.stolen) == len(INPUT_LAYOUT)
    assert processor.health[IN.name].gaps >= 1
    assert handler_of(processor).decided == all_input_ids()
    assert counters(sqlite_engine) == {"observed": 8, "folded:test-out": 8}
