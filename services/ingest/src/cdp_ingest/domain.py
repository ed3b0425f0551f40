"""Pure rules of ingestion: schema checks and row validation. No I/O, no clock."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

from cdp.ingest.v1 import ingest_pb2 as pb
from cdp_kit.errors import Violation

FT = pb.FieldType
NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
TRUE = {"true", "t", "yes", "y", "1"}
FALSE = {"false", "f", "no", "n", "0"}


def schema_violations(schema: pb.Schema) -> list[Violation]:
    """Everything wrong with a schema definition, each naming the field and the rule."""
    out: list[Violation] = []
    if not NAME_RE.match(schema.name):
        out.append(Violation("name", "pattern", "schema names are lower_snake_case, 1-63 characters"))
    if schema.schema_class == pb.SCHEMA_CLASS_UNSPECIFIED:
        out.append(Violation("schema_class", "required", "a schema is of class profile or event"))
    if not schema.fields:
        out.append(Violation("fields", "required", "a schema has at least one field"))
    names = [f.name for f in schema.fields]
    out += [Violation(n, "unique", "field defined twice") for n in sorted({n for n in names if names.count(n) > 1})]
    for f in schema.fields:
        out += _field_violations(f, f.name)
    identities = [f for f in schema.fields if f.identity_namespace]
    primaries = [f for f in identities if f.primary_identity]
    if identities and len(primaries) != 1:
        out.append(Violation("fields", "primary_identity", f"exactly one identity is primary, found {len(primaries)}"))
    if schema.schema_class == pb.SCHEMA_CLASS_EVENT:
        for attr, want in (("event_id_field", "event id"), ("timestamp_field", "timestamp")):
            ref = getattr(schema, attr)
            if not ref or ref not in names:
                out.append(Violation(attr, "required", f"event schemas name their {want} field"))
        ts = next((f for f in schema.fields if f.name == schema.timestamp_field), None)
        if ts is not None and ts.type != FT.FIELD_TYPE_TIMESTAMP:
            out.append(Violation("timestamp_field", "type", "the timestamp field must be of type timestamp"))
    return out


def _field_violations(f: pb.Field, path: str) -> list[Violation]:
    out: list[Violation] = []
    if not NAME_RE.match(f.name):
        out.append(Violation(path, "pattern", "field names are lower_snake_case"))
    if f.type == FT.FIELD_TYPE_UNSPECIFIED:
        out.append(Violation(path, "type", "field type is required"))
    if f.pattern:
        try:
            re.compile(f.pattern)
        except re.error as exc:
            out.append(Violation(path, "pattern", f"invalid regular expression: {exc}"))
    if f.identity_namespace and f.type != FT.FIELD_TYPE_STRING:
        out.append(Violation(path, "identity", "identity fields are strings"))
    for sub in f.fields:
        out += _field_violations(sub, f"{path}.{sub.name}")
    return out


def compatibility_violations(old: pb.Schema, new: pb.Schema) -> list[Violation]:
    """A new version may only add optional fields."""
    out: list[Violation] = []
    if old.schema_class != new.schema_class:
        out.append(Violation("schema_class", "compatible", "the class of a schema cannot change"))
    new_fields = {f.name: f for f in new.fields}
    for f in old.fields:
        if f.name not in new_fields:
            out.append(Violation(f.name, "compatible", "a field cannot be removed"))
        elif new_fields[f.name].SerializeToString(deterministic=True) != f.SerializeToString(deterministic=True):
            out.append(Violation(f.name, "compatible", "an existing field cannot change"))
    old_names = {f.name for f in old.fields}
    out += [
        Violation(f.name, "compatible", "an added field must be optional")
        for f in new.fields
        if f.name not in old_names and f.required
    ]
    for attr in ("event_id_field", "timestamp_field", "event_type_field"):
        if getattr(old, attr) != getattr(new, attr):
            out.append(Violation(attr, "compatible", f"{attr} cannot change"))
    return out


@dataclass
class RowResult:
    values: dict[str, Any] = field(default_factory=dict)
    identities: list[tuple[str, str]] = field(default_factory=list)
    violations: list[Violation] = field(default_factory=list)
    event_id: str = ""
    occurred_at: datetime | None = None
    event_type: str = ""

    @property
    def ok(self) -> bool:
        return not self.violations


def validate_row(
    schema: pb.Schema,
    row: Mapping[str, Any],
    *,
    record: str,
    textual: bool,
    drop_unknown: bool,
    max_bytes: int,
) -> RowResult:
    """Convert and check one row. ``textual`` rows (CSV) hold strings to convert; others hold JSON values."""
    result = RowResult()
    known = {f.name: f for f in schema.fields}
    for name in row:
        if name not in known and not drop_unknown:
            result.violations.append(Violation(str(name), "unknown_field", "not in the schema", record))
    for f in schema.fields:
        raw = row.get(f.name)
        if raw is None or (textual and raw == ""):
            if f.required or (f.identity_namespace and f.primary_identity):
                result.violations.append(Violation(f.name, "required", "missing", record))
            continue
        try:
            value = convert(f, raw, textual=textual)
        except ValueError as exc:
            result.violations.append(Violation(f.name, "type", str(exc), record))
            continue
        rule = check_constraints(f, value)
        if rule:
            result.violations.append(Violation(f.name, rule[0], rule[1], record))
            continue
        result.values[f.name] = value
        if f.identity_namespace:
            result.identities.append((f.identity_namespace, str(value)))
    size = len(json.dumps(result.values, default=str))
    if size > max_bytes:
        result.violations.append(Violation("*", "max_size", f"record is {size} bytes, limit {max_bytes}", record))
    if schema.schema_class == pb.SCHEMA_CLASS_EVENT and result.ok:
        result.event_id = str(result.values.get(schema.event_id_field, ""))
        result.occurred_at = parse_timestamp(str(result.values[schema.timestamp_field]))
        if schema.event_type_field:
            result.event_type = str(result.values.get(schema.event_type_field, ""))
    return result


def convert(f: pb.Field, raw: Any, *, textual: bool) -> Any:
    t = f.type
    if t == FT.FIELD_TYPE_STRING:
        if not isinstance(raw, str):
            raise ValueError("expected a string")
        return raw.strip() if f.identity_namespace else raw
    if t == FT.FIELD_TYPE_INTEGER:
        return _integer(raw, textual)
    if t == FT.FIELD_TYPE_NUMBER:
        return _number(raw, textual)
    if t == FT.FIELD_TYPE_BOOLEAN:
        return _boolean(raw, textual)
    if t == FT.FIELD_TYPE_DATE:
        try:
            return date.fromisoformat(str(raw).strip()).isoformat()
        except ValueError:
            raise ValueError("expected a date (YYYY-MM-DD)") from None
    if t == FT.FIELD_TYPE_TIMESTAMP:
        return parse_timestamp(str(raw)).isoformat().replace("+00:00", "Z")
    if t in (FT.FIELD_TYPE_OBJECT, FT.FIELD_TYPE_ARRAY):
        value = json.loads(raw) if textual and isinstance(raw, str) else raw
        want = dict if t == FT.FIELD_TYPE_OBJECT else list
        if not isinstance(value, want):
            raise ValueError(f"expected a JSON {'object' if want is dict else 'array'}")
        return value
    raise ValueError("unsupported field type")


def _integer(raw: Any, textual: bool) -> int:
    if isinstance(raw, bool):
        raise ValueError("expected an integer")
    if isinstance(raw, int):
        return raw
    if isinstance(raw, float) and raw.is_integer():
        return int(raw)
    if textual and isinstance(raw, str) and re.fullmatch(r"\s*[-+]?\d+\s*", raw):
        return int(raw)
    raise ValueError("expected an integer")


def _number(raw: Any, textual: bool) -> float:
    if isinstance(raw, bool):
        raise ValueError("expected a number")
    if isinstance(raw, int | float):
        return float(raw)
    if textual and isinstance(raw, str):
        try:
            value = float(raw)
        except ValueError:
            raise ValueError("expected a number") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError("expected a finite number")
        return value
    raise ValueError("expected a number")


def _boolean(raw: Any, textual: bool) -> bool:
    if isinstance(raw, bool):
        return raw
    if textual and isinstance(raw, str):
        low = raw.strip().lower()
        if low in TRUE:
            return True
        if low in FALSE:
            return False
    raise ValueError("expected a boolean")


def parse_timestamp(raw: str) -> datetime:
    text = raw.strip().replace("Z", "+00:00")
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError("expected an ISO 8601 timestamp") from None
    if moment.tzinfo is None:
        raise ValueError("timestamps need a time zone (e.g. Z or +02:00)")
    return moment.astimezone(UTC)


def check_constraints(f: pb.Field, value: Any) -> tuple[str, str] | None:
    if f.enum_values and str(value) not in f.enum_values:
        return "enum", f"not one of {len(f.enum_values)} allowed values"
    if f.pattern and isinstance(value, str) and not re.fullmatch(f.pattern, value):
        return "pattern", "does not match the field's pattern"
    if f.max_length and isinstance(value, str) and len(value) > f.max_length:
        return "max_length", f"longer than {f.max_length} characters"
    if isinstance(value, int | float) and not isinstance(value, bool):
        if f.HasField("minimum") and value < f.minimum:
            return "minimum", f"below {f.minimum:g}"
        if f.HasField("maximum") and value > f.maximum:
            return "maximum", f"above {f.maximum:g}"
    return None


@dataclass
class RejectTally:
    """Rejected rows grouped by field and rule, with counts and the first row numbers."""

    groups: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    counts: dict[tuple[str, str], int] = field(default_factory=dict)

    def add(self, row: int, violations: list[Violation]) -> None:
        for v in violations:
            key = (v.field, v.rule)
            self.counts[key] = self.counts.get(key, 0) + 1
            rows = self.groups.setdefault(key, [])
            if len(rows) < 10 and row not in rows:
                rows.append(row)

    def to_proto(self) -> list[pb.RejectGroup]:
        return [
            pb.RejectGroup(field=k[0], rule=k[1], count=self.counts[k], first_rows=self.groups[k])
            for k in sorted(self.counts)
        ]


def batch_exceeds(rejected: int, read: int, threshold: float) -> bool:
    return read > 0 and rejected / read > threshold
