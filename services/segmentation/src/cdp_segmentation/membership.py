"""Deciding membership changes: evaluate what a change can affect, compare with what is known, emit only changes."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import Connection, Engine, event
from sqlmodel import Session, col, select

from cdp.segmentation.v1 import events_pb2 as ev
from cdp.segmentation.v1 import segmentation_pb2 as pb
from cdp_kit.envelope import (
    SCHEMA_VERSION,
    VARINTS,
    Cause,
    Envelope,
    deterministic_id,
    from_timestamp,
    make_envelope,
    to_timestamp,
    varint,
)
from cdp_kit.processor import UnitOfWork
from cdp_kit.streams import SEGMENTATION_MEMBERSHIPS
from cdp_segmentation import store
from cdp_segmentation.analysis import Reads, reads_of
from cdp_segmentation.computed import ComputedDef, windows_ms, with_defaults
from cdp_segmentation.evaluate import Event, ProfileData, Test, compile_ast
from cdp_segmentation.profiles import DEFAULT_EVENT_CAP, ProfileContext, next_due
from cdp_segmentation.store import EVENT, EXITED, REALIZED, FragmentRow, MembershipRow, ProfileRow
from cdp_segmentation.working import ProfileState, WorkingSet

# At most this many profiles (and events in their histories) are kept between input batches.
KEPT_PROFILES = 50_000
KEPT_EVENTS = 1_000_000


@dataclass(frozen=True)
class CompiledSegment:
    id: str
    name: str
    ast: pb.Expression
    reads: Reads
    streaming: bool
    test: Test
    schedule: str = ""


class Catalog:
    """The segments (parsed once, in dependency order) and the profile context, cached between
    batches. The projection invalidates it whenever a fold changes either."""

    def __init__(self, event_cap: int = DEFAULT_EVENT_CAP) -> None:
        self.event_cap = event_cap
        self._segments: list[CompiledSegment] | None = None
        # Each segment compiled once per definition (by id, with the JSON it was compiled from):
        # a new segment compiles itself, not every segment again.
        self._compiled: dict[str, tuple[dict[str, Any], CompiledSegment]] = {}
        self._computed: tuple[ComputedDef, ...] | None = None
        self._ctx: ProfileContext | None = None
        self._affected: dict[tuple[Any, ...], list[CompiledSegment]] = {}
        self._empty: dict[str, bool] | None = None
        self._reading: dict[tuple[frozenset[str], frozenset[str], bool], frozenset[str]] = {}
        # The in-memory profiles of the input batch being applied (see working.py).
        self.working: WorkingSet | None = None
        # The profiles of the last committed working set, for the next input batch to start
        # from (no re-reading of the profiles it touches again): valid only while nothing
        # else has committed to the store since (see ``watch``).
        self._kept: dict[str, ProfileState] | None = None
        self._watched = False

    def invalidate(self) -> None:
        self._segments = None
        self._computed = None
        self._ctx = None
        self._affected = {}
        self._reading = {}
        self._empty = None
        self._kept = None

    def fold_membership(self, session: Session, segment_id: str, profile_id: str, status: str, at: datetime) -> None:
        """Fold one membership change: into the working set if it holds the profile, else into the store."""
        working = self.working
        if working is not None and working.session is session and working.tracks(profile_id):
            working.membership(segment_id, profile_id, status, at)
        else:
            session.merge(MembershipRow(segment_id=segment_id, profile_id=profile_id, status=status, changed_at=at))
            session.flush()

    def watch(self, engine: Engine) -> None:
        """Forget the kept profiles whenever a transaction other than a working set's commits
        to ``engine`` (commands, the clock, backfills, other inputs, DDL): it may change them."""
        event.listen(engine, "commit", self._on_commit)
        self._watched = True

    def _on_commit(self, conn: Connection) -> None:
        if self.working is None or not self.working.committing:
            self._kept = None

    def _keep(self, working: WorkingSet) -> None:
        """Called once a working set's transaction has committed (None after a rollback)."""
        profiles = working.profiles
        events = sum(len(p.events) for p in profiles.values())
        small = len(profiles) <= KEPT_PROFILES and events <= KEPT_EVENTS
        # Unwatched (a catalog nobody told about its engine's commits): nothing is kept.
        self._kept = profiles if small and working.committed and self._watched else None

    def working_for(self, session: Session) -> WorkingSet:
        """The working set of this transaction (a new one for a new transaction, starting from
        the profiles the previous one committed, if nothing else has committed since)."""
        if self.working is None or self.working.session is not session:
            kept, self._kept = self._kept, None
            self.working = WorkingSet(session, kept or {}, self._keep)
        return self.working

    def segments(self, session: Session) -> list[CompiledSegment]:
        if self._segments is None:
            compiled: dict[str, tuple[dict[str, Any], CompiledSegment]] = {}
            for row in store.all_segments(session):
                cached = self._compiled.get(row.id)
                if cached is None or cached[0] != row.body or cached[1].name != row.name:
                    segment = store.segment_of(row)
                    streaming = segment.evaluation != pb.EVALUATION_BATCH
                    made = CompiledSegment(
                        row.id,
                        row.name,
                        segment.ast,
                        reads_of(segment.ast),
                        streaming,
                        compile_ast(segment.ast),
                        segment.schedule,
                    )
                    cached = (row.body, made)
                compiled[row.id] = cached
            self._compiled = compiled
            self._segments = _dependency_order([made for _, made in compiled.values()])
        return self._segments

    def empty_values(self, session: Session) -> dict[str, bool]:
        """Whether each streaming segment holds for a profile with nothing: no attributes,
        identities, events or memberships, computed attributes at their defaults. It does not
        depend on the time (no events: no window to pass). A new profile takes these values for
        every segment that reads nothing the profile has (see ``created``)."""
        if self._empty is None:
            computed = with_defaults(self.computed(session), {})
            data = ProfileData({}, set(), set(), lambda: (), computed)
            values: dict[str, bool] = {}
            for seg in self.streaming(session):  # in dependency order: memberships accumulate
                values[seg.id] = seg.test(data, 0)
                if values[seg.id]:
                    data.memberships.add(seg.id)
            self._empty = values
        return self._empty

    def created(self, session: Session, state: ProfileState) -> tuple[list[CompiledSegment], frozenset[str]]:
        """For a profile new in the store: every streaming segment, and the ids of those that
        read what it has (attributes, event types, identities) -- the others hold for it exactly
        when they hold for the empty profile (``empty_values``)."""
        key = (frozenset(state.attributes), frozenset(e.event_type for e in state.events), bool(state.namespaces))
        reading = self._reading.get(key)
        if reading is None or self._segments is None:
            chosen = self.affected(session, attributes=key[0], event_types=key[1], identities=key[2])
            reading = self._reading[key] = frozenset(s.id for s in chosen)
        return self.affected(session, everything=True), reading

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


