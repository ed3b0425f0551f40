"""The identity store: identities, links between them, and profiles."""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlmodel import Field, Session, SQLModel, col, func, select

from cdp_kit.store import tables_of


class IdentityRow(SQLModel, table=True):
    __tablename__ = "identity_node"

    namespace: str = Field(primary_key=True)
    value: str = Field(primary_key=True)
    profile_id: str = Field(index=True)
    first_seen: datetime
    last_seen: datetime


class LinkRow(SQLModel, table=True):
    """Two identities seen together in one record or event."""

    __tablename__ = "identity_link"

    a: str = Field(primary_key=True)
    b: str = Field(primary_key=True)
    first_seen: datetime
    last_seen: datetime
    dataset: str


class ProfileRow(SQLModel, table=True):
    __tablename__ = "identity_profile"

    profile_id: str = Field(primary_key=True)
    ordinal: int = Field(sa_type=sa.BigInteger, index=True)
    merged_into: str = ""


TABLES = tables_of(IdentityRow, LinkRow, ProfileRow)


def node_key(namespace: str, value: str) -> str:
    return f"{namespace}:{value}"


def profiles_of(session: Session, identities: list[tuple[str, str]]) -> list[ProfileRow]:
    ids: set[str] = set()
    for ns, value in identities:
        row = session.get(IdentityRow, (ns, value))
        if row is not None:
            ids.add(row.profile_id)
    return [p for p in (session.get(ProfileRow, i) for i in sorted(ids)) if p is not None]


def next_ordinal(session: Session) -> int:
    current = session.exec(select(func.max(ProfileRow.ordinal))).one()
    return int(current or 0) + 1


def identities_of(session: Session, profile_id: str) -> list[IdentityRow]:
    rows = session.exec(
        select(IdentityRow)
        .where(IdentityRow.profile_id == profile_id)
        .order_by(col(IdentityRow.namespace), col(IdentityRow.value))
    )
    return list(rows.all())
