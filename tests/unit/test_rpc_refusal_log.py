"""A refused call is logged with its reason, bounded: a refusal may quote what the caller sent."""

from __future__ import annotations

import structlog

from cdp_kit.errors import NotFound
from cdp_kit.grpc_server import LOGGED_ERROR_CHARS, _status_of


def test_a_refusal_quoting_a_huge_name_is_logged_bounded_and_answered_bounded() -> None:
    name = "seg" + "x" * 100_000
    with structlog.testing.capture_logs() as logs:
        code, details = _status_of(NotFound(f"segment {name!r} not found"), "/cdp.segmentation.v1.X/ListMembers")
    [line] = [entry for entry in logs if entry["event"] == "rpc_refused"]
    assert len(line["error"]) <= LOGGED_ERROR_CHARS + 3
    assert code.name == "NOT_FOUND"
    assert len(details) < 10_000
