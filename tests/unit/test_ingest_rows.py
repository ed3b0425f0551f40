"""Reading and validating batches without a service: incremental parsers, gzip, staging,
and a property: whatever the rows, nothing crashes and every row is accepted or has a reason."""

from __future__ import annotations

import csv
import gzip
import io
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdp.common.v1.envelope_pb2 import IdentityValue
from cdp.ingest.v1 import events_pb2 as ev
from cdp.ingest.v1 import ingest_pb2 as pb
from cdp_ingest.batches import BatchRun
from cdp_ingest.domain import Validator, compatibility_violations, schema_violations
from cdp_ingest.judging import StagedRecord
from cdp_ingest.parsing import CsvParser, Inflater, JsonLinesParser
from cdp_ingest.records import RecordBuilder
from cdp_kit.envelope import Envelope, EventBatch, deterministic_id, unpack, varint
from cdp_kit.errors import InvalidInput

SCHEMA = json_format.ParseDict(
    {
        "name": "people",
        "schema_class": "SCHEMA_CLASS_PROFILE",
        "fields": [
            {"name": "id", "type": "FIELD_TYPE_STRING", "identity_namespace": "crm_id", "required": True},
            {"name": "age", "type": "FIELD_TYPE_INTEGER", "minimum": 0, "maximum": 150},
            {"name": "score", "type": "FIELD_TYPE_NUMBER"},
            {"name": "member", "type": "FIELD_TYPE_BOOLEAN"},
            {"name": "since", "type": "FIELD_TYPE_DATE"},
            {"name": "seen", "type": "FIELD_TYPE_TIMESTAMP"},
            {"name": "tier", "type": "FIELD_TYPE_STRING", "enum_values": ["a", "b"]},
            {
                "name": "address",
                "type": "FIELD_TYPE_OBJECT",
                "fields": [{"name": "zip", "type": "FIELD_TYPE_STRING", "required": True}],
            },
            {"name": "tags", "type": "FIELD_TYPE_ARRAY", "items": "FIELD_TYPE_STRING"},
        ],
    },
    pb.Schema(),
)
COLUMNS = [f.name for f in SCHEMA.fields]


def envelopes_of(encoded: list[bytes]) -> list[Envelope]:
    """Envelopes parsed from the bytes ``RecordBuilder`` wrote (framed as an ``EventBatch``)."""
    batch = EventBatch()
    batch.ParseFromString(b"".join(b"\x0a" + varint(len(e)) + e for e in encoded))
    return list(batch.events)


def build(builder: RecordBuilder, **kwargs: Any) -> Envelope:
    return Envelope.FromString(builder.encode(**kwargs))


def run_batch(tmp_path: Path, data: bytes, fmt: pb.FileFormat.ValueType, piece: int = 7) -> BatchRun:
    run = BatchRun(
        header=pb.IngestFileHeader(dataset="people", batch_key="k", format=fmt),
        dataset=pb.Dataset(name="people", schema_name="people", unknown_fields=pb.UNKNOWN_FIELDS_REJECT),
        schema=SCHEMA,
        staging=tmp_path,
        max_bytes=2000,
        max_kept_rejects=1_000_000,
        builder=RecordBuilder("people", pb.SCHEMA_CLASS_PROFILE, "b", datetime(2026, 1, 1, tzinfo=UTC)),
    )
    for start in range(0, len(data), piece):
        run.feed(data[start : start + piece])
    run.finish()
    return run


def test_csv_split_anywhere_reads_quoted_newlines_and_numbers_rows(tmp_path: Path) -> None:
    data = b'id,age,tier\n1,5,a\n"2",6,"b"\n"line\nbreak",7,a\n\n4,x,a\n'
    run = run_batch(tmp_path, data, pb.FILE_FORMAT_CSV, piece=3)
    rows = [(row, unpack(env, ev.RecordAccepted)) for chunk in run.accepted for row, _, env in _parsed(chunk)]
    read = [(row, rec.attributes["id"], rec.attributes["age"], rec.row) for row, rec in rows]
    assert read == [(1, "1", 5, 1), (2, "2", 6, 2), (3, "line\nbreak", 7, 3)]
    rejected = [r for chunk in run.rejected for r in chunk]
    assert rejected == [(4, {"id": "4", "age": "x", "tier": "a"}, [("age", "type", "expected an integer")])]


def _parsed(chunk: list[StagedRecord]) -> list[tuple[int, str, Envelope]]:
    return [(row, key, env) for (row, key, _), env in zip(chunk, envelopes_of([d for _, _, d in chunk]), strict=True)]


