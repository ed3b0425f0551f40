"""Privacy requests in segmentation (cdp.privacy.v1): the person exits every audience and their
profile, attributes, events, identities, memberships and computed values are erased.

* Identity puts the erasure of a delete on its fragments log too, in its place among the person's
  fragments: the profile input (``ProfilesToMemberships``) erases the profile's rows when it reads it,
  so a replay erases exactly what the live store erased (and keeps a person who came back later).
* Reading the request itself (``cdp.privacy.requests``) leaves it pending; the applier waits until
  the profile input has read everything identity wrote before the request (the erasure included),
  emits ``MembershipChanged`` EXITED for every audience the person was in (cause
  ``privacy:<request id>``) and, as a second cause of the same transaction, ``PrivacyApplied`` with
  the counts. A membership that exits for privacy is deleted, not kept as "exited" (live and on replay).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import sqlalchemy as sa
from sqlmodel import Field, Session, SQLModel, col, select

from cdp.privacy.v1 import privacy_pb2 as pb
from cdp_kit.envelope import Cause, Envelope, deterministic_id, make_envelope, to_timestamp, unpack, utcnow
from cdp_kit.errors import Unavailable
from cdp_kit.eventlog import LogMessage
from cdp_kit.privacy import KeyVault, checked_request, is_delete, keep_applying, revoke
from cdp_kit.processor import Processor, UnitOfWork, in_checkpoint
from cdp_kit.store import get_checkpoint, scrub_after_commit, tables_of, transaction
from cdp_kit.streams import PROFILE, SEGMENTATION_PRIVACY_APPLIED, SEGMENTATION_READS_PROFILE
from cdp_kit.telemetry import get_logger
from cdp_segmentation.membership import Catalog, exit_all
from cdp_segmentation.store import EVENT, FragmentRow, MembershipRow, ProfileIdentityRow, ProfileRow

log = get_logger(__name__)
REQUESTED = pb.PrivacyRequested.DESCRIPTOR.full_name
APPLIED = pb.PrivacyApplied.DESCRIPTOR.full_name
PRIVACY_CAUSE = "privacy:"
CHUNK = 500
CATCH_UP_S = 10.0


class PrivacyPendingRow(SQLModel, table=True):
    """A request erased from the store whose exits and acknowledgement are still to do."""

    __tablename__ = "seg_privacy_pending"

    request_id: str = Field(primary_key=True)
    mode: int
    profile_ids: list[str] = Field(default_factory=list, sa_type=sa.JSON)
    counts: dict[str, int] = Field(default_factory=dict, sa_type=sa.JSON)


class PrivacyDoneRow(SQLModel, table=True):
    """A request segmentation has acknowledged (folded from its own ``PrivacyApplied``)."""

    __tablename__ = "seg_privacy_done"

    request_id: str = Field(primary_key=True)


class PrivacyErasedRow(SQLModel, table=True):
    """What the profile input erased for a request (counts), when it read identity's erasure."""

    __tablename__ = "seg_privacy_erased"

    request_id: str = Field(primary_key=True)
    counts: dict[str, int] = Field(default_factory=dict, sa_type=sa.JSON)


class PrivacyExitHeldRow(SQLModel, table=True):
    """An exit of an erased person folded before the profile input read the erasure (a rebuild
    folds its own logs first): the membership is kept until then (``fold_privacy_exit``)."""

    __tablename__ = "seg_privacy_exit_held"

    request_id: str = Field(primary_key=True)
    profile_id: str = Field(primary_key=True)
    segment_id: str = Field(primary_key=True)


class PrivacyUnreadableRow(SQLModel, table=True):
    """A profile the profile input met a fragment of that it cannot read: sealed under keys a
    privacy delete destroyed (revoked here), so it folds as erased. The store holds less of the
    person than the live store held when it decided on them (a rebuild reads none of their
    fragments), so the profile's memberships are not evaluated again (``unreadable``) until the
    profile input reads identity's erasure of it, which the privacy exits follow: an erasure of the
    profile, or one naming any of ``key_refs`` (the refs the unreadable fragments were sealed
    under: a fragment naming several people is unreadable once any of them is erased, and the
    profile of another one of them is readable again after that person's erasure). A merge's
    survivor and a split's parts take the mark of the profiles they took fragments from."""

    __tablename__ = "seg_privacy_unreadable"

    profile_id: str = Field(primary_key=True)
    key_refs: list[str] = Field(default_factory=list, sa_type=sa.JSON)


