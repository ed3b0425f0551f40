"""The walking skeleton over gRPC against the four services and nats-server as subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from cdp.common.v1.envelope_pb2 import IdentityValue
from cdp.ingest.v1 import ingest_pb2 as ing
from cdp.segmentation.v1 import segmentation_pb2 as seg
from cdp_activation.store import TABLES as ACTIVATION_TABLES
from cdp_cli.client import Client
from cdp_cli.skeleton import ACTIVATED_SEGMENT, DemoData, Outcome, ingest_crm, run_flow, wait_settled
from cdp_cli.stack import Stack
from cdp_identity.store import TABLES as IDENTITY_TABLES
from cdp_ingest.store import TABLES as INGEST_TABLES
from cdp_kit.natsauth import stack_env
from cdp_kit.store import canonical_dump, make_engine, sqlite_url, with_checkpoint
from cdp_kit.testing.postgres import EmbeddedPostgres
from cdp_segmentation.store import TABLES as SEGMENTATION_TABLES

pytestmark = pytest.mark.e2e
TABLES = {
    "ingest": INGEST_TABLES,
    "identity": IDENTITY_TABLES,
    "segmentation": SEGMENTATION_TABLES,
    "activation": ACTIVATION_TABLES,
}


def settle(stack: Stack, client: Client, data: DemoData) -> Outcome:
    return wait_settled(client, stack.data_dir / "exports", data, timeout_s=120)


def test_offline_and_online_data_become_one_profile_per_person(
    stack: Stack, client: Client, demo_data: DemoData
) -> None:
    report = run_flow(client, demo_data)
    assert report.batch is not None
    assert (report.batch.rows_accepted, report.batch.rows_rejected) == (demo_data.people, demo_data.bad_rows)
    assert report.events_accepted == len(demo_data.events)

    outcome = settle(stack, client, demo_data)

    assert outcome.profiles == demo_data.expected_profiles
    assert outcome.segment_sizes == demo_data.expected_sizes
    header, *rows = outcome.file_rows
    assert header == ["profile_id", "email", "first_name", "loyalty_tier"]
    assert sorted(r[0] for r in rows) == outcome.members[ACTIVATED_SEGMENT]
    assert all(r[3] == "gold" and r[1] == r[1].strip().lower() for r in rows)

    person = client.segmentation.GetProfile(
        seg.GetProfileRequest(identity=IdentityValue(namespace="email", value="Person.1@example.com"))
    )
    identities = {(i.namespace, i.value) for i in person.identities}
    assert {("crm_id", "C00001"), ("email", "person.1@example.com"), ("cookie", "ck-00001")} <= identities
    assert person.events == 3  # two page views before the login that linked the cookie, and the login
    assert {a.name: a.source_dataset for a in person.attributes}["loyalty_tier"] == "crm"


def test_a_resent_batch_ingests_nothing_twice(stack: Stack, client: Client, demo_data: DemoData) -> None:
    run_flow(client, demo_data)
    before = settle(stack, client, demo_data)
    again = ingest_crm(client, demo_data)
    assert again.duplicate
    assert again.status == ing.BATCH_STATUS_COMPLETED
    assert settle(stack, client, demo_data).profiles == before.profiles


def rebuild(stack: Stack, service: str, store_url: str, data_dir: Path) -> None:
    env = {
        **os.environ,
        "CDP_NATS_URL": stack.nats_url,
        **stack_env(stack.secrets_dir, service),
        "CDP_STORE_URL": store_url,
        "CDP_DATA_DIR": str(data_dir),
        "CDP_LOG_FORMAT": "json",
        "CDP_PII_HASH_KEY_FILE": str(stack.pii_hash_key_file),
    }
    subprocess.run([sys.executable, "-m", f"cdp_{service}", "rebuild"], env=env, check=True, timeout=120)


def assert_same_store(live_url: str, rebuilt_url: str, service: str) -> None:
    tables = with_checkpoint(TABLES[service])
    live, rebuilt = make_engine(live_url), make_engine(rebuilt_url)
    try:
        assert canonical_dump(rebuilt, tables) == canonical_dump(live, tables), service
    finally:
        live.dispose()
        rebuilt.dispose()


def test_every_store_rebuilt_from_the_log_equals_the_original(
    stack: Stack, client: Client, demo_data: DemoData, tmp_path: Path
) -> None:
    run_flow(client, demo_data)
    settle(stack, client, demo_data)
    for service in TABLES:
        rebuilt_url = sqlite_url(tmp_path / f"rebuilt-{service}.db")
        rebuild(stack, service, rebuilt_url, tmp_path / "rebuild-data")
        assert_same_store(sqlite_url(stack.data_dir / f"{service}.db"), rebuilt_url, service)


@pytest.mark.postgres
def test_stores_rebuilt_on_postgresql_equal_the_sqlite_originals(
    stack: Stack, client: Client, demo_data: DemoData, tmp_path: Path, embedded_postgres: EmbeddedPostgres
) -> None:
    run_flow(client, demo_data)
    settle(stack, client, demo_data)
    for service in TABLES:
        name, url = embedded_postgres.create_database()
        try:
            rebuild(stack, service, url, tmp_path / "rebuild-data")
            assert_same_store(sqlite_url(stack.data_dir / f"{service}.db"), url, service)
        finally:
            embedded_postgres.drop_database(name)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory, demo_data: DemoData) -> Outcome:
    with (
        Stack(tmp_path_factory.mktemp("baseline") / "cdp") as stack,
        Client(stack.data_dir, addresses=stack.addresses) as client,
    ):
        run_flow(client, demo_data)
        return settle(stack, client, demo_data)


def comparable(outcome: Outcome) -> tuple[object, ...]:
    return outcome.profiles, outcome.segment_sizes, outcome.members, outcome.file_rows


@pytest.mark.parametrize("victim", ["ingest", "identity", "segmentation", "activation"])
def test_killing_a_service_mid_flow_changes_nothing(
    stack: Stack, client: Client, demo_data: DemoData, baseline: Outcome, victim: str
) -> None:
    killed = threading.Event()

    def kill_soon() -> None:
        stack.kill(victim)  # SIGKILL; the supervisor restarts it
        killed.set()

    timer = threading.Timer(0.4, kill_soon)
    timer.start()
    try:
        run_flow(client, demo_data)
        assert killed.wait(30)
        stack.wait_serving(victim)
        outcome = settle(stack, client, demo_data)
    finally:
        timer.cancel()
    assert stack.restarts[victim] >= 1
    assert comparable(outcome) == comparable(baseline)
