"""Against the running stack: what activation sends agrees with segmentation's merged profile.

Two CRM rows for a person (older city first, newer second; two rows with the same time; newer
first), and a loyalty dataset holding other values of the same attributes. Under
``dataset_precedence`` (loyalty first) and under ``timestamp``, and after each change of the
merge policy, a file_export plan receives exactly the attribute values segmentation's GetProfile
shows, and activation's consent gate reads the same ``consent_email_marketing`` value.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, struct_pb2
from typer.testing import CliRunner

from cdp.activation.v1 import activation_pb2 as act
from cdp.common.v1 import envelope_pb2 as common
from cdp.segmentation.v1 import segmentation_pb2 as seg
from cdp_cli.app import app
from cdp_cli.client import Client
from cdp_cli.skeleton import retrying
from cdp_cli.stack import Stack
from tests.e2e.chain import wait_drained, wait_for

pytestmark = pytest.mark.e2e

TIMEOUT_S = 90.0
CONSENT = "consent_email_marketing"
ATTRIBUTES = ["city", "tier", CONSENT]
T0, T1, T2 = "2023-06-01T00:00:00Z", "2024-01-01T00:00:00Z", "2024-06-01T00:00:00Z"


def schema(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "schema_class": "SCHEMA_CLASS_PROFILE",
        "timestamp_field": "updated_at",
        "fields": [
            {"name": "crm_id", "type": "FIELD_TYPE_STRING", "identity_namespace": "crm_id", "required": True},
            {"name": "city", "type": "FIELD_TYPE_STRING"},
            {"name": "tier", "type": "FIELD_TYPE_STRING"},
            {"name": CONSENT, "type": "FIELD_TYPE_STRING"},
            {"name": "updated_at", "type": "FIELD_TYPE_TIMESTAMP"},
        ],
    }


# (crm_id, city, tier, consent, updated_at), in file order.
CRM = [
    ("OLDER_FIRST", "old city", "silver", "y", T1),
    ("OLDER_FIRST", "new city", "silver", "y", T2),
    ("TIE", "first row", "bronze", "y", T1),
    ("TIE", "second row", "silver", "y", T1),
    ("NEWER_FIRST", "new city", "silver", "y", T2),
    ("NEWER_FIRST", "old city", "bronze", "y", T1),
    ("CONSENT", "crm city", "silver", "n", T2),
]
LOYALTY = [
    ("OLDER_FIRST", "loyalty city", "gold", "y", T0),
    ("TIE", "loyalty city", "platinum", "y", T0),
    ("CONSENT", "loyalty city", "gold", "y", T1),
]
# What each policy must show (by hand, not the project's code): city, tier, consent.
TIMESTAMP = {
    "OLDER_FIRST": ("new city", "silver", "y"),
    "TIE": ("second row", "silver", "y"),
    "NEWER_FIRST": ("new city", "silver", "y"),
    "CONSENT": ("crm city", "silver", "n"),
}
LOYALTY_FIRST = {
    "OLDER_FIRST": ("loyalty city", "gold", "y"),
    "TIE": ("loyalty city", "platinum", "y"),
    "NEWER_FIRST": ("new city", "silver", "y"),
    "CONSENT": ("loyalty city", "gold", "y"),
}
PRECEDENCE = seg.MergePolicy(kind=seg.MERGE_POLICY_KIND_DATASET_PRECEDENCE, datasets=["loyalty", "crm"])
NEWEST = seg.MergePolicy(kind=seg.MERGE_POLICY_KIND_TIMESTAMP)


def cdp(stack: Stack, *args: str) -> str:
    result = CliRunner().invoke(app, ["--data-dir", str(stack.data_dir), *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def write_csv(path: Path, rows: Sequence[tuple[str, ...]]) -> Path:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["crm_id", "city", "tier", CONSENT, "updated_at"])
    writer.writerows(rows)
    path.write_text(out.getvalue())
    return path


def shown(client: Client) -> dict[str, tuple[str, dict[str, Any]]]:
    """Segmentation's GetProfile of each person: (profile id, the plan's attributes)."""
    out: dict[str, tuple[str, dict[str, Any]]] = {}
    for crm_id in TIMESTAMP:
        request = seg.GetProfileRequest(identity=common.IdentityValue(namespace="crm_id", value=crm_id))
        profile = retrying(partial(client.segmentation.GetProfile, request))
        values = {a.name: json_format.MessageToDict(a.value) for a in profile.attributes}
        out[crm_id] = (profile.profile_id, {a: values.get(a) for a in ATTRIBUTES})
    return out


def exported(stack: Stack, folder: str, rows: int) -> dict[str, dict[str, Any]] | None:
    """The plan's file (profile id -> attributes) once it holds ``rows`` people."""
    path = stack.data_dir / "exports" / folder / "known.csv"
    if not path.exists():
        return None
    found = list(csv.DictReader(path.open(newline="")))
    if len(found) != rows:
        return None
    return {r["profile_id"]: {a: r[a] for a in ATTRIBUTES} for r in found}


