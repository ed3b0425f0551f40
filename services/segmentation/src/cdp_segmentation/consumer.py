"""Identity's fragments and merges: keep the unified profile, re-evaluate, emit changes."""

from __future__ import annotations

from sqlmodel import Session

from cdp.identity.v1 import events_pb2 as identity_ev
from cdp_kit.envelope import Envelope, from_timestamp, is_a, unpack
from cdp_kit.eventlog import LogMessage
from cdp_kit.processor import UnitOfWork
from cdp_segmentation.membership import active_segments, exit_all, reevaluate
from cdp_segmentation.profiles import apply_fragment, apply_merge


class ProfilesToMemberships:
    def observe(self, session: Session, msg: LogMessage, env: Envelope) -> None:
        if is_a(env, identity_ev.ProfileFragment):
            apply_fragment(session, unpack(env, identity_ev.ProfileFragment))
        elif is_a(env, identity_ev.ProfilesMerged):
            apply_merge(session, unpack(env, identity_ev.ProfilesMerged))

    def decide(self, uow: UnitOfWork, msg: LogMessage, env: Envelope) -> None:
        at = from_timestamp(env.occurred_at)
        segments = active_segments(uow.session)
        if is_a(env, identity_ev.ProfileFragment):
            frag = unpack(env, identity_ev.ProfileFragment)
            reevaluate(uow, frag.profile_id, segments, at, f"fragment:{env.id}")
        elif is_a(env, identity_ev.ProfilesMerged):
            merged = unpack(env, identity_ev.ProfilesMerged)
            for absorbed in merged.absorbed:
                exit_all(uow, absorbed, at, f"merged-into:{merged.survivor}")
            reevaluate(uow, merged.survivor, segments, at, f"merge:{env.id}")
