"""Ingest use cases: load state, decide, append events through the processor."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from google.protobuf import struct_pb2

from cdp.common.v1.envelope_pb2 import IdentityValue
from cdp.ingest.v1 import events_pb2 as ev
from cdp.ingest.v1 import ingest_pb2 as pb
from cdp_ingest import store
from cdp_ingest.domain import (
    NAME_RE,
    RejectTally,
    RowResult,
    batch_exceeds,
    compatibility_violations,
    schema_violations,
    validate_row,
)
from cdp_ingest.settings import IngestSettings
from cdp_kit.envelope import Cause, Envelope, deterministic_id, make_envelope, utcnow
from cdp_kit.errors import AlreadyExists, InvalidInput, NotFound, Violation
from cdp_kit.processor import Processor, UnitOfWork
from cdp_kit.streams import INGEST_CONFIG, INGEST_RECORDS

CHUNK_ROWS = 500
CHUNK_BYTES = 256 * 1024


@dataclass(frozen=True)
class Accepted:
    row: int
    result: RowResult


class IngestHandlers:
    def __init__(self, processor: Processor, settings: IngestSettings) -> None:
        self.processor = processor
        self.settings = settings

    # ------------------------------------------------------------ config
    async def create_schema(self, schema: pb.Schema) -> pb.Schema:
        problems = schema_violations(schema)
        if problems:
            raise InvalidInput(f"schema {schema.name!r} is invalid", problems)

        def decide(uow: UnitOfWork) -> pb.Schema:
            current = store.latest_schema(uow.session, schema.name)
            new = pb.Schema()
            new.CopyFrom(schema)
            new.version = 1 if current is None else current.version + 1
            if current is not None:
                incompatible = compatibility_violations(current, new)
                if incompatible:
                    raise InvalidInput(f"schema {schema.name!r} v{new.version} is not compatible", incompatible)
            uow.emit(
                INGEST_CONFIG,
                [self._config_event(ev.SchemaRegistered(schema=new), f"schema:{new.name}:{new.version}")],
            )
            return new

        return await self.processor.execute(deterministic_id("schema", schema.name, utcnow().isoformat()), decide)

    async def create_dataset(self, dataset: pb.Dataset) -> pb.Dataset:
        if not NAME_RE.match(dataset.name):
            raise InvalidInput("invalid dataset", [Violation("name", "pattern", "lower_snake_case, 1-63 characters")])

        def decide(uow: UnitOfWork) -> pb.Dataset:
            if store.dataset(uow.session, dataset.name) is not None:
                raise AlreadyExists(f"dataset {dataset.name!r} exists")
            if store.latest_schema(uow.session, dataset.schema_name) is None:
                raise NotFound(f"schema {dataset.schema_name!r} not found")
            new = pb.Dataset()
            new.CopyFrom(dataset)
            if new.unknown_fields == pb.UNKNOWN_FIELDS_UNSPECIFIED:
                new.unknown_fields = pb.UNKNOWN_FIELDS_REJECT
            uow.emit(INGEST_CONFIG, [self._config_event(ev.DatasetCreated(dataset=new), f"dataset:{new.name}")])
            return new

        return await self.processor.execute(deterministic_id("dataset", dataset.name), decide)

    def _config_event(self, payload: Any, key: str) -> Envelope:
        return make_envelope(
            payload,
            event_id=deterministic_id("ingest-config", key),
            subject_key=key,
            occurred_at=utcnow(),
            cause=Cause(),
        )

    def _target(self, name: str) -> tuple[pb.Dataset, pb.Schema]:
        with self.processor.read() as session:
            ds = store.dataset(session, name)
            if ds is None:
                raise NotFound(f"dataset {name!r} not found")
            schema = store.latest_schema(session, ds.schema_name)
        if schema is None:
            raise NotFound(f"schema {ds.schema_name!r} of dataset {name!r} not found")
        return ds, schema

    # ------------------------------------------------------------ batches
    async def ingest_file(self, header: pb.IngestFileHeader, data: bytes) -> pb.BatchReport:
        if not header.batch_key:
            raise InvalidInput("missing batch key", [Violation("batch_key", "required", "a batch needs a key")])
        ds, schema = self._target(header.dataset)
        batch_id = deterministic_id("batch", header.dataset, header.batch_key)
        with self.processor.read() as session:
            previous = store.batch(session, batch_id)
            done_chunks = store.appended_chunks(session, batch_id)
        if previous is not None and previous.completed:
            report = store.report_of(previous)
            if report.status == pb.BATCH_STATUS_COMPLETED:
                report.duplicate = True
                return report
        received_at = previous.received_at.replace(tzinfo=UTC) if previous is not None else utcnow()
        report = pb.BatchReport(batch_id=batch_id, batch_key=header.batch_key, dataset=ds.name)
        accepted = self._validate_file(header, data, ds, schema, report)
        threshold = header.error_threshold if header.HasField("error_threshold") else self.settings.error_threshold
        if batch_exceeds(report.rows_rejected, report.rows_read, threshold):
            report.status = pb.BATCH_STATUS_FAILED
            report.failure = (
                f"{report.rows_rejected} of {report.rows_read} rows rejected, above the {threshold:.1%} threshold: "
                "nothing was ingested"
            )
            await self._complete(report, 0, received_at, attempt=hashlib.sha256(data).hexdigest()[:16])
            return report
        chunks = list(_chunks(accepted))
        for index, chunk in enumerate(chunks):
            if index not in done_chunks:
                await self._append_chunk(batch_id, index, chunk, ds, schema, received_at)
        report.status = pb.BATCH_STATUS_COMPLETED
        await self._complete(report, len(chunks), received_at)
        return report

    def _validate_file(
        self,
        header: pb.IngestFileHeader,
        data: bytes,
        ds: pb.Dataset,
        schema: pb.Schema,
        report: pb.BatchReport,
    ) -> list[Accepted]:
        tally = RejectTally()
        accepted: list[Accepted] = []
        drop = ds.unknown_fields == pb.UNKNOWN_FIELDS_DROP
        limit = (
            self.settings.max_event_bytes
            if schema.schema_class == pb.SCHEMA_CLASS_EVENT
            else self.settings.max_profile_record_bytes
        )
        textual = header.format in (pb.FILE_FORMAT_CSV, pb.FILE_FORMAT_UNSPECIFIED)
        for row_no, row, problems in parse_rows(header.format, data):
            report.rows_read += 1
            result = (
                RowResult(violations=problems)
                if problems
                else validate_row(
                    schema, row, record=f"row {row_no}", textual=textual, drop_unknown=drop, max_bytes=limit
                )
            )
            if result.ok:
                accepted.append(Accepted(row_no, result))
                report.rows_accepted += 1
            else:
                report.rows_rejected += 1
                tally.add(row_no, result.violations)
        if report.rows_read == 0:
            raise InvalidInput("empty file", [Violation("file", "empty", "no data rows", header.file_name)])
        report.rejects.extend(tally.to_proto())
        return accepted

    async def _append_chunk(
        self,
        batch_id: str,
        index: int,
        chunk: Sequence[Accepted],
        ds: pb.Dataset,
        schema: pb.Schema,
        received_at: datetime,
    ) -> None:
        def decide(uow: UnitOfWork) -> None:
            marker = make_envelope(
                ev.BatchChunkAppended(batch_id=batch_id, chunk=index),
                event_id=deterministic_id("chunk", batch_id, index),
                subject_key=ds.name,
                occurred_at=received_at,
                cause=uow.cause,
            )
            records = [
                record_envelope(ds, schema, item.result, batch_id=batch_id, row=item.row, received_at=received_at)
                for item in chunk
            ]
            uow.emit(INGEST_RECORDS, [marker, *records])

        await self.processor.execute(f"{batch_id}:{index}", decide)

    async def _complete(self, report: pb.BatchReport, chunks: int, received_at: datetime, attempt: str = "") -> None:
        def decide(uow: UnitOfWork) -> None:
            env = make_envelope(
                ev.BatchCompleted(report=report, chunks=chunks),
                event_id=deterministic_id("batch-completed", report.batch_id, attempt),
                subject_key=report.dataset,
                occurred_at=received_at,
                cause=uow.cause,
            )
            uow.emit(INGEST_RECORDS, [env])

        await self.processor.execute(f"{report.batch_id}:done:{attempt}", decide)

    async def get_batch(self, batch_id: str) -> pb.BatchReport:
        with self.processor.read() as session:
            row = store.batch(session, batch_id)
        if row is None or not row.completed:
            raise NotFound(f"batch {batch_id!r} not found")
        return store.report_of(row)

    # ------------------------------------------------------------ events
    async def publish_events(self, dataset_name: str, events: Sequence[dict[str, Any]]) -> list[pb.EventResult]:
        ds, schema = self._target(dataset_name)
        if schema.schema_class != pb.SCHEMA_CLASS_EVENT:
            raise InvalidInput(
                f"dataset {dataset_name!r} holds profile records",
                [Violation("dataset", "class", "events go to datasets of an event schema")],
            )
        drop = ds.unknown_fields == pb.UNKNOWN_FIELDS_DROP
        results: list[pb.EventResult] = []
        valid: list[tuple[int, RowResult]] = []
        for i, raw in enumerate(events):
            result = validate_row(
                schema,
                raw,
                record=f"event {i}",
                textual=False,
                drop_unknown=drop,
                max_bytes=self.settings.max_event_bytes,
            )
            if result.ok:
                valid.append((i, result))
                results.append(pb.EventResult(index=i, status=pb.EVENT_STATUS_ACCEPTED, event_id=result.event_id))
            else:
                errors = [pb.FieldError(field=v.field, rule=v.rule, message=v.message) for v in result.violations]
                results.append(pb.EventResult(index=i, status=pb.EVENT_STATUS_REJECTED, errors=errors))
        now = utcnow()
        for group in _event_groups(valid):
            await self._append_events(ds, schema, group, results, now)
        return results

    async def _append_events(
        self,
        ds: pb.Dataset,
        schema: pb.Schema,
        group: list[tuple[int, RowResult]],
        results: list[pb.EventResult],
        now: datetime,
    ) -> None:
        """One message of new events; ids seen before (ever) are answered as duplicates."""

        def decide(uow: UnitOfWork) -> None:
            seen = store.seen_events(uow.session, ds.name, [r.event_id for _, r in group])
            fresh: list[Envelope] = []
            for i, result in group:
                if result.event_id in seen:
                    results[i].status = pb.EVENT_STATUS_DUPLICATE
                    continue
                seen.add(result.event_id)
                fresh.append(record_envelope(ds, schema, result, batch_id="", row=0, received_at=now))
            uow.emit(INGEST_RECORDS, fresh)

        await self.processor.execute(deterministic_id("events", ds.name, *[r.event_id for _, r in group]), decide)


def _event_groups(valid: list[tuple[int, RowResult]]) -> Iterator[list[tuple[int, RowResult]]]:
    group: list[tuple[int, RowResult]] = []
    size = 0
    for item in valid:
        n = len(json.dumps(item[1].values, default=str)) + 256
        if group and size + n > CHUNK_BYTES:
            yield group
            group, size = [], 0
        group.append(item)
        size += n
    if group:
        yield group


def record_envelope(
    ds: pb.Dataset, schema: pb.Schema, result: RowResult, *, batch_id: str, row: int, received_at: datetime
) -> Envelope:
    is_event = schema.schema_class == pb.SCHEMA_CLASS_EVENT
    record_id = result.event_id if is_event else f"{batch_id}:{row}"
    attributes = struct_pb2.Struct()
    attributes.update(result.values)
    payload = ev.RecordAccepted(
        record_id=record_id,
        dataset=ds.name,
        schema_class=schema.schema_class,
        batch_id=batch_id,
        row=row,
        identities=[IdentityValue(namespace=ns, value=v) for ns, v in result.identities],
        attributes=attributes,
        event_type=result.event_type,
    )
    occurred_at = result.occurred_at or received_at
    payload.occurred_at.FromDatetime(occurred_at)
    return make_envelope(
        payload,
        event_id=deterministic_id("record", ds.name, record_id),
        subject_key=ds.name,
        occurred_at=occurred_at,
        cause=Cause(),
    )


def _chunks(accepted: list[Accepted]) -> Iterator[list[Accepted]]:
    chunk: list[Accepted] = []
    size = 0
    for item in accepted:
        n = len(json.dumps(item.result.values, default=str)) + 64
        if chunk and (len(chunk) >= CHUNK_ROWS or size + n > CHUNK_BYTES):
            yield chunk
            chunk, size = [], 0
        chunk.append(item)
        size += n
    if chunk:
        yield chunk


def parse_rows(fmt: int, data: bytes) -> Iterator[tuple[int, dict[str, Any], list[Violation]]]:
    """Rows of a file with their 1-based numbers; a row that cannot be read comes with its problems."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InvalidInput(
            "file is not valid UTF-8",
            [Violation("file", "encoding", f"invalid UTF-8 at byte {exc.start}", f"line {line}")],
        ) from exc
    if fmt == pb.FILE_FORMAT_JSONL:
        yield from _jsonl_rows(text)
    elif fmt in (pb.FILE_FORMAT_CSV, pb.FILE_FORMAT_UNSPECIFIED):
        yield from _csv_rows(text)
    else:
        raise InvalidInput("unsupported format", [Violation("format", "supported", "CSV and JSON Lines are supported")])


def _csv_rows(text: str) -> Iterator[tuple[int, dict[str, Any], list[Violation]]]:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as exc:
        raise InvalidInput("malformed CSV header", [Violation("header", "csv", str(exc), "line 1")]) from exc
    row_no = 0
    while True:
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            row_no += 1
            yield row_no, {}, [Violation("*", "csv", str(exc), f"row {row_no}")]
            return
        if not values:
            continue
        row_no += 1
        if len(values) != len(header):
            problem = Violation("*", "ragged_row", f"{len(values)} values for {len(header)} columns", f"row {row_no}")
            yield row_no, {}, [problem]
            continue
        yield row_no, dict(zip(header, values, strict=True)), []


def _jsonl_rows(text: str) -> Iterator[tuple[int, dict[str, Any], list[Violation]]]:
    row_no = 0
    for line in text.splitlines():
        if not line.strip():
            continue
        row_no += 1
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            yield row_no, {}, [Violation("*", "json", exc.msg, f"row {row_no}")]
            continue
        if not isinstance(value, dict):
            yield row_no, {}, [Violation("*", "json", "each line holds a JSON object", f"row {row_no}")]
            continue
        yield row_no, value, []
