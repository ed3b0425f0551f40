"""Limits on hostile input, checked on the raw bytes BEFORE any parser sees them.

Python's ``json`` decoder recurses once per level of nesting and raises ``RecursionError``
past ~1,000 levels; the ``csv`` module buffers a whole field; protobuf refuses to decode a
``Struct`` nested deeper than its own limit. So a record is measured first, with scans that
never recurse, and one that is too deep or too large becomes a rejected row (a dead letter on
``cdp.collect``) naming its record, field and rule: ``depth``, ``field_size``, ``row_size`` or
``event_size``. The standard library parsers are only ever handed what has passed.

Depth counts the record itself as level 1 (``{"a": [1]}`` is 2 deep), whatever the format:
a CSV cell holding JSON starts at level 2, as the same value would in a JSON Lines row.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from cdp_kit.errors import Violation

MIB = 1024 * 1024
# What a row of ingest can hold and still travel: protobuf decodes a Struct at most ~32
# objects deep (each level is three messages under upb's limit of 100), so deeper records
# could be appended but never read back by identity.
MAX_DEPTH_CEILING = 32
DEFAULT_MAX_DEPTH = 32
# One field of 1 MiB is far beyond any real attribute (an address, a JSON blob of
# preferences) yet small next to what a reader holds in memory; a row of 4 MiB leaves room for
# several such fields and equals the largest quoted CSV field the parser ever buffered; an
# event of 1 MiB is NATS' default max_payload, so no real publisher sends a larger one.
DEFAULT_FIELD_BYTES = MIB
DEFAULT_ROW_BYTES = 4 * MIB
DEFAULT_EVENT_BYTES = MIB


@dataclass(frozen=True)
class Limits:
    """The limits of one service (small, hashable and picklable: reader processes get them too)."""

    max_depth: int = DEFAULT_MAX_DEPTH
    field_bytes: int = DEFAULT_FIELD_BYTES
    row_bytes: int = DEFAULT_ROW_BYTES
    event_bytes: int = DEFAULT_EVENT_BYTES


class LimitExceeded(ValueError):
    """A value refused by a limit while converting it (a CSV cell holding JSON): the validator
    reports it under ``rule`` rather than as a type error."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(message)
        self.rule = rule


# ----------------------------------------------------------------------------- violations


def depth_violation(limit: int, record: str, field: str = "*") -> Violation:
    return Violation(field, "depth", f"nesting deeper than {limit}", record)


def field_violation(field: str, limit: int, record: str) -> Violation:
    return Violation(field, "field_size", f"field larger than {limit} bytes", record)


def row_violation(limit: int, record: str) -> Violation:
    return Violation("*", "row_size", f"row larger than {limit} bytes", record)


def event_violation(limit: int, record: str) -> Violation:
    return Violation("*", "event_size", f"event larger than {limit} bytes", record)


# ----------------------------------------------------------------------------- JSON depth

# What changes the depth or hides it: brackets, and the quotes and backslashes of strings.
_JSON_TOKENS = re.compile(r'[\[\]{}"\\]')


def too_deep(text: str, limit: int) -> bool:
    """Whether JSON ``text`` nests deeper than ``limit`` (brackets inside strings, escaped
    quotes included, do not count). Never recurses; a malformed text is left to the parser,
    which fails on it before going any deeper than this scan saw."""
    if text.count("[") + text.count("{") <= limit:
        return False  # depth never exceeds the number of openers: most records cost two C scans
    depth = 0
    in_string = False
    escaped_at = -1
    for match in _JSON_TOKENS.finditer(text):
        pos = match.start()
        if pos == escaped_at:
            continue
        char = text[pos]
        if in_string:
            if char == "\\":
                escaped_at = pos + 1
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > limit:
                return True
        elif char in "]}":
            depth -= 1
    return False


def json_text(data: bytes) -> str:
    """The text of a JSON document as ``json.loads`` would decode it (it detects UTF-16 and
    UTF-32 too): the depth scan must read the very characters the parser will.
    Raises ``UnicodeDecodeError`` as the parser would."""
    return data.decode(json.detect_encoding(data), "surrogatepass")


# ----------------------------------------------------------------------------- sizes


def text_bytes(value: str) -> int:
    """Bytes of text as read (invalid input was kept as surrogates by ``surrogateescape``)."""
    return len(value.encode("utf-8", "surrogateescape"))


def value_bytes(value: Any) -> int:
    """Bytes a parsed value takes as JSON, near enough to compare with a limit. Walks
    containers with a stack: a value is never measured by recursing into it."""
    total = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            total += text_bytes(item) + 2
        elif isinstance(item, bytes):
            total += len(item)
        elif isinstance(item, Mapping):
            total += 2
            for key, sub in item.items():
                total += (text_bytes(key) if isinstance(key, str) else 8) + 3
                stack.append(sub)
        elif isinstance(item, list | tuple):
            total += 2 + len(item)
            stack.extend(item)
        else:
            total += 8
    return total


def oversized_fields(values: Mapping[str, Any], limit: int) -> Iterator[str]:
    """Names of the top-level fields of a parsed record larger than ``limit`` bytes."""
    for name, value in values.items():
        if value_bytes(value) > limit:
            yield str(name)


# ----------------------------------------------------------------------------- CSV rows

_CSV_TOKENS = re.compile(rb'[",\n]')


class CsvRowScan:
    """Walks the bytes of ONE CSV row as they arrive, quote-aware, measuring each field, until
    the newline that ends the row: what the parser does instead of buffering a row too large
    to hand to the ``csv`` module. Only positions and lengths are kept, never the bytes."""

    def __init__(self) -> None:
        self.size = 0
        self.field = 0
        self._field_bytes = 0
        self.in_quotes = False
        self.widest: tuple[int, int] = (0, 0)
        """(bytes, index) of the widest field seen."""

    def feed(self, data: bytes) -> int:
        """Position in ``data`` just past the newline that ends the row, or -1 (it goes on)."""
        start = 0
        for match in _CSV_TOKENS.finditer(data):
            pos = match.start()
            token = data[pos]
            if token == 0x22:  # '"': a doubled quote toggles twice, as it should
                self.in_quotes = not self.in_quotes
            elif not self.in_quotes:
                self._close_field(pos - start)
                start = pos + 1
                if token == 0x0A:  # "\n": the row ends
                    self.size += pos + 1
                    return pos + 1
                self.field += 1
        self._field_bytes += len(data) - start
        self.size += len(data)
        return -1

    def _close_field(self, tail: int) -> None:
        width = self._field_bytes + tail
        if width > self.widest[0]:
            self.widest = (width, self.field)
        self._field_bytes = 0

    def finish(self) -> None:
        """The row ended with the file (no newline)."""
        self._close_field(0)

    def violation(self, header: list[str] | None, limits: Limits, record: str) -> Violation:
        """The rule the row broke: its widest field, when that alone is too large, else the row."""
        width, index = self.widest
        if width > limits.field_bytes:
            name = header[index] if header is not None and index < len(header) else f"column {index + 1}"
            return field_violation(name, limits.field_bytes, record)
        return row_violation(limits.row_bytes, record)
