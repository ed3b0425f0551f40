"""What activation keeps of other services' facts: segments, memberships, profiles."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from google.protobuf import json_format
from sqlalchemy import event
from sqlmodel import Session, col, delete, select, update

from cdp.identity.v1 import events_pb2 as identity_ev
from cdp.segmentation.v1 import events_pb2 as seg_ev
from cdp.segmentation.v1 import segmentation_pb2 as seg_pb
from cdp_activation.changes import Changes
from cdp_activation.privacy import is_erased
from cdp_activation.profiles import merge_rule, offer, reresolve, reresolve_all, set_merge_rule
from cdp_activation.store import (
    UPSERT_CHUNK,
    AttributeSourceRow,
    FragmentRow,
    KeyRefRow,
    MemberRow,
    ProfileRow,
    SegmentChangeRow,
    SegmentRow,
    upsert,
)
from cdp_kit.envelope import Envelope, from_timestamp, is_a, unpack
from cdp_kit.eventlog import LogMessage
from cdp_kit.merging import MergeRule, Origin, positions, timestamp_ms
from cdp_kit.processor import UnitOfWork


class _ObserveOnly:
    def decide(self, uow: UnitOfWork, msg: LogMessage, env: Envelope) -> None:
        return None


def rule_of(policy: seg_pb.MergePolicy) -> MergeRule:
    """The kit's merge rule for segmentation's merge policy."""
    if policy.kind == seg_pb.MERGE_POLICY_KIND_DATASET_PRECEDENCE:
        return MergeRule(tuple(policy.datasets))
    return MergeRule()


def _note(changes: Changes | None, session: Session, profiles: Iterable[str] = (), everything: bool = False) -> None:
    if changes is not None:
        changes.note(session, profiles, everything=everything)


class SegmentsObserver(_ObserveOnly):
    """Segmentation's config: its segments, and its merge policy (a new one resolves every
    profile's attributes again, as segmentation does)."""

    def __init__(self, changes: Changes | None = None) -> None:
        self.changes = changes

    def observe(self, session: Session, msg: LogMessage, env: Envelope) -> None:
        if is_a(env, seg_ev.SegmentDefined):
            seg = unpack(env, seg_ev.SegmentDefined).segment
            # No note: its memberships come as their own changes, and a plan of a segment not known
            # till now was never planned (the planner tries it whole every round until it is).
            session.merge(SegmentRow(id=seg.id, name=seg.name))
        elif is_a(env, seg_ev.MergePolicySet):
            rule = rule_of(unpack(env, seg_ev.MergePolicySet).policy)
            if set_merge_rule(session, rule):
                reresolve_all(session, rule)
                _note(self.changes, session, everything=True)
            session.flush()


_UNFINISHED = "act_unfinished_handlers"


def _unfinished(session: Session, handler: MembershipsObserver | ProfilesObserver) -> None:
    """The processor calls ``finish`` before it commits a batch; a caller that does not (a test
    feeding ``observe`` alone) still gets what was observed written, before the commit."""
    session.info.setdefault(_UNFINISHED, {})[id(handler)] = handler


@event.listens_for(Session, "before_commit")
def _finish_before_commit(session: Session) -> None:
    for handler in list(session.info.pop(_UNFINISHED, {}).values()):
        handler.finish(session)


_MEMBERSHIPS = "act_pending_memberships"
_SEGMENT_CHANGES = "act_pending_segment_changes"


