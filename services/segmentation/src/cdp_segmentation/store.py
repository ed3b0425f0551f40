"""The segmentation store: fragments, unified profiles, segment definitions, memberships, the clock."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from google.protobuf import json_format
from sqlmodel import Field, Session, SQLModel, col, func, select

from cdp.segmentation.v1 import segmentation_pb2 as pb
from cdp_kit.store import tables_of
from cdp_segmentation.vocabulary import EventSchema, EventVocabulary, Vocabulary

REALIZED = "realized"
EXITED = "exited"
RECORD = "record"
EVENT = "event"


class SegmentRow(SQLModel, table=True):
    __tablename__ = "seg_segment"

    id: str = Field(primary_key=True)
    name: str = Field(unique=True)
    body: dict[str, Any] = Field(sa_type=sa.JSON)
    evaluated: bool = False
    # Bumped when every profile must be evaluated again (a new merge policy).
    generation: int = 0
    # Batch segments: the log time (epoch ms) of the last finished SQL evaluation.
    last_run_ms: int = Field(default=0, sa_type=sa.BigInteger)


class ProfileRow(SQLModel, table=True):
    """A unified profile: attributes merged from its record fragments by the merge policy, with their sources."""

    __tablename__ = "seg_profile"

    profile_id: str = Field(primary_key=True)
    attributes: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON)
    sources: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON)
    events: int = 0
    # The current value of every computed attribute (see computed.py), by name.
    computed: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON)
    # Earliest log time (epoch ms) at which a window or a retention period changes what this profile matches.
    next_due_ms: int | None = Field(default=None, sa_type=sa.BigInteger, index=True)


class FragmentRow(SQLModel, table=True):
    """Every fragment identity sent: records (attributes) and events (the event history)."""

    __tablename__ = "seg_fragment"
    __table_args__ = (sa.Index("ix_seg_fragment_history", "profile_id", "kind", "event_type", "ts_ms"),)

    source_event_id: str = Field(primary_key=True)
    profile_id: str
    dataset: str
    kind: str
    event_type: str = ""
    ts_ms: int = Field(sa_type=sa.BigInteger)
    # Position in identity's log, the tie-break after the record time: the stream sequence of the
    # message, then the fragment's place among the message's events.
    seq: int = Field(sa_type=sa.BigInteger)
    pos: int = 0
    attributes: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON)


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


class DatasetRow(SQLModel, table=True):
    """What segmentation keeps of ingest's datasets: the event retention."""

    __tablename__ = "seg_dataset"

    name: str = Field(primary_key=True)
    retention_seconds: int = Field(default=0, sa_type=sa.BigInteger)


class SchemaRow(SQLModel, table=True):
    """What segmentation keeps of ingest's schemas: field paths and types, to check definitions."""

    __tablename__ = "seg_schema"

    name: str = Field(primary_key=True)
    schema_class: str
    fields: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON)
    # Event schemas: the event types it declares (empty: its fields apply to any event type).
    event_types: list[str] = Field(default_factory=list, sa_type=sa.JSON)


class ComputedRow(SQLModel, table=True):
    """A computed attribute's definition (folded from ComputedAttributeDefined)."""

    __tablename__ = "seg_computed"

    name: str = Field(primary_key=True)
    body: dict[str, Any] = Field(sa_type=sa.JSON)


class StateRow(SQLModel, table=True):
    """Singletons folded from the own logs: the clock, the merge policy."""

    __tablename__ = "seg_state"

    key: str = Field(primary_key=True)
    value: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON)


TABLES = tables_of(
    SegmentRow, ProfileRow, FragmentRow, ProfileIdentityRow, MembershipRow, DatasetRow, SchemaRow, StateRow, ComputedRow
)


def computed_of(row: ComputedRow) -> pb.ComputedAttribute:
    return computed_of_body(row.body)


def computed_of_body(body: dict[str, Any]) -> pb.ComputedAttribute:
    return json_format.ParseDict(body, pb.ComputedAttribute())


def all_computed(session: Session) -> list[pb.ComputedAttribute]:
    rows = session.exec(select(ComputedRow).order_by(col(ComputedRow.name))).all()
    return [computed_of(r) for r in rows]


_PARSED: dict[str, tuple[dict[str, Any], pb.Segment]] = {}
_PARSED_MAX = 100_000


