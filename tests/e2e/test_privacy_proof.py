"""The privacy proof (issue "Privacy"), on the real stack: nats-server and the four services as
subprocesses, HTTP stand-ins for the platforms.

1. A person with an email, a phone, names, a loyalty record, orders and web events (published on
   cdp.collect) is activated to a file drop and to two platforms.
2. ``cdp privacy delete email:...``: within 60 s the profile is NOT_FOUND by every identity it had,
   it is in no audience, the platforms received removals, and the request is completed.
3. Every service rebuilt from the log equals its live store (so the person stays gone), and every
   other profile is as it was before the delete.
4. The raw bytes of the JetStream store, every SQLite file, every log and every export hold none
   of the person's email, phone digits or names (another person's email is found: the search reads
   real data).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa

from cdp.activation.v1 import activation_pb2 as act
from cdp.common.v1.envelope_pb2 import IdentityValue
from cdp.identity.v1 import identity_pb2 as idn
from cdp.ingest.v1 import ingest_pb2 as ing
from cdp.privacy.v1 import privacy_pb2 as prv
from cdp.privacy.v1 import privacy_pb2_grpc
from cdp.segmentation.v1 import segmentation_pb2 as seg
from cdp_cli.client import Client
from cdp_cli.platforms import local_platforms
from cdp_cli.skeleton import ACTIVATED_SEGMENT, DemoData, ensure_datasets, lag, retrying, run_flow, wait_settled
from cdp_cli.stack import Stack
from cdp_kit.store import canonical_dump, make_engine, sqlite_url, with_checkpoint
from tests.e2e.chain import publish, wait_for
from tests.e2e.natsconn import NatsTarget
from tests.e2e.test_skeleton import TABLES, rebuild

pytestmark = pytest.mark.e2e

CDP = str(Path(sys.executable).with_name("cdp"))
EMAIL = "Zed.Quill@Example.org"
PHONE = "+33 6 12 34 56 78"
NEEDLES = (b"zed.quill", b"612345678", b"12 34 56 78", b"zebedee", b"quillfeather")
CRM_ID, LOYALTY_ID, COOKIE = "C90001", "L90001", "ck-zed-90001"
IDENTITIES = [
    ("email", EMAIL),
    ("phone", PHONE),
    ("crm_id", CRM_ID),
    ("loyalty_id", LOYALTY_ID),
    ("cookie", COOKIE),
]
CONTACT_SCHEMA = {
    "name": "loyalty_contact",
    "schema_class": "SCHEMA_CLASS_PROFILE",
    "fields": [
        {"name": "loyalty_id", "type": "FIELD_TYPE_STRING", "required": True, "identity_namespace": "loyalty_id"},
        {"name": "email", "type": "FIELD_TYPE_STRING", "identity_namespace": "email"},
        {"name": "phone", "type": "FIELD_TYPE_STRING", "identity_namespace": "phone"},
        {"name": "last_name", "type": "FIELD_TYPE_STRING"},
        {"name": "points", "type": "FIELD_TYPE_INTEGER"},
    ],
}
ORDER_SCHEMA = {
    "name": "store_order_p",
    "schema_class": "SCHEMA_CLASS_EVENT",
    "event_id_field": "order_id",
    "timestamp_field": "ts",
    "event_type_field": "type",
    "fields": [
        {"name": "order_id", "type": "FIELD_TYPE_STRING", "required": True},
        {"name": "ts", "type": "FIELD_TYPE_TIMESTAMP", "required": True},
        {"name": "type", "type": "FIELD_TYPE_STRING"},
        {"name": "crm_id", "type": "FIELD_TYPE_STRING", "required": True, "identity_namespace": "crm_id"},
        {"name": "amount", "type": "FIELD_TYPE_NUMBER"},
    ],
}


def cdp(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CDP, "--data-dir", str(data_dir), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "COLUMNS": "200"},
    )


def ingest_csv(client: Client, dataset: str, batch_key: str, rows: list[list[str]]) -> ing.BatchReport:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    header = ing.IngestFileHeader(dataset=dataset, batch_key=batch_key, format=ing.FILE_FORMAT_CSV)

    def chunks() -> Iterator[ing.IngestFileChunk]:
        yield ing.IngestFileChunk(header=header)
        yield ing.IngestFileChunk(data=out.getvalue().encode())

    report: ing.BatchReport = retrying(lambda: client.ingest.IngestFile(chunks()))
    assert report.rows_accepted == len(rows) - 1, report
    return report


def add_the_person(client: Client, target: NatsTarget) -> None:
    ensure_datasets(client, {"loyalty_contact": CONTACT_SCHEMA, "orders_p": ORDER_SCHEMA})
    header = ["crm_id", "email", "first_name", "loyalty_tier", "lifetime_value", "country"]
    ingest_csv(client, "crm", "zed-crm", [header, [CRM_ID, EMAIL, "Zebedee", "gold", "1500", "FR"]])
    contact = ["loyalty_id", "email", "phone", "last_name", "points"]
    ingest_csv(client, "loyalty_contact", "zed-loyalty", [contact, [LOYALTY_ID, EMAIL, PHONE, "Quillfeather", "900"]])
    request = ing.PublishEventsRequest(dataset="orders_p")
    for n, amount in ((1, 40.0), (2, 75.5)):
        order = {"order_id": f"zed-o{n}", "ts": f"2026-11-0{n}T10:00:00Z", "type": "order", "crm_id": CRM_ID}
        request.events.add().update({**order, "amount": amount})
    answer = retrying(partial(client.ingest.PublishEvents, request))
    assert all(r.status == ing.EVENT_STATUS_ACCEPTED for r in answer.results), answer
    web = {"ts": "2026-11-03T09:00:00Z", "cookie_id": COOKIE}
    views = (
        {**web, "event_id": "zed-pv-1", "type": "page_view", "page": "/"},
        {**web, "event_id": "zed-login", "type": "login", "email": EMAIL},
    )
    for body in views:
        publish(target, "cdp.collect.web", json.dumps(body).encode(), {"Nats-Msg-Id": f"web:{body['event_id']}"})


def profile_of(client: Client, namespace: str, value: str) -> seg.Profile | None:
    try:
        answer: seg.Profile = client.segmentation.GetProfile(
            seg.GetProfileRequest(identity=IdentityValue(namespace=namespace, value=value))
        )
        return answer
    except grpc.RpcError as err:
        if err.code() == grpc.StatusCode.NOT_FOUND:
            return None
        raise


def others(client: Client, data: DemoData) -> dict[str, Any]:
    """Every other person's profile as segmentation serves it (attributes, identities, segments)."""
    dump: dict[str, Any] = {}
    for i in range(1, data.people + 1):
        found = profile_of(client, "crm_id", f"C{i:05d}")
        assert found is not None
        dump[f"C{i:05d}"] = (
            sorted((a.name, a.value.SerializeToString()) for a in found.attributes),
            sorted((x.namespace, x.value) for x in found.identities),
            sorted(found.segments),
            found.events,
        )
    return dump


