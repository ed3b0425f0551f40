"""Schema options: a profile record's own time, every option the service would not honour
refused by name and rule, and when two registrations are the same schema."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from google.protobuf import json_format

from cdp.ingest.v1 import events_pb2 as ev
from cdp.ingest.v1 import ingest_pb2 as pb
from cdp_ingest.domain import Validator, schema_violations
from cdp_ingest.judging import Rejected, judge
from cdp_ingest.options import same_dataset, same_schema
from cdp_ingest.parsing import Parsed
from cdp_ingest.records import RecordBuilder
from cdp_kit.envelope import Envelope, unpack

BATCH_TIME = datetime(2026, 3, 1, tzinfo=UTC)


def crm(**extra: object) -> pb.Schema:
    body: dict[str, object] = {
        "name": "crm",
        "schema_class": "SCHEMA_CLASS_PROFILE",
        "fields": [
            {"name": "crm_id", "type": "FIELD_TYPE_STRING", "identity_namespace": "crm_id", "required": True},
            {"name": "city", "type": "FIELD_TYPE_STRING"},
            {"name": "updated_at", "type": "FIELD_TYPE_TIMESTAMP"},
            {"name": "visits", "type": "FIELD_TYPE_INTEGER"},
            {"name": "score", "type": "FIELD_TYPE_NUMBER"},
            {"name": "vip", "type": "FIELD_TYPE_BOOLEAN"},
            {"name": "born", "type": "FIELD_TYPE_DATE"},
            {
                "name": "address",
                "type": "FIELD_TYPE_OBJECT",
                "fields": [{"name": "zip", "type": "FIELD_TYPE_STRING"}],
            },
            {"name": "tags", "type": "FIELD_TYPE_ARRAY", "items": "FIELD_TYPE_STRING"},
        ],
        **extra,
    }
    return json_format.ParseDict(body, pb.Schema())


def rules(schema: pb.Schema) -> set[tuple[str, str]]:
    return {(v.field, v.rule) for v in schema_violations(schema)}


# ----------------------------------------------------------------------------- record time


def judged_records(schema: pb.Schema, rows: list[dict[str, str]]) -> tuple[list[Envelope], list[Rejected]]:
    validator = Validator(schema, textual=True, drop_unknown=False, max_bytes=10_000)
    builder = RecordBuilder("crm", schema.schema_class, "b1", BATCH_TIME, record_time=bool(schema.timestamp_field))
    parsed: list[Parsed] = [(i + 1, dict(row), [], 10) for i, row in enumerate(rows)]
    out = judge(parsed, validator, builder)
    return [Envelope.FromString(data) for (_, _, data), _ in out.accepted], out.rejected


def test_a_profile_record_takes_its_time_from_the_timestamp_field() -> None:
    schema = crm(timestamp_field="updated_at")
    assert schema_violations(schema) == []
    envs, rejected = judged_records(
        schema,
        [
            {"crm_id": "C1", "city": "Lyon", "updated_at": "2024-05-01T10:00:00+02:00"},
            {"crm_id": "C1", "city": "Paris", "updated_at": "2023-01-01T00:00:00Z"},
            {"crm_id": "C2", "city": "Nice"},  # no time: the field is required once named
        ],
    )
    times = [unpack(e, ev.RecordAccepted).occurred_at.ToDatetime(tzinfo=UTC) for e in envs]
    assert times == [datetime(2024, 5, 1, 8, tzinfo=UTC), datetime(2023, 1, 1, tzinfo=UTC)]
    assert [e.occurred_at.ToDatetime(tzinfo=UTC) for e in envs] == times  # the envelope's time too
    assert [(r[0], [(v.field, v.rule) for v in r[1]]) for r in rejected] == [(3, [("updated_at", "required")])]


def test_without_a_timestamp_field_a_profile_record_takes_the_batch_time() -> None:
    envs, _ = judged_records(crm(), [{"crm_id": "C1", "updated_at": "2024-05-01T10:00:00Z"}])
    record = unpack(envs[0], ev.RecordAccepted)
    assert record.occurred_at.ToDatetime(tzinfo=UTC) == BATCH_TIME == envs[0].occurred_at.ToDatetime(tzinfo=UTC)


def test_a_profile_timestamp_field_names_a_top_level_timestamp() -> None:
    assert ("timestamp_field", "exists") in rules(crm(timestamp_field="nope"))
    assert ("timestamp_field", "type") in rules(crm(timestamp_field="born"))
    assert ("timestamp_field", "type") in rules(crm(timestamp_field="city"))


# ----------------------------------------------------------------------------- options not honoured


def _field(schema: pb.Schema, name: str) -> pb.Field:
    return next(f for f in schema.fields if f.name == name)


def _sub(schema: pb.Schema) -> pb.Field:
    return _field(schema, "address").fields[0]


def _add_sub(f: pb.Field) -> None:
    f.fields.add(name="x", type=pb.FIELD_TYPE_STRING)


UNHONOURED: list[tuple[str, Callable[[pb.Schema], None], tuple[str, str]]] = [
    (
        "event_type_field on a profile",
        lambda s: setattr(s, "event_type_field", "city"),
        ("event_type_field", "event_only"),
    ),
    ("event_id_field on a profile", lambda s: setattr(s, "event_id_field", "crm_id"), ("event_id_field", "event_only")),
    ("items on a string", lambda s: setattr(_field(s, "city"), "items", pb.FIELD_TYPE_STRING), ("city", "items")),
    ("enum on a boolean", lambda s: _field(s, "vip").enum_values.append("true"), ("vip", "enum_values")),
    ("enum on a number", lambda s: _field(s, "score").enum_values.append("1.5"), ("score", "enum_values")),
    ("enum on a date", lambda s: _field(s, "born").enum_values.append("2020-01-01"), ("born", "enum_values")),
    ("a non-integer enum", lambda s: _field(s, "visits").enum_values.extend(["1", "+2"]), ("visits", "enum_values")),
    ("pattern on an integer", lambda s: setattr(_field(s, "visits"), "pattern", "[0-9]+"), ("visits", "pattern")),
    ("pattern on an array", lambda s: setattr(_field(s, "tags"), "pattern", "x"), ("tags", "pattern")),
    ("minimum on a string", lambda s: setattr(_field(s, "city"), "minimum", 1), ("city", "minimum")),
    ("max_length on an integer", lambda s: setattr(_field(s, "visits"), "max_length", 3), ("visits", "max_length")),
    (
        "fields on an array",
        lambda s: _add_sub(_field(s, "tags")),
        ("tags", "fields"),
    ),
    ("minimum on a string sub-field", lambda s: setattr(_sub(s), "minimum", 1), ("address.zip", "minimum")),
    ("identity on a sub-field", lambda s: setattr(_sub(s), "identity_namespace", "email"), ("address.zip", "identity")),
]


@pytest.mark.parametrize(("change", "expected"), [(c, e) for _, c, e in UNHONOURED], ids=[n for n, _, _ in UNHONOURED])
def test_an_option_the_service_does_not_honour_is_refused_by_field_and_rule(
    change: Callable[[pb.Schema], None], expected: tuple[str, str]
) -> None:
    schema = crm()
    assert schema_violations(schema) == []
    change(schema)
    assert expected in rules(schema)


def test_the_options_the_service_honours_pass() -> None:
    schema = crm(timestamp_field="updated_at")
    _field(schema, "city").enum_values.extend(["Lyon", "Paris"])
    _field(schema, "city").pattern = "[A-Z].*"
    _field(schema, "city").max_length = 40
    _field(schema, "visits").enum_values.extend(["0", "1", "-1"])
    _field(schema, "visits").minimum = -1
    _field(schema, "score").maximum = 10
    _sub(schema).required = True
    assert schema_violations(schema) == []
    events = pb.Schema(name="web", schema_class=pb.SCHEMA_CLASS_EVENT)
    events.fields.add(name="id", type=pb.FIELD_TYPE_STRING)
    events.fields.add(name="ts", type=pb.FIELD_TYPE_TIMESTAMP)
    events.fields.add(name="type", type=pb.FIELD_TYPE_STRING)
    events.event_id_field, events.timestamp_field, events.event_type_field = "id", "ts", "type"
    assert schema_violations(events) == []


def test_value_checks_on_sub_fields_are_applied() -> None:
    schema = crm()
    _sub(schema).enum_values.extend(["75001", "69001"])
    _sub(schema).max_length = 5
    assert schema_violations(schema) == []
    validator = Validator(schema, textual=False, drop_unknown=False, max_bytes=10_000)
    assert validator.validate({"crm_id": "C1", "address": {"zip": "75001"}}, 10, "row 1").ok
    bad = validator.validate({"crm_id": "C1", "address": {"zip": "13001"}}, 10, "row 2")
    assert [(v.field, v.rule, v.message) for v in bad.violations] == [
        ("address", "enum", "zip: not one of 2 allowed values")
    ]


# ----------------------------------------------------------------------------- sameness


def test_field_order_and_enum_order_do_not_make_another_schema() -> None:
    a = crm(timestamp_field="updated_at")
    _field(a, "city").enum_values.extend(["Lyon", "Paris"])
    b = pb.Schema()
    b.CopyFrom(a)
    b.version = 7
    reordered = list(reversed(b.fields))
    del b.fields[:]
    b.fields.extend(reordered)
    city = _field(b, "city")
    del city.enum_values[:]
    city.enum_values.extend(["Paris", "Lyon", "Paris"])
    _field(b, "address").fields.add(name="city", type=pb.FIELD_TYPE_STRING)
    _field(a, "address").fields.add(name="city", type=pb.FIELD_TYPE_STRING)
    zip_first = list(reversed(_field(b, "address").fields))
    del _field(b, "address").fields[:]
    _field(b, "address").fields.extend(zip_first)
    assert same_schema(a, b)


@pytest.mark.parametrize(
    "change",
    [
        lambda s: setattr(_field(s, "city"), "required", True),
        lambda s: setattr(_field(s, "city"), "max_length", 9),
        lambda s: _field(s, "city").enum_values.append("Nice"),
        lambda s: setattr(_field(s, "score"), "minimum", 0),
        lambda s: setattr(s, "timestamp_field", ""),
        lambda s: _add_sub(_field(s, "address")),
        lambda s: setattr(_sub(s), "required", True),
    ],
)
def test_any_change_of_meaning_is_another_schema(change: Callable[[pb.Schema], None]) -> None:
    a = crm(timestamp_field="updated_at")
    b = pb.Schema()
    b.CopyFrom(a)
    change(b)
    assert not same_schema(a, b)


def test_datasets_compare_by_every_setting() -> None:
    a = pb.Dataset(name="crm", schema_name="crm", unknown_fields=pb.UNKNOWN_FIELDS_REJECT)
    assert same_dataset(a, pb.Dataset(name="crm", schema_name="crm", unknown_fields=pb.UNKNOWN_FIELDS_REJECT))
    assert not same_dataset(a, pb.Dataset(name="crm", schema_name="crm", unknown_fields=pb.UNKNOWN_FIELDS_DROP))
    assert not same_dataset(a, pb.Dataset(name="crm", schema_name="other", unknown_fields=pb.UNKNOWN_FIELDS_REJECT))
