"""Folds identity's own events (fragments and merges) into the graph."""

from __future__ import annotations

from datetime import datetime
from itertools import combinations

from sqlmodel import Session, col, update

from cdp.identity.v1 import events_pb2 as ev
from cdp_identity.store import IdentityRow, LinkRow, ProfileRow, next_ordinal, node_key
from cdp_kit.envelope import Envelope, from_timestamp, is_a, unpack
from cdp_kit.streams import OwnLog


class IdentityProjection:
    def fold(self, session: Session, own: OwnLog, env: Envelope) -> None:
        if is_a(env, ev.ProfileFragment):
            self._fragment(session, unpack(env, ev.ProfileFragment), from_timestamp(env.occurred_at))
        elif is_a(env, ev.ProfilesMerged):
            self._merged(session, unpack(env, ev.ProfilesMerged))

    def _fragment(self, session: Session, frag: ev.ProfileFragment, at: datetime) -> None:
        if session.get(ProfileRow, frag.profile_id) is None:
            session.add(ProfileRow(profile_id=frag.profile_id, ordinal=next_ordinal(session)))
            session.flush()
        for ident in frag.identities:
            row = session.get(IdentityRow, (ident.namespace, ident.value))
            if row is None:
                row = IdentityRow(
                    namespace=ident.namespace,
                    value=ident.value,
                    profile_id=frag.profile_id,
                    first_seen=at,
                    last_seen=at,
                )
            else:
                row.profile_id = frag.profile_id
                row.last_seen = max(row.last_seen, at)
            session.add(row)
        keys = sorted(node_key(i.namespace, i.value) for i in frag.identities)
        for a, b in combinations(keys, 2):
            link = session.get(LinkRow, (a, b))
            if link is None:
                session.add(LinkRow(a=a, b=b, first_seen=at, last_seen=at, dataset=frag.dataset))
            else:
                link.last_seen = max(link.last_seen, at)
                session.add(link)
        session.flush()

    def _merged(self, session: Session, merged: ev.ProfilesMerged) -> None:
        absorbed = list(merged.absorbed)
        session.exec(
            update(IdentityRow).where(col(IdentityRow.profile_id).in_(absorbed)).values(profile_id=merged.survivor)
        )
        session.exec(
            update(ProfileRow).where(col(ProfileRow.profile_id).in_(absorbed)).values(merged_into=merged.survivor)
        )
        session.exec(
            update(ProfileRow).where(col(ProfileRow.merged_into).in_(absorbed)).values(merged_into=merged.survivor)
        )
        session.flush()
