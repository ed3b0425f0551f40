"""kill -9 of the activation service mid-delivery: after a restart the delivery log
reconciles with what the local destination received, and nothing was added twice."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlmodel import Session, select

from cdp_activation.store import BatchRow, PlanMemberRow
from cdp_cli.client import stack_channel
from cdp_kit.grpc_auth import ensure_local_secrets
from cdp_kit.natsauth import ADMIN, stack_env
from cdp_kit.store import make_engine
from cdp_kit.testing.plugin import SecureNats
from cdp_standins import Fault, LocalPlatforms
from tests.integration.test_activation_delivery import Upstream, people, until


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(data_dir: Path, nats: SecureNats, port: int) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "CDP_NATS_URL": nats.url,
        **stack_env(nats.secrets_dir, "activation"),
        "CDP_DATA_DIR": str(data_dir),
        "CDP_GRPC_PORT": str(port),
        "CDP_DELIVERY_INTERVAL_S": "0.05",
        "CDP_LOG_LEVEL": "warning",
        "CDP_PII_HASH_EPHEMERAL": "true",  # activation hashes no personal data; it only needs a key to start
        **ensure_local_secrets(data_dir).server_env(),  # TLS and tokens, as cdp up runs it
    }
    return subprocess.Popen([sys.executable, "-m", "cdp_activation", "serve"], env=env)


@pytest.fixture
async def platforms() -> AsyncIterator[LocalPlatforms]:
    servers = LocalPlatforms()
    await servers.start()
    yield servers
    await servers.stop()


def batches(db: Path) -> list[BatchRow]:
    engine = make_engine(f"sqlite:///{db}")
    try:
        with Session(engine) as session:
            return list(session.exec(select(BatchRow)))
    finally:
        engine.dispose()


def holdings(db: Path) -> set[str]:
    engine = make_engine(f"sqlite:///{db}")
    try:
        with Session(engine) as session:
            return set(session.exec(select(PlanMemberRow.profile_id)))
    finally:
        engine.dispose()


async def test_activation_kill_9_mid_delivery_reconciles(
    tmp_path: Path, secure_nats: SecureNats, platforms: LocalPlatforms
) -> None:
    from google.protobuf import struct_pb2

    from cdp.activation.v1 import activation_pb2 as pb
    from cdp.activation.v1 import activation_pb2_grpc as pb_grpc

    eventlog = await secure_nats.connect(ADMIN)  # the upstream services' facts, written as the admin
    up = Upstream(eventlog)
    port = free_port()
    proc = start(tmp_path, secure_nats, port)
    db = tmp_path / "activation.db"
    try:
        async with stack_channel(tmp_path, f"127.0.0.1:{port}", "admin") as channel:
            stub = pb_grpc.ActivationServiceStub(channel)
            await up.segment()
            config = struct_pb2.Struct()
            config.update(
                {
                    "base_url": platforms.url + "/webhook",
                    "secret": platforms.webhook_secret,
                    "batch_size": 5,
                    "batch_age_s": 0.05,
                    "timeout_s": 30,
                }
            )
            dest = pb.Destination(name="hook", connector="webhook", config=config, marketing_action="email_marketing")
            await until(lambda: _try(stub.CreateDestination(pb.CreateDestinationRequest(destination=dest))), 60)
            request = pb.ActivateRequest(destination="hook", segment="gold", identities=["email"])
            await until(lambda: _try(stub.Activate(request)), 60, "plan")
        # the first request is accepted by the destination but answered late: kill -9 meanwhile
        platforms.fail("webhook", Fault(delay_s=1.5))
        pids = await people(up, 12)
        await until(lambda: platforms.seen["webhook"] >= 1, 60, "a delivery in flight")
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        await until(lambda: len(platforms.accepted["webhook"]) >= 1, 30, "the slow request accepted")

        proc = start(tmp_path, secure_nats, port)
        await until(lambda: len(platforms.members["webhook:gold"]) == 12, 90, "all members delivered")
        await until(lambda: len(holdings(db)) == 12 and all(b.status == "delivered" for b in batches(db)), 60)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        await eventlog.close()

    # the slow batch was sent again after the restart, with the same batch id, and deduplicated
    assert platforms.duplicates["webhook"] >= 1
    # the delivery log reconciles with what the destination received
    delivered = {b.id: sorted(r["profile_id"] for r in b.records) for b in batches(db)}
    received = {
        req["batch_id"]: sorted(r["profile_id"] for r in req["records"]) for req in platforms.accepted["webhook"]
    }
    assert delivered == received
    # nothing was added twice
    adds = Counter(r["profile_id"] for req in platforms.accepted["webhook"] for r in req["records"])
    assert set(adds) == set(pids)
    assert set(adds.values()) == {1}


async def _try(call: object) -> object:
    import grpc

    try:
        return await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND):
            return None
        if exc.code() == grpc.StatusCode.ALREADY_EXISTS:
            return True
        raise
