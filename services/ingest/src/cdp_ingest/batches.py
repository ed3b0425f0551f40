"""One batch being read: parse while chunks arrive, validate, and stage rows until the verdict.

Accepted rows and kept rejected rows are staged in anonymous temporary files under the
ingest data folder (unlinked at creation, so a crash leaves nothing behind), in chunks
cut deterministically (by row count and size): a retried batch cuts the same chunks, so
chunks already on the log are recognised and skipped. Nothing is appended before the
whole file has been read and the threshold decided, so a failed batch leaves no record on
the log. Staging is not part of the store: the store stays the fold of the log, and a
rebuild equals it.
"""

from __future__ import annotations

import pickle
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from cdp.ingest.v1 import ingest_pb2 as pb
from cdp_ingest.domain import RejectTally, Validator
from cdp_ingest.parsing import Inflater, Parsed, RowParser, clean_text, parser_for
from cdp_ingest.records import RecordBuilder
from cdp_kit.errors import InvalidInput, Violation

# Accepted records travel CHUNK_ROWS or CHUNK_BYTES at a time, one message each (a message
# holds up to MAX_MESSAGE_BYTES with the kit's per-event overhead and the chunk's marker).
CHUNK_ROWS = 8000
CHUNK_BYTES = 900_000
RECORD_OVERHEAD = 48
REJECT_ROWS = 500
REJECT_BYTES = 256 * 1024
_LEN = struct.Struct("<I")

StagedRecord = tuple[int, str, bytes]
"""(row, envelope id for events, whose ids are de-duplicated, or "" for profile records; envelope bytes)."""
StagedReject = tuple[int, dict[str, Any], list[tuple[str, str, str]]]
"""(row, raw values as read, [(field, rule, message)])."""


class Spool:
    """Chunks of rows in an anonymous temporary file: written once, read back in order."""

    def __init__(self, folder: Path, max_rows: int, max_bytes: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self._file: IO[bytes] = tempfile.TemporaryFile(dir=folder, prefix="staging-")  # noqa: SIM115
        self._rows: list[Any] = []
        self._bytes = 0
        self.chunks = 0

    def add(self, row: Any, size: int) -> None:
        if self._bytes + size > self.max_bytes:
            self.cut()
        self._rows.append(row)
        self._bytes += size
        if len(self._rows) >= self.max_rows or self._bytes >= self.max_bytes:
            self.cut()

    def cut(self) -> None:
        if self._rows:
            blob = pickle.dumps(self._rows, protocol=pickle.HIGHEST_PROTOCOL)
            self._file.write(_LEN.pack(len(blob)))
            self._file.write(blob)
            self.chunks += 1
            self._rows, self._bytes = [], 0

    def __iter__(self) -> Iterator[list[Any]]:
        self.cut()
        self._file.flush()
        self._file.seek(0)
        for _ in range(self.chunks):
            (size,) = _LEN.unpack(self._file.read(_LEN.size))
            yield pickle.loads(self._file.read(size))

    def close(self) -> None:
        self._file.close()


@dataclass
class BatchRun:
    """The reading side of one IngestFile call."""

    header: pb.IngestFileHeader
    dataset: pb.Dataset
    schema: pb.Schema
    staging: Path
    max_bytes: int
    max_kept_rejects: int
    builder: RecordBuilder
    report: pb.BatchReport = field(default_factory=pb.BatchReport)
    bytes_received: int = 0
    tally: RejectTally = field(default_factory=RejectTally)

    def __post_init__(self) -> None:
        drop = self.dataset.unknown_fields == pb.UNKNOWN_FIELDS_DROP
        textual = self.header.format in (pb.FILE_FORMAT_CSV, pb.FILE_FORMAT_UNSPECIFIED)
        self.validator = Validator(self.schema, textual=textual, drop_unknown=drop, max_bytes=self.max_bytes)
        self.inflater = Inflater()
        self.parser: RowParser = parser_for(self.header.format, self.schema, drop, self.staging)
        self.accepted = Spool(self.staging, CHUNK_ROWS, CHUNK_BYTES)
        self.rejected = Spool(self.staging, REJECT_ROWS, REJECT_BYTES)

    def feed(self, data: bytes) -> None:
        self.bytes_received += len(data)
        for piece in self.inflater.feed(data):
            self._take(self.parser.feed(piece))

    def finish(self) -> None:
        for piece in self.inflater.close():
            self._take(self.parser.feed(piece))
        for rows in self.parser.close():
            self._take(rows)
        if self.report.rows_read == 0:
            raise InvalidInput(
                "empty file", [Violation("file", "empty", "no data rows", self.header.file_name or "upload")]
            )
        self.report.rejects.extend(self.tally.to_proto(with_samples=True))

    def _take(self, rows: list[Parsed]) -> None:
        report = self.report
        validate = self.validator.validate
        add = self.accepted.add
        encode = self.builder.encode
        is_event = self.builder.is_event
        key_of = self.builder.key_of
        prefix = f"{self.builder.batch_id}:"
        for row_no, values, problems, size in rows:
            report.rows_read += 1
            result = None if problems else validate(values, size, f"row {row_no}")
            if result is not None and not result.violations:
                report.rows_accepted += 1
                if is_event:
                    data = encode(
                        record_id=result.event_id,
                        row=row_no,
                        values=result.values,
                        identities=result.identities,
                        occurred_at=result.occurred_at,
                        event_type=result.event_type,
                    )
                    add((row_no, key_of(result.event_id), data), len(data) + RECORD_OVERHEAD)
                else:
                    data = encode(
                        record_id=prefix + str(row_no), row=row_no, values=result.values, identities=result.identities
                    )
                    add((row_no, "", data), len(data) + RECORD_OVERHEAD)
                continue
            violations = problems if result is None else result.violations
            report.rows_rejected += 1
            self.tally.add(row_no, violations, values, self.validator.mask)
            if report.rows_kept < self.max_kept_rejects:
                report.rows_kept += 1
                kept: StagedReject = (row_no, _printable(values), [(v.field, v.rule, v.message) for v in violations])
                self.rejected.add(kept, size)

    def close(self) -> None:
        self.accepted.close()
        self.rejected.close()


def _printable(values: dict[str, Any]) -> dict[str, Any]:
    """Raw values that can travel as JSON text (invalid UTF-8 replaced)."""
    return {clean_text(str(k)): clean_text(v) if isinstance(v, str) else _plain(v) for k, v in values.items()}


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str | list | dict):
        return value
    return str(value)
