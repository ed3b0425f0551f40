"""A stall is loud, end to end: the real four services under the supervisor.

First a normal run: ``cdp ingest --wait`` returns once every stage applied the batch, and
``cdp status --json`` then shows every consumer caught up (applied == last), without errors,
with integer lags.

Then identity is made unable to progress, for real: the CDP_PROFILE stream is told to refuse
messages above 64 bytes (a NATS-side limit), so every append of identity's fragments is
refused and identity-ingest cannot move past the next batch. With a stall limit of a few
seconds, ``cdp status`` shows it stuck with JetStream's reason and exits 1, identity's readiness
is NOT_SERVING while its liveness is SERVING, and ``cdp ingest --wait`` fails naming the stage.
Lifting the limit lets identity through and it is ready again.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from cdp_cli.app import app
from cdp_cli.client import Client, check_health
from cdp_cli.skeleton import CRM_SCHEMA, WEB_SCHEMA
from cdp_cli.stack import Stack
from cdp_cli.wait import wait_applied
from tests.e2e import natsconn

pytestmark = pytest.mark.e2e

STALL_AFTER_S = "4"
PROFILE = "CDP_PROFILE"
CRM_HEADER = "crm_id,email,first_name\n"


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    with Stack(tmp_path / "cdp", env={"CDP_STALL_AFTER_S": STALL_AFTER_S}, ready_timeout_s=120.0) as running:
        yield running


def cdp(data_dir: Path, *args: str) -> Result:
    return CliRunner().invoke(app, ["--data-dir", str(data_dir), *args], env={"COLUMNS": "200"})


def crm_file(tmp_path: Path, name: str, ids: range) -> Path:
    path = tmp_path / f"{name}.csv"
    path.write_text(CRM_HEADER + "".join(f"C{n},p{n}@example.com,P{n}\n" for n in ids))
    return path


def define_datasets(data_dir: Path, tmp_path: Path) -> None:
    for schema, dataset in ((CRM_SCHEMA, "crm"), (WEB_SCHEMA, "web")):
        path = tmp_path / f"{dataset}.json"
        path.write_text(json.dumps(schema))
        assert cdp(data_dir, "schema", "create", str(path)).exit_code == 0
        made = cdp(data_dir, "dataset", "create", dataset, "--schema", str(schema["name"]), "--profile-enabled")
        assert made.exit_code == 0, made.output


def limit_profile_messages(target: natsconn.NatsTarget, max_msg_size: int) -> None:
    """Change CDP_PROFILE's largest accepted message in JetStream (-1: no limit), as the admin."""

    async def change() -> None:
        nc = await natsconn.connect(target)
        try:
            js = nc.jetstream()
            info = await js.stream_info(PROFILE)
            config = info.config
            config.max_msg_size = max_msg_size
            await js.update_stream(config)
        finally:
            await nc.close()

    asyncio.run(change())


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def services_of(data_dir: Path) -> tuple[int, dict[str, Any]]:
    result = cdp(data_dir, "status", "--json")
    return result.exit_code, json.loads(result.stdout)["services"]


def test_ingest_wait_then_status_is_tidy_then_a_stall_is_loud(stack: Stack, tmp_path: Path) -> None:
    data_dir = stack.data_dir
    define_datasets(data_dir, tmp_path)

    # ---- the normal run
    waited = cdp(data_dir, "ingest", str(crm_file(tmp_path, "crm-1", range(1, 21))), "--dataset", "crm", "--wait")
    assert waited.exit_code == 0, waited.output
    for stage in ("ingest → CDP_INGEST", "identity → CDP_PROFILE", "segmentation → CDP_AUDIENCE"):
        assert stage in waited.stderr
    code, services = services_of(data_dir)
    assert code == 0
    for name, report in services.items():
        assert report["health"] == "SERVING", name
        assert report["liveness"] == "SERVING", name
        for consumer in report["status"]["consumers"]:
            where = f"{name}/{consumer['name']}"
            assert consumer["applied_sequence"] == consumer["stream_last_sequence"], where
            assert consumer["lag"] == 0, where
            assert isinstance(consumer["lag"], int), where
            assert consumer["error"] == "", where
            assert consumer["state"] == "caught_up", where

    # ---- identity cannot progress: JetStream refuses its fragments
    limit_profile_messages(stack, 64)
    path = crm_file(tmp_path, "crm-2", range(21, 31))
    failed = cdp(data_dir, "ingest", str(path), "--dataset", "crm", "--wait", "--wait-timeout", "120")
    assert failed.exit_code == 1, failed.output
    message = " ".join(failed.stderr.split())
    assert "stage ingest → CDP_INGEST → identity is stuck" in message
    assert "identity's consumer identity-ingest" in message
    assert "append to cdp.profile.0.fragments failed" in message

    address = stack.addresses["identity"]
    # The service re-evaluates its readiness a few times a second: wait for it to turn, not for a time.
    wait_until(
        lambda: check_health(address, service="readiness", auth=stack.grpc_auth) == "NOT_SERVING", "identity not ready"
    )
    assert check_health(address, service="liveness", auth=stack.grpc_auth) == "SERVING"
    code, services = services_of(data_dir)
    assert code == 1
    identity = services["identity"]
    [stuck] = [c for c in identity["status"]["consumers"] if c["name"] == "identity-ingest"]
    assert stuck["state"] == "stuck"
    assert "append to cdp.profile.0.fragments failed" in stuck["error"]
    assert stuck["applied_sequence"] < stuck["stream_last_sequence"]
    assert identity["health"] == "NOT_SERVING"
    assert identity["liveness"] == "SERVING"
    assert identity["status"]["ready"] is False
    table = cdp(data_dir, "status")
    assert table.exit_code == 1
    assert "identity: consumer identity-ingest is stuck" in " ".join(table.stderr.split())

    # ---- the limit lifted, identity goes on from where it stopped and is ready again
    limit_profile_messages(stack, -1)
    stack.wait_serving("identity", timeout_s=120.0)
    with Client(data_dir, addresses=stack.addresses) as client:
        wait_applied(client, 120.0)
    assert check_health(address, service="readiness", auth=stack.grpc_auth) == "SERVING"
