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

from cdp.common.v1 import deadletter_pb2 as dl
from cdp_kit import deadletters
from cdp_kit.envelope import (
    Cause,
    EncodedEnvelope,
    Envelope,
    deterministic_id,
    make_envelope,
    to_timestamp,
    utcnow,
)
from cdp_kit.errors import CdpError, Unavailable
from cdp_kit.eventlog import (
    MAX_MESSAGE_BYTES,
    AppendConflict,
    Appended,
    DeliveryGap,
    DuplicateAppend,
    DurableReader,
    EventLog,
    LogMessage,
)
from cdp_kit.natsauth import reader_name, standby_reader_name
from cdp_kit.parts import PART_HEADER, Assembler, part_header, split_by_size
from cdp_kit.privacy import REVOKED_TABLES, restore_revocations
from cdp_kit.sealing import MalformedPart
from cdp_kit.store import drop_tables, get_checkpoint, open_store, set_checkpoint, transaction
from cdp_kit.streams import ConsumerSpec, OwnLog, poison_log
from cdp_kit.telemetry import context_from, get_logger, meter, trace_headers, tracer
from cdp_kit.vault import KeysNeeded, PersonVault

T = TypeVar("T")
CAUSE_HEADER = "Cdp-Cause"
# The marker a newly active instance appends to each subject it owns (``Processor.fence``).
FENCE_HEADER = "Cdp-Fence"
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
    decide, with every new envelope of the batch, so lookups can be done in bulk;
    ``finish(session)``: called after the batch's last decide, before anything is appended
    and before the commit, so changes kept in memory can be written in bulk; and
    ``observe_erased(session, msg, env)``: called, in its place among the message's envelopes,
    for each envelope erased as a whole (sealed with a key that is gone: it is neither observed
    nor decided), with what of it is not personal (its id, type and the unsealed fields), so the
    handler can tell that it cannot read what the live service may have read."""

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
    sizes: list[int] = field(default_factory=list)
    size: int = 0

    def add(self, events: Sequence[Envelope | EncodedEnvelope], sizes: Sequence[int]) -> None:
        """More events, checked first: none may exceed one message (nothing is added otherwise)."""
        largest = max(sizes, default=0)
        if largest > MAX_MESSAGE_BYTES:
            raise OversizedCause(f"one event of {largest} bytes exceeds one message ({MAX_MESSAGE_BYTES} bytes)")
        self.events += events
        self.sizes += sizes
        self.size += sum(sizes)

    def piece(self, start: int, end: int) -> _Part:
        sizes = self.sizes[start:end]
        return _Part(self.cause, self.own, self.events[start:end], sizes, sum(sizes))


class UnitOfWork:
    """What one command or one input batch changes: store rows plus own events to append.

    A cause's events go to ONE own log and reach it whole or not at all: recovery never
    applies half of them. They travel in one message, or, when they do not fit one, in
    numbered parts that readers apply only once the last has arrived (``cdp_kit.parts``).
    Consecutive causes share a message while they write the same own log and fit; a cause
    that writes another log (or would overflow) first sends what earlier causes left
    pending, in order. Each message names the last cause it completes (``Cdp-Cause``), so
    recovery knows every input up to it has its outputs on the log. One cause that writes
    two own logs is refused (a programming error), and so is one event bigger than a message.

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
            self.processor.fold(self.session, own, env)
        current.add(events, [env.ByteSize() + EVENT_OVERHEAD_BYTES for env in events])

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
        # In bulk, not a call per event: ingest emits every accepted row here, and a call per row
        # cost ~1.8 us of a ~17 us row (measured: 11 % of a 1M-row batch's CPU).
        current.add(encoded, [len(data) + EVENT_OVERHEAD_BYTES for data in encoded])

    def _start(self, own: OwnLog) -> _Part:
        current = self._current
        if current.own is not None and current.own != own:
            raise MixedOwnLogs(f"one cause appends to one own log, not {current.own.name} and {own.name}")
        current.own = own
        return current

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
        """Move the current cause's events behind the earlier ones, sending those first if they cannot
        share. A cause too big for one message goes out at once, as numbered parts."""
        done, current = self._done, self._current
        if current.events:
            if done.events and (done.own != current.own or done.size + current.size > MAX_MESSAGE_BYTES):
                await self._send(done, consumer)
                done = self._done = _Part(done.cause)
            if current.size > MAX_MESSAGE_BYTES:
                await self._send_parts(current, consumer)
            else:
                done.own = current.own
                done.add(current.events, current.sizes)
        done.cause = current.cause
        self._current = _Part(current.cause)

    async def _send_parts(self, cause_part: _Part, consumer: ConsumerSpec | None) -> None:
        """One cause in several messages (see ``cdp_kit.parts``): only the last completes the cause."""
        ranges = split_by_size(cause_part.sizes, MAX_MESSAGE_BYTES)
        for index, (start, end) in enumerate(ranges, 1):
            last = index == len(ranges)
            await self._send(cause_part.piece(start, end), consumer if last else None, numbered=(index, len(ranges)))

    async def _send(
        self, part: _Part, consumer: ConsumerSpec | None, *, numbered: tuple[int, int] | None = None
    ) -> None:
        """Publish one message; it stays in flight until ``acknowledged`` (the next send at the latest)."""
        await self.acknowledged()
        if self.processor.replay_only:
            raise ReplayWouldAppend(
                f"{self.processor.service} would append to {part.own.subject if part.own else '?'} "
                f"while rebuilding ({part.cause.key()}): the replay decided something the log does not "
                "hold. A rebuild never writes the log: it stopped here. If the service had not caught "
                "up, start it (serve) to decide the rest; otherwise this is a determinism bug."
            )
        vault = self.processor.vault
        if vault is not None:
            await vault.commit()  # the keys of what this message seals are in the bucket before it is
        assert part.own is not None
        own, cause = part.own, part.cause
        expected = get_checkpoint(self.session, own_checkpoint(own))
        headers = {CAUSE_HEADER: cause.key(), **trace_headers()}
        msg_id = deterministic_id(own.subject, cause.key())
        if numbered is not None:
            headers[PART_HEADER] = part_header(*numbered)
            # A re-decided cause follows its aborted attempt on the log: its parts need other ids.
            msg_id = deterministic_id(own.subject, cause.key(), headers[PART_HEADER], expected)
        appending = asyncio.ensure_future(
            self.processor.eventlog.append(
                own.subject,
                part.events,
                msg_id=msg_id,
                expected_last_subject_sequence=expected,
                headers=headers,
                recorded_at=utcnow(),
            )
        )
        self._inflight = (appending, part, consumer)
        # Two turns of the event loop: the append's publish runs, then the client's flusher
        # writes it to the socket, so the server stores it while the batch goes on deciding.
        await asyncio.sleep(0)
        await asyncio.sleep(0)