PRIVACY_TABLES = tables_of(
    PrivacyPendingRow, PrivacyDoneRow, PrivacyErasedRow, PrivacyExitHeldRow, PrivacyUnreadableRow
)
_HELD = "seg_privacy_exits_held"
_UNREADABLE = "seg_privacy_unreadable"


def _parts(items: Sequence[str]) -> list[Sequence[str]]:
    return [items[i : i + CHUNK] for i in range(0, len(items), CHUNK)]


def erase(session: Session, catalog: Catalog, profile_ids: Sequence[str]) -> dict[str, int]:
    """Delete what the store holds of these profiles (but their memberships: they exit first)."""
    working = catalog.working
    if working is not None and working.session is session:
        working.write_back()
        working.forget(profile_ids)
    counts = {"profiles": 0, "attributes": 0, "events": 0, "identities": 0}
    for part in _parts(sorted(profile_ids)):
        kinds = session.exec(select(FragmentRow.kind).where(col(FragmentRow.profile_id).in_(part))).all()
        counts["events"] += sum(1 for k in kinds if k == EVENT)
        counts["attributes"] += sum(1 for k in kinds if k != EVENT)
        session.execute(sa.delete(FragmentRow).where(col(FragmentRow.profile_id).in_(part)))
        counts["identities"] += session.execute(  # type: ignore[attr-defined]
            sa.delete(ProfileIdentityRow).where(col(ProfileIdentityRow.profile_id).in_(part))
        ).rowcount
        counts["profiles"] += session.execute(  # type: ignore[attr-defined]
            sa.delete(ProfileRow).where(col(ProfileRow.profile_id).in_(part))
        ).rowcount
    session.flush()
    catalog.invalidate()
    scrub_after_commit(session)
    return counts


def erase_requested(session: Session, catalog: Catalog, env: Envelope) -> None:
    """Identity's erasure of a person, read on the profile input: erase the profiles now."""
    req = unpack(env, pb.PrivacyRequested)
    if not is_delete(req.mode):
        return
    readable_again(session, req)  # also when it names no profile: marks made through its keys clear
    if not req.profile_ids:
        return
    counts = erase(session, catalog, sorted(req.profile_ids))
    session.merge(PrivacyErasedRow(request_id=req.request_id, counts=counts))
    held = session.exec(select(PrivacyExitHeldRow).where(PrivacyExitHeldRow.request_id == req.request_id)).all()
    for row in held:
        # A replay: the exit was folded before this input was read again; it takes effect here.
        membership = session.get(MembershipRow, (row.segment_id, row.profile_id))
        if membership is not None:
            session.delete(membership)
        session.delete(row)
    session.flush()


def mark_unreadable(session: Session, profile_id: str, key_refs: Sequence[str]) -> None:
    """The profile input met a fragment of this profile it cannot read, sealed under ``key_refs``
    (see ``PrivacyUnreadableRow``)."""
    if not profile_id:
        return
    row = session.get(PrivacyUnreadableRow, profile_id)
    known = row.key_refs if row is not None else []
    session.merge(PrivacyUnreadableRow(profile_id=profile_id, key_refs=sorted({*known, *key_refs})))
    session.flush()
    session.info[_UNREADABLE] = True


def merge_unreadable(session: Session, survivor: str, absorbed: Sequence[str]) -> None:
    """Profiles merged: the survivor holds what the absorbed held, unreadable data included."""
    if not unreadable_any(session):
        return
    rows = session.exec(select(PrivacyUnreadableRow).where(col(PrivacyUnreadableRow.profile_id).in_(absorbed))).all()
    refs = sorted({ref for row in rows for ref in row.key_refs})
    for row in rows:
        session.delete(row)
    if rows:
        session.flush()
        mark_unreadable(session, survivor, refs)


