"""The projector loop: the one way a service's store changes.

A service's store is the fold of
  * its **own logs** (subjects it alone writes), folded by its ``Projection``, and
  * its **inputs** (other services' subjects), read by durable consumers.

Processing one fetched batch of an input happens in ONE SQL transaction:
``observe`` applies the pure-projection part of each message; ``decide`` (only for
messages whose outputs are not yet on the log) emits events, which are folded at
once and appended to the own log at the end of the batch, guarded by
``Nats-Expected-Last-Subject-Sequence`` and de-duplicated by a deterministic
``Nats-Msg-Id``. The input checkpoint, the own-log checkpoint and the state commit
together; the input is acked after commit. A message at or below the checkpoint
is skipped.

If the process dies after an append but before the commit, recovery folds the
own-log tail first and records, from the ``Cdp-Cause`` header, which input
messages already have their outputs on the log; those are then observed but not
decided again. So every input's outputs reach the log exactly once, and the store
after a crash equals the store without one.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import nats.errors
from nats.aio.msg import Msg
from sqlalchemy.engine import Engine
from sqlmodel import Session

from cdp_kit.envelope import Cause, EncodedEnvelope, Envelope, deterministic_id, to_timestamp, utcnow
from cdp_kit.errors import CdpError, Unavailable
from cdp_kit.eventlog import (
    MAX_MESSAGE_BYTES,
    AppendConflict,
    Appended,
    DeliveryGap,
    DuplicateAppend,
    EventLog,
    LogMessage,
)
from cdp_kit.store import drop_tables, get_checkpoint, open_store, set_checkpoint, transaction
from cdp_kit.streams import ConsumerSpec, OwnLog
from cdp_kit.telemetry import context_from, get_logger, meter, trace_headers, tracer

T = TypeVar("T")
CAUSE_HEADER = "Cdp-Cause"
# What encoding adds to each event beyond its own size: recorded_at (stamped at append) and
# the EventBatch field framing. Generous, so an estimate below the limit encodes below it.
EVENT_OVERHEAD_BYTES = 40
log = get_logger(__name__)


class Projection(Protocol):
    """Folds the service's own events into its store. Pure: reads no clock, no network.

    A projection may also define ``prefetch(session, own, envelopes)``: when recovery or a
    rebuild folds a batch of own-log messages, it is called once, before any fold, with every
    envelope of the batch, so lookups can be done in bulk (it must change nothing a fold would
    not find the same way)."""

    def fold(self, session: Session, own: OwnLog, env: Envelope) -> None: ...


class InputHandler(Protocol):
    """What a service does with another service's facts. A handler may also define
    ``prefetch(session, envelopes)``: called once per fetched batch, before any observe or
    decide, with every new envelope of the batch, so lookups can be done in bulk; and
    ``finish(session)``: called after the batch's last decide, before anything is appended
    and before the commit, so changes kept in memory can be written in bulk."""

    def observe(self, session: Session, msg: LogMessage, env: Envelope) -> None:
        """Apply what this service keeps of another service's fact (may do nothing)."""

    def decide(self, uow: UnitOfWork, msg: LogMessage, env: Envelope) -> None:
        """Emit this service's own events in reaction (may emit nothing)."""


@dataclass(frozen=True)
class Input:
    """One input of a service. ``raw`` inputs carry bytes from outside publishers (not
    EventBatch envelopes): each message reaches the handler as one envelope of type
    ``RAW_TYPE`` whose ``payload.value`` holds the bytes and whose id is derived from the
    stream position."""

    spec: ConsumerSpec
    handler: InputHandler
    raw: bool = False

    def envelopes(self, msg: LogMessage) -> list[Envelope]:
        return [raw_envelope(msg)] if self.raw else msg.events()


RAW_TYPE = "cdp.raw"


def raw_envelope(msg: LogMessage) -> Envelope:
    env = Envelope(id=deterministic_id("raw", msg.stream, msg.sequence), type=RAW_TYPE, subject_key=msg.subject)
    if msg.stored_at is not None:
        env.occurred_at.CopyFrom(to_timestamp(msg.stored_at))
    env.payload.type_url = f"type.googleapis.com/{RAW_TYPE}"
    env.payload.value = msg.data
    return env


def in_checkpoint(spec: ConsumerSpec) -> str:
    return f"in:{spec.name}"