Unit = list[tuple[LogMessage, "Msg | None"]]
"""One input message, or every part of one cause (``cdp_kit.parts``), with the raw messages to ack."""


async def _acknowledge(unit: Unit, reader: DurableReader | None) -> None:
    """After a commit: acknowledge the last message applied (or dropped, as an aborted part is), and
    with it (the consumers acknowledge all below it) everything before. Through the live reader,
    which makes a lost ack good."""
    raw = unit[-1][1] if unit else None
    if raw is None:
        return
    if reader is not None:
        await reader.ack(raw)
    else:
        await raw.ack()


def _key(unit: Unit) -> int:
    """A unit is applied, decided and checkpointed as its last message."""
    return unit[-1][0].sequence


def _erased(
    msg: LogMessage, kept: list[Envelope], opened: dict[int, list[Envelope]] | None
) -> list[tuple[Envelope, bool]] | None:
    """The message's envelopes in their order, each with whether it was erased as a whole; None
    when none was (the kept envelopes are the message's own objects, opened in place)."""
    if opened is None or msg.sequence not in opened:
        return None
    whole = msg.events()
    if len(whole) == len(kept):
        return None
    held = {id(env) for env in kept}
    return [(env, id(env) not in held) for env in whole]


def _whole(unit: Unit) -> LogMessage:
    """A unit as one message, for its dead letter: the last part's place, every part's bytes."""
    last = unit[-1][0]
    if len(unit) == 1:
        return last
    data = b"".join(msg.data for msg, _ in unit)
    return LogMessage(last.stream, last.sequence, last.subject, last.headers, data, stored_at=last.stored_at)


class MixedOwnLogs(CdpError):
    """A programming error: one cause's events must go to one own log."""


class OversizedCause(CdpError):
    """One event is larger than a message holds (a cause of many events is split into parts instead)."""


def _redrive_of(header: str) -> tuple[str, int, int] | None:
    """(consumer, sequence, attempt) of an own-log message that a redrive caused."""
    if not header.startswith("cmd:redrive:"):
        return None
    consumer, _, rest = header.removeprefix("cmd:redrive:").partition(":")
    sequence, _, attempt = rest.partition(":")
    if not (sequence.isdigit() and attempt.isdigit()):
        return None
    return consumer, int(sequence), int(attempt)


def _consumer_of(header: str, inputs: Sequence[Input]) -> tuple[ConsumerSpec, int] | None:
    """Which input message an own-log message answered, from its ``Cdp-Cause`` header."""
    stream, _, seq = header.rpartition(":")
    if not stream or stream == "cmd" or not seq.isdigit():
        return None
    for inp in inputs:
        if inp.spec.name == stream:
            return inp.spec, int(seq)
    return None


class ReplayWouldAppend(CdpError):
    """A rebuild's replay tried to append to the log (see ``Processor.rebuild``)."""