class MembershipsObserver(_ObserveOnly):
    """Membership changes, kept per fetched batch (the last change of each segment and profile)
    and written in bulk by ``finish``: two statements a batch instead of a lookup, a write and a
    flush per message."""

    def __init__(self, changes: Changes | None = None) -> None:
        self.changes = changes

    def observe(self, session: Session, msg: LogMessage, env: Envelope) -> None:
        if not is_a(env, seg_ev.MembershipChanged):
            return
        change = unpack(env, seg_ev.MembershipChanged)
        _unfinished(session, self)
        pending: dict[tuple[str, str], datetime | None] = session.info.setdefault(_MEMBERSHIPS, {})
        if change.status == seg_ev.MEMBERSHIP_STATUS_REALIZED and is_erased(session, change.profile_id):
            pass  # a privacy request erased them: a late entry is not kept
        elif change.status == seg_ev.MEMBERSHIP_STATUS_REALIZED:
            pending[(change.segment_id, change.profile_id)] = from_timestamp(change.at)
        else:
            pending[(change.segment_id, change.profile_id)] = None
        session.info.setdefault(_SEGMENT_CHANGES, {})[change.segment_id] = msg.sequence

    def finish(self, session: Session) -> None:
        session.info.get(_UNFINISHED, {}).pop(id(self), None)
        pending: dict[tuple[str, str], datetime | None] = session.info.pop(_MEMBERSHIPS, {})
        sequences: dict[str, int] = session.info.pop(_SEGMENT_CHANGES, {})
        exits: dict[str, list[str]] = {}
        for (segment_id, profile_id), since in pending.items():
            if since is None:
                exits.setdefault(segment_id, []).append(profile_id)
        for segment_id, ids in exits.items():
            for start in range(0, len(ids), UPSERT_CHUNK):  # bounded IN lists
                session.exec(
                    delete(MemberRow).where(
                        col(MemberRow.segment_id) == segment_id,
                        col(MemberRow.profile_id).in_(ids[start : start + UPSERT_CHUNK]),
                    )
                )
        entries = [
            {"segment_id": seg, "profile_id": pid, "since": since}
            for (seg, pid), since in sorted(pending.items())
            if since is not None
        ]
        upsert(session, MemberRow, entries, ["segment_id", "profile_id"])
        upsert(
            session,
            SegmentChangeRow,
            [{"segment_id": seg, "sequence": seq} for seg, seq in sorted(sequences.items())],
            ["segment_id"],
        )
        _note(self.changes, session, (pid for _, pid in pending))


def new_profile(profile_id: str) -> ProfileRow:
    """An empty profile row, every field given: SQLModel computes a missing field's default
    factory through ``inspect.signature`` (most of the cost of a new row)."""
    return ProfileRow(profile_id=profile_id, identities={}, attributes={}, origins={})


_ATTRIBUTE_SOURCES = "act_attribute_sources"
_KEY_REFS = "act_key_refs"
_FRAGMENTS = "act_pending_fragments"
_LOADED = "act_loaded_profiles"
_TOUCHED = "act_touched_profiles"


def _source(session: Session, name: str, dataset: str) -> None:
    """Record that ``name`` came from ``dataset``, once per transaction (a wide record names 60
    attributes, and every record of a batch names the same ones), written by ``_write_pending``."""
    known: dict[tuple[str, str], bool] = session.info.setdefault(_ATTRIBUTE_SOURCES, {})
    if (name, dataset) not in known:
        known[(name, dataset)] = False  # not written yet


def _key_refs(session: Session, frag: identity_ev.ProfileFragment, refs: Sequence[str]) -> None:
    """The refs of the fragment's identities: identity's sealer lists them first, in their order."""
    known: dict[str, str | None] = session.info.setdefault(_KEY_REFS, {})
    for ident, ref in zip(frag.identities, refs, strict=False):
        if ref not in known:
            known[ref] = f"{ident.namespace}:{ident.value}"


def _write_pending(session: Session) -> None:
    """Write the fragments, attribute sources and key refs noted so far in bulk (before a merge or
    a split reads or moves fragments, and at the end of the batch)."""
    sources: dict[tuple[str, str], bool] = session.info.get(_ATTRIBUTE_SOURCES, {})
    new_sources = [{"name": n, "dataset": d} for (n, d), written in sorted(sources.items()) if not written]
    upsert(session, AttributeSourceRow, new_sources, ["name", "dataset"], update=False)
    for key in sources:
        sources[key] = True
    refs: dict[str, str | None] = session.info.get(_KEY_REFS, {})
    new_refs = [{"key_ref": ref, "key": key} for ref, key in sorted(refs.items()) if key is not None]
    upsert(session, KeyRefRow, new_refs, ["key_ref"])
    for ref in refs:
        refs[ref] = None
    fragments: dict[str, dict[str, Any]] = session.info.pop(_FRAGMENTS, {})
    upsert(session, FragmentRow, [fragments[k] for k in sorted(fragments)], ["id"])