def emitted_checkpoint(spec: ConsumerSpec) -> str:
    return f"emitted:{spec.name}"


def own_checkpoint(own: OwnLog) -> str:
    return f"own:{own.name}"


@dataclass
class _Part:
    """Pending events of one or more consecutive causes, all for one own log."""

    cause: Cause
    own: OwnLog | None = None
    events: list[Envelope | EncodedEnvelope] = field(default_factory=list)
    size: int = 0


class UnitOfWork:
    """What one command or one input batch changes: store rows plus own events to append.

    A cause's events go to ONE own log and travel in ONE message, so they reach the log
    whole or not at all: recovery never finds half of them. Consecutive causes share a
    message while they write the same own log and fit; a cause that writes another log
    (or would overflow) first sends what earlier causes left pending, in order. Each
    message names the last cause it completes (``Cdp-Cause``), so recovery knows every
    input up to it has its outputs on the log. One cause that writes two own logs, or
    more than one message of events, is refused: split such work into several commands.

    One message at a time is in flight: a message is published and the batch goes on deciding
    while JetStream stores it; its acknowledgement is awaited before the next message is
    published (whose guard needs its sequence), before any checkpoint is set, and when the work
    is flushed for good (so a commit follows only acknowledged appends). The log receives the
    same messages in the same order as if each append were awaited at once.
    """

    def __init__(self, session: Session, processor: Processor, cause: Cause) -> None:
        self.session = session
        self.processor = processor
        self.cause = cause
        self._done = _Part(cause)
        self._current = _Part(cause)
        self._inflight: tuple[asyncio.Future[Appended], _Part, ConsumerSpec | None] | None = None

    def emit(self, own: OwnLog, events: Sequence[Envelope]) -> None:
        if not events:
            return
        current = self._start(own)
        for env in events:
            self.processor.projection.fold(self.session, own, env)
            current.events.append(env)
            current.size += env.ByteSize() + EVENT_OVERHEAD_BYTES
        self._check_size(current)

    def emit_encoded(self, own: OwnLog, encoded: Sequence[EncodedEnvelope], fold: Callable[[Session], None]) -> None:
        """Emit envelopes a service serialized itself (a hot path: no protobuf object per event).

        ``fold`` applies to the session, at once, exactly what folding the events one by one
        would; recovery and rebuild fold them one by one, so the service's rebuild tests are
        what hold it to that. The bytes must not carry ``recorded_at``: the kit stamps it.
        """
        if not encoded:
            return
        current = self._start(own)
        fold(self.session)
        current.events += encoded
        current.size += sum(map(len, encoded)) + EVENT_OVERHEAD_BYTES * len(encoded)
        self._check_size(current)

    def _start(self, own: OwnLog) -> _Part:
        current = self._current
        if current.own is not None and current.own != own:
            raise MixedOwnLogs(f"one cause appends to one own log, not {current.own.name} and {own.name}")
        current.own = own
        return current

    @staticmethod
    def _check_size(current: _Part) -> None:
        if current.size > MAX_MESSAGE_BYTES:
            raise OversizedCause(
                f"{len(current.events)} events ({current.size} bytes) for one cause exceed one message "
                f"({MAX_MESSAGE_BYTES} bytes): split the work"
            )

    @property
    def pending_bytes(self) -> int:
        return self._done.size + self._current.size

    async def next_cause(self, cause: Cause, consumer: ConsumerSpec | None = None) -> None:
        """Close the current cause and start another."""
        await self._settle(consumer)
        self.cause = cause
        self._current = _Part(cause)

    async def flush(self, cause: Cause, consumer: ConsumerSpec | None = None, *, wait: bool = True) -> None:
        """Append everything pending, in cause order; then every cause up to ``cause`` counts as emitted.
        With ``wait`` (for the last flush before a commit) every append is acknowledged on return;
        without, the last message may still be in flight."""
        self._current.cause = cause
        await self._settle(consumer)
        if self._done.events:
            await self._send(self._done, consumer)
        elif consumer is not None:
            await self.acknowledged()
            set_checkpoint(self.session, emitted_checkpoint(consumer), cause.sequence)
        self._done = _Part(cause)
        self._current = _Part(cause)
        if wait:
            await self.acknowledged()

    async def acknowledged(self) -> None:
        """Wait for the message in flight, if any, and record where it landed."""
        if self._inflight is None:
            return
        appending, part, consumer = self._inflight
        self._inflight = None
        appended = await appending
        assert part.own is not None
        if appended.duplicate:
            raise DuplicateAppend(f"{part.own.subject} already holds the events of {part.cause.key()}")
        set_checkpoint(self.session, own_checkpoint(part.own), appended.sequence)
        if consumer is not None:
            set_checkpoint(self.session, emitted_checkpoint(consumer), part.cause.sequence)

    async def abandon(self) -> None:
        """The work failed: let the message in flight finish (its outcome no longer matters: the
        transaction rolls back and recovery folds whatever reached the log)."""
        if self._inflight is not None:
            appending = self._inflight[0]
            self._inflight = None
            with contextlib.suppress(BaseException):
                await appending

    async def _settle(self, consumer: ConsumerSpec | None) -> None:
        """Move the current cause's events behind the earlier ones, sending those first if they cannot share."""
        done, current = self._done, self._current
        if current.events:
            if done.events and (done.own != current.own or done.size + current.size > MAX_MESSAGE_BYTES):
                await self._send(done, consumer)
                done = self._done = _Part(done.cause)
            done.own = current.own
            done.events += current.events
            done.size += current.size
        done.cause = current.cause
        self._current = _Part(current.cause)

    async def _send(self, part: _Part, consumer: ConsumerSpec | None) -> None:
        """Publish one message; it stays in flight until ``acknowledged`` (the next send at the latest)."""
        await self.acknowledged()
        assert part.own is not None
        own, cause = part.own, part.cause
        appending = asyncio.ensure_future(
            self.processor.eventlog.append(
                own.subject,
                part.events,
                msg_id=deterministic_id(own.subject, cause.key()),
                expected_last_subject_sequence=get_checkpoint(self.session, own_checkpoint(own)),
                headers={CAUSE_HEADER: cause.key(), **trace_headers()},
                recorded_at=utcnow(),
            )
        )
        self._inflight = (appending, part, consumer)
        # Two turns of the event loop: the append's publish runs, then the client's flusher
        # writes it to the socket, so the server stores it while the batch goes on deciding.
        await asyncio.sleep(0)
        await asyncio.sleep(0)


