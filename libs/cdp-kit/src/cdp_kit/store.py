"""The store base: SQLModel on SQLite (WAL) by default, PostgreSQL by URL.

Every service store is a projection. It keeps, in the same transaction as its
state, the stream positions it has applied (``cdp_checkpoint``), so a re-delivered
message at or below its checkpoint is recognised and skipped.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import structlog
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.pool import NullPool
from sqlalchemy.schema import CreateIndex, CreateTable
from sqlmodel import Field, Session, SQLModel, select


class Checkpoint(SQLModel, table=True):
    """How far one input or own log has been applied to this store."""

    __tablename__ = "cdp_checkpoint"

    name: str = Field(primary_key=True)
    sequence: int = Field(default=0, sa_type=sa.BigInteger)


class StoreSchema(SQLModel, table=True):
    """Which table definitions a service's store was created with (a fingerprint of their DDL)."""

    __tablename__ = "cdp_store_schema"

    service: str = Field(primary_key=True)
    fingerprint: str


def sqlite_url(path: Path | str) -> str:
    return f"sqlite:///{Path(path)}"


# SQLite reads pages through a memory map of up to this many MiB of the file (``PRAGMA mmap_size``)
# instead of one read() system call per page outside its small page cache. Writes still go
# through the WAL. At 1,000,000 records the identity store is a few hundred MB and a transaction
# reads tens of thousands of random pages. The mapping is shared page cache, not heap.
SQLITE_MMAP_MIB = 1024


def _sqlite_pragmas(mmap_mib: int) -> Any:
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        # NORMAL is durable across process crashes (kill -9); power loss may lose the last
        # transactions, which recovery re-derives from the log.
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=10000")
        cursor.execute(f"PRAGMA mmap_size={int(mmap_mib) * 1024 * 1024}")
        # Privacy: a deleted row's bytes are overwritten with zeros, not left in free pages for
        # anyone reading the file (an erased person must not be recoverable from the store; the
        # write-ahead log's old frames are the other copy: see scrub_after_commit).
        cursor.execute("PRAGMA secure_delete=ON")
        cursor.close()

    return on_connect


