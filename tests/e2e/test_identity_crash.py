"""kill -9 identity in the middle of a stream that trips every guardrail (a device shared by two
CRM ids, graphs over a small size limit, junk values) around operator unlinks: after the restarts
the graph equals the one of a run without crashes (same profiles, decisions, splits and counts)."""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format

from cdp.common.v1 import admin_pb2
from cdp.common.v1.envelope_pb2 import IdentityValue
from cdp.identity.v1 import identity_pb2 as pb
from cdp.ingest.v1 import ingest_pb2 as ing
from cdp_cli.client import Client
from cdp_cli.skeleton import retrying
from cdp_cli.stack import Stack

pytestmark = pytest.mark.e2e
ENV = {"CDP_MAX_IDENTITIES": "5", "CDP_BATCH_SIZE": "2"}
PER_REQUEST = 3
APP_SCHEMA = {
    "name": "app_event",
    "schema_class": "SCHEMA_CLASS_EVENT",
    "event_id_field": "event_id",
    "timestamp_field": "ts",
    "event_type_field": "type",
    "fields": [
        {"name": "event_id", "type": "FIELD_TYPE_STRING", "required": True},
        {"name": "ts", "type": "FIELD_TYPE_TIMESTAMP", "required": True},
        {"name": "type", "type": "FIELD_TYPE_STRING"},
        {"name": "cookie_id", "type": "FIELD_TYPE_STRING", "identity_namespace": "cookie", "required": True},
        {"name": "crm_id", "type": "FIELD_TYPE_STRING", "identity_namespace": "crm_id"},
        {"name": "email", "type": "FIELD_TYPE_STRING", "identity_namespace": "email"},
        {"name": "idfa", "type": "FIELD_TYPE_STRING", "identity_namespace": "idfa"},
    ],
}
UNLINKS = [(("cookie", "ck-5"), ("email", "p5@example.com")), (("idfa", "dev-shared"), None)]


def events(people: range, start_minute: int) -> list[dict[str, Any]]:
    """Page views, then a login naming cookie, email and CRM id; a shared device; a person with many cookies."""
    out: list[dict[str, Any]] = []

    def add(kind: str, **ids: str) -> None:
        minute = start_minute + len(out)
        ts = f"2026-11-01T{minute // 60:02d}:{minute % 60:02d}:00Z"
        out.append({"event_id": f"{kind}-{start_minute}-{len(out)}", "ts": ts, "type": kind, **ids})

    for i in people:
        add("page_view", cookie_id=f"ck-{i}")
        add("page_view", cookie_id=f"ck-{i}")
        add("login", cookie_id=f"ck-{i}", email=f"p{i}@example.com", crm_id=f"C{i}")
        add(
            "app_open", cookie_id=f"ck-app-{i}", crm_id=f"C{i}", idfa="dev-shared"
        )  # the first CRM id keeps it; the others are refused
        add("login", cookie_id=f"ck-3-{i}", email="p3@example.com")  # person 3 outgrows the size limit
        add("login", cookie_id=f"ck-junk-{i}", email="test@test.com")  # junk never links
    add("login", cookie_id="ck-5", email="p5@example.com")  # after the unlink: stays unlinked
    return out


def all_identities(people: range) -> list[tuple[str, str]]:
    out = [("idfa", "dev-shared")]
    for i in people:
        out += [("cookie", f"ck-{i}"), ("email", f"p{i}@example.com"), ("crm_id", f"C{i}")]
        out += [("cookie", f"ck-app-{i}"), ("cookie", f"ck-3-{i}"), ("cookie", f"ck-junk-{i}")]
    return out


def setup(client: Client) -> None:
    schema = json_format.ParseDict(APP_SCHEMA, ing.Schema())
    retrying(partial(client.ingest.CreateSchema, ing.CreateSchemaRequest(schema=schema)))
    dataset = ing.Dataset(name="app", schema_name="app_event", profile_enabled=True)
    retrying(partial(client.ingest.CreateDataset, ing.CreateDatasetRequest(dataset=dataset)))


