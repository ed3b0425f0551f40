"""Segmentation through the `cdp` CLI against the running stack, with the segmentation service
SIGKILLed while identity's fragments stream in: windowed and sequence memberships end as a run
without the crash would (known by construction of the demo data), and the streamed memberships
equal what SQL over the same store says."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest
from typer.testing import CliRunner

from cdp_cli.app import app
from cdp_cli.client import Client
from cdp_cli.skeleton import DemoData, lag, run_flow, wait_settled
from cdp_cli.stack import Stack

pytestmark = pytest.mark.e2e
# Every other demo person views two pages then logs in a minute later; anonymous cookies view one page.
SEGMENTS = {
    "browsed_then_login": "page_view followed by login within 1h",
    "anonymous_bounce": "page_view not followed by login within 1h",
    "two_views": "count(page_view) >= 2 within 3650d",
    "last_saw_shoes": 'last_page = "/shoes" and views >= 2',  # over computed attributes
}
COMPUTED = {"views": "count(page_view)", "last_page": "most_recent(page_view.page)"}


def cdp(stack: Stack, *args: str) -> Any:
    result = CliRunner().invoke(app, ["--data-dir", str(stack.data_dir), *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def cdp_json(stack: Stack, *args: str) -> Any:
    return json.loads(cdp(stack, *args, "--json"))


def expected_sizes(data: DemoData) -> dict[str, int]:
    browsers = len(range(1, data.people + 1, 2))
    return {
        "browsed_then_login": browsers,
        "anonymous_bounce": data.anonymous_cookies,
        "two_views": browsers,
        "last_saw_shoes": browsers,
    }


def wait_for(stack: Stack, client: Client, expected: dict[str, int], timeout_s: float = 120) -> dict[str, int]:
    deadline = time.monotonic() + timeout_s
    sizes: dict[str, int] = {}
    while time.monotonic() < deadline:
        if lag(client) == 0:
            sizes = {name: len(cdp_json(stack, "segment", "members", name)["profile_ids"]) for name in SEGMENTS}
            if sizes == expected:
                return sizes
        time.sleep(0.5)
    return sizes


def test_cli_explain_evaluate_and_profile_get_with_a_segmentation_crash_mid_stream(
    stack: Stack, client: Client, demo_data: DemoData
) -> None:
    explained = cdp_json(stack, "segment", "explain", SEGMENTS["anonymous_bounce"])
    assert explained["evaluation"] == "EVALUATION_STREAMING"
    assert "event:page_view" in explained["reads"]
    assert "events login, page_view" in explained["evaluation_reason"]
    text = cdp(stack, "segment", "explain", "count(order) >= 2", "--schedule", "0 3 * * *")
    assert "evaluation: batch" in text
    for name, function in COMPUTED.items():
        assert f"computed attribute {name} = {function} created" in cdp(stack, "computed", "create", name, function)
    assert [a["name"] for a in cdp_json(stack, "computed", "list")["attributes"]] == ["last_page", "views"]
    for name, query in SEGMENTS.items():
        assert f"segment {name} created" in cdp(stack, "segment", "create", name, query)

    killer = threading.Timer(1.5, stack.kill, args=("segmentation",))
    killer.start()
    try:
        run_flow(client, demo_data)
    finally:
        killer.join()
    wait_settled(client, stack.data_dir / "exports", demo_data, timeout_s=120)
    assert stack.restarts["segmentation"] >= 1

    assert wait_for(stack, client, expected_sizes(demo_data)) == expected_sizes(demo_data)
    for name, query in SEGMENTS.items():  # streaming memberships == SQL over the same store
        assert int(cdp_json(stack, "segment", "explain", query)["estimated_size"]) == expected_sizes(demo_data)[name]

    evaluated = cdp(stack, "segment", "evaluate", "two_views")
    assert f"{demo_data.people + demo_data.anonymous_cookies} profiles, +0 realized, -0 exited" in evaluated

    person = cdp_json(stack, "profile", "get", "email:Person.1@example.com")
    assert {"namespace": "email", "value": "person.1@example.com"} in person["identities"]
    assert {"browsed_then_login", "two_views"} <= set(person["segments"])
    assert {e["event_type"] for e in person["recent_events"]} == {"page_view", "login"}
    assert any(a["name"] == "loyalty_tier" and a["source_dataset"] == "crm" for a in person["attributes"])
    assert {c["name"]: c["value"] for c in person["computed"]} == {"last_page": "/shoes", "views": 2.0}
    assert "last_saw_shoes" in person["segments"]
    text = cdp(stack, "profile", "get", "email:person.1@example.com")
    assert "most_recent(page_view.page)" in text
