"""Bulk reads and writes on the driver cursor of a session's connection, inside its transaction.

The graph moves thousands of rows per transaction. SQLAlchemy's per-row parameter handling
costs more than SQLite itself, so the working set hands plain tuples to the driver's
``executemany`` and reads with ``IN (...)`` lists, in the dialect's placeholder style
(sqlite3: ``?``, psycopg: ``%s``). Table and column names come from the store's tables only.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session

IN_CHUNK = 500
Row = tuple[Any, ...]


def chunks(items: Sequence[Any], size: int = IN_CHUNK) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


class Bulk:
    """The driver connection of ``session``'s current transaction."""

    def __init__(self, session: Session) -> None:
        connection = session.connection()
        self.dbapi = connection.connection
        self.mark = "?" if connection.dialect.name == "sqlite" else "%s"

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        cursor = self.dbapi.cursor()
        try:
            cursor.execute(sql, tuple(params))
            return list(cursor.fetchall())  # sqlite3 and psycopg rows are tuples already
        finally:
            cursor.close()

    def select_in(self, table: sa.Table, columns: Sequence[str], column: str, values: Iterable[str]) -> list[Row]:
        """Rows of ``table`` whose ``column`` is one of ``values`` (sorted, in chunks)."""
        out: list[Row] = []
        names = ", ".join(_quoted(table, c) for c in columns)
        where = _quoted(table, column)
        for chunk in chunks(sorted(set(values))):
            marks = ", ".join([self.mark] * len(chunk))
            out += self.rows(f"SELECT {names} FROM {table.name} WHERE {where} IN ({marks})", chunk)
        return out

    def many(self, sql: str, rows: Sequence[Row]) -> None:
        if not rows:
            return
        cursor = self.dbapi.cursor()
        try:
            cursor.executemany(sql, list(rows))
        finally:
            cursor.close()

    def insert(self, table: sa.Table, columns: Sequence[str], rows: Sequence[Row]) -> None:
        names = ", ".join(_quoted(table, c) for c in columns)
        marks = ", ".join([self.mark] * len(columns))
        self.many(f"INSERT INTO {table.name} ({names}) VALUES ({marks})", rows)

    def insert_new(self, table: sa.Table, columns: Sequence[str], rows: Sequence[Row]) -> None:
        """Insert the rows whose key is not in the table yet (SQLite and PostgreSQL alike)."""
        names = ", ".join(_quoted(table, c) for c in columns)
        marks = ", ".join([self.mark] * len(columns))
        self.many(f"INSERT INTO {table.name} ({names}) VALUES ({marks}) ON CONFLICT DO NOTHING", rows)

    def update(self, table: sa.Table, columns: Sequence[str], keys: Sequence[str], rows: Sequence[Row]) -> None:
        """Each row holds the new values of ``columns`` followed by the values of ``keys``."""
        sets = ", ".join(f"{_quoted(table, c)} = {self.mark}" for c in columns)
        where = " AND ".join(f"{_quoted(table, k)} = {self.mark}" for k in keys)
        self.many(f"UPDATE {table.name} SET {sets} WHERE {where}", rows)

    def delete(self, table: sa.Table, keys: Sequence[str], rows: Sequence[Row]) -> None:
        where = " AND ".join(f"{_quoted(table, k)} = {self.mark}" for k in keys)
        self.many(f"DELETE FROM {table.name} WHERE {where}", rows)


def _quoted(table: sa.Table, column: str) -> str:
    """A column of the table, quoted (``key`` and ``unique`` are reserved words somewhere)."""
    assert column in table.c, f"{table.name} has no column {column}"
    return f'"{column}"'
