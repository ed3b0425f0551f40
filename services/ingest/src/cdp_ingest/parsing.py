"""Incremental file parsers: bytes go in as chunks arrive, rows come out; memory stays bounded.

* gzip is detected by its magic bytes and inflated in bounded pieces (multi-member too);
* CSV is cut at the last newline outside quotes (an even count of ``"`` before it), so a
  quoted field may span lines and chunks; a quoted field running past ``MAX_PENDING_BYTES``
  is an unbalanced quote and fails the file;
* JSON Lines are cut at newlines; a line longer than ``MAX_PENDING_BYTES`` is rejected as
  oversized and skipped;
* Parquet needs its footer, so it is spooled to a temporary file and read in record batches.

A row that cannot be read comes with its problems (field ``*`` or the column, and a rule).
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from cdp.ingest.v1 import ingest_pb2 as pb
from cdp_kit.errors import InvalidInput, Violation

Parsed = tuple[int, dict[str, Any], list[Violation], int]
"""(1-based row number, values by column, problems reading it, size in bytes)."""

MAX_PENDING_BYTES = 4 * 1024 * 1024
INFLATE_PIECE = 1024 * 1024
GZIP_MAGIC = b"\x1f\x8b"
csv.field_size_limit(MAX_PENDING_BYTES)


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


class CsvParser:
    """CSV with a header row; every value is text, converted later by the schema's types."""

    def __init__(self) -> None:
        self.header: list[str] | None = None
        self._pending = b""
        self._row = 0
        self._first = True

    @classmethod
    def after_header(cls, header: list[str], first_row: int) -> CsvParser:
        """A parser for blocks past the header, whose first row is ``first_row``."""
        parser = cls()
        parser.header = header
        parser._row = first_row - 1
        parser._first = False
        return parser

    def feed(self, data: bytes) -> list[Parsed]:
        return [row for block in self.split(data) for row in self.parse(block)]

    def split(self, data: bytes) -> list[bytes]:
        """The complete rows received so far, as one block (none if no row is complete yet)."""
        self._pending += data
        cut = self._cut()
        if cut < 0:
            if len(self._pending) > MAX_PENDING_BYTES:
                raise InvalidInput(
                    "malformed CSV",
                    [
                        Violation(
                            "*", "csv", "unbalanced quote: a quoted field runs on past 4 MiB", f"row {self._row + 1}"
                        )
                    ],
                )
            return []
        complete, self._pending = self._pending[: cut + 1], self._pending[cut + 1 :]
        return [complete]

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


def _ragged(header: list[str], values: list[str]) -> dict[str, Any]:
    named = {header[i] if i < len(header) else f"_extra_{i + 1 - len(header)}": v for i, v in enumerate(values)}
    return {k: clean_text(v) for k, v in named.items()}


class JsonLinesParser:
    """One JSON object per line; blank lines are skipped."""

    def __init__(self) -> None:
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
            if len(self._pending) > MAX_PENDING_BYTES:
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
            problem = Violation("*", "max_size", f"a line longer than {MAX_PENDING_BYTES} bytes", f"row {self._row}")
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
        try:
            value = json.loads(line)
        except UnicodeDecodeError:
            out.append((self._row, {}, [Violation("*", "encoding", "invalid UTF-8", record)], len(line)))
            return
        except ValueError as exc:
            msg = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
            out.append((self._row, {}, [Violation("*", "json", f"not valid JSON: {msg}", record)], len(line)))
            return
        if not isinstance(value, dict):
            problem = Violation("*", "json", f"each line holds a JSON object, not {type(value).__name__}", record)
            out.append((self._row, {}, [problem], len(line)))
            return
        out.append((self._row, value, [], len(line)))


class ParquetParser:
    """Spooled to disk while it arrives (the footer comes last), then read in record batches."""

    BATCH_ROWS = 4096

    def __init__(self, spool_dir: Path, columns_check: ColumnsCheck) -> None:
        spool_dir.mkdir(parents=True, exist_ok=True)
        self._file = tempfile.NamedTemporaryFile(dir=spool_dir, prefix="upload-", suffix=".parquet")  # noqa: SIM115
        self._check = columns_check

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
            row = 0
            for batch in reader.iter_batches(batch_size=self.BATCH_ROWS, columns=columns):
                out: list[Parsed] = []
                for values in batch.to_pylist():
                    row += 1
                    out.append((row, values, [], _estimate(values)))
                yield out
        finally:
            self._file.close()


ColumnsCheck = Callable[[Any], list[str]]


def _estimate(values: dict[str, Any]) -> int:
    return sum(len(v) if isinstance(v, str) else 8 for v in values.values()) + 2 * len(values)


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
                if f.required or f.primary_identity:
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


def parser_for(fmt: int, schema: pb.Schema, drop_unknown: bool, spool_dir: Path) -> RowParser:
    if fmt in (pb.FILE_FORMAT_CSV, pb.FILE_FORMAT_UNSPECIFIED):
        return CsvParser()
    if fmt == pb.FILE_FORMAT_JSONL:
        return JsonLinesParser()
    if fmt == pb.FILE_FORMAT_PARQUET:
        return ParquetParser(spool_dir, parquet_columns(schema, drop_unknown))
    raise InvalidInput("unsupported format", [Violation("format", "supported", "CSV, JSON Lines and Parquet")])