def split_unreadable(session: Session, profile_id: str, parts: Sequence[str]) -> None:
    """A profile split: each part may have taken what the profile held, unreadable data included
    (a fragment the store never read moves nowhere, so a part cannot tell it misses one)."""
    if not unreadable_any(session):
        return
    row = session.get(PrivacyUnreadableRow, profile_id)
    if row is None:
        return
    for part in parts:
        if part != profile_id:
            mark_unreadable(session, part, row.key_refs)


def readable_again(session: Session, req: pb.PrivacyRequested) -> None:
    """Identity's erasure read: the profiles it erases, and those unreadable only through the keys
    it destroys, are no longer unreadable (what they hold is what a rebuild holds)."""
    if not unreadable_any(session):
        return
    erased, destroyed = set(req.profile_ids), set(req.key_refs)
    for row in session.exec(select(PrivacyUnreadableRow)).all():
        if row.profile_id in erased or destroyed.intersection(row.key_refs):
            session.delete(row)
    session.flush()


def unreadable_any(session: Session) -> bool:
    """Whether any profile is unreadable: one query per transaction while none is (the usual case)."""
    known = session.info.get(_UNREADABLE)
    if known is None:
        known = session.exec(select(PrivacyUnreadableRow.profile_id).limit(1)).first() is not None
        session.info[_UNREADABLE] = known
    return bool(known)


def unreadable(session: Session, profile_id: str) -> bool:
    """Whether this profile's memberships are not to be evaluated (see ``PrivacyUnreadableRow``):
    the live service decided on data this store no longer holds, and what it decided is on the
    log; until the erasure (then the privacy exits), the profile's memberships stay as they are."""
    return unreadable_any(session) and session.get(PrivacyUnreadableRow, profile_id) is not None


def fold_privacy_exit(session: Session, cause: str, profile_id: str, segment_id: str) -> None:
    """Fold an exit of an erased person (cause ``privacy:<request id>``): the membership is deleted
    once the profile input has read identity's erasure (live, and in recovery). A rebuild folds its
    own logs before it reads its inputs again: then the membership is held until the erasure is
    read (``erase_requested``), so replaying the person's earlier inputs finds what the live store
    found then and decides (emits) nothing new; a later realization of the same membership (the
    person came back) supersedes the held exit (``realized_again``)."""
    request_id = cause.removeprefix(PRIVACY_CAUSE)
    if session.get(PrivacyErasedRow, request_id) is not None:
        delete_memberships(session, [profile_id])
        return
    session.merge(PrivacyExitHeldRow(request_id=request_id, profile_id=profile_id, segment_id=segment_id))
    session.info[_HELD] = True


def realized_again(session: Session, segment_id: str, profile_id: str) -> None:
    """A membership realized after a held privacy exit of it: the exit no longer applies. One
    query per transaction while nothing is held (the usual case), none per membership."""
    held = session.info.get(_HELD)
    if held is None:
        held = session.info[_HELD] = session.exec(select(PrivacyExitHeldRow.request_id).limit(1)).first() is not None
    if held:
        session.execute(
            sa.delete(PrivacyExitHeldRow).where(
                col(PrivacyExitHeldRow.segment_id) == segment_id, col(PrivacyExitHeldRow.profile_id) == profile_id
            )
        )


def delete_memberships(session: Session, profile_ids: Sequence[str]) -> int:
    n = 0
    for part in _parts(sorted(profile_ids)):
        n += session.execute(  # type: ignore[attr-defined]
            sa.delete(MembershipRow).where(col(MembershipRow.profile_id).in_(part))
        ).rowcount
    session.flush()
    return int(n)


def is_privacy_exit(cause: str) -> bool:
    return cause.startswith(PRIVACY_CAUSE)


def fold_applied(session: Session, env: Envelope) -> None:
    """Fold segmentation's own ``PrivacyApplied``: the request is done."""
    if env.type != APPLIED:
        return
    applied = unpack(env, pb.PrivacyApplied)
    pending = session.get(PrivacyPendingRow, applied.request_id)
    if pending is not None:
        session.delete(pending)
    session.merge(PrivacyDoneRow(request_id=applied.request_id))
    session.flush()