class MixedOwnLogs(CdpError):
    """A programming error: one cause's events must go to one own log."""


class OversizedCause(CdpError):
    """One cause produced more events than one message holds."""


def _consumer_of(header: str, inputs: Sequence[Input]) -> tuple[ConsumerSpec, int] | None:
    """Which input message an own-log message answered, from its ``Cdp-Cause`` header."""
    stream, _, seq = header.rpartition(":")
    if not stream or stream == "cmd" or not seq.isdigit():
        return None
    for inp in inputs:
        if inp.spec.name == stream:
            return inp.spec, int(seq)
    return None


@dataclass
class ConsumerHealth:
    """How one input is doing, for status, readiness and metrics.

    ``progressed_at`` is the monotonic time of the last fetch that went through (a batch
    applied, or nothing left to read); a consumer whose ``progressed_at`` is older than the
    service's stall limit is stuck, and ``error`` says why."""

    progressed_at: float = field(default_factory=time.monotonic)
    error: str = ""
    gaps: int = 0

    def progressed(self) -> None:
        self.progressed_at = time.monotonic()
        self.error = ""

    def stalled_for(self) -> float:
        return time.monotonic() - self.progressed_at


class Processor:
    def __init__(
        self,
        *,
        service: str,
        engine: Engine,
        eventlog: EventLog,
        tables: Sequence[object],
        own_logs: Sequence[OwnLog],
        projection: Projection,
        inputs: Sequence[Input] = (),
        batch_size: int = 256,
    ) -> None:
        self.service = service
        self.engine = engine
        self.eventlog = eventlog
        self.tables = list(tables)
        self.own_logs = list(own_logs)
        self.projection = projection
        self.inputs = list(inputs)
        self.batch_size = batch_size
        self.lock = asyncio.Lock()
        self.ready = asyncio.Event()
        self._stopping = asyncio.Event()
        self.health: dict[str, ConsumerHealth] = {inp.spec.name: ConsumerHealth() for inp in self.inputs}
        self._tracer = tracer(f"cdp.{service}")
        instruments = meter(f"cdp.{service}")
        self._applied = instruments.create_counter(
            "cdp.input.messages", unit="{message}", description="Input messages applied to the store"
        )
        self._batch_seconds = instruments.create_histogram(
            "cdp.input.batch.duration", unit="s", description="Time to apply one fetched batch"
        )

    # ----------------------------------------------------------------- setup
    def create_store(self) -> bool:
        """Create the store's tables. A store whose tables were defined otherwise (by an older
        or newer version) is emptied, and ``run`` rebuilds it from the log. True if it was."""
        reset = open_store(self.engine, self.service, self.tables)  # type: ignore[arg-type]
        if reset:
            log.warning("store_schema_changed_rebuilding", service=self.service)
        return reset

    def drop_store(self) -> None:
        drop_tables(self.engine, self.tables)  # type: ignore[arg-type]

    async def recover(self) -> int:
        """Fold every own-log message not yet in the store. Returns how many were folded."""
        folded = 0
        async with self.lock:
            for own in self.own_logs:
                folded += await self._fold_tail(own)
        return folded

    async def _fold_tail(self, own: OwnLog) -> int:
        with Session(self.engine) as session:
            start = get_checkpoint(session, own_checkpoint(own)) + 1
        count = 0
        batch: list[LogMessage] = []
        async for msg in self.eventlog.read(own.stream.name, own.subject, start, batch=self.batch_size):
            batch.append(msg)
            if len(batch) >= self.batch_size:
                count += self._fold_messages(own, batch)
                batch = []
        if batch:
            count += self._fold_messages(own, batch)
        if count:
            log.info("own_log_recovered", own_log=own.name, messages=count)
        return count

    def _fold_messages(self, own: OwnLog, msgs: list[LogMessage]) -> int:
        with transaction(self.engine) as session:
            prefetch = getattr(self.projection, "prefetch", None)
            if prefetch is not None:
                prefetch(session, own, [env for msg in msgs for env in msg.events()])
            for msg in msgs:
                for env in msg.events():
                    self.projection.fold(session, own, env)
                set_checkpoint(session, own_checkpoint(own), msg.sequence)
                answered = _consumer_of(msg.headers.get(CAUSE_HEADER, ""), self.inputs)
                if answered is not None:
                    set_checkpoint(session, emitted_checkpoint(answered[0]), answered[1])
        return len(msgs)

    # -------------------------------------------------------------- commands
    async def execute(self, command_id: str, decide: Callable[[UnitOfWork], T]) -> T:
        """Run a client command: decide, fold and append its events, commit. Retries once on a guard conflict."""
        for attempt in (1, 2):
            try:
                async with self.lock:
                    with transaction(self.engine) as session:
                        uow = UnitOfWork(session, self, Cause(command_id=command_id))
                        try:
                            result = decide(uow)
                            await uow.flush(uow.cause)
                        except BaseException:
                            await uow.abandon()
                            raise
                return result
            except AppendConflict:
                if attempt == 2:
                    raise
                log.warning("append_conflict_recovering", command_id=command_id)
                await self.recover()
        raise AssertionError("unreachable")

    def read(self) -> Session:
        """A session for queries (no writes)."""
        return Session(self.engine, expire_on_commit=False)

    # ---------------------------------------------------------------- inputs
    async def apply_input_batch(self, inp: Input, items: Sequence[tuple[LogMessage, Msg | None]]) -> int:
        """Apply one fetched batch of an input in one transaction, then ack. Returns how many were new."""
        started = time.perf_counter()
        applied_now = 0
        headers = items[0][0].headers if items else {}
        with self._tracer.start_as_current_span(
            f"apply {inp.spec.name}", context=context_from(headers), attributes={"cdp.messages": len(items)}
        ):
            async with self.lock:
                with transaction(self.engine) as session:
                    uow: UnitOfWork | None = None
                    try:
                        applied = get_checkpoint(session, in_checkpoint(inp.spec))
                        emitted = get_checkpoint(session, emitted_checkpoint(inp.spec))
                        last = applied
                        prefetch = getattr(inp.handler, "prefetch", None)
                        if prefetch is not None:
                            fresh = [env for msg, _ in items if msg.sequence > applied for env in inp.envelopes(msg)]
                            prefetch(session, fresh)
                        for msg, _raw in items:
                            if msg.sequence <= applied:
                                continue
                            cause = Cause(inp.spec.name, msg.sequence)
                            uow = uow or UnitOfWork(session, self, cause)
                            await uow.next_cause(cause, inp.spec)
                            envelopes = inp.envelopes(msg)
                            for env in envelopes:
                                inp.handler.observe(session, msg, env)
                            if msg.sequence > emitted:
                                for env in envelopes:
                                    inp.handler.decide(uow, msg, env)
                            last = msg.sequence
                            applied_now += 1
                            if uow.pending_bytes >= MAX_MESSAGE_BYTES // 4:
                                # Mid-batch: the message goes out and the batch goes on while JetStream stores it.
                                await uow.flush(Cause(inp.spec.name, last), inp.spec, wait=False)
                        finish = getattr(inp.handler, "finish", None)
                        if finish is not None:
                            finish(session)
                        if uow is not None:
                            await uow.flush(Cause(inp.spec.name, last), inp.spec)
                            set_checkpoint(session, in_checkpoint(inp.spec), last)
                    except BaseException:
                        if uow is not None:
                            await uow.abandon()
                        raise
        for _msg, raw in items:
            if raw is not None:
                await raw.ack()
        labels = {"consumer": inp.spec.name}
        self._applied.add(applied_now, labels)
        self._batch_seconds.record(time.perf_counter() - started, labels)
        return applied_now

    @property
    def failures(self) -> dict[str, str]:
        """The current error of every input that has one."""
        return {name: h.error for name, h in self.health.items() if h.error}

    async def run_input(self, inp: Input) -> None:
        """Consume one input until stopped, restarting the consumer on failure."""
        backoff = 0.2
        health = self.health[inp.spec.name]
        while not self._stopping.is_set():
            reader = None
            try:
                with self.read() as session:
                    start = get_checkpoint(session, in_checkpoint(inp.spec)) + 1
                reader = await self.eventlog.durable(inp.spec, start)
                while not self._stopping.is_set():
                    items = await reader.fetch(self.batch_size, timeout=1.0)
                    if items:
                        await self.apply_input_batch(inp, items)
                    health.progressed()
                    backoff = 0.2
            except DeliveryGap as exc:
                # Not an error to wait out: the consumer is re-created at the checkpoint at once.
                health.gaps += 1
                log.warning("input_gap_reading_again", consumer=inp.spec.name, error=exc.message)
            except AppendConflict as exc:
                health.error = exc.message
                log.warning("append_conflict_recovering", consumer=inp.spec.name)
                await self.recover()
            except Unavailable as exc:
                health.error = exc.message
                log.warning("input_unavailable", consumer=inp.spec.name, error=exc.message, retry_in=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            except CdpError as exc:
                # A message this service cannot apply (e.g. OversizedCause): stop here, visibly, and retry later.
                health.error = exc.message
                log.error("input_stuck", consumer=inp.spec.name, error=exc.message, retry_in=5.0)
                await asyncio.sleep(5.0)
            except (nats.errors.Error, OSError) as exc:
                health.error = f"{type(exc).__name__}: {exc}"
                log.warning("input_unavailable", consumer=inp.spec.name, error=str(exc), retry_in=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                if reader is not None:
                    with contextlib.suppress(nats.errors.Error, OSError):
                        await reader.close()

    async def run(self) -> None:
        """Recover, then consume every input until stopped."""
        await self.recover()
        self.ready.set()
        await asyncio.gather(*(self.run_input(inp) for inp in self.inputs))
        await self._stopping.wait()

    async def catch_up(self) -> None:
        """Recover, then apply every input up to its end as of now, reading without durable
        consumers (so a rebuild beside a live service never moves the live service's cursor)."""
        await self.recover()
        for inp in self.inputs:
            with self.read() as session:
                start = get_checkpoint(session, in_checkpoint(inp.spec)) + 1
            batch: list[tuple[LogMessage, Msg | None]] = []
            async for msg in self.eventlog.read(inp.spec.stream.name, inp.spec.filter_subject, start):
                batch.append((msg, None))
                if len(batch) >= self.batch_size:
                    await self.apply_input_batch(inp, batch)
                    batch = []
            if batch:
                await self.apply_input_batch(inp, batch)

    async def rebuild(self) -> None:
        """Drop the store and replay the log into it."""
        self.drop_store()
        self.create_store()
        await self.catch_up()

    def stop(self) -> None:
        self._stopping.set()
        self.ready.clear()