class ProfilesObserver(_ObserveOnly):
    """Identity's fragments, merges and splits: each profile's identities, and its attributes
    resolved by segmentation's merge policy from its record fragments (``cdp_activation.profiles``).

    Per fetched batch: ``prefetch`` loads every profile the batch's fragments name in one query
    per 500, fragments, attribute sources and key refs are written in bulk (``_write_pending``)
    and the profiles at commit, with no flush per message."""

    def __init__(self, changes: Changes | None = None) -> None:
        self.changes = changes
        self._positions_of: LogMessage | None = None
        self._positions: dict[str, int] = {}

    def prefetch(self, session: Session, envelopes: Sequence[Envelope]) -> None:
        ids = sorted(
            {
                unpack(env, identity_ev.ProfileFragment).profile_id
                for env in envelopes
                if is_a(env, identity_ev.ProfileFragment)
            }
        )
        loaded: dict[str, ProfileRow | None] = dict.fromkeys(ids)
        for start in range(0, len(ids), UPSERT_CHUNK):  # bounded IN lists
            query = select(ProfileRow).where(col(ProfileRow.profile_id).in_(ids[start : start + UPSERT_CHUNK]))
            for row in session.exec(query):
                loaded[row.profile_id] = row
        session.info[_LOADED] = loaded

    def observe(self, session: Session, msg: LogMessage, env: Envelope) -> None:
        _unfinished(session, self)
        if is_a(env, identity_ev.ProfileFragment):
            frag = unpack(env, identity_ev.ProfileFragment)
            self._fragment(session, frag, msg.sequence, self._position(msg, env))
            if env.sealed:
                _key_refs(session, frag, env.sealed[0].key_refs)
        elif is_a(env, identity_ev.ProfilesMerged):
            merged = unpack(env, identity_ev.ProfilesMerged)
            self._merged(session, merged)
            _note(self.changes, session, [merged.survivor, *merged.absorbed])
        elif is_a(env, identity_ev.ProfileSplit):
            split = unpack(env, identity_ev.ProfileSplit)
            self._split(session, split)
            _note(self.changes, session, [split.profile_id, *(part.profile_id for part in split.parts)])

    def finish(self, session: Session) -> None:
        session.info.get(_UNFINISHED, {}).pop(id(self), None)
        _write_pending(session)
        session.info.pop(_LOADED, None)
        _note(self.changes, session, session.info.pop(_TOUCHED, ()))

    def _position(self, msg: LogMessage, env: Envelope) -> int:
        """The envelope's place among its message's events (with the sequence, its log position)."""
        if msg is not self._positions_of:
            self._positions_of, self._positions = msg, positions(msg.events())
        return self._positions.get(env.id, 0)

    @staticmethod
    def _profile(session: Session, profile_id: str) -> ProfileRow:
        """The profile's row: prefetched (no query), or read; a new one when there is none."""
        loaded: dict[str, ProfileRow | None] | None = session.info.get(_LOADED)
        if loaded is not None and profile_id in loaded:
            row = loaded[profile_id]
            if row is None:
                row = loaded[profile_id] = new_profile(profile_id)
            return row
        return session.get(ProfileRow, profile_id) or new_profile(profile_id)

    @staticmethod
    def _fragment(session: Session, frag: identity_ev.ProfileFragment, seq: int, pos: int) -> None:
        if is_erased(session, frag.profile_id):
            # A privacy request erased the profile: nothing of the fragment is kept but which
            # datasets its names came from (no personal data), as before the erasure, so a
            # rebuild (which tombstones first, from the delivery log) keeps the same lineage.
            if frag.dataset:
                names = [i.namespace for i in frag.identities]
                if frag.kind != "event":
                    names += list(frag.attributes.fields)
                for name in names:
                    _source(session, name, frag.dataset)
            return
        session.info.setdefault(_TOUCHED, set()).add(frag.profile_id)
        row = ProfilesObserver._profile(session, frag.profile_id)
        identities = {ns: list(values) for ns, values in row.identities.items()}
        for ident in frag.identities:
            values = identities.setdefault(ident.namespace, [])
            if ident.value not in values:
                values.append(ident.value)
            if frag.dataset:
                _source(session, ident.namespace, frag.dataset)
        row.identities = identities
        if frag.kind != "event":
            values_of = json_format.MessageToDict(frag.attributes)
            origin = Origin(frag.dataset, timestamp_ms(frag.occurred_at), seq, pos)
            offer(row, values_of, origin, merge_rule(session))
            if frag.dataset:
                for name in values_of:
                    _source(session, name, frag.dataset)
            fragment_id = frag.source_event_id or frag.record_id
            if fragment_id:
                session.info.setdefault(_FRAGMENTS, {})[fragment_id] = {
                    "id": fragment_id,
                    "profile_id": frag.profile_id,
                    "attributes": values_of,
                    "dataset": origin.dataset,
                    "ts_ms": origin.ts_ms,
                    "seq": origin.seq,
                    "pos": origin.pos,
                }
        session.add(row)

    @staticmethod
    def _merged(session: Session, merged: identity_ev.ProfilesMerged) -> None:
        """The survivor takes the absorbed profiles' identities and fragments; its attributes are
        resolved again from all of them."""
        _write_pending(session)
        session.info.pop(_LOADED, None)  # rows are deleted and made below: read them again after
        survivor = session.get(ProfileRow, merged.survivor) or ProfileRow(profile_id=merged.survivor)
        identities = {ns: list(values) for ns, values in survivor.identities.items()}
        absorbed_ids = list(merged.absorbed)
        for absorbed in session.exec(select(ProfileRow).where(col(ProfileRow.profile_id).in_(absorbed_ids))):
            for ns, values in absorbed.identities.items():
                target = identities.setdefault(ns, [])
                target.extend(v for v in values if v not in target)
            session.delete(absorbed)
        session.exec(
            update(FragmentRow).where(col(FragmentRow.profile_id).in_(absorbed_ids)).values(profile_id=merged.survivor)
        )
        session.flush()
        survivor.identities = identities
        reresolve(session, [survivor], merge_rule(session))

    @staticmethod
    def _split(session: Session, split: identity_ev.ProfileSplit) -> None:
        """Each part becomes its own profile: its identities, and the attributes of its fragments.
        The split profile, when no part keeps its id, keeps what no part took."""
        _write_pending(session)
        session.info.pop(_LOADED, None)  # rows are made below: read them again after
        moved: set[tuple[str, str]] = set()
        for part in split.parts:
            ids = list(part.fragment_ids)
            for start in range(0, len(ids), 500):  # bounded IN lists
                session.exec(
                    update(FragmentRow)
                    .where(col(FragmentRow.id).in_(ids[start : start + 500]))
                    .values(profile_id=part.profile_id)
                )
            moved.update((ident.namespace, ident.value) for ident in part.identities)
        session.flush()
        touched: list[ProfileRow] = []
        part_ids = {part.profile_id for part in split.parts}
        if split.profile_id not in part_ids:
            original = session.get(ProfileRow, split.profile_id)
            if original is not None:
                original.identities = {
                    ns: kept
                    for ns, values in original.identities.items()
                    if (kept := [v for v in values if (ns, v) not in moved])
                }
                touched.append(original)
        for part in split.parts:
            identities: dict[str, list[str]] = {}
            for ident in part.identities:
                values = identities.setdefault(ident.namespace, [])
                if ident.value not in values:
                    values.append(ident.value)
            row = session.get(ProfileRow, part.profile_id) or ProfileRow(profile_id=part.profile_id)
            row.identities = identities
            touched.append(row)
        reresolve(session, touched, merge_rule(session))
