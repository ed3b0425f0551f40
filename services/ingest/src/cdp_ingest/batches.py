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

import json
import pickle
import struct
import tempfile
from collections import ChainMap
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from cdp.common.v1.envelope_pb2 import Envelope
from cdp.ingest.v1 import ingest_pb2 as pb
from cdp.ingest.v1.events_pb2 import RecordAccepted
from cdp_ingest.domain import IdentityRules, RejectTally, Validator
from cdp_ingest.judging import Judged, judge
from cdp_ingest.limits import Limits
from cdp_ingest.parsing import CsvParser, Inflater, Refused, RowParser, Split, parser_for
from cdp_ingest.privacy import SUPPRESSED_RULE, Suppression
from cdp_ingest.readers import BlockQueue, ReaderPool, ReadSpec, count_rows
from cdp_ingest.records import RecordBuilder
from cdp_kit.errors import InvalidInput, Violation
from cdp_kit.sealing import Erased, merge_part, open_part
from cdp_kit.telemetry import pii_hash_key

# Accepted records travel CHUNK_ROWS or CHUNK_BYTES at a time, one message each (a message
# holds up to MAX_MESSAGE_BYTES with the kit's per-event overhead and the chunk's marker).
CHUNK_ROWS = 8000
CHUNK_BYTES = 900_000
# CSV files are read by the reader processes (when the service has some) past their first MiB:
# below it, starting them would cost more than it saves.
POOL_FROM_BYTES = 1024 * 1024
REJECT_ROWS = 500
REJECT_BYTES = 256 * 1024
# A rejected row is kept whole up to this size; a larger one (it fits the row limit, not one
# dead-letter message) keeps an excerpt of each long value.
KEPT_ROW_BYTES = REJECT_BYTES
EXCERPT_CHARS = 1024
_LEN = struct.Struct("<I")

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
    """The reading side of one IngestFile call. With a ``pool``, CSV rows after the header are
    judged by reader processes (see ``cdp_ingest.readers``); the results are the same."""

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
    pool: ReaderPool | None = None
    read_seconds: float = 0.0
    limits: Limits = field(default_factory=Limits)
    identity: IdentityRules = field(default_factory=IdentityRules)
    # Identities a privacy request suppresses: their rows are dropped, counted under rule "suppressed".
    suppression: Suppression = field(default_factory=Suppression)

    def __post_init__(self) -> None:
        drop = self.dataset.unknown_fields == pb.UNKNOWN_FIELDS_DROP
        textual = self.header.format in (pb.FILE_FORMAT_CSV, pb.FILE_FORMAT_UNSPECIFIED)
        self.validator = Validator(
            self.schema,
            textual=textual,
            drop_unknown=drop,
            max_bytes=self.max_bytes,
            max_depth=self.limits.max_depth,
            identity=self.identity,
        )
        self.inflater = Inflater()
        self.parser: RowParser = parser_for(self.header.format, self.schema, drop, self.staging, self.limits)
        self.accepted = Spool(self.staging, CHUNK_ROWS, CHUNK_BYTES)
        self.rejected = Spool(self.staging, REJECT_ROWS, REJECT_BYTES)
        self._blocks: BlockQueue | None = None

    def feed(self, data: bytes) -> None:
        self.bytes_received += len(data)
        for piece in self.inflater.feed(data):
            self._read(piece)

    def finish(self) -> None:
        for piece in self.inflater.close():
            self._read(piece)
        if self._blocks is not None:
            for judged in self._blocks.drain():
                self._take(judged)
        for rows in self.parser.close():
            self._take(judge(rows, self.validator, self.builder))
        if self.report.rows_read == 0:
            raise InvalidInput(
                "empty file", [Violation("file", "empty", "no data rows", self.header.file_name or "upload")]
            )
        self.report.rejects.extend(self.tally.to_proto(with_samples=True))

    def _read(self, piece: bytes) -> None:
        parser = self.parser
        pooled = self.pool is not None and (self._blocks is not None or self.bytes_received >= POOL_FROM_BYTES)
        if not pooled or not isinstance(parser, CsvParser):
            self._take(judge(parser.feed(piece), self.validator, self.builder))
            return
        for item in parser.split(piece):
            self._read_split(parser, item)

    def _read_split(self, parser: CsvParser, item: Split) -> None:
        """One block (or one row refused as too large) of a CSV read on the reader processes;
        results are taken in file order either way."""
        if isinstance(item, Refused):
            judged = judge([parser.refused_row(item)], self.validator, self.builder)
            if self._blocks is None:
                self._take(judged)
            else:
                self._blocks.submit_judged(judged)
            return
        # the header (and the rows of its block) are read here, as is everything when the
        # readers are busy with another batch
        if parser.header is None or (self._blocks is None and not self._start_readers(parser.header)):
            self._take(judge(parser.parse(item), self.validator, self.builder))
            return
        assert self._blocks is not None
        first = parser.skip(count_rows(item))
        for judged in self._blocks.submit(item, first):
            self._take(judged)

    def _start_readers(self, header: list[str]) -> bool:
        if self.pool is None:
            return False
        readers = self.pool.acquire()
        if readers is None:  # another batch is using the readers: read this one here
            self.pool = None
            return False
        self._blocks = BlockQueue(self.pool, readers, self._spec(header))
        return True

    def _spec(self, header: list[str]) -> ReadSpec:
        return ReadSpec(
            schema=self.schema.SerializeToString(deterministic=True),
            textual=self.validator.textual,
            drop_unknown=self.validator.drop_unknown,
            max_bytes=self.max_bytes,
            dataset=self.builder.dataset,
            batch_id=self.builder.batch_id,
            received_at=self.builder.received_at,
            header=tuple(header),
            limits=self.limits,
            identity=self.identity,
            seal=self.builder.keys is not None,
            pii_key=pii_hash_key() if self.builder.keys is not None else b"",
        )

    def _take(self, judged: Judged) -> None:
        if self.suppression:
            self._suppress(judged)
        report = self.report
        report.rows_read += judged.rows_read
        report.rows_accepted += len(judged.accepted)
        if judged.keys:
            self.builder.adopt(judged.keys)
        add = self.accepted.add
        for staged, size in judged.accepted:
            add(staged, size)
        mask = self.validator.mask
        for row_no, violations, samples, values, size in judged.rejected:
            report.rows_rejected += 1
            self.tally.add(row_no, violations, {name: mask(name, value) for name, value in samples.items()})
            if report.rows_kept < self.max_kept_rejects:
                report.rows_kept += 1
                if size > KEPT_ROW_BYTES:
                    values, size = _excerpts(values)
                kept: StagedReject = (row_no, values, [(v.field, v.rule, v.message) for v in violations])
                self.rejected.add(kept, size)

    def _suppress(self, judged: Judged) -> None:
        """Drop the accepted rows that carry a suppressed identity: counted as rejected (rule
        ``suppressed``, the identity named by its keyed hash), never kept."""
        kept = []
        known = getattr(self.builder.keys, "known", None)
        keys: Mapping[str, bytes] = ChainMap(judged.keys, known()) if known is not None else judged.keys
        for item in judged.accepted:
            (row_no, _key, data), _size = item
            hashed = self.suppression.match(record_identities(data, keys))
            if hashed is None:
                kept.append(item)
                continue
            self.report.rows_rejected += 1
            message = f"identity {hashed} is suppressed by a privacy request"
            self.tally.add(row_no, [Violation("identity", SUPPRESSED_RULE, message)], {})
        judged.accepted = kept

    def close(self) -> None:
        if self._blocks is not None:
            self._blocks.release(broken=False)
        self.accepted.close()
        self.rejected.close()


