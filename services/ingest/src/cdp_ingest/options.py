"""Which schema options the service honours (the refusal of every other one), and when two
schemas are the same.

A ``Schema`` or ``Field`` option that validation would never read is refused at CreateSchema,
naming the field and the rule, rather than accepted and silently ignored. What is honoured:

| option | honoured on |
|---|---|
| ``event_id_field``, ``event_type_field`` | event schemas |
| ``timestamp_field`` | event schemas (required) and profile schemas (optional: each record's time) |
| ``identity_namespace`` | top-level string fields (``primary_identity`` is refused everywhere) |
| ``enum_values`` | string and integer fields (integer values for integer fields) |
| ``pattern``, ``max_length`` | string fields |
| ``minimum``, ``maximum`` | integer and number fields |
| ``fields`` | object fields (at any depth) |
| ``items`` | array fields |
| ``required`` | every field (sub-fields of objects too) |

Value checks (enum, pattern, length, range) apply at every depth of an object; identities are
read from a row's top-level fields only, so a sub-field naming a namespace is refused. Pure: no I/O.
"""

from __future__ import annotations

import re
from typing import Any

from cdp.ingest.v1 import ingest_pb2 as pb
from cdp_kit.errors import Violation

FT = pb.FieldType
INTEGER_TEXT = re.compile(r"-?(0|[1-9][0-9]*)")  # as str() writes an integer: what a value is compared as
ENUM_TYPES = (FT.FIELD_TYPE_STRING, FT.FIELD_TYPE_INTEGER)
TIME_TYPES = (FT.FIELD_TYPE_TIMESTAMP,)


def unhonoured_options(schema: pb.Schema) -> list[Violation]:
    """Every option of ``schema`` the service would not apply, each naming the field and rule."""
    out = _schema_level(schema)
    for f in schema.fields:
        out += _field_options(f, f.name, top=True)
    return out


def _schema_level(schema: pb.Schema) -> list[Violation]:
    out: list[Violation] = []
    if schema.schema_class == pb.SCHEMA_CLASS_PROFILE:
        for attr in ("event_id_field", "event_type_field"):
            if getattr(schema, attr):
                out.append(Violation(attr, "event_only", f"{attr} applies to event schemas, not profile schemas"))
        out += _profile_time(schema)
    return out


def _profile_time(schema: pb.Schema) -> list[Violation]:
    """A profile schema's ``timestamp_field`` names a top-level timestamp field: each record's time."""
    if not schema.timestamp_field:
        return []
    by_name = {f.name: f for f in schema.fields}
    field = by_name.get(schema.timestamp_field)
    if field is None:
        return [Violation("timestamp_field", "exists", "names no top-level field of the schema")]
    if field.type not in TIME_TYPES:
        return [Violation("timestamp_field", "type", "the timestamp field must be of type timestamp")]
    return []


def _field_options(f: pb.Field, path: str, *, top: bool) -> list[Violation]:
    out: list[Violation] = []
    if f.items != FT.FIELD_TYPE_UNSPECIFIED and f.type != FT.FIELD_TYPE_ARRAY:
        out.append(Violation(path, "items", "only array fields have an item type"))
    if f.enum_values and f.type not in ENUM_TYPES:
        out.append(Violation(path, "enum_values", "enum_values apply to string and integer fields"))
    elif f.enum_values and f.type == FT.FIELD_TYPE_INTEGER:
        bad = [v for v in f.enum_values if not INTEGER_TEXT.fullmatch(v)]
        if bad:
            out.append(Violation(path, "enum_values", f"{len(bad)} value(s) are not integers written plainly (7, -3)"))
    if f.pattern and f.type != FT.FIELD_TYPE_STRING:
        out.append(Violation(path, "pattern", "pattern applies to string fields"))
    if not top:
        out += _sub_field_options(f, path)
    for sub in f.fields:
        out += _field_options(sub, f"{path}.{sub.name}", top=False)
    return out


def _sub_field_options(f: pb.Field, path: str) -> list[Violation]:
    """Options an object's sub-field cannot carry: identities are read from top-level fields."""
    out: list[Violation] = []
    if f.identity_namespace or f.primary_identity:
        out.append(Violation(path, "identity", "identity fields are top-level fields, not sub-fields of an object"))
    return out


# ----------------------------------------------------------------------------- sameness


def canonical(schema: pb.Schema) -> pb.Schema:
    """The schema as it means: without its version, fields (at every depth) in name order and
    enum values as a sorted set. Field order is presentation (rows are matched by name) and an
    enum is a set of allowed values, so neither order tells two schemas apart."""
    out = pb.Schema()
    out.CopyFrom(schema)
    out.version = 0
    _canonical_fields(out.fields)
    return out


def _canonical_fields(fields: Any) -> None:
    ordered = sorted(fields, key=lambda f: f.name)
    copies = []
    for f in ordered:
        copy = pb.Field()
        copy.CopyFrom(f)
        values = sorted(set(copy.enum_values))
        del copy.enum_values[:]
        copy.enum_values.extend(values)
        _canonical_fields(copy.fields)
        copies.append(copy)
    del fields[:]
    fields.extend(copies)


def same_schema(a: pb.Schema, b: pb.Schema) -> bool:
    """Whether registering ``b`` over ``a`` would change nothing."""
    return canonical(a).SerializeToString(deterministic=True) == canonical(b).SerializeToString(deterministic=True)


def same_dataset(a: pb.Dataset, b: pb.Dataset) -> bool:
    """Datasets are flat: equal messages (after defaults are filled in) are the same dataset."""
    return a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True)
