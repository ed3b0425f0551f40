"""The activation store: destinations, plans, what it knows of profiles, segments and
memberships, and the delivery log."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from google.protobuf import json_format
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Field, Session, SQLModel, col, select

from cdp.activation.v1 import activation_pb2 as pb
from cdp_kit.store import tables_of


class DestinationRow(SQLModel, table=True):
    __tablename__ = "act_destination"

    id: str = Field(primary_key=True)
    name: str = Field(unique=True)
    # The config's secrets are sealed (cdp_kit.keyring); legacy_plain: the log holds them in
    # plain text (written by a version before encryption) until RotateSecrets writes them sealed.
    body: dict[str, Any] = Field(sa_type=sa.JSON)
    legacy_plain: bool = False


class PlanRow(SQLModel, table=True):
    __tablename__ = "act_plan"

    id: str = Field(primary_key=True)
    destination_id: str = Field(index=True)
    segment_id: str = Field(index=True)
    body: dict[str, Any] = Field(sa_type=sa.JSON)
    delivered_through: int = Field(default=0, sa_type=sa.BigInteger)
    deliveries: int = 0
    # Batches prepared so far: the next batch's sequence (batch ids derive from it).
    batch_seq: int = Field(default=0, sa_type=sa.BigInteger)


class SegmentRow(SQLModel, table=True):
    """Segments as segmentation defined them (from CDP_CONFIG)."""

    __tablename__ = "act_segment"

    id: str = Field(primary_key=True)
    name: str = Field(index=True)


class MemberRow(SQLModel, table=True):
    """Realized memberships (from CDP_AUDIENCE); exits delete the row."""

    __tablename__ = "act_member"

    segment_id: str = Field(primary_key=True)
    profile_id: str = Field(primary_key=True, index=True)
    since: datetime


class SegmentChangeRow(SQLModel, table=True):
    """The audience sequence of the last membership change of each segment."""

    __tablename__ = "act_segment_change"

    segment_id: str = Field(primary_key=True)
    sequence: int = Field(sa_type=sa.BigInteger)


class ProfileRow(SQLModel, table=True):
    """What activation keeps of a profile: identities by namespace, and attributes as
    segmentation's merge policy resolves them (``cdp_kit.merging``)."""

    __tablename__ = "act_profile"

    profile_id: str = Field(primary_key=True)
    identities: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON)
    attributes: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON)
    # The origin of each attribute's value: [dataset, record time ms, log sequence, position].
    origins: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON)


class FragmentRow(SQLModel, table=True):
    """A profile record's attributes with their origin, kept so a merge, a split or a new merge
    policy can resolve a profile's attributes again."""

    __tablename__ = "act_fragment"

    id: str = Field(primary_key=True)
    profile_id: str = Field(index=True)
    attributes: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON)
    dataset: str = ""
    ts_ms: int = Field(default=0, sa_type=sa.BigInteger)
    # Position in identity's log: the stream sequence of the message, then the place in it.
    seq: int = Field(default=0, sa_type=sa.BigInteger)
    pos: int = 0


class MergePolicyRow(SQLModel, table=True):
    """Segmentation's merge policy (from its config log): the dataset precedence, empty for
    ``timestamp``. One row; absent is ``timestamp``."""

    __tablename__ = "act_merge_policy"

    id: str = Field(primary_key=True)
    precedence: list[Any] = Field(default_factory=list, sa_type=sa.JSON)


class PlanMemberRow(SQLModel, table=True):
    """Who the destination holds for a plan, and the record it was sent (removals reuse it)."""

    __tablename__ = "act_plan_member"

    plan_id: str = Field(primary_key=True)
    profile_id: str = Field(primary_key=True, index=True)  # indexed: a privacy erasure finds them by profile
    record: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON)


class BatchRow(SQLModel, table=True):
    """A prepared micro-batch: pending until delivered or dead-lettered."""

    __tablename__ = "act_batch"
    # The removal batches (action "erase") of a plan, or all of them, found without reading every
    # batch: PrivacyAcks looks for them every delivery interval, and the add batches never go.
    __table_args__ = (sa.Index("ix_act_batch_action_plan", "action", "plan_id"),)

    id: str = Field(primary_key=True)
    plan_id: str = Field(index=True)
    destination_id: str = Field(index=True)
    action: str
    sequence: int = Field(sa_type=sa.BigInteger)
    status: str = Field(index=True)  # pending | delivered | dead
    records: list[Any] = Field(default_factory=list, sa_type=sa.JSON)
    profiles: int = 0
    attempts: int = 0
    retried: int = 0
    reason: str = ""
    permanent: bool = False
    prepared_at: datetime
    finished_at: datetime | None = None
    latency_ms: float = 0.0
    activated: int = 0
    rejected: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON)
    warnings: list[Any] = Field(default_factory=list, sa_type=sa.JSON)
    # A privacy removal batch: the vault key refs its records are sealed under on CDP_DELIVERY
    # (not a person's keys), and whether activation destroyed them (RemovalKeysDestroyed).
    removal_keys: list[Any] = Field(default_factory=list, sa_type=sa.JSON)
    keys_destroyed: bool = False