CHANGED = ev.MembershipChanged.DESCRIPTOR.full_name
_CHANGED_URL = f"type.googleapis.com/{CHANGED}"
_STATUS = {REALIZED: ev.MEMBERSHIP_STATUS_REALIZED, EXITED: ev.MEMBERSHIP_STATUS_EXITED}


_MEMBERSHIP_HASH = hashlib.sha256(b"membership\x1f")
# The variant digit by the hash digit it replaces (ASCII codes).
_VARIANT = {ord(c): ord("89ab"[int(c, 16) & 3]) for c in "0123456789abcdef"}


def membership_id(segment_id: str, profile_id: str, cause: str) -> str:
    """``deterministic_id("membership", segment_id, profile_id, cause)``, computed inline."""
    return _membership_id(segment_id, profile_id, cause).decode()


def _membership_id(segment_id: str, profile_id: str, cause: str) -> bytes:
    """``membership_id`` as the ASCII bytes of the UUID (36 of them)."""
    hashed = _MEMBERSHIP_HASH.copy()
    hashed.update(f"{segment_id}\x1f{profile_id}\x1f{cause}".encode())
    h = hashed.hexdigest().encode()  # version nibble 8, variant bits 10, as the kit writes them
    return b"%b-%b-8%b-%c%b-%b" % (h[:8], h[8:12], h[13:16], _VARIANT[h[16]], h[17:20], h[20:32])


