"""Unified profiles as a projection of identity's fragments, merges and splits.

Every fragment is kept (records with their attributes, events as the event history), so a
profile's merged attributes can be recomputed exactly under any merge policy and after a
split. Merge policies (``cdp_kit.merging``, the rule activation uses too): ``timestamp`` (newest
record time wins, then the later log position) and ``dataset_precedence`` (the first listed
dataset holding the attribute wins; the others after it, by timestamp). Event history: each
dataset's retention counts against the log's clock; a profile keeps at most ``event_cap``
events, the oldest dropped first.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from typing import Any

from sqlmodel import Session, col, delete, func, select, update

from cdp.identity.v1 import events_pb2 as identity_ev
from cdp.segmentation.v1 import segmentation_pb2 as pb
from cdp_kit.merging import MergeRule
from cdp_segmentation import store
from cdp_segmentation.computed import ComputedDef, values
from cdp_segmentation.evaluate import Event
from cdp_segmentation.store import EVENT, FragmentRow, ProfileIdentityRow, ProfileRow

DEFAULT_EVENT_CAP = 5000


@dataclass
class ProfileContext:
    """What shapes a profile beyond its fragments: read once per batch of work."""

    policy: pb.MergePolicy
    retention_ms: dict[str, int]
    clock_ms: int
    windows_ms: set[int] = field(default_factory=set)
    event_cap: int = DEFAULT_EVENT_CAP
    computed: tuple[ComputedDef, ...] = ()

    @cached_property
    def rule(self) -> MergeRule:
        return rule_of(self.policy)

    @classmethod
    def load(
        cls, session: Session, windows_ms: set[int], event_cap: int, computed: tuple[ComputedDef, ...] = ()
    ) -> ProfileContext:
        return cls(
            store.merge_policy(session),
            store.retention_ms(session),
            store.clock_ms(session),
            windows_ms,
            event_cap,
            computed,
        )


def to_ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat()


def rule_of(policy: pb.MergePolicy) -> MergeRule:
    """The kit's merge rule for a merge policy."""
    if policy.kind == pb.MERGE_POLICY_KIND_DATASET_PRECEDENCE:
        return MergeRule(tuple(policy.datasets))
    return MergeRule()


def winner_key(rule: MergeRule, source: dict[str, Any]) -> tuple[int, ...]:
    """The larger key wins an attribute (``cdp_kit.merging``): a source's dataset, record time
    and log position (the stream sequence of identity's message, then the fragment's place in it)."""
    return rule.key(source["dataset"], int(source["ts"]), int(source["seq"]), int(source.get("pos", 0)))


def _source(row: FragmentRow) -> dict[str, Any]:
    return source_of(row.dataset, row.ts_ms, row.seq, row.pos, row.source_event_id)


def source_of(dataset: str, ts_ms: int, seq: int, pos: int, source_event_id: str) -> dict[str, Any]:
    """Where an attribute's value came from, with what orders it."""
    return {"dataset": dataset, "at": iso(ts_ms), "ts": ts_ms, "seq": seq, "pos": pos, "id": source_event_id}


def _offer(profile: ProfileRow, row: FragmentRow, rule: MergeRule) -> None:
    attributes, sources = dict(profile.attributes), dict(profile.sources)
    candidate = _source(row)
    for name, value in row.attributes.items():
        current = sources.get(name)
        if current is None or winner_key(rule, candidate) >= winner_key(rule, current):
            attributes[name] = value
            sources[name] = candidate
    profile.attributes, profile.sources = attributes, sources


def recompute(session: Session, profile_id: str, ctx: ProfileContext) -> ProfileRow:
    """Rebuild a profile's attributes, event count and next due time from its fragments."""
    profile = session.get(ProfileRow, profile_id) or ProfileRow(profile_id=profile_id)
    profile.attributes, profile.sources = {}, {}
    for row in store.records_of(session, profile_id):
        _offer(profile, row, ctx.rule)
    enforce_cap(session, profile_id, ctx.event_cap)
    profile.events = event_count(session, profile_id)
    profile.next_due_ms = next_due(session, profile_id, ctx)
    profile.computed = computed_values(session, profile_id, ctx)
    session.add(profile)
    return profile


def history(session: Session, profile_id: str) -> list[Event]:
    """The retained events, oldest first by (time, log position, id)."""
    rows = session.exec(
        select(FragmentRow.event_type, FragmentRow.ts_ms, FragmentRow.attributes)
        .where(FragmentRow.profile_id == profile_id, FragmentRow.kind == EVENT)
        .order_by(col(FragmentRow.ts_ms), col(FragmentRow.seq), col(FragmentRow.source_event_id))
    ).all()
    return [Event(t, int(ts), dict(attrs)) for t, ts, attrs in rows]


def computed_values(session: Session, profile_id: str, ctx: ProfileContext) -> dict[str, Any]:
    """Every computed attribute of a profile from scratch, over its kept events at the clock."""
    if not ctx.computed:
        return {}
    session.flush()
    return values(ctx.computed, history(session, profile_id), ctx.clock_ms)


def event_count(session: Session, profile_id: str) -> int:
    query = select(func.count()).where(FragmentRow.profile_id == profile_id, FragmentRow.kind == EVENT)
    return int(session.exec(query).one())


def expired(ts_ms: int, dataset: str, ctx: ProfileContext) -> bool:
    retention = ctx.retention_ms.get(dataset)
    return retention is not None and ts_ms <= ctx.clock_ms - retention


