"""Against the running stack, through the `cdp` CLI: a profile schema's timestamp_field decides
which of two CRM rows of a person wins (in one file and across files, newer or older first,
equal times going to the later row), and `cdp events publish` sends JSON Lines on NATS as an
online publisher would, reporting bad lines by number and counting ingest's dead letters."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cdp_cli.app import app
from cdp_cli.client import Client
from cdp_cli.stack import Stack
from tests.e2e.chain import dead_letters, read_log

pytestmark = pytest.mark.e2e

CRM = {
    "name": "crm_timed",
    "schema_class": "SCHEMA_CLASS_PROFILE",
    "timestamp_field": "updated_at",
    "fields": [
        {"name": "crm_id", "type": "FIELD_TYPE_STRING", "identity_namespace": "crm_id", "required": True},
        {"name": "city", "type": "FIELD_TYPE_STRING"},
        {"name": "updated_at", "type": "FIELD_TYPE_TIMESTAMP"},
    ],
}
WEB = {
    "name": "web_publish",
    "schema_class": "SCHEMA_CLASS_EVENT",
    "event_id_field": "event_id",
    "timestamp_field": "ts",
    "event_type_field": "type",
    "fields": [
        {"name": "event_id", "type": "FIELD_TYPE_STRING"},
        {"name": "ts", "type": "FIELD_TYPE_TIMESTAMP"},
        {"name": "type", "type": "FIELD_TYPE_STRING"},
        {"name": "cookie_id", "type": "FIELD_TYPE_STRING", "identity_namespace": "cookie", "required": True},
        {"name": "amount", "type": "FIELD_TYPE_NUMBER"},
    ],
}
T1, T2, T3 = "2024-01-01T00:00:00Z", "2024-06-01T00:00:00Z", "2025-01-01T00:00:00Z"
# (crm_id, city, updated_at) per file, in file order.
FIRST = [
    ("NEWER_FIRST", "new", T2),
    ("NEWER_FIRST", "old", T1),
    ("OLDER_FIRST", "old", T1),
    ("OLDER_FIRST", "new", T2),
    ("TIE_IN_FILE", "first row", T1),
    ("TIE_IN_FILE", "second row", T1),
    ("ACROSS_NEWER_FIRST", "new", T3),
    ("ACROSS_OLDER_FIRST", "old", T1),
    ("ACROSS_TIE", "first file", T2),
]
SECOND = [
    ("ACROSS_NEWER_FIRST", "old", T1),
    ("ACROSS_OLDER_FIRST", "new", T3),
    ("ACROSS_TIE", "second file", T2),
]
EXPECTED = {
    "NEWER_FIRST": "new",
    "OLDER_FIRST": "new",
    "TIE_IN_FILE": "second row",
    "ACROSS_NEWER_FIRST": "new",
    "ACROSS_OLDER_FIRST": "new",
    "ACROSS_TIE": "second file",
}


def cdp(stack: Stack, *args: str, code: int = 0) -> str:
    result = CliRunner().invoke(app, ["--data-dir", str(stack.data_dir), *args], catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result.output


def write_csv(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["crm_id", "city", "updated_at"])
    writer.writerows(rows)
    path.write_text(out.getvalue())
    return path


def city_of(stack: Stack, crm_id: str) -> tuple[Any, str]:
    profile = json.loads(cdp(stack, "profile", "get", f"crm_id:{crm_id}", "--json"))
    city = next(a for a in profile["attributes"] if a["name"] == "city")
    return city["value"], city["updated_at"]


def test_record_time_decides_between_two_crm_rows_and_events_publish_counts_dead_letters(
    stack: Stack, client: Client, tmp_path: Path
) -> None:
    for name, body in (("crm", CRM), ("web", WEB)):
        (tmp_path / f"{name}.json").write_text(json.dumps(body))
        assert "registered" in cdp(stack, "schema", "create", str(tmp_path / f"{name}.json"))
    cdp(stack, "dataset", "create", "crm", "--schema", "crm_timed")
    cdp(stack, "dataset", "create", "web", "--schema", "web_publish")
    # Registered again as they are: the same version, nothing new on the config log.
    assert "crm_timed v1" in cdp(stack, "schema", "create", str(tmp_path / "crm.json"))

    cdp(stack, "ingest", str(write_csv(tmp_path / "crm1.csv", FIRST)), "--dataset", "crm", "--wait")
    cdp(stack, "ingest", str(write_csv(tmp_path / "crm2.csv", SECOND)), "--dataset", "crm", "--wait")
    found = {crm_id: city_of(stack, crm_id) for crm_id in EXPECTED}
    assert {crm_id: city for crm_id, (city, _) in found.items()} == EXPECTED
    assert found["ACROSS_OLDER_FIRST"][1].startswith("2025-01-01T00:00:00")  # the record's time, not the batch's

    lines = [
        json.dumps({"event_id": "e1", "ts": T1, "type": "page_view", "cookie_id": "ck-1"}),
        "{not json",
        json.dumps({"event_id": "e2", "ts": T1, "type": "order", "cookie_id": "ck-1", "amount": "twelve"}),
        "",
        json.dumps([1, 2]),
        json.dumps({"event_id": "e3", "ts": "yesterday", "type": "page_view", "cookie_id": "ck-2"}),
        json.dumps({"event_id": "e4", "ts": T2, "type": "order", "cookie_id": "ck-2", "amount": 12.5}),
    ]
    events = tmp_path / "events.jsonl"
    events.write_text("\n".join(lines) + "\n")
    report = json.loads(cdp(stack, "events", "publish", str(events), "--dataset", "web", "--json"))
    assert report["published"] == 4
    assert report["bad_lines"] == 2
    assert [(b["line"], b["reason"].split(" (")[0]) for b in report["bad"]] == [
        (2, "not JSON"),
        (5, "not a JSON object"),
    ]
    assert report["dead_lettered"] == 2
    assert sorted(report["dead_letter_reasons"]) == [
        "amount: type: expected a number",
        "ts: type: expected an ISO 8601 timestamp",
    ]
    collected = read_log(stack, "CDP_COLLECT", "cdp.collect.web")
    assert [m.headers.get("Nats-Msg-Id") for m in collected] == ["web:e1", "web:e2", "web:e3", "web:e4"]
    assert len(dead_letters(client, "ingest", "ingest-collect")) == 2

    # The same file again: JetStream already holds every message id, and nothing new is dead-lettered.
    again = json.loads(cdp(stack, "events", "publish", str(events), "--dataset", "web", "--json"))
    assert (again["published"], again["duplicates"], again["dead_lettered"]) == (0, 4, 0)

    refused = cdp(stack, "events", "publish", str(events), "--dataset", "crm", code=1)
    assert "holds profile records" in refused
