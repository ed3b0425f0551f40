"""Poison input: messages a consumer can never apply, set aside with their reason.

A consumer must never stop on one message. When applying an input message raises, the
processor tells **transient** failures (NATS or the store unavailable, a guard conflict:
retried with back-off, never dead-lettered) from **poison** (anything else: undecodable
bytes, a payload of the wrong type, a handler that raises on this message). Poison is
isolated to one message (or one multi-part cause), written as a ``MessageDeadLettered``
event on the service's own dead-letter log, folded into ``cdp_deadletter``, and the input
checkpoint moves past it. Because the decision is on the log, a rebuild skips the same
messages. A redrive is a ``DeadLetterRedriveRequested`` event; the consumer then applies the
message again, and ``DeadLetterRedriven`` records that it went through (a failure is
dead-lettered again, one attempt more).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import nats.errors
import sqlalchemy as sa
import sqlalchemy.exc
from sqlmodel import Field, Session, SQLModel, col, select

from cdp.common.v1 import deadletter_pb2 as dl
from cdp_kit.envelope import Envelope, is_a, to_timestamp, unpack
from cdp_kit.errors import Conflict, Unavailable
from cdp_kit.eventlog import LogMessage
from cdp_kit.telemetry import scrub

State = Literal["dead", "redrive_requested", "redriven"]
EXCERPT_BYTES = 96
ERROR_CHARS = 300
# Failures that say nothing about the message: wait them out and try the same message again.
TRANSIENT: tuple[type[BaseException], ...] = (
    Unavailable,
    Conflict,
    nats.errors.Error,
    OSError,
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
)


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, TRANSIENT) or (isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.connection_invalidated)


class DeadLetterRow(SQLModel, table=True):
    """One input message set aside, and where its redrive stands."""

    __tablename__ = "cdp_deadletter"

    consumer: str = Field(primary_key=True)
    sequence: int = Field(primary_key=True, sa_type=sa.BigInteger)
    stream: str
    subject: str
    error_class: str
    error: str
    excerpt: str
    size_bytes: int = Field(sa_type=sa.BigInteger)
    state: str
    redrives: int = 0
    stored_at_ms: int = Field(default=0, sa_type=sa.BigInteger)


class RedriveRequestRow(SQLModel, table=True):
    """A redrive request already on the log, by its id: asking again with the same id changes nothing."""

    __tablename__ = "cdp_deadletter_request"

    request_id: str = Field(primary_key=True)
    requested: int = Field(default=0, sa_type=sa.BigInteger)


DEADLETTER_TABLES = [
    SQLModel.metadata.tables[DeadLetterRow.__tablename__],
    SQLModel.metadata.tables[RedriveRequestRow.__tablename__],
]


def masked_excerpt(data: bytes, limit: int = EXCERPT_BYTES) -> str:
    """The first bytes' shape: letters become x, digits 9, anything unprintable a dot."""
    text = data[:limit].decode("utf-8", "replace")
    shape = "".join(_mask(c) for c in text)
    return shape + ("..." if len(data) > limit else "")


def _mask(c: str) -> str:
    if c.isalpha():
        return "x"
    if c.isdigit():
        return "9"
    return c if c.isascii() and c.isprintable() else "."


def describe(consumer: str, msg: LogMessage, exc: BaseException) -> dl.DeadLetter:
    letter = dl.DeadLetter(
        consumer=consumer,
        stream=msg.stream,
        sequence=msg.sequence,
        subject=msg.subject,
        error_class=type(exc).__name__,
        error=scrub(str(exc))[:ERROR_CHARS],
        excerpt=masked_excerpt(msg.data),
        size_bytes=len(msg.data),
        state="dead",
    )
    if msg.stored_at is not None:
        letter.stored_at.CopyFrom(to_timestamp(msg.stored_at))
    return letter


def set_aside_own(session: Session, reader: str, msg: LogMessage, exc: BaseException) -> None:
    """Record an own-log message that could not be folded (no event: a rebuild decides the same)."""
    if session.get(DeadLetterRow, (reader, msg.sequence)) is None:
        record(session, describe(reader, msg, exc))


def fold(session: Session, env: Envelope) -> None:
    """Fold one event of a dead-letter log into ``cdp_deadletter``."""
    if is_a(env, dl.MessageDeadLettered):
        event = unpack(env, dl.MessageDeadLettered)
        record(session, event.dead_letter, event.attempt)
    elif is_a(env, dl.DeadLetterRedriveRequested):
        request = unpack(env, dl.DeadLetterRedriveRequested)
        _note_request(session, request)
        for row in _rows(session, request.consumer, request.sequences):
            if row.state == "dead":
                row.state = "redrive_requested"
                session.add(row)
    elif is_a(env, dl.DeadLetterRedriven):
        done = unpack(env, dl.DeadLetterRedriven)
        mark_redriven(session, done.consumer, done.sequence, done.attempt)


def _note_request(session: Session, request: dl.DeadLetterRedriveRequested) -> None:
    if not request.request_id:
        return
    row = session.get(RedriveRequestRow, request.request_id) or RedriveRequestRow(request_id=request.request_id)
    row.requested += len(request.sequences)
    session.add(row)


