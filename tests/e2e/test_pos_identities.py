"""Several identities per row, one shared normaliser, profile lookups: through the `cdp` CLI
against the running stack (nats-server and the four services as processes).

A point-of-sale orders file whose rows carry a loyalty id, a CRM id, both, or neither (guest
checkouts) is one dataset: guest rows are rejected with rule `identity` by default, and kept
(linked to no one, counted by identity) on a dataset that allows anonymous rows. A phone typed
as "(201) 555-0142" finds the profile identity linked as +12015550142. `cdp profile get` takes
the profile id `segment members --json` lists. A NOT_FOUND answer names the namespace only.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from typer.testing import CliRunner

from cdp.common.v1.envelope_pb2 import IdentityValue
from cdp.identity.v1 import identity_pb2
from cdp.segmentation.v1 import segmentation_pb2
from cdp_cli.app import app
from cdp_cli.client import Client
from cdp_cli.skeleton import lag
from cdp_cli.stack import Stack

pytestmark = pytest.mark.e2e

CRM = {
    "name": "crm_person",
    "schema_class": "SCHEMA_CLASS_PROFILE",
    "fields": [
        {"name": "crm_id", "type": "FIELD_TYPE_STRING", "identity_namespace": "crm_id"},
        {"name": "email", "type": "FIELD_TYPE_STRING", "identity_namespace": "email"},
        {"name": "phone", "type": "FIELD_TYPE_STRING", "identity_namespace": "phone"},
        {"name": "tier", "type": "FIELD_TYPE_STRING"},
    ],
}
POS = {
    "name": "pos_order",
    "schema_class": "SCHEMA_CLASS_EVENT",
    "event_id_field": "order_id",
    "timestamp_field": "ts",
    "event_type_field": "type",
    "fields": [
        {"name": "order_id", "type": "FIELD_TYPE_STRING", "required": True},
        {"name": "ts", "type": "FIELD_TYPE_TIMESTAMP", "required": True},
        {"name": "type", "type": "FIELD_TYPE_STRING"},
        {"name": "loyalty_id", "type": "FIELD_TYPE_STRING", "identity_namespace": "loyalty_id"},
        {"name": "crm_id", "type": "FIELD_TYPE_STRING", "identity_namespace": "crm_id"},
        {"name": "store_card", "type": "FIELD_TYPE_STRING", "identity_namespace": "store_card"},
        {"name": "amount", "type": "FIELD_TYPE_NUMBER"},
    ],
}
CRM_CSV = "crm_id,email,phone,tier\nC1,ann@example.com,(201) 555-0142,gold\nC2,bob@example.com,,silver\n"
# Orders keyed by either id: L1 is Ann's loyalty card (the row with both links it to C1), L2 is
# someone the CRM does not know, two guest checkouts carry no id, one carries a junk CRM id.
ORDERS: list[dict[str, Any]] = [
    {"order_id": "o1", "loyalty_id": "L1", "amount": 10.0},
    {"order_id": "o2", "crm_id": "C1", "amount": 20.0},
    {"order_id": "o3", "loyalty_id": "L1", "crm_id": "C1", "amount": 30.0},
    {"order_id": "o4", "loyalty_id": "L2", "amount": 40.0},
    {"order_id": "o5", "crm_id": "C2", "amount": 50.0},
    {"order_id": "o6", "amount": 5.0},
    {"order_id": "o7", "loyalty_id": "", "crm_id": "", "amount": 6.0},
    {"order_id": "o8", "crm_id": "NULL", "amount": 7.0},
]


def cdp(stack: Stack, *args: str, code: int = 0) -> str:
    result = CliRunner().invoke(app, ["--data-dir", str(stack.data_dir), *args], catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result.output


def cdp_json(stack: Stack, *args: str) -> Any:
    return json.loads(cdp(stack, *args, "--json"))


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def orders_file(tmp_path: Path, name: str, prefix: str) -> str:
    rows = [
        {**o, "order_id": prefix + str(o["order_id"]), "ts": "2026-03-01T10:00:00Z", "type": "order"} for o in ORDERS
    ]
    return write(tmp_path / name, "".join(json.dumps(r) + "\n" for r in rows))


def settle(client: Client, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while lag(client) != 0:
        assert time.monotonic() < deadline, "the services did not catch up"
        time.sleep(0.2)


def test_orders_keyed_by_either_id_guest_checkouts_and_lookups(stack: Stack, client: Client, tmp_path: Path) -> None:
    # An identity field of a namespace identity does not define is refused, naming it; once the
    # namespace is created the same schema registers at once (ingest waits to have read it).
    pos = write(tmp_path / "pos.json", json.dumps(POS))
    refused = cdp(stack, "schema", "create", pos, code=1)
    assert "store_card" in refused
    assert "not defined" in refused
    cdp(stack, "identity", "namespace", "create", "store_card", "--type", "custom")
    assert "schema pos_order v1 registered" in cdp(stack, "schema", "create", pos)
    cdp(stack, "schema", "create", write(tmp_path / "crm.json", json.dumps(CRM)))
    cdp(stack, "dataset", "create", "crm", "--schema", "crm_person", "--profile-enabled")
    cdp(stack, "dataset", "create", "pos", "--schema", "pos_order", "--profile-enabled")
    cdp(stack, "dataset", "create", "pos_open", "--schema", "pos_order", "--profile-enabled", "--allow-anonymous-rows")
    listed = {d["name"]: d for d in cdp_json(stack, "dataset", "list")["datasets"]}
    assert listed["pos_open"].get("allow_anonymous_rows") is True
    assert not listed["pos"].get("allow_anonymous_rows")

    crm = write(tmp_path / "crm.csv", CRM_CSV)
    assert int(cdp_json(stack, "ingest", crm, "--dataset", "crm")["rows_accepted"]) == 2

    # By default the two guest checkouts are rejected (rule identity, on each identity field);
    # the junk CRM id passes ingest. 2 of 8 is over the default threshold: the batch fails.
    failed = json.loads(
        cdp(stack, "ingest", orders_file(tmp_path, "o.jsonl", "a"), "--dataset", "pos", "--json", code=1)
    )
    assert failed["status"] == "BATCH_STATUS_FAILED"
    report = json.loads(
        cdp(
            stack,
            "ingest",
            orders_file(tmp_path, "o.jsonl", "a"),
            "--dataset",
            "pos",
            "--json",
            "--error-threshold",
            "0.3",
        )
    )
    assert (int(report["rows_accepted"]), int(report["rows_rejected"])) == (6, 2)
    groups = {(g["field"], g["rule"]): (int(g["count"]), [int(r) for r in g["first_rows"]]) for g in report["rejects"]}
    assert groups == {
        ("crm_id", "identity"): (2, [6, 7]),
        ("loyalty_id", "identity"): (2, [6, 7]),
        ("store_card", "identity"): (2, [6, 7]),
    }
    # With the setting, the same file is kept whole; its guest rows link to no one.
    kept = cdp_json(stack, "ingest", orders_file(tmp_path, "p.jsonl", "b"), "--dataset", "pos_open")
    assert (int(kept["rows_accepted"]), int(kept.get("rows_rejected", 0))) == (8, 0)
    settle(client)

    # One person: Ann's CRM row, her loyalty card and both orders files' rows keyed by either id.
    ann = cdp_json(stack, "profile", "get", "crm_id:C1")
    assert cdp_json(stack, "profile", "get", "loyalty_id:L1")["profile_id"] == ann["profile_id"]
    assert int(ann["events"]) == 6  # o1, o2, o3 from each of the two files
    assert {(i["namespace"], i["value"]) for i in ann["identities"]} >= {
        ("crm_id", "C1"),
        ("loyalty_id", "L1"),
        ("phone", "+12015550142"),
    }
    # The phone as typed finds her: every lookup normalises as identity does.
    for typed in ("phone:(201) 555-0142", "phone:+1 201-555-0142", "email:ANN@Example.com "):
        assert cdp_json(stack, "profile", "get", typed)["profile_id"] == ann["profile_id"]
    resolved = client.identity.Resolve(
        identity_pb2.ResolveRequest(identity=IdentityValue(namespace="phone", value="(201) 555-0142")), timeout=10
    )
    assert resolved.profile_id == ann["profile_id"]

    # Identity counts the records that linked no one: 2 guest rows of pos_open and the junk id
    # of each file (its value is dropped as blocklisted, so its record links no one either).
    stats = cdp_json(stack, "identity", "stats")
    drops = {(d["namespace"], d["rule"]): int(d["count"]) for d in stats["dropped"]}
    assert drops[("*", "no_identities")] == 4
    assert drops[("crm_id", "blocklist")] == 2

    # A profile id, as segment members --json lists it, is a key of profile get too.
    cdp(stack, "segment", "create", "gold", 'tier = "gold"')
    deadline = time.monotonic() + 60
    while not (members := cdp_json(stack, "segment", "members", "gold")["profile_ids"]):
        assert time.monotonic() < deadline, "the segment never filled"
        time.sleep(0.2)
    assert members == [ann["profile_id"]]
    assert cdp_json(stack, "profile", "get", members[0])["profile_id"] == ann["profile_id"]
    assert f"profile {ann['profile_id']}" in cdp(stack, "profile", "get", members[0])

    # Not found names the namespace, never the value or a hash of it; the CLI echoes what was typed.
    for request, namespace in (
        (
            segmentation_pb2.GetProfileRequest(identity=IdentityValue(namespace="phone", value="(201) 555-0199")),
            "phone",
        ),
        (
            segmentation_pb2.GetProfileRequest(identity=IdentityValue(namespace="email", value="zoe@example.com")),
            "email",
        ),
    ):
        with pytest.raises(grpc.RpcError) as err:
            client.segmentation.GetProfile(request, timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert err.value.details() == f"{namespace} not found"
    with pytest.raises(grpc.RpcError) as err:
        client.identity.Resolve(
            identity_pb2.ResolveRequest(identity=IdentityValue(namespace="email", value="zoe@example.com")), timeout=10
        )
    assert (err.value.code(), err.value.details()) == (grpc.StatusCode.NOT_FOUND, "email not found")
    missing = cdp(stack, "profile", "get", "email:zoe@example.com", code=1)
    assert "no profile for email:zoe@example.com" in missing
    assert "email not found" in missing
    assert "profile 'p-000000000000000000000000' not found" in cdp(
        stack, "profile", "get", "p-000000000000000000000000", code=1
    )