def _activate(client: Client, request: act.ActivateRequest) -> bool | None:
    try:
        client.activation.Activate(request)
    except grpc.RpcError as err:
        if isinstance(err, grpc.Call) and err.code() == grpc.StatusCode.NOT_FOUND:
            return None  # activation has not read the segment yet
        raise
    return True


def send_to_new_file(stack: Stack, client: Client, folder: str) -> dict[str, dict[str, Any]]:
    """A new file_export plan of the segment: its first snapshot is what activation holds now."""
    config = struct_pb2.Struct()
    config.update({"folder": folder, "format": "csv"})
    destination = act.Destination(
        name=folder, connector="file_export", config=config, marketing_action="email_marketing"
    )
    retrying(lambda: client.activation.CreateDestination(act.CreateDestinationRequest(destination=destination)))
    request = act.ActivateRequest(
        destination=folder, segment="known", identities=["crm_id"], attributes=ATTRIBUTES, schedule="streaming"
    )
    wait_for("activation to know the segment", partial(_activate, client, request), TIMEOUT_S)
    consenting = sum(1 for _, attrs in shown(client).values() if attrs[CONSENT] == "y")
    return wait_for(f"the {folder} export", partial(exported, stack, folder, consenting), TIMEOUT_S)


def check(stack: Stack, client: Client, folder: str, expected: dict[str, tuple[str, str, str]]) -> None:
    profiles = shown(client)
    assert {c: tuple(attrs[a] for a in ATTRIBUTES) for c, (_, attrs) in profiles.items()} == expected
    file = send_to_new_file(stack, client, folder)
    # Exactly GetProfile's values, for exactly the people whose consent (as GetProfile shows it) is "y".
    assert file == {pid: attrs for pid, attrs in profiles.values() if attrs[CONSENT] == "y"}


def set_policy(stack: Stack, client: Client, policy: seg.MergePolicy) -> None:
    retrying(partial(client.segmentation.SetMergePolicy, seg.SetMergePolicyRequest(policy=policy)))
    wait_drained(client, stack, TIMEOUT_S)  # activation has read the policy too


def test_file_export_receives_what_get_profile_shows_under_each_merge_policy(
    stack: Stack, client: Client, tmp_path: Path
) -> None:
    for name in ("crm", "loyalty"):
        (tmp_path / f"{name}.json").write_text(json.dumps(schema(f"{name}_profile")))
        cdp(stack, "schema", "create", str(tmp_path / f"{name}.json"))
        cdp(stack, "dataset", "create", name, "--schema", f"{name}_profile")
    set_policy(stack, client, PRECEDENCE)  # before any record: activation folds fragments under it
    cdp(stack, "ingest", str(write_csv(tmp_path / "crm.csv", CRM)), "--dataset", "crm", "--wait")
    cdp(stack, "ingest", str(write_csv(tmp_path / "loyalty.csv", LOYALTY)), "--dataset", "loyalty", "--wait")
    cdp(stack, "segment", "create", "known", "has crm_id")
    wait_drained(client, stack, TIMEOUT_S)
    check(stack, client, "loyalty_first", LOYALTY_FIRST)

    set_policy(stack, client, NEWEST)  # every profile resolved again, in both services
    check(stack, client, "newest", TIMESTAMP)

    set_policy(stack, client, PRECEDENCE)
    check(stack, client, "loyalty_first_again", LOYALTY_FIRST)