def publish(client: Client, stream: list[dict[str, Any]], *, midway: Callable[[], None] | None = None) -> None:
    for start in range(0, len(stream), PER_REQUEST):
        if midway is not None and start >= len(stream) // 2:
            midway()
            midway = None
        request = ing.PublishEventsRequest(dataset="app")
        for event in stream[start : start + PER_REQUEST]:
            request.events.add().update(event)
        reply = retrying(partial(client.ingest.PublishEvents, request))
        assert all(r.status == ing.EVENT_STATUS_ACCEPTED for r in reply.results), reply


def caught_up(client: Client, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = retrying(lambda: client.admin("identity").GetStatus(admin_pb2.GetStatusRequest()))
        if status.ready and status.consumers and all(c.lag == 0 and not c.error for c in status.consumers):
            return
        time.sleep(0.2)
    raise AssertionError("identity did not catch up with ingest")


def unlink(client: Client) -> None:
    for (ns, value), other in UNLINKS:
        request = pb.UnlinkRequest(identity=IdentityValue(namespace=ns, value=value), reason="crash test")
        if other is not None:
            request.other.CopyFrom(IdentityValue(namespace=other[0], value=other[1]))
        assert retrying(partial(client.identity.Unlink, request)).changed


def graph_of(client: Client, people: range) -> dict[str, Any]:
    """What identity answers: the partition into profiles, every decision, the counts."""
    profiles: set[frozenset[str]] = set()
    decisions: set[tuple[Any, ...]] = set()
    seen: dict[str, tuple[str, str]] = {}
    unknown: list[str] = []
    for ns, value in all_identities(people):
        request = pb.GetGraphRequest(identity=IdentityValue(namespace=ns, value=value))
        try:
            graph = retrying(partial(client.identity.GetGraph, request))
        except grpc.RpcError as err:
            if not isinstance(err, grpc.Call) or err.code() != grpc.StatusCode.NOT_FOUND:
                raise
            unknown.append(f"{ns}:{value}")
            continue
        profiles.add(frozenset(f"{n.identity.namespace}:{n.identity.value}" for n in graph.nodes))
        for n in graph.nodes:
            seen[f"{n.identity.namespace}:{n.identity.value}"] = (
                n.first_seen.ToJsonString(),
                n.last_seen.ToJsonString(),
            )
        for d in graph.decisions:
            links = tuple(sorted((x.a.value, x.b.value) for x in d.links))
            source = "" if d.rule.startswith("unlink_") else d.source_event_id  # a command's id names its time
            decisions.add((d.rule, d.effect, d.identity.value, source, links))
    stats = retrying(lambda: client.identity.GetStats(pb.GetStatsRequest()))
    return {
        "profiles": profiles,
        "decisions": decisions,
        "seen": seen,
        "unknown": unknown,
        "stats": (stats.identities, stats.links, stats.profiles, stats.fragments, dict(stats.decisions)),
        "dropped": sorted((d.namespace, d.rule, d.count) for d in stats.dropped),
    }


def run(data_dir: Path, *, crash: bool) -> tuple[dict[str, Any], int]:
    first, second = range(1, 9), range(9, 17)
    with (
        Stack(data_dir, ["ingest", "identity"], env=ENV) as stack,
        Client(stack.data_dir, addresses=stack.addresses) as client,
    ):
        setup(client)

        def kill() -> None:
            stack.kill("identity")  # SIGKILL; the supervisor restarts it
            stack.wait_serving("identity")

        publish(client, events(first, 0), midway=kill if crash else None)
        caught_up(client)
        unlink(client)
        publish(client, events(second, 600), midway=kill if crash else None)
        if crash:
            kill()  # while it works through what was published during the restart
        caught_up(client)
        return graph_of(client, range(1, 17)), stack.restarts["identity"]


@pytest.fixture(scope="module")
def no_crash(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    graph, restarts = run(tmp_path_factory.mktemp("no-crash") / "cdp", crash=False)
    assert restarts == 0
    return graph


def test_killing_identity_mid_stream_with_guardrails_and_unlinks_changes_nothing(
    tmp_path: Path, no_crash: dict[str, Any]
) -> None:
    rules = {d[0] for d in no_crash["decisions"]}
    assert {"unique_namespace", "max_identities", "unlink_link", "unlink_identity", "unlinked"} <= rules
    assert ("email", "blocklist", 16) in no_crash["dropped"]
    crashed, restarts = run(tmp_path / "cdp", crash=True)
    assert restarts == 3
    assert crashed == no_crash
