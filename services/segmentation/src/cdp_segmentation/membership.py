"""Deciding membership changes: evaluate, compare with what is known, emit only changes."""

from __future__ import annotations

from datetime import datetime

from sqlmodel import Session, col, select

from cdp.segmentation.v1 import events_pb2 as ev
from cdp.segmentation.v1 import segmentation_pb2 as pb
from cdp_kit.envelope import Envelope, deterministic_id, make_envelope
from cdp_kit.processor import UnitOfWork
from cdp_kit.streams import SEGMENTATION_MEMBERSHIPS
from cdp_segmentation import store
from cdp_segmentation.evaluate import matches
from cdp_segmentation.store import EXITED, REALIZED, ProfileRow


def profile_view(profile: ProfileRow, identities: list[store.ProfileIdentityRow]) -> dict[str, object]:
    """What the audience language sees: attributes, plus `identities.<namespace>`."""
    view: dict[str, object] = dict(profile.attributes)
    idents: dict[str, str] = {}
    for ident in identities:
        idents.setdefault(ident.namespace, ident.value)
    view["identities"] = idents
    return view


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
    uow: UnitOfWork, profile_id: str, segments: list[tuple[str, pb.Expression]], at: datetime, cause: str
) -> None:
    profile = uow.session.get(ProfileRow, profile_id)
    current = store.memberships_of(uow.session, profile_id)
    events: list[Envelope] = []
    view = profile_view(profile, store.identities_of(uow.session, profile_id)) if profile else None
    for segment_id, ast in segments:
        inside = view is not None and matches(ast, view)
        was = current.get(segment_id) == REALIZED
        if inside != was:
            events.append(change(uow, segment_id, profile_id, REALIZED if inside else EXITED, at, cause))
    uow.emit(SEGMENTATION_MEMBERSHIPS, events)


def exit_all(uow: UnitOfWork, profile_id: str, at: datetime, cause: str) -> None:
    current = store.memberships_of(uow.session, profile_id)
    events = [change(uow, sid, profile_id, EXITED, at, cause) for sid, st in sorted(current.items()) if st == REALIZED]
    uow.emit(SEGMENTATION_MEMBERSHIPS, events)


def active_segments(session: Session) -> list[tuple[str, pb.Expression]]:
    return [(row.id, store.segment_of(row).ast) for row in store.all_segments(session)]


BACKFILL_PAGE = 1000


def backfill_page(uow: UnitOfWork, *, segment_id: str, after: str, at: datetime) -> str | None:
    """Evaluate one page of profiles (ordered by id, after ``after``) against a segment and
    emit the differences. Returns the last profile id of the page, or None when there are
    no more profiles: then the segment is marked evaluated. Diff-based, so re-running is harmless."""
    row = uow.session.get(store.SegmentRow, segment_id)
    if row is None:
        return None
    ast = store.segment_of(row).ast
    page = list(
        uow.session.exec(
            select(ProfileRow)
            .where(col(ProfileRow.profile_id) > after)
            .order_by(col(ProfileRow.profile_id))
            .limit(BACKFILL_PAGE)
        ).all()
    )
    if not page:
        marker = make_envelope(
            ev.SegmentEvaluated(segment_id=segment_id, profiles=store.profile_count(uow.session)),
            event_id=deterministic_id("segment-evaluated", segment_id),
            subject_key=segment_id,
            occurred_at=at,
            cause=uow.cause,
        )
        uow.emit(SEGMENTATION_MEMBERSHIPS, [marker])
        return None
    events: list[Envelope] = []
    current = store.statuses(uow.session, segment_id, [p.profile_id for p in page])
    for profile in page:
        inside = matches(ast, profile_view(profile, store.identities_of(uow.session, profile.profile_id)))
        if inside != (current.get(profile.profile_id) == REALIZED):
            status = REALIZED if inside else EXITED
            events.append(change(uow, segment_id, profile.profile_id, status, at, f"segment-defined:{segment_id}"))
    uow.emit(SEGMENTATION_MEMBERSHIPS, events)
    return page[-1].profile_id
