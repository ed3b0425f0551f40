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

import nats.errors
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import Field, Session, SQLModel, select

from cdp.common.v1.envelope_pb2 import IdentityValue
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
from cdp_kit.processor import (
    CAUSE_HEADER,
    Input,
    MixedOwnLogs,
    OversizedCause,
    Processor,
    UnitOfWork,
    emitted_checkpoint,
    in_checkpoint,
    own_checkpoint,
)
from cdp_kit.store import Checkpoint, all_checkpoints, canonical_dump, make_engine
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

    Each echo event is padded with ``size`` bytes, or ``sizes[input message sequence]`` where given."""

    def __init__(
        self, outs: Sequence[OwnLog] = (OUT,), *, size: int = 0, sizes: Mapping[int, int] | None = None
    ) -> None:
        self.outs = list(outs)
        self.size = size
        self.sizes = dict(sizes or {})
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
        for own in self.outs:
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


class SimulatedCrash(Exception):
    """The process 'dies' here: after an append reached JetStream, before the SQL commit."""


class CrashAfterAppend(EventLog):
    """Shares a connection; the ``crash_on``-th append reaches the log, then the caller 'dies'."""

    def __init__(self, eventlog: EventLog, crash_on: int) -> None:
        super().__init__(eventlog.nc)
        self.crash_on = crash_on
        self.appends = 0

    async def append(self, subject: str, events: list[Envelope], **kwargs: Any) -> Appended:
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

    async def append(self, subject: str, events: list[Envelope], **kwargs: Any) -> Appended:
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


@pytest.fixture
async def reference_log(tmp_path: Path) -> AsyncIterator[EventLog]:
    """A second, fresh nats-server for the no-crash reference run."""
    server = NatsServer(tmp_path / "jetstream-reference", log_file=tmp_path / "nats-reference.log")
    server.start()
    try:
        log = await EventLog.connect(server.url, "cdp-test-reference")
        await log.ensure_streams()
        try:
            yield log
        finally:
            await log.close()
    finally:
        server.stop()


async def reference_run(
    engine: Engine,
    eventlog: EventLog,
    *,
    own_logs: Sequence[OwnLog] = (OUT,),
    layout: Sequence[int] = INPUT_LAYOUT,
    size: int = 0,
    batch_size: int = 3,
) -> dict[str, list[tuple[Any, ...]]]:
    await append_inputs(eventlog, layout)
    processor = make_processor(
        engine, eventlog, EchoHandler(own_logs, size=size), own_logs=own_logs, batch_size=batch_size
    )
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


@pytest.mark.xfail(
    strict=True,
    reason="kit bug: a cause whose outputs span several own logs is marked emitted as soon as ONE of its "
    "messages is on the log, so a crash between the appends loses the other logs' outputs for ever",
)
async def test_crash_between_the_appends_of_two_own_logs(
    sqlite_engine: Engine, eventlog: EventLog, reference_engine: Engine, reference_log: EventLog
) -> None:
    both = (OUT, OUT_B)
    expected = await reference_run(reference_engine, reference_log, own_logs=both)
    expected_b = await outputs(reference_log, OUT_B)
    assert [i for _, ids in expected_b for i in ids] == output_ids(OUT_B)

    await append_inputs(eventlog)
    crashing = make_processor(
        sqlite_engine, CrashAfterAppend(eventlog, 1), EchoHandler(both), own_logs=both, batch_size=3
    )
    with pytest.raises(SimulatedCrash):
        await crashing.catch_up()
    assert len(await outputs(eventlog, OUT)) == 1
    assert await outputs(eventlog, OUT_B) == []

    restarted = make_processor(sqlite_engine, eventlog, EchoHandler(both), own_logs=both, batch_size=3)
    await restarted.catch_up()

    assert await outputs(eventlog, OUT_B) == expected_b  # fails: the first batch's OUT_B events are missing
    assert dump(sqlite_engine) == expected


@pytest.mark.xfail(
    strict=True,
    reason="kit bug: when the guard refuses the append to a second own log after the first own log's append "
    "succeeded, recovery marks the whole batch emitted and the second log's outputs are silently dropped",
)
async def test_conflict_on_the_second_own_log_during_input_processing(
    sqlite_engine: Engine, eventlog: EventLog
) -> None:
    both = (OUT, OUT_B)
    await append_inputs(eventlog)
    # Just before the first batch appends to OUT, another writer appends to OUT_B: the OUT append
    # succeeds, the OUT_B append is refused by the guard, run_input recovers and re-applies the batch.
    racing = RacingWriter(eventlog, subject=OUT_B.subject, times=1)
    processor = make_processor(sqlite_engine, racing, EchoHandler(both), own_logs=both, batch_size=3)

    await processor.catch_up()  # no crash, no error surfaces

    assert racing.races == 1
    assert [i for _, ids in await outputs(eventlog, OUT) for i in ids] == output_ids(OUT)
    got_b = [i for _, ids in await outputs(eventlog, OUT_B) for i in ids]
    assert got_b == [foreign_event("race-1").id, *output_ids(OUT_B)]  # fails: first batch's OUT_B events lost


@pytest.mark.xfail(
    strict=True,
    reason="kit bug: outputs split into several chunks (> MAX_BATCH_BYTES) are marked emitted as soon as the "
    "first chunk is on the log, so a crash between the chunk appends loses the later chunks for ever",
)
async def test_crash_between_the_chunks_of_one_own_log(
    sqlite_engine: Engine, eventlog: EventLog, reference_engine: Engine, reference_log: EventLog
) -> None:
    layout = [2]  # one input message, two events, each echoed as a ~500 KB event: two chunks
    size = 500_000
    expected = await reference_run(reference_engine, reference_log, layout=layout, size=size)
    expected_outputs = await outputs(reference_log)
    assert [len(ids) for _, ids in expected_outputs] == [1, 1]

    await append_inputs(eventlog, layout)
    crashing = make_processor(sqlite_engine, CrashAfterAppend(eventlog, 1), EchoHandler(size=size))
    with pytest.raises(SimulatedCrash):
        await crashing.catch_up()

    restarted = make_processor(sqlite_engine, eventlog, EchoHandler(size=size))
    await restarted.catch_up()

    assert await outputs(eventlog) == expected_outputs  # fails: the second chunk is never appended
    assert dump(sqlite_engine) == expected


# ===================================================================== (d) rebuild


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


# ===================================================================== (e) commands


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


@pytest.mark.xfail(
    strict=True,
    reason="kit bug: UnitOfWork._append ignores Appended.duplicate, so events JetStream de-duplicated "
    "(Nats-Msg-Id) are still folded and committed: the store is no longer the fold of its log",
)
async def test_re_executed_command_keeps_the_store_equal_to_its_log(sqlite_engine: Engine, eventlog: EventLog) -> None:
    processor = make_processor(sqlite_engine, eventlog, with_input=False)
    await processor.recover()
    calls: list[str] = []
    await processor.execute("c1", command("one", calls))
    await processor.execute("c1", command("one", calls))  # a client retry of the same command
    assert len(await outputs(eventlog)) == 1  # JetStream dropped the second append as a duplicate

    live = dump(sqlite_engine)
    await processor.rebuild()
    assert dump(sqlite_engine) == live  # fails: live store folded the event twice, the log holds it once


@pytest.mark.xfail(
    strict=True,
    reason="kit bug: after a guard conflict on its second own log, execute() retries; the retry's append to "
    "the first own log is de-duplicated by JetStream (same Nats-Msg-Id) but its events are folded again",
)
async def test_execute_conflict_on_the_second_own_log_keeps_the_store_equal_to_its_log(
    sqlite_engine: Engine, eventlog: EventLog
) -> None:
    both = (OUT, OUT_B)
    processor = make_processor(sqlite_engine, eventlog, own_logs=both, with_input=False)
    await processor.recover()
    await eventlog.append(OUT_B.subject, [foreign_event("intruder")], msg_id="intruder")
    calls: list[str] = []

    await processor.execute("c1", command("one", calls, both))

    assert calls == ["one", "one"]
    assert [cause for cause, _ in await outputs(eventlog, OUT)] == ["cmd:c1"]
    live = dump(sqlite_engine)
    await processor.rebuild()
    assert dump(sqlite_engine) == live  # fails: folded:test-out is 2 live, 1 after rebuild
