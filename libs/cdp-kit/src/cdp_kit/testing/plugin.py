"""Pytest fixtures that start real infrastructure: a nats-server with JetStream on a
free loopback port and a temp store dir per test, SQLite stores, and an embedded
PostgreSQL with a fresh database per test. Every test session keys ``pii_hash`` with a random
key (services under test run in-process; a real deployment names its key file).

Registered through the ``pytest11`` entry point of cdp-kit.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from cdp_kit.eventlog import EventLog
from cdp_kit.natsauth import ADMIN, NatsAuth, ensure_secrets, stack_auth
from cdp_kit.natsserver import NatsServer
from cdp_kit.piikey import ephemeral_key
from cdp_kit.store import sqlite_url
from cdp_kit.telemetry import configure_pii_hash
from cdp_kit.testing.postgres import EmbeddedPostgres


@pytest.fixture(scope="session", autouse=True)
def pii_hash_key() -> bytes:
    """The session's PII hash key, as a service's composition root would configure it."""
    key = ephemeral_key()
    configure_pii_hash(key)
    return key


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "jetstream", log_file=tmp_path / "nats.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def nats_url(nats_server: NatsServer) -> str:
    return nats_server.url


@pytest.fixture
async def eventlog(nats_url: str) -> AsyncIterator[EventLog]:
    log = await EventLog.connect(nats_url, "cdp-test")
    await log.ensure_streams()
    try:
        yield log
    finally:
        await log.close()


@pytest.fixture
def secure_nats(tmp_path: Path) -> Iterator[SecureNats]:
    """A nats-server with TLS and the platform's users and permissions (``cdp_kit.natsauth``),
    its streams provisioned by the admin user. Credentials in ``secrets_dir`` as ``cdp up`` lays them out."""
    secrets_dir = tmp_path / "secrets"
    server = NatsServer(
        tmp_path / "jetstream-secure",
        log_file=tmp_path / "nats-secure.log",
        config=ensure_secrets(secrets_dir),
        tls=True,
    )
    server.start()
    try:
        secure = SecureNats(server, secrets_dir)
        asyncio.run(secure.provision())
        yield secure
    finally:
        server.stop()


class SecureNats:
    def __init__(self, server: NatsServer, secrets_dir: Path) -> None:
        self.server = server
        self.secrets_dir = secrets_dir

    @property
    def url(self) -> str:
        return self.server.url

    def auth(self, user: str) -> NatsAuth:
        return stack_auth(self.secrets_dir, user)

    async def connect(self, user: str) -> EventLog:
        return await EventLog.connect(self.url, f"cdp-test-{user}", auth=self.auth(user))

    async def provision(self) -> None:
        log = await self.connect(ADMIN)
        try:
            await log.ensure_streams()
        finally:
            await log.close()


@pytest.fixture(scope="session")
def embedded_postgres() -> Iterator[EmbeddedPostgres]:
    root = Path(tempfile.mkdtemp(prefix="cdp-pg-"))
    server = EmbeddedPostgres(root)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(embedded_postgres: EmbeddedPostgres) -> Iterator[str]:
    name, url = embedded_postgres.create_database()
    try:
        yield url
    finally:
        embedded_postgres.drop_database(name)


@pytest.fixture
def sqlite_store_url(tmp_path: Path) -> str:
    return sqlite_url(tmp_path / "store.db")


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh store URL; tests using it run once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        return sqlite_url(tmp_path / "store.db")
    url: str = request.getfixturevalue("postgres_url")
    return url
