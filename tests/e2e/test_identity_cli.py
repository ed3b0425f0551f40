"""``cdp identity …`` against the real stack: the CLI talks gRPC to the identity service running as a
subprocess, after records went through ingest and identity over JetStream."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format
from typer.testing import CliRunner

from cdp.ingest.v1 import ingest_pb2 as ing
from cdp_cli.app import app
from cdp_cli.client import Client
from cdp_cli.skeleton import CRM_SCHEMA, WEB_SCHEMA
from cdp_cli.stack import Stack

pytestmark = pytest.mark.e2e
CRM_ROWS = b"crm_id,email,first_name\nC1,Ann@Example.com ,Ann\nC2,bob@example.com,Bob\nC3,null,Nobody\n"
WEB_EVENTS: list[dict[str, Any]] = [
    {"event_id": "pv-1", "ts": "2026-11-01T09:00:00Z", "type": "page_view", "cookie_id": "ck-1", "page": "/"},
    {"event_id": "pv-2", "ts": "2026-11-01T09:01:00Z", "type": "page_view", "cookie_id": "ck-1", "page": "/shoes"},
    {
        "event_id": "login-1",
        "ts": "2026-11-01T09:02:00Z",
        "type": "login",
        "cookie_id": "ck-1",
        "email": "ann@example.com",
    },
]


def cdp(data_dir: Path, *args: str) -> Any:
    """Run ``cdp --data-dir DIR ARGS --json``; the parsed JSON answer."""
    result = CliRunner().invoke(app, ["--data-dir", str(data_dir), *args, "--json"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def cdp_fails(data_dir: Path, *args: str, code: int = 1) -> str:
    result = CliRunner().invoke(app, ["--data-dir", str(data_dir), *args], env={"COLUMNS": "200"})
    assert result.exit_code == code, result.output
    return " ".join(result.output.split())


def eventually(check: Callable[[], Any], what: str, timeout_s: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            got = check()
            if got:
                return got
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def ingest(client: Client) -> None:
    for schema, dataset in ((CRM_SCHEMA, "crm"), (WEB_SCHEMA, "web")):
        client.ingest.CreateSchema(ing.CreateSchemaRequest(schema=json_format.ParseDict(schema, ing.Schema())))
        client.ingest.CreateDataset(
            ing.CreateDatasetRequest(
                dataset=ing.Dataset(name=dataset, schema_name=str(schema["name"]), profile_enabled=True)
            )
        )
    header = ing.IngestFileHeader(dataset="crm", batch_key="crm-1", format=ing.FILE_FORMAT_CSV, file_name="crm.csv")
    report = client.ingest.IngestFile(iter([ing.IngestFileChunk(header=header), ing.IngestFileChunk(data=CRM_ROWS)]))
    assert report.rows_accepted == 3
    request = ing.PublishEventsRequest(dataset="web")
    for event in WEB_EVENTS:
        request.events.add().update(event)
    published = client.ingest.PublishEvents(request)
    assert [r.status for r in published.results] == [ing.EVENT_STATUS_ACCEPTED] * len(WEB_EVENTS)


def identities(reply: dict[str, Any]) -> set[str]:
    return {f"{i['namespace']}:{i['value']}" for i in reply["identities"]}


def test_the_identity_cli_manages_namespaces_shows_graphs_and_unlinks(stack: Stack, client: Client) -> None:
    data = stack.data_dir
    created = cdp(data, "identity", "namespace", "create", "member_no", "--type", "cross_device", "--unique")
    assert (created["name"], created["type"], created["unique"]) == ("member_no", "NAMESPACE_TYPE_CROSS_DEVICE", True)
    listed = {n["name"]: n for n in cdp(data, "identity", "namespace", "list")["namespaces"]}
    assert {"crm_id", "email", "cookie", "member_no"} <= set(listed)
    assert listed["member_no"]["priority"] == 100
    assert not listed["member_no"]["standard"]
    assert "exists" in cdp_fails(data, "identity", "namespace", "create", "member_no")
    # a type that does not exist is a usage error (exit 2), listing the types, before any call
    refused = cdp_fails(data, "identity", "namespace", "create", "x_no", "--type", "planet", code=2)
    assert "--type" in refused
    assert "cross_device" in refused

    ingest(client)
    # the login linked the cookie (and its two page views) to Ann's CRM profile
    ann = eventually(
        lambda: (
            cdp(data, "identity", "resolve", "cookie:ck-1")
            if "crm_id:C1" in identities(cdp(data, "identity", "resolve", "cookie:ck-1"))
            else None
        ),
        "the login to link the cookie",
    )
    assert identities(ann) == {"crm_id:C1", "email:ann@example.com", "cookie:ck-1"}

    graph = cdp(data, "identity", "graph", "email:ANN@example.com")
    assert graph["profile_id"] == ann["profile_id"]
    assert graph["primary"] == {"namespace": "crm_id", "value": "C1"}
    nodes = {f"{n['identity']['namespace']}:{n['identity']['value']}": n for n in graph["nodes"]}
    assert (nodes["crm_id:C1"]["dataset"], nodes["crm_id:C1"]["batch_id"]) != ("", "")
    assert nodes["cookie:ck-1"]["first_seen"] == "2026-11-01T09:00:00Z"  # the first page view
    assert nodes["cookie:ck-1"]["last_seen"] == "2026-11-01T09:02:00Z"  # the login
    assert (nodes["cookie:ck-1"]["dataset"], nodes["cookie:ck-1"]["last_dataset"]) == ("web", "web")
    assert nodes["email:ann@example.com"]["dataset"] in ("crm", "web")
    links = {(x["a"]["value"], x["b"]["value"]): x for x in graph["links"]}
    assert set(links) == {("C1", "ann@example.com"), ("ck-1", "ann@example.com")}
    login_link = links[("ck-1", "ann@example.com")]
    assert (login_link["dataset"], login_link["first_seen"]) == ("web", "2026-11-01T09:02:00Z")
    assert links[("C1", "ann@example.com")]["dataset"] == "crm"

    stats = cdp(data, "identity", "stats")
    assert (int(stats["identities"]), int(stats["links"]), int(stats["profiles"])) == (6, 3, 3)
    assert {(d["namespace"], d["rule"], int(d["count"])) for d in stats["dropped"]} == {("email", "blocklist", 1)}

    unlinked = cdp(data, "identity", "unlink", "cookie:ck-1", "--from", "email:ann@example.com", "--reason", "shared")
    assert unlinked["changed"]
    assert unlinked["decision"]["rule"] == "unlink_link"
    parts = {p["founder"]["value"]: p for p in unlinked["split"]["parts"]}
    assert set(parts) == {"ck-1", "C1"}
    assert len(parts["ck-1"]["fragment_ids"]) == 2  # the two page views stay with the cookie
    cookie = cdp(data, "identity", "resolve", "cookie:ck-1")
    person = cdp(data, "identity", "resolve", "crm_id:C1")
    assert cookie["profile_id"] != person["profile_id"]
    assert identities(cookie) == {"cookie:ck-1"}
    assert identities(person) == {"crm_id:C1", "email:ann@example.com"}
    assert {cookie["profile_id"], person["profile_id"]} == {p["profile_id"] for p in parts.values()}
    decisions = cdp(data, "identity", "graph", "cookie:ck-1")["decisions"]
    assert [(d["rule"], d["effect"]) for d in decisions] == [("unlink_link", "removed")]
    again = cdp(data, "identity", "unlink", "cookie:ck-1", "--from", "email:ann@example.com")
    assert not again["changed"]

    assert "NOT_FOUND" in cdp_fails(data, "identity", "graph", "email:nobody@example.com")
    assert "not an identity" in cdp_fails(data, "identity", "unlink", "ck-1")
    assert "INVALID_ARGUMENT" in cdp_fails(data, "identity", "resolve", "email:null")