def test_gzip_members_and_pieces_inflate_to_the_original(tmp_path: Path) -> None:
    raw = b"id,age\n" + b"".join(f"{i},{i % 100}\n".encode() for i in range(5000))
    data = gzip.compress(raw[:20_000]) + gzip.compress(raw[20_000:])
    inflater = Inflater()
    out = b"".join(b"".join(inflater.feed(data[i : i + 1000])) for i in range(0, len(data), 1000))
    assert out + b"".join(inflater.close()) == raw
    truncated = Inflater()
    list(truncated.feed(data[:500]))
    with pytest.raises(InvalidInput, match="truncated gzip"):
        list(truncated.close())


def test_jsonl_oversized_lines_are_rejected_and_skipped() -> None:
    parser = JsonLinesParser()
    big = b'{"id": "' + b"x" * (5 * 1024 * 1024) + b'"}\n{"id": "after"}\n'
    rows = [r for i in range(0, len(big), 1 << 20) for r in parser.feed(big[i : i + (1 << 20)])]
    rows += [r for chunk in parser.close() for r in chunk]
    assert [(r[0], r[2][0].rule if r[2] else None) for r in rows] == [(1, "row_size"), (2, None)]
    assert rows[1][1] == {"id": "after"}


def test_a_csv_header_problem_is_refused() -> None:
    with pytest.raises(InvalidInput, match="malformed CSV header"):
        CsvParser().feed(b"id,id\n1,2\n")


def test_nested_objects_and_arrays_are_checked(tmp_path: Path) -> None:
    validator = Validator(SCHEMA, textual=False, drop_unknown=False, max_bytes=2000)
    ok = validator.validate({"id": "1", "address": {"zip": "75001"}, "tags": ["x"]}, 10, "row 1")
    assert ok.ok
    bad = validator.validate({"id": "1", "address": {"city": "Paris"}, "tags": [1]}, 10, "row 1")
    assert [(v.field, v.rule, v.message) for v in bad.violations] == [
        ("address", "type", "zip: missing"),
        ("tags", "type", "item: expected a string"),
    ]


def test_schema_rules_and_widening_versions() -> None:
    bad = pb.Schema(name="x", schema_class=pb.SCHEMA_CLASS_PROFILE)
    bad.fields.add(name="n", type=pb.FIELD_TYPE_STRING, minimum=1, primary_identity=True)
    rules = {(v.field, v.rule) for v in schema_violations(bad)}
    assert {("n", "minimum"), ("n", "primary_identity")} <= rules
    old = pb.Schema(name="x", schema_class=pb.SCHEMA_CLASS_PROFILE)
    old.fields.add(name="tier", type=pb.FIELD_TYPE_STRING, enum_values=["a"], max_length=5)
    wider = pb.Schema()
    wider.CopyFrom(old)
    wider.fields[0].enum_values.append("b")
    wider.fields[0].max_length = 10
    assert compatibility_violations(old, wider) == []
    assert [v.message for v in compatibility_violations(wider, old)] == [
        "enum values cannot be removed",
        "max_length cannot shrink",
    ]


# ----------------------------------------------------------------------------- the property

cell = st.one_of(
    st.text(max_size=12),
    st.integers(-(10**20), 10**20).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(["", "a", "b", "yes", "no", "2026-02-30", "2026-01-01", "2026-01-01T00:00:00Z", "{}", "[]"]),
    st.binary(max_size=6).map(lambda b: b.decode("latin-1")),
)
json_value: Any = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.lists(cell, min_size=0, max_size=len(COLUMNS) + 2), min_size=1, max_size=25))
def test_random_csv_rows_never_crash_and_each_is_accepted_or_has_a_reason(
    tmp_path: Path, rows: list[list[str]]
) -> None:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    writer.writerows(rows)
    data = out.getvalue().encode("utf-8", "surrogatepass")
    if not any(rows):  # only a file that holds no data row is refused as a whole
        with pytest.raises(InvalidInput, match="empty file"):
            run_batch(tmp_path, data, pb.FILE_FORMAT_CSV, piece=11)
        return
    _every_row_accounted(run_batch(tmp_path, data, pb.FILE_FORMAT_CSV, piece=11))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.lists(
        st.one_of(st.dictionaries(st.sampled_from([*COLUMNS, "other"]), json_value, max_size=6), json_value),
        min_size=1,
        max_size=20,
    )
)
def test_random_json_lines_never_crash_and_each_is_accepted_or_has_a_reason(tmp_path: Path, rows: list[Any]) -> None:
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    run = run_batch(tmp_path, data, pb.FILE_FORMAT_JSONL, piece=13)
    assert run.report.rows_read == len(rows)
    _every_row_accounted(run)