def enforce_cap(session: Session, profile_id: str, cap: int) -> int:
    """Drop the oldest events beyond the cap (by event time, then log order). Returns how many."""
    session.flush()
    keep = (
        select(FragmentRow.source_event_id)
        .where(FragmentRow.profile_id == profile_id, FragmentRow.kind == EVENT)
        .order_by(col(FragmentRow.ts_ms).desc(), col(FragmentRow.seq).desc(), col(FragmentRow.source_event_id).desc())
        .offset(cap)
    )
    dropped = list(session.exec(keep).all())
    if dropped:
        session.exec(delete(FragmentRow).where(col(FragmentRow.source_event_id).in_(dropped)))
    return len(dropped)


def next_due(session: Session, profile_id: str, ctx: ProfileContext) -> int | None:
    """The earliest clock time after now at which a window end or a retention end changes this profile.

    A function of the profile's events, the windows and the clock only, so a rebuild computes the same."""
    candidates: list[int] = []
    base = select(func.min(FragmentRow.ts_ms)).where(FragmentRow.profile_id == profile_id, FragmentRow.kind == EVENT)
    for width in sorted(ctx.windows_ms):
        first = session.exec(base.where(col(FragmentRow.ts_ms) > ctx.clock_ms - width)).one()
        if first is not None:
            candidates.append(int(first) + width)
    for dataset, retention in sorted(ctx.retention_ms.items()):
        query = base.where(FragmentRow.dataset == dataset, col(FragmentRow.ts_ms) > ctx.clock_ms - retention)
        first = session.exec(query).one()
        if first is not None:
            candidates.append(int(first) + retention)
    return min(candidates) if candidates else None


def apply_merge(session: Session, merged: identity_ev.ProfilesMerged, ctx: ProfileContext) -> None:
    absorbed_ids = list(merged.absorbed)
    session.exec(
        update(FragmentRow).where(col(FragmentRow.profile_id).in_(absorbed_ids)).values(profile_id=merged.survivor)
    )
    session.exec(
        update(ProfileIdentityRow)
        .where(col(ProfileIdentityRow.profile_id).in_(absorbed_ids))
        .values(profile_id=merged.survivor)
    )
    session.exec(delete(ProfileRow).where(col(ProfileRow.profile_id).in_(absorbed_ids)))
    session.flush()
    recompute(session, merged.survivor, ctx)
    session.flush()


def apply_split(session: Session, split: identity_ev.ProfileSplit, ctx: ProfileContext) -> list[str]:
    """Move each part's fragments and identities to its profile; recompute every part. Returns the parts."""
    parts = [p.profile_id for p in split.parts]
    for part in split.parts:
        for chunk in _chunks(list(part.fragment_ids), 500):
            session.exec(
                update(FragmentRow)
                .where(col(FragmentRow.source_event_id).in_(chunk))
                .values(profile_id=part.profile_id)
            )
        for ident in part.identities:
            session.merge(ProfileIdentityRow(namespace=ident.namespace, value=ident.value, profile_id=part.profile_id))
    session.flush()
    touched = sorted({split.profile_id, *parts})
    for profile_id in touched:
        if _is_empty(session, profile_id):
            session.exec(delete(ProfileRow).where(col(ProfileRow.profile_id) == profile_id))
        else:
            recompute(session, profile_id, ctx)
    session.flush()
    return touched


def _is_empty(session: Session, profile_id: str) -> bool:
    fragments = session.exec(select(func.count()).where(FragmentRow.profile_id == profile_id)).one()
    identities = session.exec(select(func.count()).where(ProfileIdentityRow.profile_id == profile_id)).one()
    return not fragments and not identities


def _chunks(items: list[str], size: int) -> Iterable[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def apply_retention(session: Session, ctx: ProfileContext) -> None:
    """The clock moved: drop events past their dataset's retention (the due profiles are recomputed after)."""
    for dataset, retention in sorted(ctx.retention_ms.items()):
        session.exec(
            delete(FragmentRow).where(
                col(FragmentRow.kind) == EVENT,
                col(FragmentRow.dataset) == dataset,
                col(FragmentRow.ts_ms) <= ctx.clock_ms - retention,
            )
        )
    session.flush()


def recompute_all(session: Session, ctx: ProfileContext) -> None:
    """A new merge policy: every profile's attributes again."""
    ids = list(session.exec(select(ProfileRow.profile_id).order_by(col(ProfileRow.profile_id))).all())
    for profile_id in ids:
        recompute(session, profile_id, ctx)
    session.flush()


def recompute_computed_all(session: Session, ctx: ProfileContext) -> None:
    """A new computed attribute: every profile's values (and next due time: its window may be new)."""
    session.flush()
    for profile in session.exec(select(ProfileRow).order_by(col(ProfileRow.profile_id))).all():
        profile.computed = computed_values(session, profile.profile_id, ctx)
        profile.next_due_ms = next_due(session, profile.profile_id, ctx)
        session.add(profile)
    session.flush()


def due_profiles(session: Session, clock_ms: int, limit: int) -> list[str]:
    query = (
        select(ProfileRow.profile_id)
        .where(col(ProfileRow.next_due_ms).is_not(None), col(ProfileRow.next_due_ms) <= clock_ms)
        .order_by(col(ProfileRow.next_due_ms), col(ProfileRow.profile_id))
        .limit(limit)
    )
    return list(session.exec(query).all())


def refresh_due(session: Session, profile_id: str, ctx: ProfileContext) -> None:
    profile = session.get(ProfileRow, profile_id)
    if profile is not None:
        profile.events = event_count(session, profile_id)
        profile.next_due_ms = next_due(session, profile_id, ctx)
        profile.computed = computed_values(session, profile_id, ctx)
        session.add(profile)