class Changes:
    """The membership changes of one cause at one time, serialized straight to ``Envelope``
    bytes (no protobuf object per change): what ``make_envelope`` would build, field for field,
    with what the changes share (type, times, causation, the status-and-time bytes of the
    payload) encoded once. ``emit`` hands them to the unit of work with one fold for all
    (``Catalog.fold_membership`` each, as the projection folds one ``MembershipChanged``)."""

    def __init__(self, uow: UnitOfWork, at: datetime, cause: str) -> None:
        self.uow, self.cause = uow, cause
        shared, middle, self.folded_at = _template_of(at, uow.cause)
        # The envelope's fields after subject_key, up to the payload's tag: occurred_at (4),
        # schema_version (6), causation (7); then payload (9).
        self._shared = shared + b"\x4a"
        # The payload's fields after profile_id: status (3) and at (4), then cause (5).
        cause_field = _string_field(5, cause)
        self._tails = {status: fields + cause_field for status, fields in middle.items()}
        self._profile: tuple[str, bytes, bytes] = ("", b"", b"")
        self.encoded: list[bytes] = []
        self.folding: list[tuple[str, str, str]] = []

    def add(self, segment_id: str, profile_id: str, status: str) -> None:
        if self._profile[0] != profile_id:  # the changes of one cause are mostly of one profile
            self._profile = (profile_id, _string_field(2, profile_id), _string_field(3, profile_id))
        _, payload_profile, subject = self._profile
        # The MembershipChanged (segment_id, profile_id, status, at, cause), in an Any (type_url,
        # value), in the Envelope (id, type, subject_key, occurred_at, schema_version, causation,
        # payload): fields in number order, lengths before each. recorded_at (5) is the kit's to add.
        payload = _segment_field(segment_id) + payload_profile + self._tails[status]
        size = len(payload)
        size_field = VARINTS[size] if size < 16384 else varint(size)
        any_size = _ANY_TYPE_URL_SIZE + len(size_field) + size
        self.encoded.append(
            b"".join(
                (
                    _ID_TAG,
                    _membership_id(segment_id, profile_id, self.cause),
                    _TYPE_FIELD,
                    subject,
                    self._shared,
                    VARINTS[any_size] if any_size < 16384 else varint(any_size),
                    _ANY_TYPE_URL,
                    size_field,
                    payload,
                )
            )
        )
        self.folding.append((segment_id, profile_id, status))

    def emit(self, catalog: Catalog) -> int:
        if not self.encoded:
            return 0
        folding, at = self.folding, self.folded_at

        def fold(session: Session) -> None:
            working = catalog.working
            if working is not None and working.session is session:
                untracked = working.fold_memberships(folding, at)
            else:
                untracked = folding
            for segment_id, profile_id, status in untracked:
                catalog.fold_membership(session, segment_id, profile_id, status, at)

        self.uow.emit_encoded(SEGMENTATION_MEMBERSHIPS, self.encoded, fold)
        return len(self.encoded)


def _string_field(number: int, value: str) -> bytes:
    """A protobuf string field (tag, length, UTF-8), or nothing for an empty string (proto3)."""
    if not value:
        return b""
    data = value.encode()
    return bytes((number << 3 | 2,)) + varint(len(data)) + data


@functools.lru_cache(maxsize=4096)
def _segment_field(segment_id: str) -> bytes:
    """MembershipChanged.segment_id (field 1): the same few segments change again and again."""
    return _string_field(1, segment_id)


_TYPE_FIELD = _string_field(2, CHANGED)
# Any.type_url (1), then the tag of Any.value (2), whose length follows.
_ANY_TYPE_URL = _string_field(1, _CHANGED_URL) + b"\x12"
_ANY_TYPE_URL_SIZE = len(_ANY_TYPE_URL)
_ID_TAG = b"\x0a\x24"  # Envelope.id (1): a UUID is 36 characters


_last_template: list[tuple[datetime, Cause, tuple[bytes, dict[str, bytes], datetime]]] = []


def _template_of(at: datetime, cause: Cause) -> tuple[bytes, dict[str, bytes], datetime]:
    """``_template``, remembering the last one by identity: the changes of one input message
    share its cause object, and their times are mostly one object (see ``consumer._datetime``)."""
    if _last_template:
        last_at, last_cause, template = _last_template[0]
        if last_at is at and last_cause is cause:
            return template
    template = _template(at, cause)
    _last_template[:] = [(at, cause, template)]
    return template