def _every_row_accounted(run: BatchRun) -> None:
    report = run.report
    accepted = [r[0] for chunk in run.accepted for r in chunk]
    rejected = [r for chunk in run.rejected for r in chunk]
    assert report.rows_read == report.rows_accepted + report.rows_rejected
    assert len(accepted) == report.rows_accepted
    assert len(rejected) == report.rows_rejected
    assert sorted(accepted + [r[0] for r in rejected]) == list(range(1, report.rows_read + 1))
    assert all(reasons and all(f and rule and msg for f, rule, msg in reasons) for _, _, reasons in rejected)
    assert sum(g.count for g in report.rejects) >= report.rows_rejected
    run.close()


def test_hand_encoded_records_equal_what_protobuf_builds() -> None:
    received = datetime(2026, 1, 2, 3, 4, 5, 678_000, tzinfo=UTC)
    values: dict[str, Any] = {"id": "C1", "n": 3, "x": -2.5, "vip": True, "no": False, "obj": {"a": [1, "x", None]}}
    values["ü"] = "é" * 200
    profile = RecordBuilder("people", pb.SCHEMA_CLASS_PROFILE, "batch-1", received)
    env = build(profile, record_id="batch-1:70000", row=70_000, values=values, identities=[("crm_id", "C1")])
    expected = ev.RecordAccepted(
        record_id="batch-1:70000",
        dataset="people",
        schema_class=pb.SCHEMA_CLASS_PROFILE,
        batch_id="batch-1",
        row=70_000,
        identities=[IdentityValue(namespace="crm_id", value="C1")],
        event_type="",
    )
    expected.attributes.update(values)
    expected.occurred_at.FromDatetime(received)
    assert unpack(env, ev.RecordAccepted) == expected
    assert (env.id, env.type, env.subject_key, env.schema_version) == (
        deterministic_id("record", "people", "batch-1:70000"),
        "cdp.ingest.v1.RecordAccepted",
        "people",
        1,
    )
    assert env.occurred_at == expected.occurred_at

    before_epoch = datetime(1960, 5, 6, 7, 8, 9, 5, tzinfo=UTC)
    events = RecordBuilder("web", pb.SCHEMA_CLASS_EVENT, "", received)
    env = build(events, record_id="ev1", row=0, values={}, identities=[], occurred_at=before_epoch, event_type="pv")
    record = unpack(env, ev.RecordAccepted)
    assert (record.record_id, record.row, record.batch_id, record.event_type) == ("ev1", 0, "", "pv")
    assert record.occurred_at.ToDatetime(tzinfo=UTC) == before_epoch == env.occurred_at.ToDatetime(tzinfo=UTC)
    assert [
        e.id for e in envelopes_of([events.encode(record_id=i, row=0, values={}, identities=[]) for i in "ab"])
    ] == [
        events.key_of("a"),
        events.key_of("b"),
    ]


def test_json_values_that_cannot_travel_are_rejected_not_crashing() -> None:
    validator = Validator(SCHEMA, textual=False, drop_unknown=False, max_bytes=2000)
    bad = validator.validate(
        {"id": "\ud800", "age": 10**30, "score": 10**400, "address": {"zip": "1", "big": 10**400}}, 10, "row 1"
    )
    assert [(v.field, v.rule) for v in bad.violations] == [
        ("id", "type"),
        ("age", "type"),
        ("score", "type"),
        ("address", "type"),
    ]


@pytest.mark.parametrize("size", [0, 1, 120, 121, 122, 127, 128, 16_370, 16_383, 16_384, 20_000, 2_100_000])
def test_hand_encoded_lengths_hold_across_varint_boundaries(size: int) -> None:
    """Text lengths around the one-, two- and three-byte varint limits, in ids, identities and
    attributes, ASCII and multi-byte, and a lone surrogate: the bytes parse to what protobuf builds."""
    received = datetime(2026, 1, 2, tzinfo=UTC)
    builder = RecordBuilder("people", pb.SCHEMA_CLASS_PROFILE, "b", received)
    for text in ("x" * size, "é" * (size // 2), "a\ud800" + "z" * size):
        values: dict[str, Any] = {"k": text, "n": 1.5, "ok": True, "long": text + "!"}
        clean = text.encode("utf-8", "replace").decode()  # ids are checked UTF-8 before they get here
        env = build(builder, record_id=clean or "r", row=size, values=values, identities=[("ns", text), ("e", "v")])
        expected = ev.RecordAccepted(
            record_id=clean or "r",
            dataset="people",
            schema_class=pb.SCHEMA_CLASS_PROFILE,
            batch_id="b",
            row=size,
            identities=[
                IdentityValue(namespace="ns", value=text.encode("utf-8", "replace").decode()),
                IdentityValue(namespace="e", value="v"),
            ],
        )
        expected.attributes.update(
            {k: v.encode("utf-8", "replace").decode() if isinstance(v, str) else v for k, v in values.items()}
        )
        expected.occurred_at.FromDatetime(received)
        assert unpack(env, ev.RecordAccepted) == expected
