"""What activation keeps of other services' facts: segments, memberships, profiles."""

from __future__ import annotations

from collections.abc import Sequence

from google.protobuf import json_format
from sqlmodel import Session, col, delete, select, update

from cdp.identity.v1 import events_pb2 as identity_ev
from cdp.segmentation.v1 import events_pb2 as seg_ev
from cdp.segmentation.v1 import segmentation_pb2 as seg_pb
from cdp_activation.privacy import is_erased
from cdp_activation.profiles import merge_rule, offer, reresolve, reresolve_all, set_merge_rule
from cdp_activation.store import (
    AttributeSourceRow,
    FragmentRow,
    KeyRefRow,
    MemberRow,
    ProfileRow,
    SegmentChangeRow,
    SegmentRow,
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


class SegmentsObserver(_ObserveOnly):
    """Segmentation's config: its segments, and its merge policy (a new one resolves every
    profile's attributes again, as segmentation does)."""

    def observe(self, session: Session, msg: LogMessage, env: Envelope) -> None:
        if is_a(env, seg_ev.SegmentDefined):
            seg = unpack(env, seg_ev.SegmentDefined).segment
            session.merge(SegmentRow(id=seg.id, name=seg.name))
        elif is_a(env, seg_ev.MergePolicySet):
            rule = rule_of(unpack(env, seg_ev.MergePolicySet).policy)
            if set_merge_rule(session, rule):
                reresolve_all(session, rule)
            session.flush()


class MembershipsObserver(_ObserveOnly):
    def observe(self, session: Session, msg: LogMessage, env: Envelope) -> None:
        if not is_a(env, seg_ev.MembershipChanged):
            return
        change = unpack(env, seg_ev.MembershipChanged)
        if change.status == seg_ev.MEMBERSHIP_STATUS_REALIZED and is_erased(session, change.profile_id):
            pass  # a privacy request erased them: a late entry is not kept
        elif change.status == seg_ev.MEMBERSHIP_STATUS_REALIZED:
            since = from_timestamp(change.at)
            session.merge(MemberRow(segment_id=change.segment_id, profile_id=change.profile_id, since=since))
        else:
            session.exec(
                delete(MemberRow).where(
                    col(MemberRow.segment_id) == change.segment_id, col(MemberRow.profile_id) == change.profile_id
                )
            )
        session.merge(SegmentChangeRow(segment_id=change.segment_id, sequence=msg.sequence))
        session.flush()


def _source(session: Session, name: str, dataset: str) -> None:
    """Record that ``name`` came from ``dataset``, once per transaction (a wide record names 60
    attributes, and every record of a batch names the same ones: a merge is a lookup each)."""
    known: set[tuple[str, str]] = session.info.setdefault("act_attribute_sources", set())
    if (name, dataset) not in known:
        known.add((name, dataset))
        session.merge(AttributeSourceRow(name=name, dataset=dataset))


def _key_refs(session: Session, frag: identity_ev.ProfileFragment, refs: Sequence[str]) -> None:
    """The refs of the fragment's identities: identity's sealer lists them first, in their order."""
    known: set[str] = session.info.setdefault("act_key_refs", set())
    for ident, ref in zip(frag.identities, refs, strict=False):
        if ref not in known:
            known.add(ref)
            session.merge(KeyRefRow(key_ref=ref, key=f"{ident.namespace}:{ident.value}"))


class ProfilesObserver(_ObserveOnly):
    """Identity's fragments, merges and splits: each profile's identities, and its attributes
    resolved by segmentation's merge policy from its record fragments (``cdp_activation.profiles``)."""

    def __init__(self) -> None:
        self._positions_of: LogMessage | None = None
        self._positions: dict[str, int] = {}

    def observe(self, session: Session, msg: LogMessage, env: Envelope) -> None:
        if is_a(env, identity_ev.ProfileFragment):
            frag = unpack(env, identity_ev.ProfileFragment)
            self._fragment(session, frag, msg.sequence, self._position(msg, env))
            if env.sealed:
                _key_refs(session, frag, env.sealed[0].key_refs)
        elif is_a(env, identity_ev.ProfilesMerged):
            self._merged(session, unpack(env, identity_ev.ProfilesMerged))
        elif is_a(env, identity_ev.ProfileSplit):
            self._split(session, unpack(env, identity_ev.ProfileSplit))
        session.flush()

    def _position(self, msg: LogMessage, env: Envelope) -> int:
        """The envelope's place among its message's events (with the sequence, its log position)."""
        if msg is not self._positions_of:
            self._positions_of, self._positions = msg, positions(msg.events())
        return self._positions.get(env.id, 0)

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
        row = session.get(ProfileRow, frag.profile_id) or ProfileRow(profile_id=frag.profile_id)
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
                session.merge(
                    FragmentRow(
                        id=fragment_id,
                        profile_id=frag.profile_id,
                        attributes=values_of,
                        dataset=origin.dataset,
                        ts_ms=origin.ts_ms,
                        seq=origin.seq,
                        pos=origin.pos,
                    )
                )
        session.add(row)

    @staticmethod
    def _merged(session: Session, merged: identity_ev.ProfilesMerged) -> None:
        """The survivor takes the absorbed profiles' identities and fragments; its attributes are
        resolved again from all of them."""
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