def fence_epoch(marker: str) -> int:
    """The epoch a fence marker (``<instance>@<epoch>``) names; 0 for a marker of another shape."""
    epoch = marker.rpartition("@")[2]
    return int(epoch) if epoch.isdigit() and len(epoch) < 20 else 0


class LeaseStale(Unavailable):
    """This instance's lease is too old to act on (``cdp_kit.lease``): retried until it is renewed
    (or found lost, and the process steps down)."""


class Deposed(BaseException):
    """Another instance fenced this one's logs (``cdp_kit.lease``): it must stop at once.

    A BaseException, so that no ``except Exception`` on the way (poison isolation, a retry loop)
    can take it for a bad message and go on."""


@dataclass
class ConsumerHealth:
    """How one input is doing, for status, readiness and metrics.

    ``progressed_at`` is the monotonic time of the last fetch that went through (a batch
    applied, or nothing left to read); a consumer whose ``progressed_at`` is older than the
    service's stall limit is stuck, and ``error`` says why."""

    progressed_at: float = field(default_factory=time.monotonic)
    error: str = ""
    gaps: int = 0
    # Stream messages that retention removed before this consumer read them (``DurableReader.aged_out``).
    aged_out: int = 0

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
        vault: PersonVault | None = None,
    ) -> None:
        self.service = service
        # Opens sealed personal data at the decode boundary (cdp_kit.vault): handlers and
        # projections see plain payloads, and an event whose keys are gone is left out (erased).
        self.vault = vault
        # While rebuilding: nothing may be appended (``rebuild``).
        self.replay_only = False
        self.engine = engine
        self.eventlog = eventlog
        self.tables = [*tables, *deadletters.DEADLETTER_TABLES, *REVOKED_TABLES]
        self.poison = poison_log(service)
        self.own_logs = [*own_logs, self.poison]
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
        self._dead_lettered = instruments.create_counter(
            "cdp.input.dead_lettered", unit="{message}", description="Input messages set aside as poison"
        )
        self._redrives: set[str] = set()
        self._readers: dict[str, DurableReader] = {}
        # Under a lease (cdp_kit.lease): this instance's fence marker, where it stands on each own
        # log, whether the process may act on the world now, and whether it was deposed.
        self.fence_marker: str | None = None
        self.fenced_at: dict[str, int] = {}
        self.may_act: Callable[[], bool] = lambda: True
        self.deposed = asyncio.Event()
        self._reader_name: Callable[[str], str] = reader_name
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
        """Fold every own-log message not yet in the store. Returns how many were folded.

        Raises ``Deposed`` when it meets another instance's fence after this one's."""
        folded = 0
        async with self.lock:
            for own in self.own_logs:
                folded += await self._fold_tail(own)
        return folded

    # ------------------------------------------------------- active/standby
    async def fence(self, marker: str, *, attempts: int = 100) -> None:
        """Append this instance's fence marker to every own log (an empty batch with ``Cdp-Fence``)
        against the subject's true last sequence. From then on an instance that wrote before it
        fails its next append's guard, meets the marker while recovering, and steps down."""
        self.fence_marker = marker
        for own in self.own_logs:
            for _ in range(attempts):
                if not self.may_act():  # the lease lapsed while fencing: stop, never fence late
                    raise LeaseStale(f"{self.service}: the lease lapsed while fencing {own.subject}")
                last = await self.eventlog.last_sequence(own.stream.name, own.subject)
                try:
                    appended = await self.eventlog.append(
                        own.subject,
                        [],
                        msg_id=deterministic_id("fence", own.subject, marker),
                        expected_last_subject_sequence=last,
                        headers={FENCE_HEADER: marker},
                    )
                except AppendConflict:  # the deposed instance appended meanwhile: fence after it
                    await asyncio.sleep(0.02)
                    continue
                self.fenced_at[own.name] = appended.sequence
                break
            else:
                raise Unavailable(f"fencing {own.subject} failed {attempts} times: another writer keeps appending")
        log.info("fenced", service=self.service, marker=marker, at=self.fenced_at)

    def _check_fence(self, own: OwnLog, msg: LogMessage) -> None:
        """Another instance's marker with a higher epoch deposes this one, wherever it stands on the
        log: a holder whose lease lapsed while it fenced may append its marker after the new
        holder's, and must not depose it (epochs are the lease's revisions: they only grow)."""
        marker = msg.headers.get(FENCE_HEADER)
        if marker is None or self.fence_marker is None or marker == self.fence_marker:
            return
        if fence_epoch(marker) <= fence_epoch(self.fence_marker):
            return  # an earlier active's marker
        self.deposed.set()
        log.error("deposed_stepping_down", service=self.service, own_log=own.name, by=marker, sequence=msg.sequence)
        raise Deposed(f"{self.service}: {own.subject} #{msg.sequence} is fenced by {marker}; this instance stops")

    async def follow(self) -> bool:
        """A standby's catch-up: fold the own logs and replay the inputs read-only, through readers
        of its own, as far as the active's outputs reach. True when it reached the end of every
        input; False when it stopped where it would have to decide what the active has not yet
        appended (it goes on from there next time)."""
        self.replay_only = True
        self._reader_name = standby_reader_name
        try:
            await self.catch_up()
            return True
        except ReplayWouldAppend:
            return False
        finally:
            self.replay_only = False
            self._reader_name = reader_name
            if self.vault is not None:
                self.vault.forget_pending()  # made for decisions the replay dropped

    async def _fold_tail(self, own: OwnLog) -> int:
        with Session(self.engine) as session:
            start = get_checkpoint(session, own_checkpoint(own)) + 1
        count = last = 0
        assembler: Assembler[None] = Assembler(own.name)
        batch: list[LogMessage] = []
        reader = self.eventlog.read(
            own.stream.name, own.subject, start, batch=self.batch_size, name=self._reader_name(own.name)
        )
        # Closed at once when a fold raises (e.g. Deposed), not when the generator is collected:
        # an open reader would hold the connection's drain at shutdown.
        async with contextlib.aclosing(reader):
            async for msg in reader:
                if msg.sequence < start:
                    continue  # never folded twice, whoever's reader this turned out to be
                last = msg.sequence
                batch += [m for unit in assembler.feed([(msg, None)]) for m, _ in unit]
                if len(batch) >= self.batch_size:
                    count += await self._open_and_fold(own, batch)
                    batch = []
        if batch:
            count += await self._open_and_fold(own, batch)
        if assembler.held or assembler.dropped:
            # The parts of a cause whose writer died before the last: an aborted attempt, never folded.
            # The next append is guarded by the subject's true last sequence, so that moves past them.
            with transaction(self.engine) as session:
                set_checkpoint(session, own_checkpoint(own), last)
            log.warning("own_log_aborted_parts", own_log=own.name, held=len(assembler.held), dropped=assembler.dropped)
        if count:
            log.info("own_log_recovered", own_log=own.name, messages=count)
        return count

    def fold(self, session: Session, own: OwnLog, env: Envelope) -> None:
        """Fold one own event: the kit folds its dead-letter log, the service's projection the rest."""
        if own is self.poison:
            deadletters.fold(session, env)
            return
        if self.vault is not None and any(part.ciphertext for part in env.sealed):
            # An event emitted sealed in this transaction: the store folds it opened, the log
            # gets it sealed (a copy is opened, never the event that will be appended).
            opened = Envelope()
            opened.CopyFrom(env)
            if not self.vault.open_envelope(opened, checked=True):  # sealed here, by this process
                return
            env = opened
        self.projection.fold(session, own, env)

    async def _open_and_fold(self, own: OwnLog, msgs: list[LogMessage]) -> int:
        """Open then fold own-log messages. A message with a malformed sealed part
        (``cdp_kit.sealing.MalformedPart``) fails its fold, and is set aside like any message that
        cannot be folded. Should opening itself fail on the bytes (anything but a transient
        failure, which is raised and retried), the messages are opened and folded one at a time and
        the one that fails is set aside: recovery never crash-loops on bytes."""
        malformed: dict[int, MalformedPart] = {}
        try:
            opened = await self._open(msgs, malformed)
        except Exception as exc:
            if deadletters.is_transient(exc):
                raise
            if len(msgs) > 1:
                return sum([await self._open_and_fold(own, [msg]) for msg in msgs])
            return self._set_aside_own(own, msgs[0], exc)
        return self._fold_messages(own, msgs, opened, malformed)

    async def _open(
        self, msgs: Sequence[LogMessage], malformed: dict[int, MalformedPart]
    ) -> dict[int, list[Envelope]] | None:
        """The messages' envelopes with their sealed parts opened (None: this process seals nothing);
        a message with a malformed part is left out, its error in ``malformed``."""
        if self.vault is None:
            return None
        return await self.vault.open_messages(msgs, malformed)

    def _fold_messages(
        self,
        own: OwnLog,
        msgs: list[LogMessage],
        opened: dict[int, list[Envelope]] | None = None,
        malformed: dict[int, MalformedPart] | None = None,
    ) -> int:
        """Fold own-log messages in one transaction. A message that cannot be folded (bytes this
        service never wrote: its subject is only writable by it once NATS permissions are on) is
        set aside, one at a time, so recovery never crash-loops; the same bytes fail the same way
        on a rebuild, so the decision needs no event of its own."""
        try:
            return self._fold_batch(own, msgs, opened, malformed or {})
        except Exception as exc:
            if deadletters.is_transient(exc):
                raise
            if len(msgs) > 1:
                return sum(self._fold_messages(own, [msg], opened, malformed) for msg in msgs)
            return self._set_aside_own(own, msgs[0], exc)

    def _set_aside_own(self, own: OwnLog, msg: LogMessage, exc: Exception) -> int:
        """Record an own-log message that cannot be opened or folded, and move the checkpoint past it."""
        with transaction(self.engine) as session:
            deadletters.set_aside_own(session, f"own:{own.name}", msg, exc)
            set_checkpoint(session, own_checkpoint(own), msg.sequence)
        log.error(
            "own_log_message_set_aside",
            own_log=own.name,
            sequence=msg.sequence,
            error_class=type(exc).__name__,
            rule=getattr(exc, "rule", ""),
        )
        return 0

    def _fold_batch(
        self,
        own: OwnLog,
        msgs: list[LogMessage],
        opened: dict[int, list[Envelope]] | None,
        malformed: dict[int, MalformedPart],
    ) -> int:
        def events(msg: LogMessage) -> list[Envelope]:
            bad = malformed.get(msg.sequence)
            if bad is not None:
                raise bad  # poison: set aside (``_fold_messages``)
            found = opened.get(msg.sequence) if opened is not None else None
            return found if found is not None else msg.events()

        with transaction(self.engine) as session:
            prefetch = getattr(self.projection, "prefetch", None)
            if prefetch is not None and own is not self.poison:
                prefetch(session, own, [env for msg in msgs for env in events(msg)])
            fold_erased = getattr(self.projection, "fold_erased", None) if own is not self.poison else None
            for msg in msgs:
                self._check_fence(own, msg)
                kept = events(msg)
                for env in kept:
                    self.fold(session, own, env)
                if fold_erased is not None and opened is not None and msg.sequence in opened:
                    whole = msg.events()  # decoded once (cached); opened in place, erased ones left out
                    if len(whole) != len(kept):
                        # What of an erased event is not personal (its id, its key) may still matter
                        # to the store: e.g. ingest's event-id dedupe index, as the live store had it.
                        held = {id(env) for env in kept}
                        for env in whole:
                            if id(env) not in held:
                                fold_erased(session, own, env)
                set_checkpoint(session, own_checkpoint(own), msg.sequence)
                header = msg.headers.get(CAUSE_HEADER, "")
                answered = _consumer_of(header, self.inputs)
                if answered is not None:
                    set_checkpoint(session, emitted_checkpoint(answered[0]), answered[1])
                redriven = _redrive_of(header)
                if redriven is not None:
                    deadletters.mark_redriven(session, *redriven)
        return len(msgs)

    # -------------------------------------------------------------- commands
    async def execute(self, command_id: str, decide: Callable[[UnitOfWork], T]) -> T:
        """Run a client command: decide, fold and append its events, commit. Retries once on a guard conflict.
        Refused (``LeaseStale``) while this instance's lease is stale (``cdp_kit.lease``)."""
        if not self.may_act():
            raise LeaseStale(f"{self.service}: this instance's lease is not current; retry")
        for attempt in (1, 2):
            try:
                return await self._execute_with_keys(command_id, decide)
            except AppendConflict:
                if attempt == 2:
                    raise
                log.warning("append_conflict_recovering", command_id=command_id)
                try:
                    await self.recover()
                except Deposed as exc:  # the caller gets a retryable answer; the process stops
                    raise Unavailable(f"{self.service} was deposed by another instance: retry") from exc
        raise AssertionError("unreachable")

    async def _execute_with_keys(self, command_id: str, decide: Callable[[UnitOfWork], T]) -> T:
        """``_execute``, again after fetching the keys a seal needed (``cdp_kit.vault.KeysNeeded``)."""
        while True:
            try:
                return await self._execute(command_id, decide)
            except KeysNeeded as needed:
                assert self.vault is not None
                await self.vault.fetch_needed(needed)

    async def _execute(self, command_id: str, decide: Callable[[UnitOfWork], T]) -> T:
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

    def read(self) -> Session:
        """A session for queries (no writes)."""
        return Session(self.engine, expire_on_commit=False)

    # ---------------------------------------------------------------- inputs
    async def apply_input_batch(self, inp: Input, items: Sequence[tuple[LogMessage, Msg | None]]) -> int:
        """Apply one fetched batch of an input in one transaction, then ack. Returns how many were new.
        The parts of a cause whose last part is not in ``items`` are left unapplied."""
        assembler: Assembler[Msg | None] = Assembler(inp.spec.name)
        return await self.apply_units(inp, assembler.feed(items))

    async def apply_units(self, inp: Input, units: Sequence[Unit]) -> int:
        """Apply whole units (a message, or every part of one cause) in one transaction, then ack.

        Units that fail on poison (see ``cdp_kit.deadletters``) are applied again one at a time,
        so the poison is found and set aside and every other unit goes through."""
        try:
            return await self._apply_units(inp, units)
        except ReplayWouldAppend:
            raise  # never a poison message: the rebuild stops, loudly
        except KeysNeeded as needed:
            assert self.vault is not None
            await self.vault.fetch_needed(needed)  # then again, with the keys at hand
            return await self.apply_units(inp, units)
        except Exception as exc:
            if deadletters.is_transient(exc):
                raise
            if len(units) > 1:
                log.warning("input_poison_isolating", consumer=inp.spec.name, messages=len(units))
                return sum([await self.apply_units(inp, [unit]) for unit in units])
            await self._dead_letter(inp, units[0], exc)
            return 0

    async def _dead_letter(self, inp: Input, unit: Unit, exc: Exception) -> None:
        """Set one unit aside: an event on the dead-letter log, and the checkpoint past it."""
        msg = unit[-1][0]
        async with self.lock:
            with transaction(self.engine) as session:
                if msg.sequence <= get_checkpoint(session, in_checkpoint(inp.spec)):
                    return
                row = session.get(deadletters.DeadLetterRow, (inp.spec.name, msg.sequence))
                attempt = row.redrives if row is not None else 0
                cause = Cause(inp.spec.name, msg.sequence)
                await self._append_dead_letter(session, inp, _whole(unit), exc, attempt, cause)
                set_checkpoint(session, in_checkpoint(inp.spec), msg.sequence)
        await _acknowledge(unit, self._readers.get(inp.spec.name))
        self._dead_lettered.add(1, {"consumer": inp.spec.name})

    async def _append_dead_letter(
        self, session: Session, inp: Input, msg: LogMessage, exc: BaseException, attempt: int, cause: Cause
    ) -> None:
        letter = deadletters.describe(inp.spec.name, msg, exc)
        log.error(
            "input_dead_lettered",
            consumer=inp.spec.name,
            stream=msg.stream,
            sequence=msg.sequence,
            error_class=letter.error_class,
            attempt=attempt,
        )
        env = make_envelope(
            dl.MessageDeadLettered(dead_letter=letter, attempt=attempt),
            event_id=deterministic_id("dead-letter", inp.spec.name, msg.sequence, attempt),
            subject_key=inp.spec.name,
            occurred_at=msg.stored_at or utcnow(),
            cause=cause,
        )
        uow = UnitOfWork(session, self, cause)
        try:
            uow.emit(self.poison, [env])
            # The message's cause counts as emitted, so a replay never decides it.
            await uow.flush(cause, inp.spec if cause.stream else None)
        except BaseException:
            await uow.abandon()
            raise

    async def _apply_units(self, inp: Input, units: Sequence[Unit]) -> int:
        started = time.perf_counter()
        applied_now = 0
        malformed: dict[int, MalformedPart] = {}
        opened = await self._open([msg for unit in units for msg, _ in unit], malformed) if not inp.raw else None

        def envelopes(msg: LogMessage) -> list[Envelope]:
            bad = malformed.get(msg.sequence)
            if bad is not None:
                raise bad  # poison: dead-lettered, or skipped where a replay meets a dead letter
            found = opened.get(msg.sequence) if opened is not None else None
            return found if found is not None else inp.envelopes(msg)

        headers = units[0][0][0].headers if units else {}
        with self._tracer.start_as_current_span(
            f"apply {inp.spec.name}", context=context_from(headers), attributes={"cdp.messages": len(units)}
        ):
            async with self.lock:
                with transaction(self.engine) as session:
                    uow: UnitOfWork | None = None
                    try:
                        self._check_may_act(inp)
                        applied = get_checkpoint(session, in_checkpoint(inp.spec))
                        emitted = get_checkpoint(session, emitted_checkpoint(inp.spec))
                        last = applied
                        fresh = [unit for unit in units if _key(unit) > applied]
                        aside = self._set_aside(session, inp, fresh, emitted)
                        observe_erased = getattr(inp.handler, "observe_erased", None)
                        prefetch = getattr(inp.handler, "prefetch", None)
                        if prefetch is not None:
                            prefetch(
                                session,
                                [
                                    env
                                    for unit in fresh
                                    if _key(unit) not in aside
                                    for msg, _ in unit
                                    for env in envelopes(msg)
                                ],
                            )
                        for unit in fresh:
                            last = _key(unit)
                            if last in aside:
                                continue
                            cause = Cause(inp.spec.name, last)
                            uow = uow or UnitOfWork(session, self, cause)
                            await uow.next_cause(cause, inp.spec)
                            events = [(msg, envelopes(msg)) for msg, _raw in unit]
                            for msg, envs in events:
                                erased = _erased(msg, envs, opened) if observe_erased is not None else None
                                if erased is None:
                                    for env in envs:
                                        inp.handler.observe(session, msg, env)
                                    continue
                                assert observe_erased is not None
                                for env, gone in erased:
                                    if gone:
                                        observe_erased(session, msg, env)
                                    else:
                                        inp.handler.observe(session, msg, env)
                            if last > emitted:
                                for msg, envs in events:
                                    for env in envs:
                                        inp.handler.decide(uow, msg, env)
                            applied_now += len(unit)
                            if uow.pending_bytes >= MAX_MESSAGE_BYTES // 4:
                                # Mid-batch: the message goes out and the batch goes on while JetStream stores it.
                                await uow.flush(Cause(inp.spec.name, last), inp.spec, wait=False)
                        finish = getattr(inp.handler, "finish", None)
                        if finish is not None:
                            finish(session)
                        if uow is not None:
                            await uow.flush(Cause(inp.spec.name, last), inp.spec)
                        if last > applied:
                            set_checkpoint(session, in_checkpoint(inp.spec), last)
                        self._check_may_act(inp)  # again: the batch may have taken long
                    except BaseException:
                        if uow is not None:
                            await uow.abandon()
                        raise
        await _acknowledge(units[-1] if units else [], self._readers.get(inp.spec.name))
        labels = {"consumer": inp.spec.name}
        self._applied.add(applied_now, labels)
        self._batch_seconds.record(time.perf_counter() - started, labels)
        return applied_now

    async def _until_may_act(self) -> None:
        """Wait while the lease is stale (a renewal late): it is renewed, or found lost and the
        process steps down. The condition is the clock: there is no event to wait on."""
        while not self.may_act() and not self._stopping.is_set():  # noqa: ASYNC110
            await asyncio.sleep(0.05)

    def _check_may_act(self, inp: Input) -> None:
        """Under a lease that may have passed to a standby (a process frozen past its TTL): neither
        decide nor commit nor acknowledge, so what the batch read is redelivered to whoever is
        active (``cdp_kit.lease``). Appends are fenced anyway; this keeps a batch that decides
        nothing (nothing to fence) from being taken from the new active."""
        if not self.may_act():
            raise LeaseStale(f"{self.service}: the lease was not renewed in time; {inp.spec.name} waits")

    @staticmethod
    def _set_aside(session: Session, inp: Input, fresh: Sequence[Unit], emitted: int) -> set[int]:
        """Dead letters among units a replay reads again (none can be above the emitted checkpoint)."""
        if not fresh or _key(fresh[0]) > emitted:
            return set()
        return deadletters.set_aside(session, inp.spec.name, _key(fresh[0]), _key(fresh[-1]))

    # -------------------------------------------------------------- redrive
    def want_redrives(self, consumer: str) -> None:
        """A redrive was requested for ``consumer``: its input loop applies them before its next fetch."""
        self._redrives.add(consumer)

    async def redrive(self, inp: Input) -> int:
        """Apply again every dead letter of this input whose redrive was requested. Returns how many went through."""
        self._redrives.discard(inp.spec.name)
        with self.read() as session:
            wanted = [(row.sequence, row.redrives + 1) for row in deadletters.wanted_redrives(session, inp.spec.name)]
        done = 0
        for sequence, attempt in wanted:
            msg = LogMessage(inp.spec.stream.name, sequence, "", {}, b"")
            try:
                msg = await self.eventlog.message(inp.spec.stream.name, sequence, via=inp.spec)
                await self._apply_redrive(inp, msg, attempt)
                done += 1
            except Exception as exc:
                if deadletters.is_transient(exc):
                    self._redrives.add(inp.spec.name)
                    raise
                async with self.lock:
                    with transaction(self.engine) as session:
                        cause = Cause(command_id=f"dead-again:{inp.spec.name}:{sequence}:{attempt}")
                        await self._append_dead_letter(session, inp, msg, exc, attempt, cause)
        if wanted:
            log.info("dead_letters_redriven", consumer=inp.spec.name, requested=len(wanted), applied=done)
        return done

    async def _apply_redrive(self, inp: Input, msg: LogMessage, attempt: int) -> None:
        """Observe and decide one message again, as a command: its outputs carry a ``redrive:`` cause,
        and a ``DeadLetterRedriven`` event follows them on the dead-letter log."""
        key = f"{inp.spec.name}:{msg.sequence}:{attempt}"
        # Opened as a batch is (a malformed sealed part fails it again; an erased event is left out).
        malformed: dict[int, MalformedPart] = {}
        opened = await self._open([msg], malformed) if not inp.raw else None
        if msg.sequence in malformed:
            raise malformed[msg.sequence]
        async with self.lock:
            with transaction(self.engine) as session:
                uow = UnitOfWork(session, self, Cause(command_id=f"redrive:{key}"))
                try:
                    found = opened.get(msg.sequence) if opened is not None else None
                    envelopes = found if found is not None else inp.envelopes(msg)
                    prefetch = getattr(inp.handler, "prefetch", None)
                    if prefetch is not None:
                        prefetch(session, envelopes)
                    for env in envelopes:
                        inp.handler.observe(session, msg, env)
                    for env in envelopes:
                        inp.handler.decide(uow, msg, env)
                    finish = getattr(inp.handler, "finish", None)
                    if finish is not None:
                        finish(session)
                    done = Cause(command_id=f"redriven:{key}")
                    await uow.next_cause(done)
                    redriven = dl.DeadLetterRedriven(consumer=inp.spec.name, sequence=msg.sequence, attempt=attempt)
                    uow.emit(
                        self.poison,
                        [
                            make_envelope(
                                redriven,
                                event_id=deterministic_id("redriven", key),
                                subject_key=inp.spec.name,
                                occurred_at=utcnow(),
                                cause=done,
                            )
                        ],
                    )
                    await uow.flush(done)
                except BaseException:
                    await uow.abandon()
                    raise

    async def request_redrive(self, consumer: str, sequences: Sequence[int], request_id: str) -> int:
        """Record a redrive request (a command on the dead-letter log). Returns how many letters it names."""
        with self.read() as session:
            per_consumer = deadletters.redrivable(session, consumer, sequences)

        def decide(uow: UnitOfWork) -> int:
            events = [
                make_envelope(
                    dl.DeadLetterRedriveRequested(consumer=name, sequences=seqs, request_id=request_id),
                    event_id=deterministic_id("redrive-requested", request_id, name),
                    subject_key=name,
                    occurred_at=utcnow(),
                    cause=uow.cause,
                )
                for name, seqs in sorted(per_consumer.items())
            ]
            uow.emit(self.poison, events)
            return sum(len(seqs) for seqs in per_consumer.values())

        requested = await self.execute(f"redrive-request:{request_id}", decide)
        for name in per_consumer:
            self.want_redrives(name)
        return requested

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
                # Only the lease's holder touches the consumer: re-creating it (at this store's
                # checkpoint) would move the new active's reading under its feet.
                await self._until_may_act()
                with self.read() as session:
                    start = get_checkpoint(session, in_checkpoint(inp.spec)) + 1
                reader = await self.eventlog.durable(inp.spec, start)
                if reader.aged_out:
                    health.aged_out += reader.aged_out
                    log.error(
                        "input_history_aged_out",
                        consumer=inp.spec.name,
                        stream=inp.spec.stream.name,
                        from_sequence=start,
                        messages=reader.aged_out,
                        hint="the stream's retention (max_age) is shorter than this service's downtime",
                    )
                self._readers[inp.spec.name] = reader
                assembler: Assembler[Msg | None] = Assembler(inp.spec.name)
                while not self._stopping.is_set():
                    if inp.spec.name in self._redrives:
                        await self.redrive(inp)
                    await self._until_may_act()
                    items = await reader.fetch(self.batch_size, timeout=1.0)
                    units = assembler.feed(items)
                    if units:
                        await self.apply_units(inp, units)
                    await _acknowledge(assembler.discarded(), reader)
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
                self._readers.pop(inp.spec.name, None)
                if reader is not None:
                    with contextlib.suppress(nats.errors.Error, OSError):
                        await reader.close()

    def restore_revocations(self) -> int:
        """Revoke again in the vault what privacy requests revoked before this process started."""
        if self.vault is None:
            return 0
        with self.read() as session:
            return restore_revocations(session, self.vault)

    async def run(self) -> None:
        """Recover, then consume every input until stopped."""
        self.restore_revocations()
        await self.recover()
        with self.read() as session:
            for inp in self.inputs:
                if deadletters.wanted_redrives(session, inp.spec.name):
                    self.want_redrives(inp.spec.name)
        self.ready.set()
        await asyncio.gather(*(self.run_input(inp) for inp in self.inputs))
        await self._stopping.wait()

    async def catch_up(self) -> None:
        """Recover, then apply every input up to its end as of now, reading without durable
        consumers (so a rebuild beside a live service never moves the live service's cursor)."""
        self.restore_revocations()
        await self.recover()
        for inp in self.inputs:
            with self.read() as session:
                start = get_checkpoint(session, in_checkpoint(inp.spec)) + 1
            assembler: Assembler[Msg | None] = Assembler(inp.spec.name)
            batch: list[Unit] = []
            reader = self.eventlog.read(
                inp.spec.stream.name, inp.spec.filter_subject, start, name=self._reader_name(inp.spec.name)
            )
            async with contextlib.aclosing(reader):
                async for msg in reader:
                    batch += assembler.feed([(msg, None)])
                    if len(batch) >= self.batch_size:
                        await self.apply_units(inp, batch)
                        batch = []
            if batch:
                await self.apply_units(inp, batch)

    async def rebuild(self) -> None:
        """Drop the store and replay the log into it. Read-only on the log: a replay that would
        append (decide anything the log does not already hold) raises ``ReplayWouldAppend``
        instead, so a rebuild beside a live service can never write to that service's logs."""
        self.drop_store()
        self.create_store()
        self.replay_only = True
        try:
            await self.catch_up()
        finally:
            self.replay_only = False

    def stop(self) -> None:
        self._stopping.set()
        self.ready.clear()
