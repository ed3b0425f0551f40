"""``cdp privacy delete`` through the running stack (services as subprocesses, secured NATS): the
person is erased from identity and segmentation, their raw collect messages are erased from
CDP_COLLECT with ingest's own NATS user, and the request completes.

The request completes once every applier named by ``SERVICE_LOGS`` applied it (ingest,
segmentation and activation); identity then destroys the person's keys."""

from __future__ import annotations

import json

import pytest

from cdp_cli.client import Client
from cdp_cli.stack import Stack
from cdp_kit.streams import COLLECT, collect_subject, privacy_appliers
from tests.e2e.chain import publish, read_log
from tests.e2e.test_identity_cli import cdp, cdp_fails, eventually, identities, ingest

pytestmark = pytest.mark.e2e


def web(event_id: str, cookie: str, **more: str) -> bytes:
    event = {"event_id": event_id, "ts": "2026-11-02T10:00:00Z", "type": "page_view", "cookie_id": cookie, **more}
    return json.dumps(event).encode()


def test_a_delete_erases_the_person_everywhere_and_completes(stack: Stack, client: Client) -> None:
    data = stack.data_dir
    ingest(client)
    publish(stack, collect_subject("web"), web("c-1", "ck-9", email="ann@example.com"))
    publish(stack, collect_subject("web"), web("c-2", "ck-9"))
    publish(stack, collect_subject("web"), web("c-3", "ck-bob", email="bob@example.com"))

    def linked() -> bool:
        return {"crm_id:C1", "cookie:ck-9", "cookie:ck-1"} <= identities(
            cdp(data, "identity", "resolve", "cookie:ck-9")
        )

    eventually(linked, "the collected events to link to Ann")
    eventually(lambda: cdp(data, "profile", "get", "email:ann@example.com"), "Ann's profile in segmentation")

    done = cdp(data, "privacy", "delete", "email:ANN@example.com", "--suppress", "--wait", "--wait-timeout", "60")
    assert done["state"] == "PRIVACY_STATE_COMPLETED"
    progress = {s["service"]: s for s in done["services"]}
    assert set(progress) == {"identity", *privacy_appliers()}
    assert all(s["applied"] for s in progress.values())
    assert int(progress["ingest"]["counts"]["collect_messages"]) == 2
    assert int(progress["identity"]["counts"]["graph_nodes"]) == 4  # crm_id, email, two cookies
    assert "ann@example.com" not in json.dumps(done)

    for identity in ("email:ann@example.com", "crm_id:C1", "cookie:ck-1", "cookie:ck-9"):
        assert "not found" in cdp_fails(data, "identity", "resolve", identity).lower()
        assert "not found" in cdp_fails(data, "profile", "get", identity).lower()
    assert identities(cdp(data, "identity", "resolve", "email:bob@example.com")) >= {"crm_id:C2"}

    # Ann's raw messages are gone from CDP_COLLECT (erased by ingest's NATS user); Bob's remain.
    raw = b"".join(m.data for m in read_log(stack, COLLECT.name, "cdp.collect.>"))
    assert b"ck-9" not in raw
    assert b"ann@example.com" not in raw
    assert b"ck-bob" in raw

    listed = cdp(data, "privacy", "list")["requests"]
    assert [r["request_id"] for r in listed] == [done["request_id"]]
    assert cdp(data, "privacy", "status", done["request_id"])["state"] == "PRIVACY_STATE_COMPLETED"
