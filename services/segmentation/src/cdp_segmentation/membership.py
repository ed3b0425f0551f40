"""Deciding membership changes: evaluate what a change can affect, compare with what is known, emit only changes."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlmodel import Session, col, select

from cdp.segmentation.v1 import events_pb2 as ev
from cdp.segmentation.v1 import segmentation_pb2 as pb
from cdp_kit.envelope import Envelope, deterministic_id, make_envelope
from cdp_kit.processor import UnitOfWork
from cdp_kit.streams import SEGMENTATION_MEMBERSHIPS
from cdp_segmentation import store
from cdp_segmentation.analysis import Reads, reads_of
from cdp_segmentation.computed import ComputedDef, windows_ms
from cdp_segmentation.evaluate import Event, ProfileData, Test, compile_ast
from cdp_segmentation.profiles import DEFAULT_EVENT_CAP, ProfileContext, next_due
from cdp_segmentation.store import EVENT, EXITED, REALIZED, FragmentRow, ProfileRow
from cdp_segmentation.working import ProfileState, WorkingSet


@dataclass(frozen=True)
class CompiledSegment:
    id: str
    name: str
    ast: pb.Expression
    reads: Reads
    streaming: bool
    test: Test


class Catalog:
    """The segments (parsed once, in dependency order) and the profile context, cached between
    batches. The projection invalidates it whenever a fold changes either."""

    def __init__(self, event_cap: int = DEFAULT_EVENT_CAP) -> None:
        self.event_cap = event_cap
        self._segments: list[CompiledSegment] | None = None
        self._computed: tuple[ComputedDef, ...] | None = None
        self._ctx: ProfileContext | None = None
        self._affected: dict[tuple[Any, ...], list[CompiledSegment]] = {}
        # The in-memory profiles of the input batch being applied (see working.py).
        self.working: WorkingSet | None = None

    def invalidate(self) -> None:
        self._segments = None
        self._computed = None
        self._ctx = None
        self._affected = {}

    def working_for(self, session: Session) -> WorkingSet:
        """The working set of this transaction (a new one for a new transaction)."""
        if self.working is None or self.working.session is not session:
            self.working = WorkingSet(session)
        return self.working

    def segments(self, session: Session) -> list[CompiledSegment]:
        if self._segments is None:
            compiled = []
            for row in store.all_segments(session):
                segment = store.segment_of(row)
                streaming = segment.evaluation != pb.EVALUATION_BATCH
                compiled.append(
                    CompiledSegment(
                        row.id, row.name, segment.ast, reads_of(segment.ast), streaming, compile_ast(segment.ast)
                    )
                )
            self._segments = _dependency_order(compiled)
        return self._segments

    def streaming(self, session: Session) -> list[CompiledSegment]:
        return [s for s in self.segments(session) if s.streaming]

    def computed(self, session: Session) -> tuple[ComputedDef, ...]:
        """The computed attribute definitions, by name."""
        if self._computed is None:
            self._computed = tuple(ComputedDef.of(a) for a in store.all_computed(session))
        return self._computed

    def windows(self, session: Session) -> set[int]:
        """The windows whose end, counted from an event, changes a streaming segment or a computed attribute."""
        segment_windows: set[int] = set().union(*(s.reads.windows_ms for s in self.streaming(session)))
        return segment_windows | windows_ms(self.computed(session))

    def context(self, session: Session) -> ProfileContext:
        if self._ctx is None:
            computed = self.computed(session)
            self._ctx = ProfileContext.load(session, self.windows(session), self.event_cap, computed)
        return self._ctx

    def affected(
        self,
        session: Session,
        *,
        attributes: Iterable[str] = (),
        event_types: Iterable[str] = (),
        identities: bool = False,
        timed: bool = False,
        everything: bool = False,
    ) -> list[CompiledSegment]:
        """The streaming segments that read what changed, and every segment that reads those."""
        attrs, types = frozenset(attributes), frozenset(event_types)
        key = (attrs, types, identities, timed, everything)
        cached = self._affected.get(key)
        if cached is not None and self._segments is not None:
            return cached
        chosen: set[str] = set()
        result = []
        for seg in self.streaming(session):
            reads = seg.reads
            hit = (
                everything
                or bool(reads.attributes & attrs)
                or bool(reads.event_types & types)
                or (identities and bool(reads.namespaces))
                or (timed and bool(reads.windows_ms or reads.event_types))
                or bool(reads.segments & chosen)
            )
            if hit:
                chosen.add(seg.id)
                result.append(seg)
        self._affected[key] = result
        return result


def _dependency_order(segments: list[CompiledSegment]) -> list[CompiledSegment]:
    by_id = {s.id: s for s in segments}
    ordered: list[CompiledSegment] = []
    seen: set[str] = set()

    def visit(seg: CompiledSegment) -> None:
        if seg.id in seen:
            return
        seen.add(seg.id)
        for dep in sorted(seg.reads.segments):
            if dep in by_id:
                visit(by_id[dep])
        ordered.append(seg)

    for seg in sorted(segments, key=lambda s: s.name):
        visit(seg)
    return ordered


def profile_data(session: Session, profile: ProfileRow) -> ProfileData:
    namespaces = {i.namespace for i in store.identities_of(session, profile.profile_id)}
    memberships = {sid for sid, st in store.memberships_of(session, profile.profile_id).items() if st == REALIZED}

    def load() -> list[Event]:
        rows = session.exec(
            select(FragmentRow.event_type, FragmentRow.ts_ms, FragmentRow.attributes).where(
                FragmentRow.profile_id == profile.profile_id, FragmentRow.kind == EVENT
            )
        ).all()
        return [Event(t, int(ts), dict(attrs)) for t, ts, attrs in rows]

    return ProfileData(dict(profile.attributes), namespaces, memberships, load, dict(profile.computed or {}))


def change(uow: UnitOfWork, segment_id: str, profile_id: str, status: str, at: datetime, cause: str) -> Envelope:
    payload = ev.MembershipChanged(
        segment_id=segment_id,
        profile_id=profile_id,
        status=ev.MEMBERSHIP_STATUS_REALIZED if status == REALIZED else ev.MEMBERSHIP_STATUS_EXITED,
        cause=cause,
    )
    payload.at.FromDatetime(at)
    return make_envelope(
        payload,
        event_id=deterministic_id("membership", segment_id, profile_id, cause),
        subject_key=profile_id,
        occurred_at=at,
        cause=uow.cause,
    )


def reevaluate(
    uow: UnitOfWork, profile_id: str, segments: list[CompiledSegment], at: datetime, cause: str, now_ms: int
) -> int:
    """Evaluate ``segments`` (in dependency order) for one profile; emit the changes. Returns how many."""
    if not segments:
        return 0
    profile = uow.session.get(ProfileRow, profile_id)
    if profile is None:
        return exit_all(uow, profile_id, at, cause)
    data = profile_data(uow.session, profile)
    current = store.memberships_of(uow.session, profile_id)
    events: list[Envelope] = []
    for seg in segments:
        inside = seg.test(data, now_ms)
        if inside != (current.get(seg.id) == REALIZED):
            events.append(change(uow, seg.id, profile_id, REALIZED if inside else EXITED, at, cause))
            (data.memberships.add if inside else data.memberships.discard)(seg.id)
    uow.emit(SEGMENTATION_MEMBERSHIPS, events)
    return len(events)


def reevaluate_state(
    uow: UnitOfWork, state: ProfileState, segments: list[CompiledSegment], at: datetime, cause: str, now_ms: int
) -> int:
    """``reevaluate`` against a profile held in the working set."""
    if not segments:
        return 0
    inside_now = {sid for sid, status in state.memberships.items() if status == REALIZED}
    events = state.events
    data = ProfileData(state.attributes, state.namespaces, inside_now, lambda: events, state.computed)
    changes: list[Envelope] = []
    for seg in segments:
        inside = seg.test(data, now_ms)
        if inside != (seg.id in inside_now):
            changes.append(change(uow, seg.id, state.profile_id, REALIZED if inside else EXITED, at, cause))
            (inside_now.add if inside else inside_now.discard)(seg.id)
    uow.emit(SEGMENTATION_MEMBERSHIPS, changes)
    return len(changes)


def exit_all(uow: UnitOfWork, profile_id: str, at: datetime, cause: str) -> int:
    current = store.memberships_of(uow.session, profile_id)
    events = [change(uow, sid, profile_id, EXITED, at, cause) for sid, st in sorted(current.items()) if st == REALIZED]
    uow.emit(SEGMENTATION_MEMBERSHIPS, events)
    return len(events)


BACKFILL_PAGE = 1000


def backfill_page(
    uow: UnitOfWork, *, catalog: Catalog, segment_id: str, generation: int, after: str, at: datetime
) -> str | None:
    """Evaluate one page of profiles (ordered by id, after ``after``) against a streaming segment and
    emit the differences. Returns the last profile id of the page, or None when there are no more
    profiles: then the segment is marked evaluated. Diff-based, so re-running is harmless."""
    row = uow.session.get(store.SegmentRow, segment_id)
    if row is None or row.generation != generation or row.evaluated:
        return None  # gone, re-opened, or already evaluated by a concurrent run: nothing to do
    seg = next((s for s in catalog.segments(uow.session) if s.id == segment_id), None)
    page = list(
        uow.session.exec(
            select(ProfileRow)
            .where(col(ProfileRow.profile_id) > after)
            .order_by(col(ProfileRow.profile_id))
            .limit(BACKFILL_PAGE)
        ).all()
    )
    if not page or seg is None:
        marker = make_envelope(
            ev.SegmentEvaluated(
                segment_id=segment_id, profiles=store.profile_count(uow.session), generation=generation
            ),
            event_id=deterministic_id("segment-evaluated", segment_id, generation),
            subject_key=segment_id,
            occurred_at=at,
            cause=uow.cause,
        )
        uow.emit(SEGMENTATION_MEMBERSHIPS, [marker])
        return None
    ctx = catalog.context(uow.session)
    events: list[Envelope] = []
    current = store.statuses(uow.session, segment_id, [p.profile_id for p in page])
    for profile in page:
        _refresh_due(uow.session, profile, ctx)
        inside = seg.test(profile_data(uow.session, profile), ctx.clock_ms)
        if inside != (current.get(profile.profile_id) == REALIZED):
            status = REALIZED if inside else EXITED
            cause = f"segment-defined:{segment_id}:{generation}"
            events.append(change(uow, segment_id, profile.profile_id, status, at, cause))
    uow.emit(SEGMENTATION_MEMBERSHIPS, events)
    return page[-1].profile_id


def _refresh_due(session: Session, profile: ProfileRow, ctx: ProfileContext) -> None:
    due = next_due(session, profile.profile_id, ctx)
    if due != profile.next_due_ms:
        profile.next_due_ms = due
        session.add(profile)
