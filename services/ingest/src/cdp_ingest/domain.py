"""Pure rules of ingestion: schema checks, compatibility, row validation. No I/O, no clock."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from cdp.ingest.v1 import ingest_pb2 as pb
from cdp_ingest.declarations import (
    apply_consents,
    consent_roles,
    consent_violations,
    event_type_check,
    event_types_compat,
    event_types_violations,
)
from cdp_ingest.limits import DEFAULT_MAX_DEPTH, LimitExceeded, too_deep
from cdp_ingest.options import unhonoured_options
from cdp_kit.errors import Violation
from cdp_kit.identities import CHECK_COST, DEFAULT_PHONE_REGION, STANDARD_TYPES, Normaliser
from cdp_kit.telemetry import pii_hash, value_shape

FT = pb.FieldType
NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
TRUE = frozenset({"true", "t", "yes", "y", "1"})
FALSE = frozenset({"false", "f", "no", "n", "0"})
INT_RE = re.compile(r"\s*[-+]?\d+\s*")
NUMERIC = (FT.FIELD_TYPE_INTEGER, FT.FIELD_TYPE_NUMBER)
INT_LIMIT = 2**63
SAMPLES_PER_GROUP = 3
FIRST_ROWS_PER_GROUP = 10
MASKED_CHARS = 40  # a masked non-identity value shows at most this many characters of its shape


def type_name(t: int) -> str:
    return pb.FieldType.Name(t).removeprefix("FIELD_TYPE_").lower()  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- schemas


def schema_violations(schema: pb.Schema) -> list[Violation]:
    """Everything wrong with a schema definition, each naming the field and the rule."""
    out: list[Violation] = []
    if not NAME_RE.match(schema.name):
        out.append(Violation("name", "pattern", "schema names are lower_snake_case, 1-63 characters"))
    if schema.schema_class == pb.SCHEMA_CLASS_UNSPECIFIED:
        out.append(Violation("schema_class", "required", "a schema is of class profile or event"))
    if not schema.fields:
        out.append(Violation("fields", "required", "a schema has at least one field"))
    out += _fields_violations(schema.fields, "")
    if schema.schema_class == pb.SCHEMA_CLASS_EVENT:
        out += _event_violations(schema)
    out += unhonoured_options(schema)
    out += event_types_violations(schema) + consent_violations(schema)
    return out


PRIMARY_UNUSED = (
    "primary_identity is no longer used: a row needs any one usable identity value and identity "
    "anchors a record by namespace priority; remove it (set required: true to require the field)"
)


def unknown_namespaces(schema: pb.Schema, known: Mapping[str, int]) -> list[Violation]:
    """Identity fields whose namespace identity does not define (``cdp identity namespace list``)."""
    return [
        Violation(
            f.name,
            "identity",
            f"namespace {f.identity_namespace!r} is not defined: create it first (cdp identity namespace create)",
        )
        for f in schema.fields
        if f.identity_namespace and f.identity_namespace not in known
    ]


def _event_violations(schema: pb.Schema) -> list[Violation]:
    out: list[Violation] = []
    by_name = {f.name: f for f in schema.fields}
    for attr, want in (("event_id_field", "event id"), ("timestamp_field", "timestamp")):
        ref = getattr(schema, attr)
        if not ref or ref not in by_name:
            out.append(Violation(attr, "required", f"event schemas name their {want} field"))
    ts = by_name.get(schema.timestamp_field)
    if ts is not None and ts.type != FT.FIELD_TYPE_TIMESTAMP:
        out.append(Violation("timestamp_field", "type", "the timestamp field must be of type timestamp"))
    if schema.event_type_field and schema.event_type_field not in by_name:
        out.append(Violation("event_type_field", "exists", "names no field of the schema"))
    return out


def _fields_violations(fields: Any, prefix: str) -> list[Violation]:
    out: list[Violation] = []
    names = [f.name for f in fields]
    out += [
        Violation(prefix + n, "unique", "field defined twice") for n in sorted({n for n in names if names.count(n) > 1})
    ]
    for f in fields:
        out += _field_violations(f, prefix + f.name)
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
    if f.primary_identity:
        out.append(Violation(path, "primary_identity", PRIMARY_UNUSED))
    if (f.HasField("minimum") or f.HasField("maximum")) and f.type not in NUMERIC:
        out.append(Violation(path, "minimum", "minimum and maximum apply to integer and number fields"))
    if f.HasField("minimum") and f.HasField("maximum") and f.minimum > f.maximum:
        out.append(Violation(path, "maximum", "maximum is below minimum"))
    if f.max_length and f.type != FT.FIELD_TYPE_STRING:
        out.append(Violation(path, "max_length", "max_length applies to string fields"))
    if f.fields and f.type != FT.FIELD_TYPE_OBJECT:
        out.append(Violation(path, "fields", "only object fields have sub-fields"))
    out += _fields_violations(f.fields, path + ".")
    return out


def compatibility_violations(old: pb.Schema, new: pb.Schema) -> list[Violation]:
    """A new version may only add optional fields (and widen: more enum values, longer max_length)."""
    out: list[Violation] = []
    if old.schema_class != new.schema_class:
        out.append(Violation("schema_class", "compatible", "the class of a schema cannot change"))
    out += _fields_compat(old.fields, new.fields, "")
    for attr in ("event_id_field", "timestamp_field", "event_type_field"):
        if getattr(old, attr) != getattr(new, attr):
            out.append(Violation(attr, "compatible", f"{attr} cannot change"))
    return out + event_types_compat(old, new)


def _fields_compat(old_fields: Any, new_fields: Any, prefix: str) -> list[Violation]:
    out: list[Violation] = []
    by_name = {f.name: f for f in new_fields}
    for f in old_fields:
        if f.name not in by_name:
            out.append(Violation(prefix + f.name, "compatible", "a field cannot be removed"))
        else:
            out += _field_compat(f, by_name[f.name], prefix + f.name)
    old_names = {f.name for f in old_fields}
    for f in new_fields:
        if f.name not in old_names and f.required:
            out.append(Violation(prefix + f.name, "compatible", "an added field must be optional"))
    return out


def _field_compat(old: pb.Field, new: pb.Field, path: str) -> list[Violation]:
    out: list[Violation] = []

    def changed(what: str) -> None:
        out.append(Violation(path, "compatible", what))

    if old.type != new.type:
        changed(f"type cannot change ({type_name(old.type)} to {type_name(new.type)})")
    if old.items != new.items:
        changed("array item type cannot change")
    if new.required and not old.required:
        changed("an optional field cannot become required")
    if old.identity_namespace != new.identity_namespace:
        changed("identity namespace cannot change")
    if old.enum_values and set(old.enum_values) - set(new.enum_values):
        changed("enum values cannot be removed")
    if not old.enum_values and new.enum_values:
        changed("an enum cannot be added to an existing field")
    if old.pattern != new.pattern:
        changed("pattern cannot change")
    if new.max_length and (not old.max_length or new.max_length < old.max_length):
        changed("max_length cannot shrink")
    if new.HasField("minimum") and (not old.HasField("minimum") or new.minimum > old.minimum):
        changed("minimum cannot rise")
    if new.HasField("maximum") and (not old.HasField("maximum") or new.maximum < old.maximum):
        changed("maximum cannot fall")
    return out + _fields_compat(old.fields, new.fields, path + ".")


# ----------------------------------------------------------------------------- rows


class RowResult:
    """One row after validation: converted values and identities, or what was wrong."""

    __slots__ = ("event_id", "event_type", "identities", "occurred_at", "values", "violations")

    def __init__(self, violations: list[Violation] | None = None) -> None:
        self.values: dict[str, Any] = {}
        self.identities: list[tuple[str, str]] = []
        self.violations: list[Violation] = violations if violations is not None else []
        self.event_id = ""
        self.occurred_at: datetime | None = None
        self.event_type = ""

    @property
    def ok(self) -> bool:
        return not self.violations


Converter = Callable[[Any], Any]


@dataclass(frozen=True)
class IdentityRules:
    """What a row's identity check needs (small and hashable: it travels to reader processes):
    every namespace's type, the region of phone numbers without +, and whether the dataset keeps
    rows with no usable identity (``allow_anonymous_rows``)."""

    types: tuple[tuple[str, int], ...] = tuple(sorted(STANDARD_TYPES.items()))
    phone_region: str = DEFAULT_PHONE_REGION
    allow_anonymous: bool = False

    @classmethod
    def of(cls, types: Mapping[str, int], phone_region: str, *, allow_anonymous: bool = False) -> IdentityRules:
        return cls(tuple(sorted(types.items())), phone_region, allow_anonymous)

    def normaliser(self) -> Normaliser:
        return Normaliser.make(dict(self.types), phone_region=self.phone_region)


@dataclass(frozen=True)
class FieldCheck:
    name: str
    convert: Converter
    required: bool
    namespace: str
    constraints: Callable[[Any], tuple[str, str] | None] | None


class Validator:
    """A schema compiled once per batch: converting and checking a row is a loop over prepared checks."""

    def __init__(
        self,
        schema: pb.Schema,
        *,
        textual: bool,
        drop_unknown: bool,
        max_bytes: int,
        max_depth: int = DEFAULT_MAX_DEPTH,
        identity: IdentityRules | None = None,
    ) -> None:
        self.schema = schema
        self.textual = textual
        self.drop_unknown = drop_unknown
        self.max_bytes = max_bytes
        self.max_depth = max_depth
        self.known = frozenset(f.name for f in schema.fields)
        self.identity_fields = frozenset(f.name for f in schema.fields if f.identity_namespace)
        # A row needs one usable identity value: its identity fields are checked cheapest type
        # first (a CRM id before an email, an email before a phone), and the first usable one settles it.
        identity = identity or IdentityRules()
        types = dict(identity.types)
        self._identity_plan = [
            (f.name, f.identity_namespace)
            for f in sorted(
                (f for f in schema.fields if f.identity_namespace),
                key=lambda f: CHECK_COST.get(types.get(f.identity_namespace, 0), 0),
            )
        ]
        self._identity_check = identity.normaliser().check
        self.allow_anonymous = identity.allow_anonymous
        self.is_event = schema.schema_class == pb.SCHEMA_CLASS_EVENT
        # Events need their id and time; a profile record needs its time when its schema names the field.
        must = {schema.event_id_field, schema.timestamp_field} if self.is_event else {schema.timestamp_field} - {""}
        self.checks = [_compile(f, textual, f.name in must, max_depth) for f in schema.fields]
        # The same checks as plain tuples, read in the per-row loop without attribute lookups.
        self._plan = [(c.name, c.convert, c.required, c.namespace, c.constraints) for c in self.checks]
        self.event_id_field = schema.event_id_field
        self.timestamp_field = schema.timestamp_field
        self.event_type_field = schema.event_type_field
        self.event_type_check = event_type_check(schema)
        self.consent_roles = consent_roles(schema)

    def unknown_columns(self, columns: list[str]) -> list[str]:
        return [c for c in columns if c not in self.known]

    def validate(self, row: Mapping[str, Any], size: int, record: str) -> RowResult:
        """Convert and check one row; ``size`` is its size as read (bytes)."""
        result = RowResult()
        violations = result.violations
        values = result.values
        if not self.drop_unknown and not self.known.issuperset(row):
            for name in row:
                if name not in self.known:
                    violations.append(
                        Violation(str(name) or "(empty name)", "unknown_field", "not in the schema", record)
                    )
        if size > self.max_bytes:
            violations.append(Violation("*", "max_size", f"record is {size} bytes, limit {self.max_bytes}", record))
        empty_text = self.textual
        get = row.get
        for name, convert, required, namespace, constraints in self._plan:
            raw = get(name)
            if raw is None or (empty_text and raw == ""):
                if required:
                    violations.append(Violation(name, "required", "missing", record))
                continue
            if convert is _string and type(raw) is str:
                value = raw  # what _string answers, without the call
            else:
                try:
                    value = convert(raw)
                except (ValueError, TypeError) as exc:
                    rule = exc.rule if isinstance(exc, LimitExceeded) else "type"
                    violations.append(Violation(name, rule, str(exc), record))
                    continue
            if constraints is not None:
                broken = constraints(value)
                if broken is not None:
                    violations.append(Violation(name, broken[0], broken[1], record))
                    continue
            values[name] = value
            if namespace:
                if value:
                    result.identities.append((namespace, value))
                elif required:
                    violations.append(Violation(name, "required", "blank identity", record))
        if self.consent_roles:
            apply_consents(values, self.consent_roles, violations, record)
        if not self.allow_anonymous:
            violations += self._identity_violations(values, violations, record)
        if self.is_event and not violations:
            result.event_id = str(values.get(self.event_id_field, ""))
            result.occurred_at = parse_timestamp(values[self.timestamp_field])
            if self.event_type_field:
                result.event_type = str(values.get(self.event_type_field, ""))
            if self.event_type_check is not None and (wrong := self.event_type_check(result.event_type)):
                violations.append(Violation(wrong.field, wrong.rule, wrong.message, record))
        elif self.timestamp_field and not violations:
            result.occurred_at = parse_timestamp(values[self.timestamp_field])  # the profile record's time
        return result

    def _identity_violations(
        self, values: Mapping[str, Any], violations: list[Violation], record: str
    ) -> list[Violation]:
        """Nothing when one identity value of the row is present and of its namespace's type (a
        blocklisted placeholder counts: identity drops it and counts the drop); else one violation
        (rule ``identity``) per identity field, saying what was wrong with it. Nothing either when
        an identity field is already refused by another rule (``required``, ``type``…): that says it."""
        if not self._identity_plan:
            return [Violation("*", "identity", "the schema declares no identity field", record)]
        check = self._identity_check
        problems: list[tuple[str, str]] = []
        for name, namespace in self._identity_plan:
            value = values.get(name)
            if value is None:
                problems.append((name, "missing"))
                continue
            rule, detail = check(namespace, value)
            if not rule:
                return []
            problems.append((name, detail))
        if violations and any(v.field in self.identity_fields for v in violations):
            return []
        return [Violation(name, "identity", f"no usable identity in the row; {why}", record) for name, why in problems]

    def mask(self, field_name: str, value: Any) -> str:
        """How a rejected value appears in a report: an identity value as its keyed hash (the tag
        the services' logs use for it), any other (a name, an address) as its shape, cut short."""
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        if field_name in self.identity_fields:
            return pii_hash(text)
        return value_shape(text, MASKED_CHARS)


def _compile(f: pb.Field, textual: bool, must: bool, max_depth: int) -> FieldCheck:
    required = must or f.required
    return FieldCheck(f.name, converter(f, textual, max_depth), required, f.identity_namespace, _constraints(f))


def converter(f: pb.Field, textual: bool, max_depth: int = DEFAULT_MAX_DEPTH) -> Converter:
    t = f.type
    if t == FT.FIELD_TYPE_STRING:
        if f.identity_namespace:
            return _identity_string if textual else _checked(_identity_string)
        return _string if textual else _checked(_string)
    if t == FT.FIELD_TYPE_INTEGER:
        return _int_text if textual else _integer
    if t == FT.FIELD_TYPE_NUMBER:
        return _number_text if textual else _number
    if t == FT.FIELD_TYPE_BOOLEAN:
        return _boolean_text if textual else _boolean
    if t == FT.FIELD_TYPE_DATE:
        return _date
    if t == FT.FIELD_TYPE_TIMESTAMP:
        return _timestamp
    if t == FT.FIELD_TYPE_OBJECT:
        return _checked(_object_converter(f, textual, max_depth))
    if t == FT.FIELD_TYPE_ARRAY:
        return _checked(_array_converter(f, textual, max_depth))
    return _unsupported


def _unsupported(raw: Any) -> Any:
    raise ValueError("unsupported field type")


def _string(raw: Any) -> str:
    if type(raw) is not str:
        raise ValueError("expected a string")
    return raw


def _identity_string(raw: Any) -> str:
    if type(raw) is not str:
        raise ValueError("expected a string")
    return raw.strip()


def _in_range(value: int) -> int:
    if -INT_LIMIT <= value < INT_LIMIT:
        return value
    raise ValueError("integer outside the 64-bit range")


def _checked(convert: Converter) -> Converter:
    """JSON input can hold what text read as UTF-8 cannot: lone surrogates, huge integers."""

    def checked(raw: Any) -> Any:
        value = convert(raw)
        _storable(value)
        return value

    return checked


def _storable(value: Any) -> None:
    """Refuse what cannot travel in a record: text that is not UTF-8, numbers beyond a double."""
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            raise ValueError("text holds an invalid Unicode escape (lone surrogate)") from None
    elif isinstance(value, int) and not isinstance(value, bool):
        if abs(value) >= 2**1023:
            raise ValueError("number too large")
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError("object keys are strings")
            _storable(key)
            _storable(item)
    elif isinstance(value, list | tuple):
        for item in value:
            _storable(item)


def _int_text(raw: Any) -> int:
    if type(raw) is str and len(raw) < 64 and INT_RE.fullmatch(raw):
        return _in_range(int(raw))
    raise ValueError("expected an integer")


def _integer(raw: Any) -> int:
    if isinstance(raw, bool):
        raise ValueError("expected an integer")
    if isinstance(raw, int):
        return _in_range(raw)
    if isinstance(raw, float | Decimal) and raw == raw and abs(raw) != float("inf") and raw == int(raw):
        return _in_range(int(raw))
    raise ValueError("expected an integer")


def _number_text(raw: Any) -> float:
    try:
        value = float(raw)
    except (ValueError, TypeError):
        raise ValueError("expected a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError("expected a finite number")
    return value


def _number(raw: Any) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float | Decimal):
        raise ValueError("expected a number")
    try:
        value = float(raw)
    except OverflowError:
        raise ValueError("expected a finite number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError("expected a finite number")
    return value


def _boolean_text(raw: Any) -> bool:
    low = str(raw).strip().lower()
    if low in TRUE:
        return True
    if low in FALSE:
        return False
    raise ValueError("expected a boolean")


def _boolean(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    raise ValueError("expected a boolean")


def _date(raw: Any) -> str:
    if isinstance(raw, datetime):
        return raw.date().isoformat()
    if isinstance(raw, date):
        return raw.isoformat()
    if type(raw) is not str:
        raise ValueError("expected a date (YYYY-MM-DD)")
    try:
        return date.fromisoformat(raw.strip()).isoformat()
    except ValueError:
        raise ValueError("expected a date (YYYY-MM-DD)") from None


def _timestamp(raw: Any) -> str:
    if isinstance(raw, datetime):
        moment = raw if raw.tzinfo is not None else raw.replace(tzinfo=UTC)  # Parquet: UTC-normalised
        return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")
    if type(raw) is not str:
        raise ValueError("expected an ISO 8601 timestamp")
    return parse_timestamp(raw).isoformat().replace("+00:00", "Z")


def parse_timestamp(raw: str) -> datetime:
    text = raw.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError("expected an ISO 8601 timestamp") from None
    if moment.tzinfo is None:
        raise ValueError("timestamps need a time zone (e.g. Z or +02:00)")
    return moment.astimezone(UTC)


def _json_text(raw: Any, textual: bool, max_depth: int) -> Any:
    """A CSV cell's JSON, parsed once its depth is known to fit: the cell sits in its row, so
    its own top level is the row's second."""
    if textual and isinstance(raw, str):
        if too_deep(raw, max_depth - 1):
            raise LimitExceeded("depth", f"nesting deeper than {max_depth}")
        try:
            return json.loads(raw)
        except ValueError:
            raise ValueError("expected JSON") from None
    return raw


def _object_converter(f: pb.Field, textual: bool, max_depth: int) -> Converter:
    subs = [(s.name, converter(s, False), s.required, _constraints(s)) for s in f.fields]

    def convert(raw: Any) -> Any:
        value = _json_text(raw, textual, max_depth)
        if not isinstance(value, dict):
            raise ValueError("expected a JSON object")
        for name, sub, required, constraints in subs:
            if value.get(name) is None:
                if required:
                    raise ValueError(f"{name}: missing")
                continue
            try:
                value[name] = sub(value[name])
            except LimitExceeded as exc:
                raise LimitExceeded(exc.rule, f"{name}: {exc}") from None
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
            broken = constraints(value[name]) if constraints is not None else None
            if broken is not None:  # a sub-field's enum, pattern, length or range, under its rule
                raise LimitExceeded(broken[0], f"{name}: {broken[1]}")
        return value

    return convert


def _array_converter(f: pb.Field, textual: bool, max_depth: int) -> Converter:
    item = converter(pb.Field(type=f.items), False) if f.items else None

    def convert(raw: Any) -> Any:
        value = _json_text(raw, textual, max_depth)
        if not isinstance(value, list):
            raise ValueError("expected a JSON array")
        if item is not None:
            try:
                value = [item(v) for v in value]
            except ValueError as exc:
                raise ValueError(f"item: {exc}") from None
        return value

    return convert


def _constraints(f: pb.Field) -> Callable[[Any], tuple[str, str] | None] | None:
    enum = frozenset(f.enum_values)
    pattern = re.compile(f.pattern) if f.pattern else None
    max_length = f.max_length
    minimum = f.minimum if f.HasField("minimum") else None
    maximum = f.maximum if f.HasField("maximum") else None
    if not (enum or pattern or max_length) and minimum is None and maximum is None:
        return None

    def check(value: Any) -> tuple[str, str] | None:
        if enum and str(value) not in enum:
            return "enum", f"not one of {len(enum)} allowed values"
        if pattern is not None and isinstance(value, str) and not pattern.fullmatch(value):
            return "pattern", "does not match the field's pattern"
        if max_length and isinstance(value, str) and len(value) > max_length:
            return "max_length", f"longer than {max_length} characters"
        if minimum is not None and value < minimum:
            return "minimum", f"below {minimum:g}"
        if maximum is not None and value > maximum:
            return "maximum", f"above {maximum:g}"
        return None

    return check


# ----------------------------------------------------------------------------- batch reports


@dataclass
class RejectTally:
    """Rejected rows grouped by field and rule, with counts, the first row numbers and masked samples."""

    groups: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    counts: dict[tuple[str, str], int] = field(default_factory=dict)
    samples: dict[tuple[str, str], list[str]] = field(default_factory=dict)

    def add(self, row: int, violations: list[Violation], masked: Mapping[str, str]) -> None:
        """Count a rejected row; ``masked``: the masked value of each violated field that has one."""
        for v in violations:
            key = (v.field, v.rule)
            self.counts[key] = self.counts.get(key, 0) + 1
            rows = self.groups.setdefault(key, [])
            if len(rows) < FIRST_ROWS_PER_GROUP and row not in rows:
                rows.append(row)
            samples = self.samples.setdefault(key, [])
            sample = masked.get(v.field)
            if len(samples) < SAMPLES_PER_GROUP and sample is not None:
                samples.append(sample)

    def to_proto(self, *, with_samples: bool) -> list[pb.RejectGroup]:
        return [
            pb.RejectGroup(
                field=k[0],
                rule=k[1],
                count=self.counts[k],
                first_rows=self.groups[k],
                samples=self.samples.get(k, []) if with_samples else [],
            )
            for k in sorted(self.counts)
        ]


def batch_exceeds(rejected: int, read: int, threshold: float) -> bool:
    return read > 0 and rejected / read > threshold
