"""Incremental file parsers: bytes go in as chunks arrive, rows come out; memory stays bounded.

* gzip is detected by its magic bytes and inflated in bounded pieces (multi-member too);
* CSV is cut at the last newline outside quotes (an even count of ``"`` before it), so a
  quoted field may span lines and chunks; a row growing past the row limit is measured as it
  streams by (never buffered, never parsed) and rejected with ``field_size`` or ``row_size``;
  a quote still open at the end of the file is an unbalanced quote and fails the file;
* JSON Lines are cut at newlines; a line longer than the row limit is rejected and skipped,
  and a line nested too deep is rejected before ``json.loads`` sees it;
* Parquet needs its footer, so it is spooled to a temporary file and read in record batches.

A row that cannot be read comes with its problems (field ``*`` or the column, and a rule).
The limits (``cdp_ingest.limits``) are checked before any parser runs.
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cdp.ingest.v1 import ingest_pb2 as pb
from cdp_ingest.limits import (
    CsvRowScan,
    Limits,
    depth_violation,
    field_violation,
    json_text,
    oversized_fields,
    row_violation,
    text_bytes,
    too_deep,
    value_bytes,
)
from cdp_kit.errors import InvalidInput, Violation

Parsed = tuple[int, dict[str, Any], list[Violation], int]
"""(1-based row number, values by column, problems reading it, size in bytes)."""

INFLATE_PIECE = 1024 * 1024
GZIP_MAGIC = b"\x1f\x8b"
# The csv module never gets a row over the row limit (the parser measures rows first), so its
# own field limit must not fire first with a misleading error: it is set out of the way.
csv.field_size_limit(2**31 - 1)


class RowParser(Protocol):
    def feed(self, data: bytes) -> list[Parsed]: ...

    def close(self) -> Iterator[list[Parsed]]: ...


class Inflater:
    """Passes bytes through, or inflates them when the stream starts with the gzip magic."""

    def __init__(self) -> None:
        self._decided = False
        self._head = b""
        self._z: Any = None

    def feed(self, data: bytes) -> Iterator[bytes]:
        if not self._decided:
            self._head += data
            if len(self._head) < 2:
                return
            self._decided = True
            data, self._head = self._head, b""
            if data.startswith(GZIP_MAGIC):
                self._z = zlib.decompressobj(wbits=31)
        if self._z is None:
            if data:
                yield data
            return
        yield from self._inflate(data)

    def _inflate(self, data: bytes) -> Iterator[bytes]:
        while True:
            if self._z.eof:
                if not data:
                    return
                self._z = zlib.decompressobj(wbits=31)  # another gzip member follows
            try:
                out = self._z.decompress(data, INFLATE_PIECE)
            except zlib.error as exc:
                raise InvalidInput("corrupt gzip data", [Violation("file", "gzip", str(exc))]) from exc
            if out:
                yield out
            if self._z.eof:
                data = self._z.unused_data
                continue
            data = self._z.unconsumed_tail
            if not data and len(out) < INFLATE_PIECE:
                return

    def close(self) -> Iterator[bytes]:
        if not self._decided and self._head:
            self._decided = True
            yield self._head
            return
        if self._z is not None and not self._z.eof:
            raise InvalidInput("truncated gzip file", [Violation("file", "gzip", "the file ends mid-stream")])


def decode(data: bytes) -> tuple[str, bool]:
    """Text and whether it held invalid UTF-8 (kept as surrogates, so the row can be named)."""
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return data.decode("utf-8", "surrogateescape"), True


def _bad_utf8(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def clean_text(value: str) -> str:
    """Invalid bytes (kept as surrogates) replaced, so the text can travel as UTF-8."""
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


@dataclass(frozen=True)
class Refused:
    """A CSV row over the row limit, measured without being parsed or kept; it gets its row
    number when its turn comes (``CsvParser.refused_row``), after the blocks before it."""

    size: int
    widest: tuple[int, int]
    """(bytes, index) of its widest field."""


Split = bytes | Refused
"""What ``CsvParser.split`` answers, in file order: a block of complete rows, or a refused row."""


class CsvParser:
    """CSV with a header row; every value is text, converted later by the schema's types."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.header: list[str] | None = None
        self.limits = limits or Limits()
        self._pending = b""
        self._row = 0
        self._first = True
        self._skipping: CsvRowScan | None = None
        # A row of fewer characters than this cannot hold a field over the limit (a character
        # is at most 4 bytes): the per-row check is one comparison.
        self._field_floor = self.limits.field_bytes // 4

    @classmethod
    def after_header(cls, header: list[str], first_row: int, limits: Limits | None = None) -> CsvParser:
        """A parser for blocks past the header, whose first row is ``first_row``."""
        parser = cls(limits)
        parser.header = header
        parser._row = first_row - 1
        parser._first = False
        return parser

    def feed(self, data: bytes) -> list[Parsed]:
        out: list[Parsed] = []
        for item in self.split(data):
            if isinstance(item, Refused):
                out.append(self.refused_row(item))
            else:
                out += self.parse(item)
        return out

    def split(self, data: bytes) -> list[Split]:
        """The complete rows received so far, as blocks, and the rows refused as too large, in
        file order. Blocks only ever hold rows within the row limit."""
        out: list[Split] = []
        if self._skipping is not None:
            end = self._skipping.feed(data)
            if end < 0:
                return out
            out.append(_refused(self._skipping))
            self._skipping = None
            data = data[end:]
        self._pending += data
        if len(self._pending) > self.limits.row_bytes:
            self._split_long(out)
            return out
        cut = self._cut()
        if cut >= 0:
            complete, self._pending = self._pending[: cut + 1], self._pending[cut + 1 :]
            out.append(complete)
        return out

    def _split_long(self, out: list[Split]) -> None:
        """Pending bytes over the row limit: rows within it go on as blocks, longer ones are
        measured and refused, and a last row still growing past it is skipped as it arrives."""
        data, self._pending = self._pending, b""
        limit = self.limits.row_bytes
        start = block_start = 0
        for end in _row_ends(data):
            if end - start > limit:
                if start > block_start:
                    out.append(data[block_start:start])
                scan = CsvRowScan()
                scan.feed(data[start:end])
                out.append(_refused(scan))
                block_start = end
            start = end
        if start > block_start:
            out.append(data[block_start:start])
        rest = data[start:]
        if len(rest) > limit:
            self._skipping = CsvRowScan()
            self._skipping.feed(rest)  # no row ends in it: the row goes on
        else:
            self._pending = rest

    def refused_row(self, refused: Refused) -> Parsed:
        """The next row, refused unread. A header too large fails the file, as any bad header does."""
        width, index = refused.widest
        if self.header is None:
            problem = (
                field_violation(f"column {index + 1}", self.limits.field_bytes, "header")
                if width > self.limits.field_bytes
                else row_violation(self.limits.row_bytes, "header")
            )
            raise InvalidInput("malformed CSV header", [problem])
        self._row += 1
        record = f"row {self._row}"
        if width > self.limits.field_bytes:
            problem = field_violation(_column(self.header, index), self.limits.field_bytes, record)
        else:
            problem = row_violation(self.limits.row_bytes, record)
        return self._row, {}, [problem], refused.size

    def skip(self, rows: int) -> int:
        """Count ``rows`` read elsewhere; answers the number of the first of them."""
        first = self._row + 1
        self._row += rows
        return first

    def _cut(self) -> int:
        """Position of the last newline outside quotes in the pending bytes, or -1."""
        end = len(self._pending)
        for _ in range(64):
            pos = self._pending.rfind(b"\n", 0, end)
            if pos < 0:
                return -1
            if self._pending.count(b'"', 0, pos) % 2 == 0:
                return pos
            end = pos
        return self._cut_forward()

    def _cut_forward(self) -> int:
        """The slow way, when the tail is inside quotes: walk the lines from the start."""
        data = self._pending
        last, start, quotes = -1, 0, 0
        while (pos := data.find(b"\n", start)) >= 0:
            quotes += data.count(b'"', start, pos)
            if quotes % 2 == 0:
                last = pos
            start = pos + 1
        return last

    def close(self) -> Iterator[list[Parsed]]:
        if self._skipping is not None:
            scan, self._skipping = self._skipping, None
            if scan.in_quotes:
                message = "unbalanced quote: a quoted field runs on to the end of the file"
                problem = Violation("*", "csv", message, f"row {self._row + 1}")
                raise InvalidInput("malformed CSV", [problem])
            scan.finish()
            yield [self.refused_row(_refused(scan))]
        rest, self._pending = self._pending, b""
        if rest.strip():
            yield self.parse(rest)

    def parse(self, data: bytes) -> list[Parsed]:
        """The rows of a block of complete rows (the header first, if not read yet)."""
        if self._first:
            self._first = False
            data = data.removeprefix(b"\xef\xbb\xbf")
        text, dirty = decode(data)
        reader = csv.reader(io.StringIO(text, newline=""), strict=True)
        if self.header is None and not self._read_header(reader):
            return []
        assert self.header is not None
        return list(self._rows(reader, self.header, dirty))

    def _read_header(self, reader: Any) -> bool:
        try:
            header = next(reader, None)
        except csv.Error as exc:
            raise InvalidInput("malformed CSV header", [Violation("header", "csv", str(exc), "line 1")]) from exc
        if header is None:
            return False
        problems = [
            Violation(f"column {i + 1}", "required", "empty column name", "header")
            for i, h in enumerate(header)
            if not h.strip()
        ]
        seen: set[str] = set()
        for name in header:
            if name in seen:
                problems.append(Violation(clean_text(name), "unique", "column named twice", "header"))
            seen.add(name)
        if any(_bad_utf8(h) for h in header):
            problems.append(Violation("header", "encoding", "invalid UTF-8 in the header", "header"))
        if problems:
            raise InvalidInput("malformed CSV header", problems)
        self.header = [h.strip() for h in header]
        return True

    def _rows(self, reader: Any, header: list[str], dirty: bool) -> Iterator[Parsed]:
        width = len(header)
        while True:
            try:
                values = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                self._row += 1
                yield self._row, {}, [Violation("*", "csv", f"malformed CSV: {exc}", f"row {self._row}")], 0
                continue
            if not values:
                continue
            self._row += 1
            size = sum(map(len, values)) + len(values)
            if size > self._field_floor:
                over = self._oversized(header, values)
                if over:
                    yield self._row, over[1], over[0], size
                    continue
            if len(values) != width:
                problem = Violation("*", "ragged_row", f"{len(values)} values for {width} columns", f"row {self._row}")
                yield self._row, _ragged(header, values), [problem], size
                continue
            row = dict(zip(header, values, strict=True))
            if dirty:
                bad = [k for k, v in row.items() if _bad_utf8(v)]
                if bad:
                    row = {k: clean_text(v) for k, v in row.items()}
                    yield (
                        self._row,
                        row,
                        [Violation(k, "encoding", "invalid UTF-8", f"row {self._row}") for k in bad],
                        size,
                    )
                    continue
            yield self._row, row, [], size

    def _oversized(self, header: list[str], values: list[str]) -> tuple[list[Violation], dict[str, Any]] | None:
        """Fields over the field limit, and the row's other values: an over-long value is never
        kept (it would not fit the dead-letter message that keeps rejected rows)."""
        limit = self.limits.field_bytes
        record = f"row {self._row}"
        problems: list[Violation] = []
        kept: dict[str, Any] = {}
        for i, value in enumerate(values):
            name = _column(header, i)
            if text_bytes(value) > limit:
                problems.append(field_violation(name, limit, record))
            else:
                kept[name] = clean_text(value)
        return (problems, kept) if problems else None


