"""Rows read from a file, judged: converted, validated and encoded, or rejected with their reasons.

Pure (no I/O, no shared state), so it runs the same in the service and in a reader process
(``cdp_ingest.readers``); ``BatchRun`` takes the results in row order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cdp_ingest.domain import RowResult, Validator
from cdp_ingest.parsing import Parsed, clean_text
from cdp_ingest.records import RecordBuilder
from cdp_kit.errors import Violation
from cdp_kit.eventlog import MAX_MESSAGE_BYTES

MAX_RECORD_BYTES = MAX_MESSAGE_BYTES // 2
"""The largest record a row may encode to. Every record must fit one message on its own, and so
must what it becomes downstream: identity's fragment of it carries the same attributes plus its
identities and profile id. Half a message leaves that room whatever the row's shape (a JSON row of
many small numbers encodes to more bytes than it was read from)."""
RECORD_OVERHEAD = 48
"""Bytes a staged record adds to its chunk beyond its envelope (framing, the kit's stamp)."""

StagedRecord = tuple[int, str, bytes]
"""(row, envelope id for events, whose ids are de-duplicated, or "" for profile records; envelope bytes)."""
Rejected = tuple[int, list[Violation], dict[str, Any], dict[str, Any], int]
"""(row, violations, value of each violated field that has one (the service masks it: a reader
process holds no PII hash key), printable raw values, size read)."""


@dataclass
class Judged:
    rows_read: int = 0
    accepted: list[tuple[StagedRecord, int]] = field(default_factory=list)
    """Each accepted record with the size it adds to a staged chunk."""
    rejected: list[Rejected] = field(default_factory=list)
    keys: dict[str, bytes] = field(default_factory=dict)
    """Keys a reader process made to seal these records (``cdp_kit.vault.LocalKeys``), by ref."""


def judge(rows: list[Parsed], validator: Validator, builder: RecordBuilder) -> Judged:
    out = Judged(rows_read=len(rows))
    accept = out.accepted.append
    validate = validator.validate
    key_of = builder.key_of
    prefix = f"{builder.batch_id}:"
    for row_no, values, problems, size in rows:
        result = None if problems else validate(values, size, f"row {row_no}")
        if result is not None and not result.violations:
            data = _encoded(builder, row_no, prefix, result)
            if len(data) > MAX_RECORD_BYTES:
                message = f"row encodes to {len(data)} bytes, more than a record may hold ({MAX_RECORD_BYTES})"
                out.rejected.append((row_no, [Violation("*", "row_size", message)], {}, {}, size))
                continue
            accept(((row_no, key_of(result.event_id) if builder.is_event else "", data), len(data) + RECORD_OVERHEAD))
            continue
        violations = problems if result is None else result.violations
        samples = {v.field: values[v.field] for v in violations if values.get(v.field) is not None}
        out.rejected.append((row_no, violations, samples, printable(values), size))
    if builder.keys is not None:
        out.keys = builder.keys.take_made()
    return out


def _encoded(builder: RecordBuilder, row_no: int, prefix: str, result: RowResult) -> bytes:
    if builder.is_event:
        return builder.encode(
            record_id=result.event_id,
            row=row_no,
            values=result.values,
            identities=result.identities,
            occurred_at=result.occurred_at,
            event_type=result.event_type,
        )
    return builder.encode(
        record_id=prefix + str(row_no),
        row=row_no,
        values=result.values,
        identities=result.identities,
        occurred_at=result.occurred_at,
    )


def printable(values: dict[str, Any]) -> dict[str, Any]:
    """Raw values that can travel as JSON text (invalid UTF-8 replaced)."""
    return {clean_text(str(k)): clean_text(v) if isinstance(v, str) else _plain(v) for k, v in values.items()}


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str | list | dict):
        return value
    return str(value)