def normalise_url(url: str) -> str:
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def make_engine(url: str, *, echo: bool = False, sqlite_mmap_mib: int = SQLITE_MMAP_MIB) -> Engine:
    """An engine for a store URL; SQLite connections get WAL and the pragmas above
    (``sqlite_mmap_mib`` = 0 turns the memory map off)."""
    url = normalise_url(url)
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, echo=echo, connect_args={"check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas(sqlite_mmap_mib))
        return engine
    return sa.create_engine(url, echo=echo, pool_pre_ping=True, poolclass=NullPool if "host=/" in url else None)


def tables_of(*models: type[SQLModel]) -> list[sa.Table]:
    """The SQLAlchemy tables behind SQLModel table classes."""
    tables = [m.__dict__["__table__"] for m in models]
    assert all(isinstance(t, sa.Table) for t in tables)
    return tables


def with_checkpoint(tables: Sequence[sa.Table]) -> list[sa.Table]:
    """The tables with the checkpoint table first: what a store's content is (dumps compare it)."""
    [checkpoint] = tables_of(Checkpoint)
    return [checkpoint, *[t for t in tables if t is not checkpoint]]


def _with_kit_tables(tables: Sequence[sa.Table]) -> list[sa.Table]:
    """The tables with the kit's own: checkpoints and the record of the tables' definitions."""
    [schema] = tables_of(StoreSchema)
    return [schema, *[t for t in with_checkpoint(tables) if t is not schema]]


def create_tables(engine: Engine, tables: Sequence[sa.Table]) -> None:
    SQLModel.metadata.create_all(engine, tables=_with_kit_tables(tables))


def drop_tables(engine: Engine, tables: Sequence[sa.Table]) -> None:
    SQLModel.metadata.drop_all(engine, tables=_with_kit_tables(tables))


def fingerprint(engine: Engine, tables: Sequence[sa.Table]) -> str:
    """A hash of the DDL (tables and indexes, as this engine's dialect writes them) of a store."""
    ddl: list[str] = []
    for table in sorted(with_checkpoint(tables), key=lambda t: t.name):
        ddl.append(str(CreateTable(table).compile(dialect=engine.dialect)))
        ddl += sorted(str(CreateIndex(index).compile(dialect=engine.dialect)) for index in table.indexes)
    return hashlib.sha256("\n".join(ddl).encode()).hexdigest()[:32]


def open_store(engine: Engine, service: str, tables: Sequence[sa.Table]) -> bool:
    """Create a service's tables where missing. A store created by code with other table
    definitions (or by code that did not record them) is dropped and created empty, so the
    service rebuilds it from the log. Returns True when an existing store was reset."""
    wanted = fingerprint(engine, tables)
    present = set(sa.inspect(engine).get_table_names())
    reset = False
    if present & {t.name for t in tables}:
        recorded = None
        if StoreSchema.__tablename__ in present:
            with Session(engine) as session:
                row = session.get(StoreSchema, service)
                recorded = row.fingerprint if row is not None else None
        if recorded != wanted:
            drop_tables(engine, tables)
            reset = True
    create_tables(engine, tables)
    with transaction(engine) as session:
        session.merge(StoreSchema(service=service, fingerprint=wanted))
    return reset


@contextmanager
def transaction(engine: Engine) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any error."""
    with Session(engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


log = structlog.get_logger(__name__)
_SCRUB = "cdp_scrub_after_commit"
# Engines whose WAL still holds frames from before an erasure (a reader kept the checkpoint from
# truncating it): tried again after the next commit on the same engine.
_SCRUB_PENDING: set[Engine] = set()


def scrub_after_commit(session: Session) -> None:
    """Ask that no copy of what this transaction erased outlives its commit in the store's files.

    SQLite: ``secure_delete`` (set on every connection) zeroes deleted cells in the database
    pages, but the write-ahead log still holds earlier frames with the old rows, and a checkpoint
    does not shorten the file. After the commit, ``PRAGMA wal_checkpoint(TRUNCATE)`` copies the
    log into the database and truncates it to zero bytes; when a reader holds an older snapshot
    it cannot, and it is tried again after the next commit on that engine. PostgreSQL keeps dead
    row versions until VACUUM: docs/privacy.md says how to schedule it."""
    session.info[_SCRUB] = True


def _scrub(engine: Engine) -> bool:
    """Checkpoint and truncate a SQLite store's WAL; True when done (or nothing to do)."""
    if engine.dialect.name != "sqlite":
        return True
    with engine.connect() as connection:
        # Never wait on a reader (the busy handler would block the service for busy_timeout).
        connection.exec_driver_sql("PRAGMA busy_timeout=0")
        try:
            busy, _, _ = connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").one()
        finally:
            connection.exec_driver_sql("PRAGMA busy_timeout=10000")
    return not busy


@event.listens_for(Session, "after_commit")
def _scrub_after_commit(session: Session) -> None:
    bind = session.get_bind()
    engine = bind if isinstance(bind, Engine) else bind.engine
    if session.info.pop(_SCRUB, False) or engine in _SCRUB_PENDING:
        session.info[_SCRUB_RUN] = engine


_SCRUB_RUN = "cdp_scrub_run"


@event.listens_for(Session, "after_transaction_end")
def _scrub_when_released(session: Session, transaction: Any) -> None:
    engine = session.info.pop(_SCRUB_RUN, None)
    if engine is None or transaction.parent is not None:
        return
    if _scrub(engine):
        _SCRUB_PENDING.discard(engine)
    else:
        _SCRUB_PENDING.add(engine)
        log.info("store_scrub_deferred", reason="a reader holds an older snapshot; retried after the next commit")


_HELD = "cdp_checkpoints"


def _checkpoint(session: Session, name: str) -> Checkpoint | None:
    """A checkpoint row, held by the session: the identity map keeps rows only weakly, and one
    input batch reads and moves the same checkpoints at every append; held, they load once."""
    held: dict[str, Checkpoint] = session.info.setdefault(_HELD, {})
    row = held.get(name)
    if row is None:
        row = session.get(Checkpoint, name)
        if row is not None:
            held[name] = row
    return row


def get_checkpoint(session: Session, name: str) -> int:
    row = _checkpoint(session, name)
    return row.sequence if row else 0


def set_checkpoint(session: Session, name: str, sequence: int) -> None:
    row = _checkpoint(session, name)
    if row is None:
        row = Checkpoint(name=name, sequence=sequence)
        session.add(row)
        session.info.setdefault(_HELD, {})[name] = row
    elif sequence > row.sequence:
        row.sequence = sequence
        session.add(row)


def all_checkpoints(session: Session) -> dict[str, int]:
    return {c.name: c.sequence for c in session.exec(select(Checkpoint)).all()}


def _canonical(value: Any) -> Any:
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True, default=str)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def canonical_dump(
    engine: Engine, tables: Iterable[sa.Table], *, skip_columns: Iterable[str] = ()
) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, in a stable order: rebuilt stores are compared with it."""
    skip = set(skip_columns)
    dump: dict[str, list[tuple[Any, ...]]] = {}
    with engine.connect() as conn:
        for table in tables:
            cols = [c for c in table.columns if c.name not in skip and f"{table.name}.{c.name}" not in skip]
            rows = conn.execute(sa.select(*cols)).all()
            dump[table.name] = sorted((tuple(_canonical(v) for v in row) for row in rows), key=repr)
    return dump
