"""Privacy: a delete of 1,000 people (one request of 1,000 emails) on a store of 1,000,000
profiles, from Submit to COMPLETED (every service erased them, removals recorded, keys destroyed),
vs a request of 1,000 emails nobody holds (the same lifecycle with nothing to erase), same run.

The stack is the CLI's (``cdp_cli.stack.Stack``, all four services, security and sealing as
shipped). The profiles are a CSV of ``CDP_BENCH_PRIVACY_PROFILES`` rows (default 1,000,000;
``crm_id`` and ``email`` identities and two attributes) ingested with ``IngestFile`` and waited
for until every service has applied all its input. ``CDP_BENCH_PRIVACY_DELETES`` (default 1,000)
sets the request's size, ``CDP_BENCH_PRIVACY_TIMEOUT_S`` (default 3,600) bounds the whole run.
After the delete the bench checks that the people are gone (identity resolves none of a sample,
segmentation holds ``profiles - deletes``).
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
import time
from pathlib import Path

import grpc

from bench.connect import client, use_stack
from bench.e2e import global_timeout
from bench.lookup import load_csv
from cdp.common.v1.envelope_pb2 import IdentityValue
from cdp.identity.v1 import identity_pb2 as idn
from cdp.privacy.v1 import privacy_pb2 as prv
from cdp.privacy.v1 import privacy_pb2_grpc
from cdp.segmentation.v1 import segmentation_pb2 as seg
from cdp_cli.client import SERVICES, Client
from cdp_cli.skeleton import retrying
from cdp_cli.stack import Stack

PROFILES = int(os.environ.get("CDP_BENCH_PRIVACY_PROFILES", "1000000"))
DELETES = int(os.environ.get("CDP_BENCH_PRIVACY_DELETES", "1000"))
TIMEOUT_S = float(os.environ.get("CDP_BENCH_PRIVACY_TIMEOUT_S", "3600"))
GOAL_S = 60.0
CHUNK = 256 * 1024
SCHEMA = {
    "name": "bench_customer",
    "schema_class": "SCHEMA_CLASS_PROFILE",
    "fields": [
        {"name": "crm_id", "type": "FIELD_TYPE_STRING", "required": True, "identity_namespace": "crm_id"},
        {"name": "email", "type": "FIELD_TYPE_STRING", "identity_namespace": "email"},
        {"name": "first_name", "type": "FIELD_TYPE_STRING"},
        {"name": "tier", "type": "FIELD_TYPE_STRING"},
    ],
}


def email(i: int) -> str:
    return f"customer.{i}@example.com"


def customers_csv(rows: int) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["crm_id", "email", "first_name", "tier"])
    for i in range(rows):
        writer.writerow([f"P{i:07d}", email(i), f"Name{i}", ("gold", "silver", "bronze")[i % 3]])
    return out.getvalue().encode()


def load_profiles(cdp: Client) -> float:
    """Ingest the customers and wait (bounded) until every service applied everything; seconds taken."""
    return load_csv(cdp, "customers", SCHEMA, customers_csv(PROFILES), PROFILES, SERVICES)


def erase(cdp: Client, request_id: str, emails: list[str]) -> tuple[float, prv.PrivacyRequest]:
    """Submit one delete request and wait (bounded) for it to complete; seconds from Submit."""
    stub = privacy_pb2_grpc.PrivacyServiceStub(cdp.channel("identity"))
    request = prv.SubmitPrivacyRequest(
        request_id=request_id,
        mode=prv.PRIVACY_MODE_DELETE,
        identities=[IdentityValue(namespace="email", value=e) for e in emails],
    )
    started = time.monotonic()
    stub.Submit(request, timeout=300.0)
    deadline = started + max(600.0, TIMEOUT_S / 4)
    while True:
        answer: prv.PrivacyRequest = retrying(
            lambda: stub.GetRequest(prv.GetPrivacyRequestRequest(request_id=request_id), timeout=30.0)
        )
        if answer.state == prv.PRIVACY_STATE_COMPLETED:
            return time.monotonic() - started, answer
        if time.monotonic() > deadline:
            progress = {s.service: s.applied for s in answer.services}
            raise TimeoutError(f"privacy request {request_id} still {answer.state} ({progress})")
        time.sleep(0.05)


def resolvable(cdp: Client, emails: list[str]) -> int:
    found = 0
    for value in emails:
        try:
            cdp.identity.Resolve(idn.ResolveRequest(identity=IdentityValue(namespace="email", value=value)))
            found += 1
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.NOT_FOUND:
                raise
    return found


def main() -> None:
    with (
        tempfile.TemporaryDirectory(prefix="cdp-bench-privacy-") as tmp,
        Stack(Path(tmp) / "cdp", ready_timeout_s=120.0) as stack,
        client(stack.data_dir, stack.addresses, timeout_s=60.0) as cdp,
    ):
        use_stack(stack.data_dir)
        took = load_profiles(cdp)
        print(f"\n== privacy: delete {DELETES:,} people of {PROFILES:,} profiles (loaded and settled in {took:.0f}s)")
        nobody = [f"nobody.{i}@example.net" for i in range(DELETES)]
        baseline, _ = erase(cdp, "bench-nobody", nobody)
        step = max(1, PROFILES // DELETES)
        people = [email(i) for i in range(0, PROFILES, step)][:DELETES]
        measured, answer = erase(cdp, "bench-delete", people)
        counts = {s.service: dict(s.counts) for s in answer.services}
        print(f"   {DELETES:,} unknown emails (baseline, nothing held)   {baseline:8.2f} s")
        ratio = measured / baseline
        print(f"   {DELETES:,} people erased everywhere                 {measured:8.2f} s   ratio {ratio:.1f}")
        print(f"   profiles {len(answer.profile_ids):,}, keys destroyed {answer.keys_destroyed:,}")
        print(f"   per service {counts}")
        print(f"   goal: completed within {GOAL_S:g} s: {'meets' if measured < GOAL_S else 'MISSES'}")
        sample = people[:: max(1, len(people) // 50)]
        left = resolvable(cdp, sample)
        stats = retrying(lambda: cdp.segmentation.GetStats(seg.GetStatsRequest()))
        print(f"   check: {left} of {len(sample)} sampled emails still resolve; segmentation holds {stats.profiles:,}")
        if left or stats.profiles != PROFILES - len(people):
            raise RuntimeError("the deleted people are not all gone")
        print(f"   (load {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")


def run() -> None:
    with global_timeout(TIMEOUT_S):
        main()