def earlier_request(session: Session, request_id: str) -> int | None:
    """How many letters a request with this id named, if it is on the log already."""
    row = session.get(RedriveRequestRow, request_id)
    return None if row is None else row.requested


def record(session: Session, letter: dl.DeadLetter, attempt: int = 0) -> None:
    """Fold a dead letter, as a ``MessageDeadLettered`` (or a service's own older event) carries it.
    Again for a known letter: its error, state and attempts change, its place and shape stay."""
    row = session.get(DeadLetterRow, (letter.consumer, letter.sequence))
    if row is None:
        row = DeadLetterRow(
            consumer=letter.consumer,
            sequence=letter.sequence,
            stream=letter.stream,
            subject=letter.subject,
            excerpt=letter.excerpt,
            size_bytes=letter.size_bytes,
            error_class="",
            error="",
            state="dead",
        )
    row.error_class, row.error, row.state, row.redrives = letter.error_class, letter.error, "dead", attempt
    if letter.HasField("stored_at"):  # a redrive that found its message gone knows no time
        row.stored_at_ms = letter.stored_at.ToMilliseconds()
    session.add(row)


def mark_redriven(session: Session, consumer: str, sequence: int, attempt: int) -> None:
    row = session.get(DeadLetterRow, (consumer, sequence))
    if row is not None:
        row.state, row.redrives = "redriven", max(row.redrives, attempt)
        session.add(row)


def _rows(session: Session, consumer: str, sequences: Iterable[int]) -> list[DeadLetterRow]:
    wanted = list(sequences)
    query = select(DeadLetterRow).where(DeadLetterRow.consumer == consumer)
    if wanted:
        query = query.where(col(DeadLetterRow.sequence).in_(wanted))
    return list(session.exec(query.order_by(col(DeadLetterRow.sequence))).all())


def set_aside(session: Session, consumer: str, first: int, last: int) -> set[int]:
    """Sequences in [first, last] a replay must not apply: dead, or waiting for their redrive
    (which applies them itself). A redriven message is applied again in its place."""
    query = select(DeadLetterRow.sequence).where(
        DeadLetterRow.consumer == consumer,
        col(DeadLetterRow.sequence).between(first, last),
        DeadLetterRow.state != "redriven",
    )
    return set(session.exec(query).all())


def wanted_redrives(session: Session, consumer: str) -> list[DeadLetterRow]:
    query = select(DeadLetterRow).where(DeadLetterRow.consumer == consumer, DeadLetterRow.state == "redrive_requested")
    return list(session.exec(query.order_by(col(DeadLetterRow.sequence))).all())


def to_proto(row: DeadLetterRow) -> dl.DeadLetter:
    letter = dl.DeadLetter(
        consumer=row.consumer,
        stream=row.stream,
        sequence=row.sequence,
        subject=row.subject,
        error_class=row.error_class,
        error=row.error,
        excerpt=row.excerpt,
        size_bytes=row.size_bytes,
        state=row.state,
        redrives=row.redrives,
    )
    letter.stored_at.FromMilliseconds(row.stored_at_ms)
    return letter


def listed(session: Session, consumer: str, *, include_redriven: bool, limit: int) -> list[DeadLetterRow]:
    query = select(DeadLetterRow)
    if consumer:
        query = query.where(DeadLetterRow.consumer == consumer)
    if not include_redriven:
        query = query.where(DeadLetterRow.state != "redriven")
    query = query.order_by(col(DeadLetterRow.consumer), col(DeadLetterRow.sequence)).limit(limit)
    return list(session.exec(query).all())


def dead_per_consumer(session: Session) -> dict[str, int]:
    """Letters not redriven, per consumer (for status)."""
    return _count_by(session, DeadLetterRow.consumer, DeadLetterRow.state != "redriven")


def counts(session: Session) -> dict[str, int]:
    """Letters per state."""
    return _count_by(session, DeadLetterRow.state, sa.true())


def _count_by(session: Session, column: Any, where: Any) -> dict[str, int]:
    query = select(column, sa.func.count()).where(where).group_by(column)
    return {str(key): int(n) for key, n in session.exec(query).all()}


def redrivable(session: Session, consumer: str, sequences: Iterable[int]) -> dict[str, list[int]]:
    """The dead letters a redrive request names, per consumer (every dead one when none are named)."""
    # Own-log messages set aside ("own:<log>") are bytes the service never wrote: nothing to redrive.
    query = select(DeadLetterRow).where(DeadLetterRow.state == "dead", col(DeadLetterRow.consumer).not_like("own:%"))
    if consumer:
        query = query.where(DeadLetterRow.consumer == consumer)
    wanted = list(sequences)
    if wanted:
        query = query.where(col(DeadLetterRow.sequence).in_(wanted))
    out: dict[str, list[int]] = {}
    for row in session.exec(query.order_by(col(DeadLetterRow.sequence))).all():
        out.setdefault(row.consumer, []).append(row.sequence)
    return out
