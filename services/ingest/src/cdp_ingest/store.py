"""The ingest store: schemas, datasets, batches and the ids of every event seen."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from google.protobuf import json_format
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Field, Session, SQLModel, col, select

from cdp.ingest.v1 import ingest_pb2 as pb
from cdp_kit import deadletters
from cdp_kit.store import tables_of
from cdp_kit.streams import INGEST_READS_COLLECT, collect_subject

COLLECT_PREFIX = "cdp.collect."
# The error class of a collect reject among the kit's dead letters (any other class there is poison).
REJECTED = "Rejected"


class SchemaRow(SQLModel, table=True):
    __tablename__ = "ingest_schema"

    name: str = Field(primary_key=True)
    version: int = Field(primary_key=True)
    body: dict[str, Any] = Field(sa_type=sa.JSON)


class DatasetRow(SQLModel, table=True):
    __tablename__ = "ingest_dataset"

    name: str = Field(primary_key=True)
    schema_name: str
    body: dict[str, Any] = Field(sa_type=sa.JSON)


class BatchRow(SQLModel, table=True):
    __tablename__ = "ingest_batch"

    batch_id: str = Field(primary_key=True)
    batch_key: str
    dataset: str
    received_at: datetime
    completed: bool = False
    report: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON)


class BatchChunkRow(SQLModel, table=True):
    __tablename__ = "ingest_batch_chunk"

    batch_id: str = Field(primary_key=True)
    chunk: int = Field(primary_key=True)
    rows: int
    duplicates: int = 0


class SeenEventRow(SQLModel, table=True):
    """Every accepted event within the dedupe horizon, by the id of its record envelope
    (``records.record_key(dataset, event id)``): the fold learns it without unpacking the record.
    ``day`` (days since 1970-01-01, UTC) is when the record was appended; rows older than the
    horizon are neither consulted nor kept (``DedupeHorizon``)."""

    __tablename__ = "ingest_seen_event"

    dataset: str = Field(primary_key=True)
    record_key: str = Field(primary_key=True)
    day: int = Field(default=0, index=True)


class BatchErrorRow(SQLModel, table=True):
    """A rejected row of a batch, as read, with what was wrong (folded from the dead-letter own log)."""

    __tablename__ = "ingest_batch_error"

    batch_id: str = Field(primary_key=True)
    row: int = Field(primary_key=True, sa_type=sa.BigInteger)
    values: dict[str, Any] = Field(sa_type=sa.JSON)
    errors: list[dict[str, str]] = Field(sa_type=sa.JSON)
    # Masked before it reached the log (no valid identity to seal it under): the values are masked.
    masked: bool = False
    # The key ref each valid identity sealed the row under on the log, by the identity's keyed hash.
    key_refs: dict[str, str] = Field(default_factory=dict, sa_type=sa.JSON)


# Invalid collected events are the kit's dead letters (``cdp_deadletter``), see consumer.py.
TABLES = tables_of(SchemaRow, DatasetRow, BatchRow, BatchChunkRow, SeenEventRow, BatchErrorRow)


def as_dict(msg: Any) -> dict[str, Any]:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def latest_schema(session: Session, name: str) -> pb.Schema | None:
    row = session.exec(select(SchemaRow).where(SchemaRow.name == name).order_by(col(SchemaRow.version).desc())).first()
    return json_format.ParseDict(row.body, pb.Schema()) if row else None


def schema_version(session: Session, name: str, version: int) -> pb.Schema | None:
    row = session.get(SchemaRow, (name, version))
    return json_format.ParseDict(row.body, pb.Schema()) if row else None


def all_schemas(session: Session) -> list[pb.Schema]:
    rows = session.exec(select(SchemaRow).order_by(col(SchemaRow.name), col(SchemaRow.version))).all()
    return [json_format.ParseDict(r.body, pb.Schema()) for r in rows]


def dataset(session: Session, name: str) -> pb.Dataset | None:
    row = session.get(DatasetRow, name)
    return json_format.ParseDict(row.body, pb.Dataset()) if row else None


def all_datasets(session: Session) -> list[pb.Dataset]:
    rows = session.exec(select(DatasetRow).order_by(col(DatasetRow.name))).all()
    return [json_format.ParseDict(r.body, pb.Dataset()) for r in rows]


def batch(session: Session, batch_id: str) -> BatchRow | None:
    return session.get(BatchRow, batch_id)


def appended_chunks(session: Session, batch_id: str) -> set[int]:
    rows = session.exec(select(BatchChunkRow.chunk).where(BatchChunkRow.batch_id == batch_id)).all()
    return set(rows)


SEEN_PENDING = "ingest_seen_pending"
SEEN_QUERY_CHUNK = 900
DAY_S = 86_400


class DedupeHorizon:
    """How long an event id is remembered (``CDP_EVENT_DEDUPE_HORIZON_DAYS``; 0: for ever).

    The trade-off: an event sent again after the horizon is accepted again (a duplicate), and in
    exchange the index stays bounded (about 100 bytes a row: 1M events a day and 30 days keep
    ~3 GB). JetStream's own Nats-Msg-Id window (2 minutes) catches a publisher's retries; this
    catches a replayed export or a re-sent file. Reads ignore rows past the horizon, so the
    answer does not depend on when pruning last ran; pruning runs once a day per process."""

    def __init__(self, days: int = 30) -> None:
        self.days = days
        self.pruned_day = 0

    def oldest_day(self, today: int) -> int:
        return today - self.days + 1 if self.days > 0 else 0


DEDUPE = DedupeHorizon()


def today() -> int:
    return int(time.time()) // DAY_S


def note_seen(session: Session, dataset_name: str, key: str, day: int | None = None) -> None:
    """Record an event as seen (on ``day``, default today); written in bulk before the next seen
    query or the commit."""
    session.info.setdefault(SEEN_PENDING, []).append(
        {"dataset": dataset_name, "record_key": key, "day": today() if day is None else day}
    )


def note_seen_all(session: Session, dataset_name: str, keys: list[str]) -> None:
    """``note_seen`` of many events of one dataset, today."""
    if keys:
        day = today()
        session.info.setdefault(SEEN_PENDING, []).extend(
            {"dataset": dataset_name, "record_key": k, "day": day} for k in keys
        )


def write_seen(session: Session) -> None:
    """One insert of every event noted seen in this transaction; an id already kept has its day
    moved forward (seen again inside the horizon counts from the latest time). Once a day, rows
    older than the horizon are deleted."""
    pending = session.info.pop(SEEN_PENDING, None)
    if not pending:
        return
    table = SeenEventRow.__table__  # type: ignore[attr-defined]
    insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    stmt = insert(table)
    session.execute(
        stmt.on_conflict_do_update(index_elements=["dataset", "record_key"], set_={"day": stmt.excluded.day}),
        pending,
    )
    newest = max(int(p["day"]) for p in pending)
    if DEDUPE.days > 0 and newest > DEDUPE.pruned_day:
        DEDUPE.pruned_day = newest
        session.execute(sa.delete(table).where(table.c.day < DEDUPE.oldest_day(newest)))


@sa.event.listens_for(Session, "before_commit")
def _write_seen_before_commit(session: Session) -> None:
    write_seen(session)


@sa.event.listens_for(Session, "after_rollback")
def _forget_seen_after_rollback(session: Session) -> None:
    session.info.pop(SEEN_PENDING, None)


def seen_keys(session: Session, dataset_name: str, keys: list[str]) -> set[str]:
    """Which of these record keys (``records.record_key``) were seen before, within the horizon."""
    write_seen(session)
    found: set[str] = set()
    unique = list(dict.fromkeys(keys))
    oldest = DEDUPE.oldest_day(today())
    for start in range(0, len(unique), SEEN_QUERY_CHUNK):
        part = unique[start : start + SEEN_QUERY_CHUNK]
        found.update(
            session.exec(
                select(SeenEventRow.record_key).where(
                    SeenEventRow.dataset == dataset_name,
                    col(SeenEventRow.record_key).in_(part),
                    col(SeenEventRow.day) >= oldest,
                )
            ).all()
        )
    return found


def chunk_duplicates(session: Session, batch_id: str) -> int:
    rows = session.exec(select(BatchChunkRow.duplicates).where(BatchChunkRow.batch_id == batch_id)).all()
    return sum(rows)


def report_of(row: BatchRow) -> pb.BatchReport:
    return json_format.ParseDict(row.report, pb.BatchReport())


def has_batch_error(session: Session, batch_id: str, row: int) -> bool:
    return session.get(BatchErrorRow, (batch_id, row)) is not None


def batch_errors(session: Session, batch_id: str, after_row: int, limit: int) -> list[BatchErrorRow]:
    query = (
        select(BatchErrorRow)
        .where(BatchErrorRow.batch_id == batch_id, col(BatchErrorRow.row) > after_row)
        .order_by(col(BatchErrorRow.row))
        .limit(limit)
    )
    return list(session.exec(query).all())


def batch_error_rows(session: Session, batch_id: str, rows: list[int]) -> dict[int, BatchErrorRow]:
    if not rows:
        return {}
    query = select(BatchErrorRow).where(BatchErrorRow.batch_id == batch_id, col(BatchErrorRow.row).in_(rows))
    return {r.row: r for r in session.exec(query).all()}


def dead_letters(session: Session, dataset_name: str, after: int, limit: int) -> list[pb.DeadLetter]:
    """Collect rejects still dead (not yet redriven), from the kit's dead letters."""
    row = deadletters.DeadLetterRow
    query = select(row).where(
        row.consumer == INGEST_READS_COLLECT.name,
        row.error_class == REJECTED,
        row.state != "redriven",
        col(row.sequence) > after,
    )
    if dataset_name:
        query = query.where(row.subject == collect_subject(dataset_name))
    found = session.exec(query.order_by(col(row.sequence)).limit(limit)).all()
    return [
        pb.DeadLetter(
            sequence=r.sequence,
            dataset=r.subject.removeprefix(COLLECT_PREFIX),
            subject=r.subject,
            reason=r.error,
            raw=r.excerpt,
        )
        for r in found
    ]