def _add(counts: dict[str, int], more: dict[str, int]) -> dict[str, int]:
    return {k: counts.get(k, 0) + more.get(k, 0) for k in {*counts, *more}}


class PrivacyToSegmentation:
    """Input handler of ``cdp.privacy.requests``."""

    def __init__(self, catalog: Catalog, vault: KeyVault) -> None:
        self.catalog = catalog
        self.vault = vault
        self.changed = asyncio.Event()

    def observe(self, session: Session, msg: LogMessage, env: Envelope) -> None:
        if env.type != REQUESTED:
            return
        req = checked_request(env)
        revoke(session, self.vault, list(req.key_refs))  # remembered: revoked again after a restart
        if session.get(PrivacyDoneRow, req.request_id) is None:
            pids = sorted(req.profile_ids)
            session.merge(PrivacyPendingRow(request_id=req.request_id, mode=req.mode, profile_ids=pids))
            session.flush()
        self.changed.set()

    def decide(self, uow: UnitOfWork, msg: LogMessage, env: Envelope) -> None:
        return None


class PrivacyApplier:
    def __init__(self, processor: Processor, catalog: Catalog, handler: PrivacyToSegmentation) -> None:
        self.processor = processor
        self.catalog = catalog
        self.handler = handler

    async def _caught_up(self) -> None:
        """Wait until the profile input has read what identity had written (the request follows
        the person's fragments on identity's side)."""
        last = await self.processor.eventlog.last_sequence(PROFILE.name)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CATCH_UP_S
        while True:
            with self.processor.read() as session:
                if get_checkpoint(session, in_checkpoint(SEGMENTATION_READS_PROFILE)) >= last:
                    return
            if loop.time() >= deadline:
                raise Unavailable("the profile input has not caught up with the privacy request yet")
            await asyncio.sleep(0.05)

    async def apply_pending(self) -> int:
        with self.processor.read() as session:
            pending = [
                (p.request_id, p.mode, list(p.profile_ids), dict(p.counts))
                for p in session.exec(select(PrivacyPendingRow)).all()
            ]
        for request_id, mode, pids, counts in pending:
            if is_delete(mode) and pids:
                await self._caught_up()
            await self._apply(request_id, mode, pids, counts)
        return len(pending)

    async def _apply(self, request_id: str, mode: int, pids: list[str], counts: dict[str, int]) -> None:
        processor = self.processor
        now = utcnow()
        async with processor.lock:
            with transaction(processor.engine) as session:
                uow = UnitOfWork(session, processor, Cause(command_id=f"privacy-exit:{request_id}"))
                try:
                    if session.get(PrivacyDoneRow, request_id) is not None:
                        return
                    # The profile input erased the profiles when it read identity's erasure (in its
                    # place among the fragments): erasing here again could erase data that came after.
                    erased = session.get(PrivacyErasedRow, request_id)
                    total = _add(counts, erased.counts if erased is not None else {})
                    if is_delete(mode) and pids:
                        cause = f"{PRIVACY_CAUSE}{request_id}"
                        total["exits"] = sum(exit_all(uow, self.catalog, pid, now, cause) for pid in pids)
                        total["memberships"] = delete_memberships(session, pids)
                    done = Cause(command_id=f"privacy-applied:{request_id}")
                    await uow.next_cause(done)
                    applied = pb.PrivacyApplied(request_id=request_id, service="segmentation", counts=total)
                    applied.at.CopyFrom(to_timestamp(now))
                    env = make_envelope(
                        applied,
                        event_id=deterministic_id("privacy-applied", "segmentation", request_id),
                        subject_key=request_id,
                        occurred_at=now,
                        cause=done,
                    )
                    uow.emit(SEGMENTATION_PRIVACY_APPLIED, [env])
                    await uow.flush(done)
                except BaseException:
                    await uow.abandon()
                    raise
        log.info("privacy_applied", request_id=request_id, **{k: int(v) for k, v in total.items()})

    async def loop(self) -> None:
        await keep_applying(
            self.processor.ready,
            self.apply_pending,
            what="privacy_apply",
            changed=self.handler.changed,
            recover=self.processor.recover,
        )