@functools.lru_cache(maxsize=256)
def _template(at: datetime, cause: Cause) -> tuple[bytes, dict[str, bytes], datetime]:
    """What the changes of one input cause at one time share: the envelope's occurred_at,
    schema_version and causation fields; the payload's status-and-time bytes by status; the
    time the fold records."""
    stamp = Timestamp()
    stamp.FromDatetime(at)
    shared = Envelope(occurred_at=to_timestamp(at), schema_version=SCHEMA_VERSION, causation=cause.to_proto())
    middle = {s: ev.MembershipChanged(status=_STATUS[s], at=stamp).SerializeToString() for s in (REALIZED, EXITED)}
    return shared.SerializeToString(), middle, from_timestamp(stamp)


def reevaluate(
    uow: UnitOfWork,
    catalog: Catalog,
    profile_id: str,
    segments: list[CompiledSegment],
    at: datetime,
    cause: str,
    now_ms: int,
) -> int:
    """Evaluate ``segments`` (in dependency order) for one profile; emit the changes. Returns how many."""
    if not segments:
        return 0
    profile = uow.session.get(ProfileRow, profile_id)
    if profile is None:
        return exit_all(uow, catalog, profile_id, at, cause)
    data = profile_data(uow.session, profile)
    current = store.memberships_of(uow.session, profile_id)
    changes = Changes(uow, at, cause)
    for seg in segments:
        inside = seg.test(data, now_ms)
        if inside != (current.get(seg.id) == REALIZED):
            changes.add(seg.id, profile_id, REALIZED if inside else EXITED)
            (data.memberships.add if inside else data.memberships.discard)(seg.id)
    return changes.emit(catalog)


def reevaluate_state(
    uow: UnitOfWork,
    catalog: Catalog,
    state: ProfileState,
    segments: list[CompiledSegment],
    at: datetime,
    cause: str,
    now_ms: int,
    *,
    presumed: dict[str, bool] | None = None,
    evaluate: frozenset[str] = frozenset(),
) -> int:
    """``reevaluate`` against a profile held in the working set. With ``presumed``, only the
    segments in ``evaluate`` are evaluated; the others take their ``presumed`` value."""
    if not segments:
        return 0
    inside_now = {sid for sid, status in state.memberships.items() if status == REALIZED}
    events = state.events
    data = ProfileData(state.attributes, state.namespaces, inside_now, lambda: events, state.computed)
    changes: Changes | None = None
    for seg in segments:
        inside = seg.test(data, now_ms) if presumed is None or seg.id in evaluate else presumed[seg.id]
        if inside != (seg.id in inside_now):
            changes = changes or Changes(uow, at, cause)
            changes.add(seg.id, state.profile_id, REALIZED if inside else EXITED)
            (inside_now.add if inside else inside_now.discard)(seg.id)
    return changes.emit(catalog) if changes is not None else 0


def exit_all(uow: UnitOfWork, catalog: Catalog, profile_id: str, at: datetime, cause: str) -> int:
    current = store.memberships_of(uow.session, profile_id)
    changes = Changes(uow, at, cause)
    for sid, status in sorted(current.items()):
        if status == REALIZED:
            changes.add(sid, profile_id, EXITED)
    return changes.emit(catalog)


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
    changes = Changes(uow, at, f"segment-defined:{segment_id}:{generation}")
    current = store.statuses(uow.session, segment_id, [p.profile_id for p in page])
    for profile in page:
        _refresh_due(uow.session, profile, ctx)
        inside = seg.test(profile_data(uow.session, profile), ctx.clock_ms)
        if inside != (current.get(profile.profile_id) == REALIZED):
            changes.add(segment_id, profile.profile_id, REALIZED if inside else EXITED)
    changes.emit(catalog)
    return page[-1].profile_id


def _refresh_due(session: Session, profile: ProfileRow, ctx: ProfileContext) -> None:
    due = next_due(session, profile.profile_id, ctx)
    if due != profile.next_due_ms:
        profile.next_due_ms = due
        session.add(profile)