def members(client: Client) -> dict[str, set[str]]:
    listed = retrying(lambda: client.segmentation.ListSegments(seg.ListSegmentsRequest()))
    out: dict[str, set[str]] = {}
    for segment in listed.segments:
        got = retrying(partial(client.segmentation.ListMembers, seg.ListMembersRequest(segment=segment.name)))
        out[segment.name] = set(got.profile_ids)
    return out


def comparable(engine: sa.Engine, tables: list[sa.Table]) -> dict[str, list[tuple[Any, ...]]]:
    """A store's dump, less what only the erased person's data could teach a rebuild:

    * the position reached on CDP_COLLECT: the person's raw messages were erased from it, so a
      rebuild never reads them (it starts at the first message left);
    * which dataset each attribute name came from (activation's governance lineage), learned from
      fragments whose attributes are sealed: a rebuild relearns it from the data that is left."""
    dump = canonical_dump(engine, with_checkpoint(tables))
    dump["cdp_checkpoint"] = [row for row in dump["cdp_checkpoint"] if row[0] != "in:ingest-collect"]
    dump.pop("act_attribute_source", None)
    return dump


def sha(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def files_holding(files: list[Path], needle: bytes) -> list[str]:
    return [str(p) for p in files if needle in p.read_bytes().lower()]


@pytest.mark.timeout(900)
def test_a_deleted_person_is_gone_everywhere_within_a_minute_and_stays_gone(
    tmp_path: Path, demo_data: DemoData
) -> None:
    data_dir = tmp_path / "cdp"
    with local_platforms() as platforms, Stack(data_dir) as stack, Client(data_dir, stack.addresses) as client:
        target = stack
        quick = ["--config", "batch_age_s:=0.2"]
        meta = [*quick, "meta", "--connector", "meta_custom_audience", "--action", "ad_targeting"]
        meta += ["--config", f"base_url={platforms.url}", "--config", "audience_id=42"]
        meta += ["--secret", f"access_token=@{tmp_path / 'meta.token'}"]
        (tmp_path / "meta.token").write_text(platforms.meta_token + "\n")
        assert cdp(data_dir, "destination", "create", *meta).returncode == 0
        braze = [*quick, "braze", "--connector", "braze", "--action", "email_marketing"]
        braze += ["--config", f"base_url={platforms.url}"]
        braze += ["--secret", f"api_key=@{tmp_path / 'braze.key'}"]
        (tmp_path / "braze.key").write_text(platforms.braze_key + "\n")
        assert cdp(data_dir, "destination", "create", *braze).returncode == 0

        run_flow(client, demo_data)
        add_the_person(client, target)
        for name, ids in (("meta", ["email", "phone"]), ("braze", ["crm_id"])):
            client.activation.Activate(act.ActivateRequest(destination=name, segment=ACTIVATED_SEGMENT, identities=ids))
        wait_settled(client, data_dir / "exports", demo_data)
        person = wait_for("the person's profile", lambda: profile_of(client, "email", EMAIL), 60)
        assert {x.namespace for x in person.identities} >= {"email", "phone", "crm_id", "loyalty_id", "cookie"}
        assert ACTIVATED_SEGMENT in person.segments
        meta_holds = platforms.members["meta:42"]
        wait_for("meta to hold the person", lambda: sha("zed.quill@example.org") in meta_holds or None, 60)
        wait_for(
            "braze to hold the person",
            lambda: any(person.profile_id in m for k, m in platforms.members.items() if k.startswith("braze:")) or None,
            60,
        )
        before = others(client, demo_data)

        stub = privacy_pb2_grpc.PrivacyServiceStub(client.channel("identity"))
        # Bounded: `--wait` gives up (and the command fails) if the request is not completed in 60 s.
        deleted = cdp(data_dir, "privacy", "delete", f"email:{EMAIL}", "--wait", "--wait-timeout", "60")
        assert deleted.returncode == 0, deleted.stdout + deleted.stderr
        [request] = stub.ListRequests(prv.ListPrivacyRequestsRequest()).requests
        done = stub.GetRequest(prv.GetPrivacyRequestRequest(request_id=request.request_id))
        assert done.state == prv.PRIVACY_STATE_COMPLETED
        for namespace, value in IDENTITIES:
            assert profile_of(client, namespace, value) is None, namespace
            with pytest.raises(grpc.RpcError) as gone:
                client.identity.Resolve(idn.ResolveRequest(identity=IdentityValue(namespace=namespace, value=value)))
            assert gone.value.code() == grpc.StatusCode.NOT_FOUND
        assert all(person.profile_id not in ids for ids in members(client).values())
        assert {s.service for s in done.services if s.applied} >= {"ingest", "identity", "segmentation", "activation"}
        assert done.keys_destroyed >= 5
        assert sha("zed.quill@example.org") not in meta_holds
        assert f"braze:{person.profile_id}" in platforms.deleted
        removals = {r.destination: r.status for r in done.removals}
        assert set(removals) >= {"meta", "braze", "crm_file_drop"}, removals  # the snapshot file is written again

        def delivered() -> dict[str, str] | None:
            now = stub.GetRequest(prv.GetPrivacyRequestRequest(request_id=request.request_id))
            found = {r.destination: r.status for r in now.removals}
            return found if set(found.values()) == {"delivered"} else None

        # Activation reports each removal's outcome once its batch is delivered (then destroys the
        # batch's key: its identifiers, SHA-256 digests for Meta, are unreadable from then on).
        wait_for("the removals reported delivered", delivered, 60)
        assert not platforms.rejected
        assert others(client, demo_data) == before

        wait_for("every service to apply all its input", lambda: lag(client) == 0 or None, 60)
        for service, tables in TABLES.items():
            rebuilt = sqlite_url(tmp_path / f"rebuilt-{service}.db")
            rebuild(stack, service, rebuilt, tmp_path / "rebuild-data")
            live_engine, rebuilt_engine = make_engine(sqlite_url(data_dir / f"{service}.db")), make_engine(rebuilt)
            try:
                rebuilt_rows, live_rows = comparable(rebuilt_engine, tables), comparable(live_engine, tables)
                differing = {
                    name: (
                        sorted(set(rows) - set(live_rows[name]), key=repr),
                        sorted(set(live_rows[name]) - set(rows), key=repr),
                    )
                    for name, rows in rebuilt_rows.items()
                    if rows != live_rows[name]
                }
                assert differing == {}, f"{service}: rebuilt only, live only: {differing}"
            finally:
                live_engine.dispose()
                rebuilt_engine.dispose()

    files = [p for p in [*data_dir.rglob("*"), *tmp_path.glob("rebuilt-*")] if p.is_file()]
    groups = {
        "jetstream": [p for p in files if p.suffix == ".blk"],
        "sqlite": [p for p in files if ".db" in p.name],
        "logs": [p for p in files if p.suffix == ".log"],
        "exports": [p for p in files if "exports" in p.parts],
    }
    for group, found in groups.items():
        assert found, f"no {group} files found to search"
    assert files_holding(groups["sqlite"], b"person.1@example.com")  # the search reads real data
    for needle in (*NEEDLES, sha(EMAIL.lower()).encode()):  # Meta's digest of the email: in its removal batch, sealed
        assert files_holding(files, needle) == [], needle