def segment_of(row: SegmentRow) -> pb.Segment:
    """The segment a row holds (a copy the caller may change). Parsed once per body: the
    definition's JSON is compared with the one last parsed for that id (creating, compiling and
    classifying a segment reads every segment, and ``ParseDict`` made defining the 1,000th
    segment cost ~20 times the first)."""
    cached = _PARSED.get(row.id)
    if cached is None or cached[0] != row.body:
        if len(_PARSED) >= _PARSED_MAX:
            _PARSED.clear()
        cached = (row.body, json_format.ParseDict(row.body, pb.Segment()))
        _PARSED[row.id] = cached
    segment = pb.Segment()
    segment.CopyFrom(cached[1])
    return segment


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
    query = select(func.count()).where(MembershipRow.segment_id == segment_id, MembershipRow.status == REALIZED)
    return int(session.exec(query).one())


def memberships_of(session: Session, profile_id: str) -> dict[str, str]:
    rows = session.exec(select(MembershipRow).where(MembershipRow.profile_id == profile_id)).all()
    return {r.segment_id: r.status for r in rows}


def membership_rows(session: Session, profile_id: str) -> list[MembershipRow]:
    query = select(MembershipRow).where(MembershipRow.profile_id == profile_id).order_by(col(MembershipRow.segment_id))
    return list(session.exec(query).all())


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


def events_of(session: Session, profile_id: str, limit: int = 0) -> list[FragmentRow]:
    """The retained event history, newest first."""
    query = (
        select(FragmentRow)
        .where(FragmentRow.profile_id == profile_id, FragmentRow.kind == EVENT)
        .order_by(col(FragmentRow.ts_ms).desc(), col(FragmentRow.seq).desc(), col(FragmentRow.source_event_id).desc())
    )
    if limit:
        query = query.limit(limit)
    return list(session.exec(query).all())


def records_of(session: Session, profile_id: str) -> list[FragmentRow]:
    query = select(FragmentRow).where(FragmentRow.profile_id == profile_id, FragmentRow.kind == RECORD)
    return list(session.exec(query).all())


CLOCK = "clock"
MERGE_POLICY = "merge_policy"


def clock_ms(session: Session) -> int:
    row = session.get(StateRow, CLOCK)
    return int(row.value["ms"]) if row is not None else 0


def set_clock(session: Session, ms: int) -> None:
    session.merge(StateRow(key=CLOCK, value={"ms": ms}))


def merge_policy(session: Session) -> pb.MergePolicy:
    row = session.get(StateRow, MERGE_POLICY)
    if row is None:
        return pb.MergePolicy(kind=pb.MERGE_POLICY_KIND_TIMESTAMP)
    return json_format.ParseDict(row.value, pb.MergePolicy())


def set_merge_policy(session: Session, policy: pb.MergePolicy) -> None:
    session.merge(StateRow(key=MERGE_POLICY, value=json_format.MessageToDict(policy)))


def retention_ms(session: Session) -> dict[str, int]:
    rows = session.exec(select(DatasetRow).where(col(DatasetRow.retention_seconds) > 0)).all()
    return {r.name: r.retention_seconds * 1000 for r in rows}


def sources_of(session: Session, profile_id: str) -> list[tuple[str, str, int, int]]:
    """(dataset, kind, fragments, last record time ms) of every source of a profile."""
    query = (
        select(FragmentRow.dataset, FragmentRow.kind, func.count(), func.max(FragmentRow.ts_ms))
        .where(FragmentRow.profile_id == profile_id)
        .group_by(col(FragmentRow.dataset), col(FragmentRow.kind))
        .order_by(col(FragmentRow.dataset), col(FragmentRow.kind))
    )
    return [(d, k, int(c), int(m)) for d, k, c, m in session.exec(query).all()]


def vocabulary(session: Session) -> Vocabulary:
    """The fields ingest's schemas declare, for profiles and for events (per event type)."""
    attributes: dict[str, str] = {}
    event_schemas: list[EventSchema] = []
    for row in session.exec(select(SchemaRow).order_by(col(SchemaRow.name))).all():
        if row.schema_class == "event":
            event_schemas.append(EventSchema(row.name, row.fields, tuple(row.event_types or ())))
        else:
            attributes.update(row.fields)
    events = EventVocabulary(tuple(event_schemas))
    computed = {a.name: computed_type(a, events) for a in all_computed(session)}
    return Vocabulary(attributes, events, computed)


def computed_type(attribute: pb.ComputedAttribute, events: EventVocabulary) -> str:
    """What a computed attribute holds, for the type check: a number, or the field's type (most_recent)."""
    if attribute.aggregate != pb.AGGREGATE_MOST_RECENT:
        return "number"
    kind = events.fields_of(attribute.pattern.event_type).get(attribute.field)
    return kind if kind is not None and not kind.startswith("conflict:") else "any"
