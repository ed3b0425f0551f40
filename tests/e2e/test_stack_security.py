"""`cdp up`'s NATS is secured: anonymous and plain connections are refused, each service is
connected as its own user, and the secrets are readable by their owner only."""

from __future__ import annotations

import asyncio
import json
import stat
import urllib.request
from pathlib import Path

import pytest

from cdp_cli.stack import Stack
from cdp_kit.errors import Unavailable
from cdp_kit.eventlog import EventLog
from cdp_kit.natsauth import NatsAuth
from tests.e2e import natsconn

pytestmark = pytest.mark.e2e


def test_anonymous_and_plain_connections_are_refused(stack: Stack) -> None:
    ca = natsconn.auth(stack).ca_file

    async def connect(url: str, auth: NatsAuth) -> None:
        log = await EventLog.connect(url, "intruder", auth=auth, connect_timeout=3)
        await log.close()

    with pytest.raises(Unavailable):
        asyncio.run(connect(stack.nats_url, NatsAuth(ca_file=ca)))
    plain = stack.nats_url.replace("tls://", "nats://")
    with pytest.raises(Unavailable):
        asyncio.run(
            connect(plain, NatsAuth(user="segmentation", password=natsconn.auth(stack, "segmentation").password))
        )
    asyncio.run(connect(stack.nats_url, natsconn.auth(stack, "segmentation")))


def test_each_service_is_connected_as_itself(stack: Stack) -> None:
    url = f"http://127.0.0.1:{stack.nats_monitor_port}/connz?auth=true&limit=1024"
    with urllib.request.urlopen(url, timeout=5) as answer:
        connections = json.loads(answer.read())["connections"]
    users = {c.get("name"): c.get("authorized_user") for c in connections}
    for service in ("ingest", "identity", "segmentation", "activation"):
        assert users.get(f"cdp-{service}") == service, users
    assert all(c.get("tls_version") for c in connections), connections


def test_secrets_are_private(stack: Stack) -> None:
    secrets = stack.secrets_dir
    for folder in (secrets, secrets / "pki", secrets / "nats"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    files = [p for p in secrets.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"ca.crt", "ca.key", "nats.crt", "nats.key", "admin.password"}
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert json.loads((stack.data_dir / "stack.json").read_text())["secrets_dir"] == str(Path(secrets))