def record_identities(data: bytes, keys: Mapping[str, bytes]) -> list[tuple[str, str]]:
    """The identities of an encoded record (an envelope of ``RecordAccepted``), sealed or not
    (``keys``: the keys its reader made or found for the chunk, which seal it)."""
    env = Envelope.FromString(data)
    for part in env.sealed:
        try:
            merge_part(env, part.path, open_part(keys, part, event_id=env.id, event_type=env.type))
        except Erased:  # not one of the chunk's keys: nothing to match on here
            continue
    record = RecordAccepted.FromString(env.payload.value)
    return [(i.namespace, i.value) for i in record.identities]


def _excerpts(values: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """A large rejected row's values, each long one cut to an excerpt (marked "…"), and no more
    of them than ``KEPT_ROW_BYTES`` holds, so the row fits the dead-letter message that keeps
    it; with the size kept."""
    out: dict[str, Any] = {}
    size = 0
    for name, value in values.items():
        text = value if isinstance(value, str) else None
        if text is None and isinstance(value, list | dict):
            text = json.dumps(value, default=str)
            if len(text) <= EXCERPT_CHARS:
                text = None
        kept = value if text is None or len(text) <= EXCERPT_CHARS else text[:EXCERPT_CHARS] + "…"
        size += len(name) + (len(kept) if isinstance(kept, str) else len(json.dumps(kept, default=str)))
        if size > KEPT_ROW_BYTES:
            break
        out[name] = kept
    return out, size
