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
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from cdp.ingest.v1 import ingest_pb2 as pb
from cdp_ingest.domain import RejectTally, Validator
from cdp_ingest.parsing import Inflater, Parsed, RowParser, clean_text, parser_for
from cdp_kit.errors import InvalidInput, Violation

CHUNK_ROWS = 500
CHUNK_BYTES = 256 * 1024
_LEN = struct.Struct("<I")

StagedRecord = tuple[int, dict[str, Any], list[tuple[str, str]], str, datetime | None, str]
"""(row, values, identities, event id, occurred at, event type)."""
StagedReject = tuple[int, dict[str, Any], list[tuple[str, str, str]]]
"""(row, raw values as read, [(field, rule, message)])."""


class Spool:
    """Chunks of rows in an anonymous temporary file: written once, read back in order."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self._file: IO[bytes] = tempfile.TemporaryFile(dir=folder, prefix="staging-")  # noqa: SIM115
        self._rows: list[Any] = []
        self._bytes = 0
        self.chunks = 0

    def add(self, row: Any, size: int) -> None:
        self._rows.append(row)
        self._bytes += size
        if len(self._rows) >= CHUNK_ROWS or self._bytes >= CHUNK_BYTES:
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
    report: pb.BatchReport = field(default_factory=pb.BatchReport)
    bytes_received: int = 0
    tally: RejectTally = field(default_factory=RejectTally)

    def __post_init__(self) -> None:
        drop = self.dataset.unknown_fields == pb.UNKNOWN_FIELDS_DROP
        textual = self.header.format in (pb.FILE_FORMAT_CSV, pb.FILE_FORMAT_UNSPECIFIED)
        self.validator = Validator(self.schema, textual=textual, drop_unknown=drop, max_bytes=self.max_bytes)
        self.inflater = Inflater()
        self.parser: RowParser = parser_for(self.header.format, self.schema, drop, self.staging)
        self.accepted = Spool(self.staging)
        self.rejected = Spool(self.staging)

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
        accepted = self.accepted
        for row_no, values, problems, size in rows:
            report.rows_read += 1
            result = None if problems else validate(values, size, f"row {row_no}")
            if result is not None and not result.violations:
                report.rows_accepted += 1
                staged: StagedRecord = (
                    row_no,
                    result.values,
                    result.identities,
                    result.event_id,
                    result.occurred_at,
                    result.event_type,
                )
                accepted.add(staged, size)
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
