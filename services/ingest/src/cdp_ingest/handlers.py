"""Ingest use cases: load state, decide, append events through the processor."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

from google.protobuf import json_format, struct_pb2

from cdp.ingest.v1 import events_pb2 as ev
from cdp.ingest.v1 import ingest_pb2 as pb
from cdp_ingest import store
from cdp_ingest.batches import CHUNK_BYTES, BatchRun, StagedReject
from cdp_ingest.config import ConfigCache, Target
from cdp_ingest.domain import (
    NAME_RE,
    RowResult,
    Validator,
    batch_exceeds,
    compatibility_violations,
    schema_violations,
    unknown_namespaces,
)
from cdp_ingest.judging import RECORD_OVERHEAD, StagedRecord
from cdp_ingest.options import same_dataset, same_schema
from cdp_ingest.privacy import SUPPRESSED_RULE, Suppression, load_suppression
from cdp_ingest.readers import ReaderPool
from cdp_ingest.records import RecordBuilder, emit_records
from cdp_ingest.rejects import mask, rejected_rows
from cdp_ingest.settings import IngestSettings
from cdp_kit.access import require_role
from cdp_kit.envelope import Cause, Envelope, deterministic_id, make_envelope, utcnow
from cdp_kit.errors import AlreadyExists, Conflict, InvalidInput, NotFound, Violation
from cdp_kit.namespaces import known_types, learn, normaliser
from cdp_kit.processor import Processor, UnitOfWork
from cdp_kit.streams import INGEST_CONFIG, INGEST_DEADLETTER, INGEST_READS_IDENTITY_CONFIG, INGEST_RECORDS
from cdp_kit.telemetry import get_logger, scrub

Staged = tuple[int, str, bytes]
"""(index in the call, record key, encoded envelope) of a valid event."""
MAX_FILE_BYTES = 2 * 1024 * 1024 * 1024
log = get_logger(__name__)


class IngestHandlers:
    def __init__(self, processor: Processor, settings: IngestSettings, config: ConfigCache) -> None:
        self.processor = processor
        self.settings = settings
        self.config = config
        self.keys = processor.vault if settings.seal_personal_data else None
        self._active: set[str] = set()
        self.readers = ReaderPool(settings.read_workers) if settings.read_workers else None

    async def keep_readers(self) -> None:
        """Runs while the service does; stops the reader processes when it ends."""
        try:
            await asyncio.Event().wait()
        finally:
            if self.readers is not None:
                await asyncio.to_thread(self.readers.close)

    # ------------------------------------------------------------ config
    async def create_schema(self, schema: pb.Schema) -> pb.Schema:
        problems = schema_violations(schema) or await self._unknown_namespaces(schema)
        if problems:
            raise InvalidInput(f"schema {schema.name!r} is invalid", problems)

        def decide(uow: UnitOfWork) -> pb.Schema:
            current = store.latest_schema(uow.session, schema.name)
            if current is not None and same_schema(current, schema):
                _expect_version(schema, current.version)
                return current  # re-registered as it is: nothing changes, nothing is appended
            new = pb.Schema()
            new.CopyFrom(schema)
            new.version = 1 if current is None else current.version + 1
            _expect_version(schema, new.version)
            if current is not None:
                incompatible = compatibility_violations(current, new)
                if incompatible:
                    raise InvalidInput(
                        f"schema {schema.name!r} v{new.version} is not compatible with v{current.version}",
                        incompatible,
                    )
            uow.emit(
                INGEST_CONFIG,
                [self._config_event(ev.SchemaRegistered(schema=new), f"schema:{new.name}:{new.version}")],
            )
            return new

        return await self.processor.execute(deterministic_id("schema", schema.name, utcnow().isoformat()), decide)

    async def _unknown_namespaces(self, schema: pb.Schema) -> list[Violation]:
        """Identity fields whose namespace identity does not define. A namespace created a moment
        ago may not have been read yet: then wait until identity's config log is read to its end."""
        with self.processor.read() as session:
            unknown = unknown_namespaces(schema, known_types(session))
        if unknown and await learn(self.processor, INGEST_READS_IDENTITY_CONFIG):
            with self.processor.read() as session:
                unknown = unknown_namespaces(schema, known_types(session))
        return unknown

    async def create_dataset(self, dataset: pb.Dataset) -> pb.Dataset:
        problems = []
        if not NAME_RE.match(dataset.name):
            problems.append(Violation("name", "pattern", "lower_snake_case, 1-63 characters"))
        if dataset.retention_seconds < 0:
            problems.append(Violation("retention_seconds", "minimum", "0 (forever) or more"))
        if problems:
            raise InvalidInput(f"dataset {dataset.name!r} is invalid", problems)

        def decide(uow: UnitOfWork) -> pb.Dataset:
            existing = store.dataset(uow.session, dataset.name)
            if existing is not None:
                if same_dataset(existing, _with_defaults(dataset)):
                    return existing  # created again as it is: nothing changes, nothing is appended
                raise AlreadyExists(f"dataset {dataset.name!r} exists with other settings")
            schema = store.latest_schema(uow.session, dataset.schema_name)
            if schema is None:
                raise NotFound(f"schema {dataset.schema_name!r} not found")
            if not dataset.allow_anonymous_rows and not any(f.identity_namespace for f in schema.fields):
                raise InvalidInput(
                    f"dataset {dataset.name!r} is invalid",
                    [
                        Violation(
                            "allow_anonymous_rows",
                            "identity",
                            f"schema {schema.name!r} declares no identity field, so every row would be "
                            "rejected (rule identity): allow anonymous rows, or add an identity field",
                        )
                    ],
                )
            if dataset.retention_seconds and schema.schema_class != pb.SCHEMA_CLASS_EVENT:
                raise InvalidInput(
                    f"dataset {dataset.name!r} is invalid",
                    [Violation("retention_seconds", "event_only", "retention applies to event datasets")],
                )
            new = _with_defaults(dataset)
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

    def _target(self, name: str) -> Target:
        with self.processor.read() as session:
            return self.config.target(session, name)

    # ------------------------------------------------------------ batches
    async def ingest_file(self, chunks: AsyncIterator[pb.IngestFileChunk]) -> pb.BatchReport:
        report = pb.BatchReport()
        async for progress in self.ingest_stream(chunks):
            if progress.HasField("report"):
                report = progress.report
        return report

    async def ingest_stream(self, chunks: AsyncIterator[pb.IngestFileChunk]) -> AsyncIterator[pb.IngestProgress]:
        """Read a batch while it arrives (progress after each chunk), then judge and append it."""
        header = await _header(chunks)
        target = self._target(header.dataset)
        batch_id = deterministic_id("batch", header.dataset, header.batch_key)
        with self.processor.read() as session:
            previous = store.batch(session, batch_id)
        if previous is not None and previous.completed:
            done = store.report_of(previous)
            if done.status == pb.BATCH_STATUS_COMPLETED:
                done.duplicate = True
                yield pb.IngestProgress(report=self._with_samples(done))
                return
        if batch_id in self._active:
            raise Conflict(f"batch {header.batch_key!r} is being ingested by another call; retry when it ends")
        self._active.add(batch_id)
        # A retried batch keeps the time of its first attempt, so its records encode the same.
        received_at = previous.received_at.replace(tzinfo=UTC) if previous is not None else utcnow()
        run = BatchRun(
            header=header,
            dataset=target.dataset,
            schema=target.schema,
            staging=self.settings.data_dir / "ingest-staging",
            max_bytes=target.max_bytes,
            max_kept_rejects=self.settings.max_kept_rejects,
            builder=RecordBuilder(
                header.dataset,
                target.schema.schema_class,
                batch_id,
                received_at,
                record_time=bool(target.schema.timestamp_field),
                keys=self.keys,
            ),
            report=pb.BatchReport(batch_id=batch_id, batch_key=header.batch_key, dataset=header.dataset),
            pool=self.readers,
            limits=self.settings.limits(),
            identity=target.identity,
            suppression=self._suppression(),
        )
        try:
            started = time.perf_counter()
            async for progress in self._read(run, chunks):
                yield progress
            run.read_seconds = time.perf_counter() - started
            report = await self._judge_and_append(run, received_at)
            yield pb.IngestProgress(
                rows_read=report.rows_read,
                rows_accepted=report.rows_accepted,
                rows_rejected=report.rows_rejected,
                bytes_received=run.bytes_received,
                report=report,
            )
        finally:
            run.close()
            self._active.discard(batch_id)

    async def _read(self, run: BatchRun, chunks: AsyncIterator[pb.IngestFileChunk]) -> AsyncIterator[pb.IngestProgress]:
        async for chunk in chunks:
            if chunk.HasField("header"):
                raise InvalidInput("two headers", [Violation("header", "once", "send the header once, first")])
            if run.bytes_received + len(chunk.data) > MAX_FILE_BYTES:
                raise InvalidInput("file too large", [Violation("file", "max_size", "split files over 2 GiB")])
            await asyncio.to_thread(run.feed, chunk.data)
            r = run.report
            yield pb.IngestProgress(
                rows_read=r.rows_read,
                rows_accepted=r.rows_accepted,
                rows_rejected=r.rows_rejected,
                bytes_received=run.bytes_received,
            )
        await asyncio.to_thread(run.finish)

    async def _judge_and_append(self, run: BatchRun, received_at: datetime) -> pb.BatchReport:
        appending = time.perf_counter()
        report = run.report
        header = run.header
        threshold = header.error_threshold if header.HasField("error_threshold") else self.settings.error_threshold
        report.error_threshold = threshold
        with self.processor.read() as session:
            done_chunks = store.appended_chunks(session, report.batch_id)
        for index, rejects in enumerate(run.rejected):
            await self._append_rejects(report.batch_id, index, rejects, report.dataset, received_at)
        if batch_exceeds(report.rows_rejected, report.rows_read, threshold):
            report.status = pb.BATCH_STATUS_FAILED
            report.failure = (
                f"{report.rows_rejected} of {report.rows_read} rows rejected, above the {threshold:.1%} threshold: "
                "nothing was ingested"
            )
            await self._complete(report, 0, received_at, attempt=_attempt(report))
            return report
        for index, chunk in enumerate(run.accepted):
            if index not in done_chunks:
                await self._append_chunk(report.batch_id, index, chunk, report.dataset, received_at)
        with self.processor.read() as session:
            report.rows_duplicate = store.chunk_duplicates(session, report.batch_id)
        report.status = pb.BATCH_STATUS_COMPLETED
        await self._complete(report, run.accepted.chunks, received_at)
        log.info(
            "batch_completed",
            batch_id=report.batch_id,
            dataset=report.dataset,
            rows_read=report.rows_read,
            rows_rejected=report.rows_rejected,
            read_s=round(run.read_seconds, 3),
            append_s=round(time.perf_counter() - appending, 3),
        )
        return report

    async def _append_rejects(
        self, batch_id: str, index: int, rows: list[StagedReject], dataset: str, received_at: datetime
    ) -> None:
        validator: Validator | None = None
        with contextlib.suppress(NotFound):
            validator = self._target(dataset).validator(textual=True)
        event_id = deterministic_id("rejects", batch_id, index)

        def decide(uow: UnitOfWork) -> None:
            if store.has_batch_error(uow.session, batch_id, rows[0][0]):
                return  # kept by an earlier attempt of this batch
            # Raw values sealed under the row's identities' keys, or masked (cdp_ingest.rejects).
            norm = normaliser(uow.session, phone_region=self.settings.default_phone_region)
            payload, parts = rejected_rows(
                rows,
                batch_id=batch_id,
                chunk=index,
                event_id=event_id,
                validator=validator,
                norm=norm,
                keys=self.keys,
            )
            env = make_envelope(
                payload, event_id=event_id, subject_key=dataset, occurred_at=received_at, cause=uow.cause
            )
            env.sealed.extend(parts)
            uow.emit(INGEST_DEADLETTER, [env])

        await self.processor.execute(f"{batch_id}:rejects:{index}", decide)

    async def _append_chunk(
        self, batch_id: str, index: int, staged: list[StagedRecord], dataset: str, received_at: datetime
    ) -> None:
        """One chunk's records in one message with its marker. Records of events whose id was
        seen before (in an earlier chunk or file, by gRPC or NATS) or earlier in the chunk are left out."""
        keys = [key for _, key, _ in staged]
        is_event = bool(keys and keys[0])

        def decide(uow: UnitOfWork) -> None:
            if index in store.appended_chunks(uow.session, batch_id):
                return  # a concurrent or earlier attempt appended it
            fresh: list[bytes] = []
            fresh_keys: list[str] = []
            if is_event:
                seen = store.seen_keys(uow.session, dataset, keys)
                for _, key, data in staged:
                    if key not in seen:
                        seen.add(key)
                        fresh.append(data)
                        fresh_keys.append(key)
            else:
                fresh = [data for _, _, data in staged]
            marker = make_envelope(
                ev.BatchChunkAppended(
                    batch_id=batch_id, chunk=index, rows=len(fresh), duplicates=len(staged) - len(fresh)
                ),
                event_id=deterministic_id("chunk", batch_id, index),
                subject_key=dataset,
                occurred_at=received_at,
                cause=uow.cause,
            )
            uow.emit(INGEST_RECORDS, [marker])
            emit_records(uow, dataset, fresh, fresh_keys)

        await self.processor.execute(f"{batch_id}:{index}", decide)

    async def _complete(self, report: pb.BatchReport, chunks: int, received_at: datetime, attempt: str = "") -> None:
        logged = pb.BatchReport()
        logged.CopyFrom(report)
        for group in logged.rejects:
            del group.samples[:]  # raw values never travel on the records log

        def decide(uow: UnitOfWork) -> None:
            env = make_envelope(
                ev.BatchCompleted(report=logged, chunks=chunks),
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
        return self._with_samples(store.report_of(row))

    def _with_samples(self, report: pb.BatchReport) -> pb.BatchReport:
        """Samples of rejected values come from the kept rows, identity values masked."""
        try:
            target = self._target(report.dataset)
        except NotFound:
            return report
        with self.processor.read() as session:
            rows = store.batch_error_rows(
                session, report.batch_id, sorted({r for g in report.rejects for r in g.first_rows[:3]})
            )
        validator = target.validator(textual=True)
        for group in report.rejects:
            for number in group.first_rows[:3]:
                kept = rows.get(number)
                if kept is not None and kept.values.get(group.field) is not None:
                    value = kept.values[group.field]
                    # A row masked before it reached the log holds its masked form already.
                    group.samples.append(str(value) if kept.masked else validator.mask(group.field, value))
        return report

    async def list_batch_errors(self, request: pb.ListBatchErrorsRequest, caller: object) -> pb.ListBatchErrorsResponse:
        """Rejected rows, masked unless raw values are asked for by a caller allowed to see them."""
        if request.raw:
            require_role(caller, "operator", allowed_by_setting=self.settings.allow_raw_rejects)
        limit = min(request.limit or 1000, 10_000)
        with self.processor.read() as session:
            row = store.batch(session, request.batch_id)
            if row is None:
                raise NotFound(f"batch {request.batch_id!r} not found")
            found = store.batch_errors(session, request.batch_id, request.after_row, limit)
        response = pb.ListBatchErrorsResponse(next_after_row=found[-1].row if len(found) == limit else 0)
        validator: Validator | None = None
        with contextlib.suppress(NotFound):
            validator = self._target(row.dataset).validator(textual=True)
            response.identity_fields.extend(sorted(validator.identity_fields))
        for item in found:
            values = struct_pb2.Struct()
            if item.masked or request.raw:  # masked before it reached the log: there is nothing else to show
                values.update(item.values)
                errors = [pb.FieldError(**e) for e in item.errors]
            else:
                values.update({name: mask(validator, name, value) for name, value in item.values.items()})
                errors = [pb.FieldError(**{**e, "message": scrub(e["message"])}) for e in item.errors]
            response.errors.append(pb.BatchError(row=item.row, values=values, errors=errors))
        return response

    # ------------------------------------------------------------ events
    async def publish_events(self, dataset_name: str, events: Sequence[struct_pb2.Struct]) -> list[pb.EventResult]:
        target = self._target(dataset_name)
        if not target.is_event:
            raise InvalidInput(
                f"dataset {dataset_name!r} holds profile records",
                [Violation("dataset", "class", "events go to datasets of an event schema")],
            )
        validator = target.validator(textual=False)
        builder = RecordBuilder(target.dataset.name, pb.SCHEMA_CLASS_EVENT, "", utcnow(), keys=self.keys)
        results: list[pb.EventResult] = []
        valid: list[Staged] = []
        suppression = self._suppression()
        suppressed = 0
        for i, event in enumerate(events):
            raw = json_format.MessageToDict(event)
            result = validator.validate(raw, event.ByteSize(), f"event {i}")
            hashed = suppression.match(result.identities) if result.ok and suppression else None
            if hashed is not None:
                suppressed += 1
                message = f"identity {hashed} is suppressed by a privacy request"
                errors = [pb.FieldError(field="identity", rule=SUPPRESSED_RULE, message=message)]
                results.append(pb.EventResult(index=i, status=pb.EVENT_STATUS_REJECTED, errors=errors))
            elif result.ok:
                valid.append((i, builder.key_of(result.event_id), event_bytes(builder, result)))
                results.append(pb.EventResult(index=i, status=pb.EVENT_STATUS_ACCEPTED, event_id=result.event_id))
            else:
                errors = [pb.FieldError(field=v.field, rule=v.rule, message=v.message) for v in result.violations]
                results.append(pb.EventResult(index=i, status=pb.EVENT_STATUS_REJECTED, errors=errors))
        for group in _event_groups(valid):
            await self._append_events(builder.dataset, group, results)
        if suppressed:
            log.info("events_suppressed", dataset=builder.dataset, events=suppressed)
        return results

    def _suppression(self) -> Suppression:
        with self.processor.read() as session:
            return load_suppression(session, phone_region=self.settings.default_phone_region)

    async def _append_events(self, dataset: str, group: list[Staged], results: list[pb.EventResult]) -> None:
        """One message of new events; ids seen before (ever, by gRPC, NATS or a file) are answered as duplicates."""

        def decide(uow: UnitOfWork) -> None:
            seen = store.seen_keys(uow.session, dataset, [key for _, key, _ in group])
            fresh: list[bytes] = []
            fresh_keys: list[str] = []
            for i, key, data in group:
                if key in seen:
                    results[i].status = pb.EVENT_STATUS_DUPLICATE
                    continue
                results[i].status = pb.EVENT_STATUS_ACCEPTED
                seen.add(key)
                fresh.append(data)
                fresh_keys.append(key)
            emit_records(uow, dataset, fresh, fresh_keys)

        await self.processor.execute(deterministic_id("events", dataset, *[key for _, key, _ in group]), decide)

    async def list_dead_letters(self, request: pb.ListDeadLettersRequest) -> pb.ListDeadLettersResponse:
        limit = min(request.limit or 1000, 10_000)
        with self.processor.read() as session:
            if request.dataset and store.dataset(session, request.dataset) is None:
                found = store.dead_letters(session, request.dataset, request.after_sequence, limit)
                if not found:
                    raise NotFound(f"dataset {request.dataset!r} not found and has no dead letters")
            else:
                found = store.dead_letters(session, request.dataset, request.after_sequence, limit)
        next_after = found[-1].sequence if len(found) == limit else 0
        return pb.ListDeadLettersResponse(dead_letters=found, next_after_sequence=next_after)


def event_bytes(builder: RecordBuilder, result: RowResult) -> bytes:
    return builder.encode(
        record_id=result.event_id,
        row=0,
        values=result.values,
        identities=result.identities,
        occurred_at=result.occurred_at,
        event_type=result.event_type,
    )


def _attempt(report: pb.BatchReport) -> str:
    """Failed attempts of one batch key are told apart by what they found."""
    digest = hashlib.sha256(report.SerializeToString(deterministic=True)).hexdigest()
    return digest[:16]


async def _header(chunks: AsyncIterator[pb.IngestFileChunk]) -> pb.IngestFileHeader:
    async for chunk in chunks:
        if not chunk.HasField("header"):
            raise InvalidInput("missing header", [Violation("header", "first", "the first chunk is the header")])
        header = chunk.header
        problems = []
        if not header.batch_key:
            problems.append(Violation("batch_key", "required", "a batch needs a key"))
        if header.HasField("error_threshold") and not 0 <= header.error_threshold <= 1:
            problems.append(Violation("error_threshold", "range", "a share between 0 and 1"))
        if problems:
            raise InvalidInput("invalid batch header", problems)
        return header
    raise InvalidInput("empty request", [Violation("header", "required", "no header was sent")])


def _event_groups(valid: list[Staged]) -> Iterator[list[Staged]]:
    """Encoded events cut into groups that each fit one message."""
    group: list[Staged] = []
    size = 0
    for item in valid:
        n = len(item[2]) + RECORD_OVERHEAD
        if group and size + n > CHUNK_BYTES:
            yield group
            group, size = [], 0
        group.append(item)
        size += n
    if group:
        yield group


def _expect_version(schema: pb.Schema, version: int) -> None:
    """A schema sent with a version states which version it expects to be (0: let the service number it)."""
    if schema.version and schema.version != version:
        raise InvalidInput(
            f"schema {schema.name!r} would be v{version}, not v{schema.version}",
            [
                Violation(
                    "version", "version", f"this request registers v{version}; send 0 to let the service number it"
                )
            ],
        )


def _with_defaults(dataset: pb.Dataset) -> pb.Dataset:
    new = pb.Dataset()
    new.CopyFrom(dataset)
    if new.unknown_fields == pb.UNKNOWN_FIELDS_UNSPECIFIED:
        new.unknown_fields = pb.UNKNOWN_FIELDS_REJECT
    return new