class ExclusionRow(SQLModel, table=True):
    """A segment member a plan leaves out, and why."""

    __tablename__ = "act_exclusion"

    plan_id: str = Field(primary_key=True)
    profile_id: str = Field(primary_key=True, index=True)
    reason: str


class AttributeSourceRow(SQLModel, table=True):
    """Which datasets an attribute or identity namespace came from (for data-usage policies)."""

    __tablename__ = "act_attribute_source"

    name: str = Field(primary_key=True)
    dataset: str = Field(primary_key=True)


class LabelRow(SQLModel, table=True):
    __tablename__ = "act_label"

    kind: str = Field(primary_key=True)
    name: str = Field(primary_key=True)
    label: str = Field(primary_key=True)


class PolicyRow(SQLModel, table=True):
    __tablename__ = "act_policy"

    id: str = Field(primary_key=True)
    name: str = Field(unique=True)
    label: str = Field(index=True)
    action: str


class DeliveryRow(SQLModel, table=True):
    __tablename__ = "act_delivery"

    id: str = Field(primary_key=True)
    plan_id: str = Field(index=True)
    destination_id: str
    body: dict[str, Any] = Field(sa_type=sa.JSON)
    at: datetime


class PrivacyRow(SQLModel, table=True):
    """A privacy request (cdp.privacy.v1) as activation applied it: what it erased and what it
    asked of each destination, and whether PrivacyApplied is on the log (``applied``)."""

    __tablename__ = "act_privacy"

    request_id: str = Field(primary_key=True)
    counts: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON)
    # DestinationRemoval as dicts (plan_id -> removal), prepared batches and unsupported platforms.
    removals: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON)
    applied: bool = False
    # A removal whose outcome may still change ("prepared", or failed while it can be redriven):
    # PrivacyAcks reports "delivered" / "failed: ..." in a further PrivacyApplied when it does.
    open_removals: bool = Field(default=False, index=True)


class ErasedRow(SQLModel, table=True):
    """A profile a privacy request erased: facts about it that arrive later are not kept."""

    __tablename__ = "act_erased"

    profile_id: str = Field(primary_key=True)


class KeyRefRow(SQLModel, table=True):
    """The key refs (``cdp_kit.vault``) of each identity, read from the sealed fragments: a
    prepared batch's records are sealed under the keys of their identities."""

    __tablename__ = "act_key_ref"

    key_ref: str = Field(primary_key=True)
    key: str = Field(index=True)  # "namespace:value"


TABLES = tables_of(
    KeyRefRow,
    DestinationRow,
    PlanRow,
    SegmentRow,
    MemberRow,
    SegmentChangeRow,
    ProfileRow,
    FragmentRow,
    MergePolicyRow,
    PlanMemberRow,
    DeliveryRow,
    BatchRow,
    ExclusionRow,
    AttributeSourceRow,
    LabelRow,
    PolicyRow,
    PrivacyRow,
    ErasedRow,
)


def destination_of(row: DestinationRow) -> pb.Destination:
    return json_format.ParseDict(row.body, pb.Destination())


def plan_of(row: PlanRow) -> pb.ActivationPlan:
    return json_format.ParseDict(row.body, pb.ActivationPlan())


def destination_by_key(session: Session, key: str) -> DestinationRow | None:
    return (
        session.get(DestinationRow, key)
        or session.exec(select(DestinationRow).where(DestinationRow.name == key)).first()
    )


def segment_by_key(session: Session, key: str) -> SegmentRow | None:
    return session.get(SegmentRow, key) or session.exec(select(SegmentRow).where(SegmentRow.name == key)).first()


def members(session: Session, segment_id: str) -> list[str]:
    rows = session.exec(
        select(MemberRow.profile_id).where(MemberRow.segment_id == segment_id).order_by(col(MemberRow.profile_id))
    )
    return list(rows.all())


def last_change(session: Session, segment_id: str) -> int:
    row = session.get(SegmentChangeRow, segment_id)
    return row.sequence if row else 0


def plan_members(session: Session, plan_id: str) -> set[str]:
    return set(session.exec(select(PlanMemberRow.profile_id).where(PlanMemberRow.plan_id == plan_id)).all())


UPSERT_CHUNK = 500


def upsert(session: Session, model: Any, rows: list[dict[str, Any]], keys: list[str], *, update: bool = True) -> None:
    """Insert ``rows`` (dicts of ``model``'s columns), or on a primary key conflict update the
    other columns (``update``) or keep the row as it is: what ``session.merge`` does, in one
    statement per chunk instead of a SELECT and a write per row."""
    if not rows:
        return
    table = model.__table__
    insert = postgresql.insert(table) if session.get_bind().dialect.name == "postgresql" else sqlite.insert(table)
    others = [c for c in rows[0] if c not in keys]
    if update and others:
        stmt = insert.on_conflict_do_update(index_elements=keys, set_={c: insert.excluded[c] for c in others})
    else:
        stmt = insert.on_conflict_do_nothing(index_elements=keys)
    for start in range(0, len(rows), UPSERT_CHUNK):
        session.execute(stmt, rows[start : start + UPSERT_CHUNK])
