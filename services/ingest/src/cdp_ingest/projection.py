"""Folds ingest's own events (config and records) into its store."""

from __future__ import annotations

from google.protobuf import json_format
from sqlmodel import Session

from cdp.common.v1 import deadletter_pb2 as dl
from cdp.ingest.v1 import events_pb2 as ev
from cdp.ingest.v1 import ingest_pb2 as pb
from cdp_ingest import rejects
from cdp_ingest.config import ConfigCache
from cdp_ingest.privacy import fold_applied
from cdp_ingest.records import RECORD_TYPE
from cdp_ingest.store import (
    DAY_S,
    REJECTED,
    BatchChunkRow,
    BatchErrorRow,
    BatchRow,
    DatasetRow,
    SchemaRow,
    as_dict,
    latest_schema,
    note_seen,
)
from cdp_kit import deadletters
from cdp_kit.envelope import Envelope, from_timestamp, is_a, unpack
from cdp_kit.streams import INGEST_PRIVACY_APPLIED, INGEST_READS_COLLECT, OwnLog

CONFIG_TYPES = {ev.SchemaRegistered.DESCRIPTOR.full_name, ev.DatasetCreated.DESCRIPTOR.full_name}


class IngestProjection:
    def __init__(self, config: ConfigCache | None = None) -> None:
        self.config = config
        self._event_datasets: dict[str, bool] = {}

    def _event_dataset(self, session: Session, name: str) -> bool:
        known = self._event_datasets.get(name)
        if known is None:
            row = session.get(DatasetRow, name)
            schema = latest_schema(session, row.schema_name) if row is not None else None
            known = self._event_datasets[name] = schema is not None and schema.schema_class == pb.SCHEMA_CLASS_EVENT
        return known

    def fold_erased(self, session: Session, own: OwnLog, env: Envelope) -> None:
        """A record whose person was erased (crypto-shredding): its event id stays known, as the
        live store knew it, so a replay de-duplicates exactly as the live store does."""
        if env.type == RECORD_TYPE and self._event_dataset(session, env.subject_key):
            note_seen(session, env.subject_key, env.id, env.recorded_at.seconds // DAY_S)

    def fold(self, session: Session, own: OwnLog, env: Envelope) -> None:
        kind = env.type
        if own.subject == INGEST_PRIVACY_APPLIED.subject:
            fold_applied(session, env)
            return
        if kind == RECORD_TYPE:
            # The hot path: a record is folded only to remember event ids, and whether the
            # dataset holds events is known from the config (a dataset's class never changes).
            if self._event_dataset(session, env.subject_key):
                note_seen(session, env.subject_key, env.id, env.recorded_at.seconds // DAY_S)
            return
        if kind in CONFIG_TYPES:
            self._event_datasets.clear()
            if self.config is not None:
                self.config.clear()
        if is_a(env, ev.SchemaRegistered):
            schema = unpack(env, ev.SchemaRegistered).schema
            session.merge(SchemaRow(name=schema.name, version=schema.version, body=as_dict(schema)))
        elif is_a(env, ev.DatasetCreated):
            ds = unpack(env, ev.DatasetCreated).dataset
            session.merge(DatasetRow(name=ds.name, schema_name=ds.schema_name, body=as_dict(ds)))
        elif is_a(env, ev.BatchChunkAppended):
            chunk = unpack(env, ev.BatchChunkAppended)
            session.merge(
                BatchChunkRow(batch_id=chunk.batch_id, chunk=chunk.chunk, rows=chunk.rows, duplicates=chunk.duplicates)
            )
            self._ensure_batch(session, env, chunk.batch_id)
        elif is_a(env, ev.BatchCompleted):
            done = unpack(env, ev.BatchCompleted)
            row = self._ensure_batch(session, env, done.report.batch_id)
            row.completed = True
            row.batch_key = done.report.batch_key
            row.dataset = done.report.dataset
            row.report = as_dict(done.report)
            session.add(row)
        elif is_a(env, ev.BatchRowsRejected):
            rejected = unpack(env, ev.BatchRowsRejected)
            for item in rejected.rows:
                if rejects.erased(item):
                    continue  # sealed under the keys of a person since erased: nothing of it is kept
                errors = [{"field": e.field, "rule": e.rule, "message": e.message} for e in item.errors]
                values = json_format.MessageToDict(item.values)
                session.merge(
                    BatchErrorRow(
                        batch_id=rejected.batch_id,
                        row=item.row,
                        values=values,
                        errors=errors,
                        masked=item.masked,
                        key_refs=dict(sorted(item.key_refs.items())),
                    )
                )
        elif is_a(env, ev.EventDeadLettered):
            # Collect rejects from before they were the kit's dead letters: folded into the kit's
            # table like its own, so they are listed and redriven the same way (and the raw
            # message they carry is kept only as its masked shape).
            deadletters.record(session, legacy_dead_letter(unpack(env, ev.EventDeadLettered).dead_letter))

    @staticmethod
    def _ensure_batch(session: Session, env: Envelope, batch_id: str) -> BatchRow:
        row = session.get(BatchRow, batch_id)
        if row is None:
            row = BatchRow(
                batch_id=batch_id,
                batch_key="",
                dataset=env.subject_key,
                received_at=from_timestamp(env.occurred_at),
            )
            session.add(row)
            session.flush()
        return row


def legacy_dead_letter(letter: pb.DeadLetter) -> dl.DeadLetter:
    """An ``EventDeadLettered`` (ingest's own collect reject, before the kit's) as the kit's dead letter."""
    raw = letter.raw.encode()
    return dl.DeadLetter(
        consumer=INGEST_READS_COLLECT.name,
        stream=INGEST_READS_COLLECT.stream.name,
        sequence=letter.sequence,
        subject=letter.subject,
        error_class=REJECTED,
        error=("; ".join(f"{e.field}: {e.rule}: {e.message}" for e in letter.errors) or letter.reason)[
            : deadletters.ERROR_CHARS
        ],
        excerpt=deadletters.masked_excerpt(raw),
        size_bytes=len(raw),
        state="dead",
    )
