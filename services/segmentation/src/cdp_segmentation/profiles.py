"""Unified profiles from identity's fragments and merges (merge policy: newest value wins)."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format
from sqlmodel import Session, col, delete, update

from cdp.identity.v1 import events_pb2 as identity_ev
from cdp_kit.envelope import from_timestamp
from cdp_segmentation.store import ProfileIdentityRow, ProfileRow


def newer(candidate: dict[str, Any], current: dict[str, Any] | None) -> bool:
    """Timestamp merge policy: the newest record time wins; on a tie, the later in the log."""
    return current is None or str(candidate["at"]) >= str(current["at"])


def apply_fragment(session: Session, frag: identity_ev.ProfileFragment) -> None:
    profile = session.get(ProfileRow, frag.profile_id) or ProfileRow(profile_id=frag.profile_id)
    if frag.kind == "event":
        profile.events += 1
    else:
        at = from_timestamp(frag.occurred_at).isoformat()
        values = json_format.MessageToDict(frag.attributes)
        attributes, sources = dict(profile.attributes), dict(profile.sources)
        for name, value in values.items():
            candidate = {"dataset": frag.dataset, "at": at}
            if newer(candidate, sources.get(name)):
                attributes[name] = value
                sources[name] = candidate
        profile.attributes, profile.sources = attributes, sources
    session.add(profile)
    for ident in frag.identities:
        session.merge(ProfileIdentityRow(namespace=ident.namespace, value=ident.value, profile_id=frag.profile_id))
    session.flush()


def apply_merge(session: Session, merged: identity_ev.ProfilesMerged) -> None:
    survivor = session.get(ProfileRow, merged.survivor) or ProfileRow(profile_id=merged.survivor)
    attributes, sources = dict(survivor.attributes), dict(survivor.sources)
    for absorbed_id in merged.absorbed:
        absorbed = session.get(ProfileRow, absorbed_id)
        if absorbed is None:
            continue
        for name, value in absorbed.attributes.items():
            if newer(absorbed.sources[name], sources.get(name)):
                attributes[name] = value
                sources[name] = absorbed.sources[name]
        survivor.events += absorbed.events
        session.delete(absorbed)
    survivor.attributes, survivor.sources = attributes, sources
    session.add(survivor)
    absorbed_ids = list(merged.absorbed)
    session.exec(
        update(ProfileIdentityRow)
        .where(col(ProfileIdentityRow.profile_id).in_(absorbed_ids))
        .values(profile_id=merged.survivor)
    )
    session.flush()


def forget(session: Session, profile_id: str) -> None:
    session.exec(delete(ProfileIdentityRow).where(col(ProfileIdentityRow.profile_id) == profile_id))
