"""The store base, on SQLite and on PostgreSQL (``store_url`` runs each test on both)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import Field, Session, SQLModel, select

from cdp_kit.settings import ServiceSettings
from cdp_kit.store import (
    SQLITE_MMAP_MIB,
    Checkpoint,
    all_checkpoints,
    canonical_dump,
    create_tables,
    drop_tables,
    get_checkpoint,
    make_engine,
    open_store,
    set_checkpoint,
    transaction,
)


class StoreTestItem(SQLModel, table=True):
    __tablename__ = "test_store_item"

    key: str = Field(primary_key=True)
    count: int = 0
    score: float = 0.0
    body: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON)


ITEMS = SQLModel.metadata.tables[StoreTestItem.__tablename__]
CHECKPOINTS = SQLModel.metadata.tables[Checkpoint.__tablename__]
TABLES: list[sa.Table] = [ITEMS]


class Boom(Exception):
    pass


@pytest.fixture
def engine(store_url: str) -> Iterator[Engine]:
    engine = make_engine(store_url)
    create_tables(engine, TABLES)
    try:
        yield engine
    finally:
        engine.dispose()


def table_names(engine: Engine) -> set[str]:
    return set(sa.inspect(engine).get_table_names())


def items(engine: Engine) -> dict[str, int]:
    with Session(engine) as session:
        return {row.key: row.count for row in session.exec(select(StoreTestItem)).all()}


# ------------------------------------------------------------------ tables


def test_create_tables_adds_the_checkpoint_table(engine: Engine) -> None:
    assert {"cdp_checkpoint", "test_store_item"} <= table_names(engine)


def test_create_tables_is_idempotent(engine: Engine) -> None:
    with transaction(engine) as session:
        session.add(StoreTestItem(key="a", count=1))
    create_tables(engine, TABLES)
    assert items(engine) == {"a": 1}


def test_drop_tables_drops_the_tables_and_checkpoints(engine: Engine) -> None:
    with transaction(engine) as session:
        session.add(StoreTestItem(key="a", count=1))
        set_checkpoint(session, "in:x", 5)

    drop_tables(engine, TABLES)
    assert not {"cdp_checkpoint", "test_store_item"} & table_names(engine)

    create_tables(engine, TABLES)
    assert items(engine) == {}
    with Session(engine) as session:
        assert all_checkpoints(session) == {}


def test_checkpoint_table_passed_explicitly_is_not_duplicated(engine: Engine) -> None:
    drop_tables(engine, [CHECKPOINTS, ITEMS])
    create_tables(engine, [CHECKPOINTS, ITEMS])
    assert {"cdp_checkpoint", "test_store_item"} <= table_names(engine)


# ------------------------------------------------------------------ table definitions


def changed_items_table() -> sa.Table:
    """``test_store_item`` as a newer version of the code defines it: one more column and an index."""
    return sa.Table(
        "test_store_item",
        sa.MetaData(),
        sa.Column("key", sa.String, primary_key=True),
        sa.Column("count", sa.Integer),
        sa.Column("score", sa.Float),
        sa.Column("body", sa.JSON),
        sa.Column("added", sa.Integer, index=True),
    )


def test_a_store_opened_by_the_same_code_keeps_its_rows(engine: Engine) -> None:
    assert open_store(engine, "svc", TABLES) is True  # created by create_tables: nothing was recorded
    with transaction(engine) as session:
        session.add(StoreTestItem(key="a", count=1))
        set_checkpoint(session, "in:x", 5)

    assert open_store(engine, "svc", TABLES) is False
    assert items(engine) == {"a": 1}
    with Session(engine) as session:
        assert get_checkpoint(session, "in:x") == 5


def test_a_store_made_with_other_table_definitions_is_emptied_for_a_rebuild(engine: Engine) -> None:
    open_store(engine, "svc", TABLES)
    with transaction(engine) as session:
        session.add(StoreTestItem(key="a", count=1))
        set_checkpoint(session, "in:x", 5)
    changed = changed_items_table()

    assert open_store(engine, "svc", [changed]) is True

    columns = {c["name"] for c in sa.inspect(engine).get_columns("test_store_item")}
    assert "added" in columns
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(changed)).scalar() == 0
    with Session(engine) as session:
        assert all_checkpoints(session) == {}  # every input and own log is read again from the start
    assert open_store(engine, "svc", [changed]) is False
    drop_tables(engine, [changed])


def test_a_store_without_recorded_definitions_is_emptied(engine: Engine) -> None:
    with transaction(engine) as session:
        session.add(StoreTestItem(key="a", count=1))
    assert open_store(engine, "svc", TABLES) is True
    assert items(engine) == {}


# ------------------------------------------------------------------ checkpoints


def test_missing_checkpoint_is_zero(engine: Engine) -> None:
    with Session(engine) as session:
        assert get_checkpoint(session, "in:nothing") == 0


def test_set_and_get_checkpoint(engine: Engine) -> None:
    with transaction(engine) as session:
        set_checkpoint(session, "in:a", 3)
        set_checkpoint(session, "own:b", 10)
        assert get_checkpoint(session, "in:a") == 3
    with Session(engine) as session:
        assert get_checkpoint(session, "in:a") == 3
        assert get_checkpoint(session, "own:b") == 10
        assert all_checkpoints(session) == {"in:a": 3, "own:b": 10}


def test_checkpoint_is_monotonic(engine: Engine) -> None:
    with transaction(engine) as session:
        set_checkpoint(session, "in:a", 7)
    with transaction(engine) as session:
        set_checkpoint(session, "in:a", 4)
        assert get_checkpoint(session, "in:a") == 7
        set_checkpoint(session, "in:a", 7)
    with Session(engine) as session:
        assert get_checkpoint(session, "in:a") == 7
    with transaction(engine) as session:
        set_checkpoint(session, "in:a", 8)
    with Session(engine) as session:
        assert get_checkpoint(session, "in:a") == 8


def test_checkpoint_moves_several_times_in_one_transaction(engine: Engine) -> None:
    with transaction(engine) as session:
        for seq in (1, 2, 5, 3):
            set_checkpoint(session, "in:a", seq)
    with Session(engine) as session:
        assert get_checkpoint(session, "in:a") == 5


def test_checkpoint_holds_large_sequences(engine: Engine) -> None:
    big = 2**40
    with transaction(engine) as session:
        set_checkpoint(session, "in:a", big)
    with Session(engine) as session:
        assert get_checkpoint(session, "in:a") == big


# ------------------------------------------------------------------ transactions


def test_transaction_commits_on_success(engine: Engine) -> None:
    with transaction(engine) as session:
        session.add(StoreTestItem(key="a", count=1))
        session.add(StoreTestItem(key="b", count=2))
        set_checkpoint(session, "in:a", 2)
    assert items(engine) == {"a": 1, "b": 2}
    with Session(engine) as session:
        assert get_checkpoint(session, "in:a") == 2


def test_transaction_rolls_back_everything_on_an_exception(engine: Engine) -> None:
    with transaction(engine) as session:
        session.add(StoreTestItem(key="a", count=1))
        set_checkpoint(session, "in:a", 1)

    def half_apply_then_fail() -> None:
        with transaction(engine) as session:
            row = session.get(StoreTestItem, "a")
            assert row is not None
            row.count = 100
            session.add(row)
            session.add(StoreTestItem(key="b", count=2))
            set_checkpoint(session, "in:a", 2)
            session.flush()  # the changes reached the database, inside the transaction
            raise Boom

    with pytest.raises(Boom):
        half_apply_then_fail()

    assert items(engine) == {"a": 1}
    with Session(engine) as session:
        assert get_checkpoint(session, "in:a") == 1


def test_transaction_rolls_back_on_a_failed_commit(engine: Engine) -> None:
    with transaction(engine) as session:
        session.add(StoreTestItem(key="a", count=1))

    def fail_at_commit() -> None:
        with transaction(engine) as session:
            session.add(StoreTestItem(key="b", count=2))
            set_checkpoint(session, "in:a", 9)
            session.add(StoreTestItem(key="a", count=3))  # duplicate primary key: the commit fails

    with pytest.raises(sa.exc.IntegrityError):
        fail_at_commit()

    assert items(engine) == {"a": 1}
    with Session(engine) as session:
        assert get_checkpoint(session, "in:a") == 0


def test_transaction_objects_stay_readable_after_commit(engine: Engine) -> None:
    with transaction(engine) as session:
        row = StoreTestItem(key="a", count=4)
        session.add(row)
    assert row.count == 4


# ------------------------------------------------------------------ canonical dump


def fill(engine: Engine, rows: list[StoreTestItem], checkpoints: dict[str, int]) -> None:
    for row in rows:
        with transaction(engine) as session:
            session.add(row)
    with transaction(engine) as session:
        for name, seq in checkpoints.items():
            set_checkpoint(session, name, seq)


def dump(engine: Engine, **kwargs: Any) -> dict[str, list[tuple[Any, ...]]]:
    return canonical_dump(engine, [ITEMS, CHECKPOINTS], **kwargs)


def rows() -> list[StoreTestItem]:
    return [
        StoreTestItem(key="a", count=1, score=1.5, body={"x": 1, "y": [1, 2]}),
        StoreTestItem(key="b", count=2, score=2.0, body={}),
        StoreTestItem(key="c", count=3, score=0.0, body={"z": None, "a": "b"}),
    ]


def recreate(engine: Engine) -> None:
    drop_tables(engine, TABLES)
    create_tables(engine, TABLES)


def test_canonical_dump_is_order_independent(engine: Engine) -> None:
    fill(engine, rows(), {"in:a": 1, "own:b": 2})
    first = dump(engine)
    recreate(engine)
    fill(engine, list(reversed(rows())), {"own:b": 2, "in:a": 1})
    assert dump(engine) == first
    assert [r[0] for r in first["test_store_item"]] == ["a", "b", "c"]
    assert first["cdp_checkpoint"] == [("in:a", 1), ("own:b", 2)]


def test_canonical_dump_equal_for_equal_content(engine: Engine) -> None:
    fill(engine, rows(), {"in:a": 1})
    first = dump(engine)
    recreate(engine)
    fill(engine, rows(), {"in:a": 1})
    assert dump(engine) == first


def test_canonical_dump_is_stable(engine: Engine) -> None:
    fill(engine, rows(), {"in:a": 1})
    assert dump(engine) == dump(engine)


def test_canonical_dump_differs_for_different_content(engine: Engine) -> None:
    fill(engine, rows(), {"in:a": 1})
    before = dump(engine)

    with transaction(engine) as session:
        row = session.get(StoreTestItem, "c")
        assert row is not None
        row.body = {"z": None, "a": "c"}
        session.add(row)
    after_body = dump(engine)
    assert after_body != before

    with transaction(engine) as session:
        set_checkpoint(session, "in:a", 2)
    assert dump(engine) != after_body


def test_canonical_dump_of_json_ignores_key_order(engine: Engine) -> None:
    fill(engine, [StoreTestItem(key="a", body={"x": 1, "y": 2})], {})
    first = dump(engine)
    with transaction(engine) as session:
        row = session.get(StoreTestItem, "a")
        assert row is not None
        row.body = {"y": 2, "x": 1}
        session.add(row)
    assert dump(engine) == first


def test_canonical_dump_skips_columns(engine: Engine) -> None:
    fill(engine, [StoreTestItem(key="a", count=1)], {"in:a": 1})
    full = dump(engine)
    with transaction(engine) as session:
        row = session.get(StoreTestItem, "a")
        assert row is not None
        row.count = 2
        session.add(row)
        set_checkpoint(session, "in:a", 2)
    assert dump(engine) != full
    assert dump(engine, skip_columns=["count", "cdp_checkpoint.sequence"]) == dump(
        engine, skip_columns=["test_store_item.count", "sequence"]
    )
    skipped = dump(engine, skip_columns=["test_store_item.count"])
    assert skipped["test_store_item"] == [("a", 0, "{}")]  # 0.0 is canonicalised to 0, JSON to sorted text
    assert skipped["cdp_checkpoint"] == [("in:a", 2)]


# ------------------------------------------------------------------ SQLite specifics


def test_sqlite_engine_uses_wal(sqlite_store_url: str) -> None:
    engine = make_engine(sqlite_store_url)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 10000
            assert conn.exec_driver_sql("PRAGMA mmap_size").scalar() == SQLITE_MMAP_MIB * 1024 * 1024
    finally:
        engine.dispose()


@pytest.mark.parametrize("mib", [0, 16])
def test_sqlite_memory_map_follows_the_setting(sqlite_store_url: str, mib: int) -> None:
    """``CDP_SQLITE_MMAP_MIB`` reaches every connection the service's engine opens (0 turns it off),
    and a store written through the map reads back the same through plain reads."""
    settings = ServiceSettings(sqlite_mmap_mib=mib)
    engine = make_engine(sqlite_store_url, sqlite_mmap_mib=settings.sqlite_mmap_mib)
    try:
        create_tables(engine, TABLES)
        with transaction(engine) as session:
            for i in range(2000):
                session.add(StoreTestItem(key=f"k{i:05}", count=i, body={"n": i}))
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA mmap_size").scalar() == mib * 1024 * 1024
    finally:
        engine.dispose()
    plain = make_engine(sqlite_store_url, sqlite_mmap_mib=0)
    try:
        with Session(plain) as session:
            rows = session.exec(select(StoreTestItem).order_by(StoreTestItem.key)).all()
            assert [(r.key, r.count, r.body) for r in rows] == [(f"k{i:05}", i, {"n": i}) for i in range(2000)]
    finally:
        plain.dispose()


def test_postgres_urls_are_normalised_to_psycopg(postgres_url: str) -> None:
    engine = make_engine(postgres_url)
    try:
        assert engine.url.drivername == "postgresql+psycopg"
        with engine.connect() as conn:
            assert conn.execute(sa.text("select 1")).scalar() == 1
    finally:
        engine.dispose()
