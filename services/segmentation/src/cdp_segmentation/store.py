"""The segmentation store: unified profiles, segment definitions, memberships."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from google.protobuf import json_format
from sqlmodel import Field, Session, SQLModel, col, func, select

from cdp.segmentation.v1 import segmentation_pb2 as pb
from cdp_kit.store import tables_of

REALIZED = "realized"
EXITED = "exited"


class SegmentRow(SQLModel, table=True):
    __tablename__ = "seg_segment"

    id: str = Field(primary_key=True)
    name: str = Field(unique=True)
    body: dict[str, Any] = Field(sa_type=sa.JSON)
    evaluated: bool = False


class ProfileRow(SQLModel, table=True):
    """A unified profile: merged attributes (newest value wins) with their sources."""

    __tablename__ = "seg_profile"

    profile_id: str = Field(primary_key=True)
    attributes: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON)
    sources: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON)
    events: int = 0


class ProfileIdentityRow(SQLModel, table=True):
    __tablename__ = "seg_profile_identity"

    namespace: str = Field(primary_key=True)
    value: str = Field(primary_key=True)
    profile_id: str = Field(index=True)


class MembershipRow(SQLModel, table=True):
    __tablename__ = "seg_membership"

    segment_id: str = Field(primary_key=True)
    profile_id: str = Field(primary_key=True, index=True)
    status: str
    changed_at: datetime


TABLES = tables_of(SegmentRow, ProfileRow, ProfileIdentityRow, MembershipRow)


def segment_of(row: SegmentRow) -> pb.Segment:
    return json_format.ParseDict(row.body, pb.Segment())


def segment_by_key(session: Session, key: str) -> SegmentRow | None:
    return session.get(SegmentRow, key) or session.exec(select(SegmentRow).where(SegmentRow.name == key)).first()


def all_segments(session: Session) -> list[SegmentRow]:
    return list(session.exec(select(SegmentRow).order_by(col(SegmentRow.name))).all())


def realized(session: Session, segment_id: str, limit: int = 0) -> list[str]:
    query = (
        select(MembershipRow.profile_id)
        .where(MembershipRow.segment_id == segment_id, MembershipRow.status == REALIZED)
        .order_by(col(MembershipRow.profile_id))
    )
    if limit:
        query = query.limit(limit)
    return list(session.exec(query).all())


def size(session: Session, segment_id: str) -> int:
    return len(realized(session, segment_id))


def memberships_of(session: Session, profile_id: str) -> dict[str, str]:
    rows = session.exec(select(MembershipRow).where(MembershipRow.profile_id == profile_id)).all()
    return {r.segment_id: r.status for r in rows}


def identities_of(session: Session, profile_id: str) -> list[ProfileIdentityRow]:
    rows = session.exec(
        select(ProfileIdentityRow)
        .where(ProfileIdentityRow.profile_id == profile_id)
        .order_by(col(ProfileIdentityRow.namespace), col(ProfileIdentityRow.value))
    )
    return list(rows.all())


def statuses(session: Session, segment_id: str, profile_ids: list[str]) -> dict[str, str]:
    rows = session.exec(
        select(MembershipRow).where(
            MembershipRow.segment_id == segment_id, col(MembershipRow.profile_id).in_(profile_ids)
        )
    ).all()
    return {r.profile_id: r.status for r in rows}


def profile_count(session: Session) -> int:
    return int(session.exec(select(func.count()).select_from(ProfileRow)).one())
