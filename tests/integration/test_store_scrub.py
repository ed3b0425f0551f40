"""What a transaction erased leaves no copy in a SQLite store's files (database or WAL) once it
committed with ``scrub_after_commit``: the erasure half of a privacy delete."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from sqlmodel import Field, Session, SQLModel

from cdp_kit.store import create_tables, make_engine, scrub_after_commit, sqlite_url, tables_of

MARKER = "zed.quill.scrub@example.org"


class Person(SQLModel, table=True):
    __tablename__ = "scrub_person"

    id: int = Field(primary_key=True)
    email: str


def holding(folder: Path, needle: bytes) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file() and needle in p.read_bytes())


def fill(engine: sa.Engine) -> None:
    create_tables(engine, tables_of(Person))
    with Session(engine) as session:
        session.add(Person(id=1, email=MARKER))
        session.add_all(Person(id=n, email=f"other.{n}@example.org") for n in range(2, 200))
        session.commit()


def test_an_erased_row_is_in_no_file_after_the_commit(tmp_path: Path) -> None:
    engine = make_engine(sqlite_url(tmp_path / "s.db"))
    try:
        fill(engine)
        assert holding(tmp_path, MARKER.encode()) == ["s.db-wal"]  # the search finds real data
        with Session(engine) as session:
            session.delete(session.get(Person, 1))
            scrub_after_commit(session)
            session.commit()
        assert holding(tmp_path, MARKER.encode()) == []
        assert holding(tmp_path, b"other.2@example.org")  # the rest is kept
    finally:
        engine.dispose()


def test_without_the_scrub_the_wal_keeps_the_erased_row(tmp_path: Path) -> None:
    """Why the scrub exists: deleting (even with secure_delete) leaves the WAL's old frames."""
    engine = make_engine(sqlite_url(tmp_path / "s.db"))
    try:
        fill(engine)
        with Session(engine) as session:
            session.delete(session.get(Person, 1))
            session.commit()
        assert holding(tmp_path, MARKER.encode()) == ["s.db-wal"]
    finally:
        engine.dispose()


def test_a_reader_holding_a_snapshot_defers_the_scrub_to_the_next_commit(tmp_path: Path) -> None:
    engine = make_engine(sqlite_url(tmp_path / "s.db"))
    try:
        fill(engine)
        with engine.connect() as reader:
            reader.exec_driver_sql("BEGIN")
            assert reader.exec_driver_sql("SELECT count(*) FROM scrub_person").scalar() == 199
            with Session(engine) as session:
                session.delete(session.get(Person, 1))
                scrub_after_commit(session)
                session.commit()
            reader.exec_driver_sql("COMMIT")
        with Session(engine) as session:  # any later commit on the engine finishes it
            session.add(Person(id=500, email="later@example.org"))
            session.commit()
        assert holding(tmp_path, MARKER.encode()) == []
    finally:
        engine.dispose()
