"""Folds ingest's own events (config and records) into its store."""

from __future__ import annotations

from google.protobuf import json_format
from sqlmodel import Session

from cdp.ingest.v1 import events_pb2 as ev
from cdp.ingest.v1 import ingest_pb2 as pb
from cdp_ingest.config import ConfigCache
from cdp_ingest.store import (
    BatchChunkRow,
    BatchErrorRow,
    BatchRow,
    DatasetRow,
    DeadLetterRow,
    SchemaRow,
    SeenEventRow,
    as_dict,
)
from cdp_kit.envelope import Envelope, from_timestamp, is_a, unpack
from cdp_kit.streams import OwnLog

CONFIG_TYPES = {ev.SchemaRegistered.DESCRIPTOR.full_name, ev.DatasetCreated.DESCRIPTOR.full_name}


class IngestProjection:
    def __init__(self, config: ConfigCache | None = None) -> None:
        self.config = config

    def fold(self, session: Session, own: OwnLog, env: Envelope) -> None:
        if env.type in CONFIG_TYPES and self.config is not None:
            self.config.clear()
        if is_a(env, ev.SchemaRegistered):
            schema = unpack(env, ev.SchemaRegistered).schema
            session.merge(SchemaRow(name=schema.name, version=schema.version, body=as_dict(schema)))
        elif is_a(env, ev.DatasetCreated):
            ds = unpack(env, ev.DatasetCreated).dataset
            session.merge(DatasetRow(name=ds.name, schema_name=ds.schema_name, body=as_dict(ds)))
        elif is_a(env, ev.RecordAccepted):
            rec = unpack(env, ev.RecordAccepted)
            if rec.schema_class == pb.SCHEMA_CLASS_EVENT:
                session.merge(SeenEventRow(dataset=rec.dataset, event_id=rec.record_id))
        elif is_a(env, ev.BatchChunkAppended):
            chunk = unpack(env, ev.BatchChunkAppended)
            session.merge(BatchChunkRow(batch_id=chunk.batch_id, chunk=chunk.chunk, rows=0))
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
                errors = [{"field": e.field, "rule": e.rule, "message": e.message} for e in item.errors]
                values = json_format.MessageToDict(item.values)
                session.merge(BatchErrorRow(batch_id=rejected.batch_id, row=item.row, values=values, errors=errors))
        elif is_a(env, ev.EventDeadLettered):
            letter = unpack(env, ev.EventDeadLettered).dead_letter
            session.merge(DeadLetterRow(sequence=letter.sequence, dataset=letter.dataset, body=as_dict(letter)))

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