def _refused(scan: CsvRowScan) -> Refused:
    return Refused(scan.size, scan.widest)


def _row_ends(data: bytes) -> Iterator[int]:
    """Positions just past each newline outside quotes in ``data``, which starts a row (the
    same rule as ``CsvParser._cut`` and ``CsvRowScan``)."""
    quotes, pos = 0, 0
    while (nl := data.find(b"\n", pos)) >= 0:
        quotes += data.count(b'"', pos, nl)
        pos = nl + 1
        if quotes % 2 == 0:
            yield pos


def _column(header: list[str], index: int) -> str:
    """The name a column is reported under (values beyond the header are ``_extra_N``)."""
    return header[index] if index < len(header) else f"_extra_{index + 1 - len(header)}"


def _ragged(header: list[str], values: list[str]) -> dict[str, Any]:
    named = {header[i] if i < len(header) else f"_extra_{i + 1 - len(header)}": v for i, v in enumerate(values)}
    return {k: clean_text(v) for k, v in named.items()}


class JsonLinesParser:
    """One JSON object per line; blank lines are skipped."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self._pending = b""
        self._row = 0
        self._skipping = False
        self._first = True

    def feed(self, data: bytes) -> list[Parsed]:
        if self._first and data:
            self._first = False
            data = data.removeprefix(b"\xef\xbb\xbf")
        self._pending += data
        out: list[Parsed] = []
        cut = self._pending.rfind(b"\n")
        if cut < 0:
            if len(self._pending) > self.limits.row_bytes:
                self._oversized(out)
            return out
        complete, self._pending = self._pending[: cut + 1], self._pending[cut + 1 :]
        lines = complete.split(b"\n")
        if self._skipping:
            self._skipping = False
            lines = lines[1:]
        for line in lines:
            self._line(line, out)
        return out

    def _oversized(self, out: list[Parsed]) -> None:
        if not self._skipping:
            self._row += 1
            problem = row_violation(self.limits.row_bytes, f"row {self._row}")
            out.append((self._row, {}, [problem], len(self._pending)))
        self._skipping = True
        self._pending = b""

    def close(self) -> Iterator[list[Parsed]]:
        out: list[Parsed] = []
        if not self._skipping:
            self._line(self._pending, out)
        self._pending = b""
        if out:
            yield out

    def _line(self, line: bytes, out: list[Parsed]) -> None:
        if not line.strip():
            return
        self._row += 1
        record = f"row {self._row}"
        limits = self.limits
        if len(line) > limits.row_bytes:  # a long line that arrived whole, with its newline
            out.append((self._row, {}, [row_violation(limits.row_bytes, record)], len(line)))
            return
        try:
            text = json_text(line)
        except UnicodeDecodeError:
            out.append((self._row, {}, [Violation("*", "encoding", "invalid UTF-8", record)], len(line)))
            return
        if too_deep(text, limits.max_depth):
            out.append((self._row, {}, [depth_violation(limits.max_depth, record)], len(line)))
            return
        try:
            value = json.loads(text)
        except ValueError as exc:
            msg = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
            out.append((self._row, {}, [Violation("*", "json", f"not valid JSON: {msg}", record)], len(line)))
            return
        if not isinstance(value, dict):
            problem = Violation("*", "json", f"each line holds a JSON object, not {type(value).__name__}", record)
            out.append((self._row, {}, [problem], len(line)))
            return
        if len(line) > limits.field_bytes:  # only a line this long can hold a field this long
            over = set(oversized_fields(value, limits.field_bytes))
            if over:
                problems = [field_violation(name, limits.field_bytes, record) for name in sorted(over)]
                kept = {k: v for k, v in value.items() if k not in over}
                out.append((self._row, kept, problems, len(line)))
                return
        out.append((self._row, value, [], len(line)))


class ParquetParser:
    """Spooled to disk while it arrives (the footer comes last), then read in record batches."""

    BATCH_ROWS = 4096

    def __init__(self, spool_dir: Path, columns_check: ColumnsCheck, limits: Limits | None = None) -> None:
        spool_dir.mkdir(parents=True, exist_ok=True)
        self._file = tempfile.NamedTemporaryFile(dir=spool_dir, prefix="upload-", suffix=".parquet")  # noqa: SIM115
        self._check = columns_check
        self.limits = limits or Limits()

    def feed(self, data: bytes) -> list[Parsed]:
        self._file.write(data)
        return []

    def close(self) -> Iterator[list[Parsed]]:
        import pyarrow as pa  # type: ignore[import-untyped]
        import pyarrow.parquet as pq  # type: ignore[import-untyped]

        try:
            self._file.flush()
            try:
                reader = pq.ParquetFile(self._file.name)
            except (pa.ArrowException, OSError) as exc:
                raise InvalidInput("not a Parquet file", [Violation("file", "parquet", str(exc))]) from exc
            columns = self._check(reader.schema_arrow)
            _check_depth(reader.schema_arrow, columns, self.limits.max_depth)
            row = 0
            for batch in reader.iter_batches(batch_size=self.BATCH_ROWS, columns=columns):
                out: list[Parsed] = []
                for values in batch.to_pylist():
                    row += 1
                    size = _estimate(values)
                    out.append(_sized(row, values, size, self.limits))
                yield out
        finally:
            self._file.close()


ColumnsCheck = Callable[[Any], list[str]]


def _estimate(values: dict[str, Any]) -> int:
    """Size of a Parquet row as text would hold it: strings by length, nested values walked."""
    total = 2 * len(values)
    for v in values.values():
        if isinstance(v, str):
            total += len(v)
        elif isinstance(v, list | dict | bytes):
            total += value_bytes(v)
        else:
            total += 8
    return total


def _sized(row: int, values: dict[str, Any], size: int, limits: Limits) -> Parsed:
    """A Parquet row, or its refusal when a field or the whole row is over its limit."""
    if size <= limits.field_bytes // 4:
        return row, values, [], size
    record = f"row {row}"
    over = set(oversized_fields(values, limits.field_bytes))
    if over:
        problems = [field_violation(name, limits.field_bytes, record) for name in sorted(over)]
        return row, {k: v for k, v in values.items() if k not in over}, problems, size
    if value_bytes(values) > limits.row_bytes:
        return row, {}, [row_violation(limits.row_bytes, record)], size
    return row, values, [], size


def _check_depth(arrow_schema: Any, columns: list[str], max_depth: int) -> None:
    """Nesting is a property of a Parquet column's type, so a column too deep refuses the file
    (as any column that does not fit), before a row is turned into Python values."""
    problems = [
        depth_violation(max_depth, "parquet", name)
        for name in columns
        if 1 + _type_depth(arrow_schema.field(name).type) > max_depth
    ]
    if problems:
        raise InvalidInput("the Parquet file's columns are nested too deep", problems)


def _type_depth(arrow_type: Any) -> int:
    """Nesting of an Arrow type (a scalar is 0, a list of int 1), walked with a stack."""
    deepest = 0
    stack = [(arrow_type, 0)]
    while stack:
        t, depth = stack.pop()
        deepest = max(deepest, depth)
        if t.num_fields == 0:
            continue
        stack.extend((t.field(i).type, depth + 1) for i in range(t.num_fields))
    return deepest


ARROW_FITS: dict[int, tuple[str, ...]] = {
    pb.FIELD_TYPE_STRING: ("string", "large_string", "dictionary"),
    pb.FIELD_TYPE_INTEGER: ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"),
    pb.FIELD_TYPE_NUMBER: ("int", "uint", "float", "double", "halffloat", "decimal"),
    pb.FIELD_TYPE_BOOLEAN: ("bool",),
    pb.FIELD_TYPE_DATE: ("date32", "date64", "string", "large_string"),
    pb.FIELD_TYPE_TIMESTAMP: ("timestamp", "string", "large_string"),
    pb.FIELD_TYPE_OBJECT: ("struct", "map", "string", "large_string"),
    pb.FIELD_TYPE_ARRAY: ("list", "large_list", "fixed_size_list"),
}


def parquet_columns(schema: pb.Schema, drop_unknown: bool) -> ColumnsCheck:
    """Checks a Parquet file's columns against the schema; answers the columns to read."""
    fields = {f.name: f for f in schema.fields}

    def check(arrow_schema: Any) -> list[str]:
        problems: list[Violation] = []
        names = list(arrow_schema.names)
        for name in names:
            if name not in fields and not drop_unknown:
                problems.append(Violation(name, "unknown_field", "column not in the schema", "parquet"))
        for f in schema.fields:
            if f.name not in names:
                if f.required:
                    problems.append(Violation(f.name, "required", "required column missing", "parquet"))
                continue
            arrow_type = str(arrow_schema.field(f.name).type)
            if not arrow_type.startswith(ARROW_FITS.get(f.type, ())):
                want = pb.FieldType.Name(f.type).removeprefix("FIELD_TYPE_").lower()
                problems.append(Violation(f.name, "type", f"column of type {arrow_type} cannot hold {want}", "parquet"))
        if problems:
            raise InvalidInput("the Parquet file's columns do not fit the schema", problems)
        return [n for n in names if n in fields]

    return check


def parser_for(fmt: int, schema: pb.Schema, drop_unknown: bool, spool_dir: Path, limits: Limits) -> RowParser:
    if fmt in (pb.FILE_FORMAT_CSV, pb.FILE_FORMAT_UNSPECIFIED):
        return CsvParser(limits)
    if fmt == pb.FILE_FORMAT_JSONL:
        return JsonLinesParser(limits)
    if fmt == pb.FILE_FORMAT_PARQUET:
        return ParquetParser(spool_dir, parquet_columns(schema, drop_unknown), limits)
    raise InvalidInput("unsupported format", [Violation("format", "supported", "CSV, JSON Lines and Parquet")])
