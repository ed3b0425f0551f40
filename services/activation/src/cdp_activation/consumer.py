"""What activation keeps of other services' facts: segments, memberships, profiles."""

from __future__ import annotations

from google.protobuf import json_format
from sqlmodel import Session, col, delete, select

from cdp.identity.v1 import events_pb2 as identity_ev
from cdp.segmentation.v1 import events_pb2 as seg_ev
from cdp_activation.store import (
    AttributeSourceRow,
    FragmentRow,
    MemberRow,
    ProfileRow,
    SegmentChangeRow,
    SegmentRow,
)
from cdp_kit.envelope import Envelope, from_timestamp, is_a, unpack
from cdp_kit.eventlog import LogMessage
from cdp_kit.processor import UnitOfWork


class _ObserveOnly:
    def decide(self, uow: UnitOfWork, msg: LogMessage, env: Envelope) -> None:
        return None


class SegmentsObserver(_ObserveOnly):
    def observe(self, session: Session, msg: LogMessage, env: Envelope) -> None:
        if is_a(env, seg_ev.SegmentDefined):
            seg = unpack(env, seg_ev.SegmentDefined).segment
            session.merge(SegmentRow(id=seg.id, name=seg.name))


class MembershipsObserver(_ObserveOnly):
    def observe(self, session: Session, msg: LogMessage, env: Envelope) -> None:
        if not is_a(env, seg_ev.MembershipChanged):
            return
        change = unpack(env, seg_ev.MembershipChanged)
        if change.status == seg_ev.MEMBERSHIP_STATUS_REALIZED:
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


def newest(fragments: list[FragmentRow]) -> tuple[dict[str, object], dict[str, object]]:
    """Attributes of a profile from its record fragments: the newest value of each wins."""
    attributes: dict[str, object] = {}
    times: dict[str, object] = {}
    for frag in sorted(fragments, key=lambda f: (f.at, f.id)):
        for name, value in frag.attributes.items():
            attributes[name], times[name] = value, frag.at
    return attributes, times


def _source(session: Session, name: str, dataset: str) -> None:
    """Record that ``name`` came from ``dataset``, once per transaction (a wide record names 60
    attributes, and every record of a batch names the same ones: a merge is a lookup each)."""
    known: set[tuple[str, str]] = session.info.setdefault("act_attribute_sources", set())
    if (name, dataset) not in known:
        known.add((name, dataset))
        session.merge(AttributeSourceRow(name=name, dataset=dataset))


class ProfilesObserver(_ObserveOnly):
    def observe(self, session: Session, msg: LogMessage, env: Envelope) -> None:
        if is_a(env, identity_ev.ProfileFragment):
            self._fragment(session, unpack(env, identity_ev.ProfileFragment))
        elif is_a(env, identity_ev.ProfilesMerged):
            self._merged(session, unpack(env, identity_ev.ProfilesMerged))
        elif is_a(env, identity_ev.ProfileSplit):
            self._split(session, unpack(env, identity_ev.ProfileSplit))
        session.flush()

    @staticmethod
    def _fragment(session: Session, frag: identity_ev.ProfileFragment) -> None:
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
            at = from_timestamp(frag.occurred_at).isoformat()
            values_of = json_format.MessageToDict(frag.attributes)
            attributes, times = dict(row.attributes), dict(row.attribute_times)
            for name, value in values_of.items():
                if str(times.get(name, "")) <= at:
                    attributes[name], times[name] = value, at
                if frag.dataset:
                    _source(session, name, frag.dataset)
            row.attributes, row.attribute_times = attributes, times
            fragment_id = frag.source_event_id or frag.record_id
            if fragment_id:
                session.merge(FragmentRow(id=fragment_id, profile_id=frag.profile_id, attributes=values_of, at=at))
        session.add(row)

    @staticmethod
    def _merged(session: Session, merged: identity_ev.ProfilesMerged) -> None:
        survivor = session.get(ProfileRow, merged.survivor) or ProfileRow(profile_id=merged.survivor)
        identities = {ns: list(values) for ns, values in survivor.identities.items()}
        attributes, times = dict(survivor.attributes), dict(survivor.attribute_times)
        absorbed_ids = list(merged.absorbed)
        for absorbed in session.exec(select(ProfileRow).where(col(ProfileRow.profile_id).in_(absorbed_ids))):
            for ns, values in absorbed.identities.items():
                target = identities.setdefault(ns, [])
                target.extend(v for v in values if v not in target)
            for name, value in absorbed.attributes.items():
                if str(times.get(name, "")) <= str(absorbed.attribute_times.get(name, "")):
                    attributes[name], times[name] = value, absorbed.attribute_times.get(name, "")
            session.delete(absorbed)
        for frag in session.exec(select(FragmentRow).where(col(FragmentRow.profile_id).in_(absorbed_ids))):
            frag.profile_id = merged.survivor
            session.add(frag)
        survivor.identities, survivor.attributes, survivor.attribute_times = identities, attributes, times
        session.add(survivor)

    @staticmethod
    def _split(session: Session, split: identity_ev.ProfileSplit) -> None:
        """Each part becomes its own profile: its identities, and the attributes of its fragments."""
        for part in split.parts:
            if part.fragment_ids:
                for frag in session.exec(select(FragmentRow).where(col(FragmentRow.id).in_(list(part.fragment_ids)))):
                    frag.profile_id = part.profile_id
                    session.add(frag)
        session.flush()
        for part in split.parts:
            fragments = list(session.exec(select(FragmentRow).where(FragmentRow.profile_id == part.profile_id)))
            attributes, times = newest(fragments)
            identities: dict[str, list[str]] = {}
            for ident in part.identities:
                values = identities.setdefault(ident.namespace, [])
                if ident.value not in values:
                    values.append(ident.value)
            row = session.get(ProfileRow, part.profile_id) or ProfileRow(profile_id=part.profile_id)
            row.identities, row.attributes, row.attribute_times = identities, attributes, times
            session.add(row)
