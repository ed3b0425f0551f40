"""Activation's copy of profile attributes, resolved by segmentation's merge policy.

Every record fragment is kept with its origin (dataset, record time, log sequence, place in the
message), so a profile's attributes follow ``cdp_kit.merging`` exactly as segmentation's do: a
fragment is offered to its profile, a merge or a split resolves the profiles it touches from
their fragments, and a new merge policy resolves every profile again (in bounded chunks).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlmodel import Session, col, select

from cdp_activation.store import FragmentRow, MergePolicyRow, ProfileRow
from cdp_kit.merging import MergeRule, Origin, resolve

POLICY_ID = "merge_policy"
_RULE = "act_merge_rule"
CHUNK = 500


def merge_rule(session: Session) -> MergeRule:
    """The merge rule in force, read once per transaction."""
    rule = session.info.get(_RULE)
    if not isinstance(rule, MergeRule):
        row = session.get(MergePolicyRow, POLICY_ID)
        rule = MergeRule(tuple(str(d) for d in row.precedence) if row is not None else ())
        session.info[_RULE] = rule
    return rule


def set_merge_rule(session: Session, rule: MergeRule) -> bool:
    """Record a merge policy. Returns whether it differs from the one in force."""
    changed = rule != merge_rule(session)
    session.merge(MergePolicyRow(id=POLICY_ID, precedence=list(rule.precedence)))
    session.info[_RULE] = rule
    return changed


def encode(origin: Origin) -> list[Any]:
    return [origin.dataset, origin.ts_ms, origin.seq, origin.pos]


def decode(stored: Any) -> Origin:
    dataset, ts_ms, seq, pos = stored
    return Origin(str(dataset), int(ts_ms), int(seq), int(pos))


def origin_of(fragment: FragmentRow) -> Origin:
    return Origin(fragment.dataset, fragment.ts_ms, fragment.seq, fragment.pos)


def offer(profile: ProfileRow, values: dict[str, Any], origin: Origin, rule: MergeRule) -> None:
    """A record's attributes replace the kept ones unless those win by the rule."""
    attributes, origins = dict(profile.attributes), dict(profile.origins)
    stored = encode(origin)
    for name, value in values.items():
        current = origins.get(name)
        if rule.wins(origin, decode(current) if current is not None else None):
            attributes[name], origins[name] = value, stored
    profile.attributes, profile.origins = attributes, origins


def resolved(rule: MergeRule, fragments: Iterable[FragmentRow]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A profile's attributes and their origins from its fragments."""
    attributes, origins = resolve(rule, ((f.attributes, origin_of(f)) for f in fragments))
    return attributes, {name: encode(origin) for name, origin in origins.items()}


def fragments_of(session: Session, profile_ids: list[str]) -> dict[str, list[FragmentRow]]:
    out: dict[str, list[FragmentRow]] = {pid: [] for pid in profile_ids}
    for start in range(0, len(profile_ids), CHUNK):  # bounded IN lists
        chunk = profile_ids[start : start + CHUNK]
        for fragment in session.exec(select(FragmentRow).where(col(FragmentRow.profile_id).in_(chunk))):
            out[fragment.profile_id].append(fragment)
    return out


def reresolve(session: Session, profiles: list[ProfileRow], rule: MergeRule) -> None:
    """Resolve these profiles' attributes from their fragments."""
    by_profile = fragments_of(session, [p.profile_id for p in profiles])
    for profile in profiles:
        profile.attributes, profile.origins = resolved(rule, by_profile[profile.profile_id])
        session.add(profile)


def reresolve_all(session: Session, rule: MergeRule, chunk: int = CHUNK) -> int:
    """A new merge policy: every profile's attributes again, ``chunk`` profiles at a time (one
    fragment query each, flushed and let go before the next). Returns the profiles changed."""
    session.flush()
    changed, after = 0, ""
    while True:
        page = select(ProfileRow).where(col(ProfileRow.profile_id) > after).order_by(col(ProfileRow.profile_id))
        profiles = list(session.exec(page.limit(chunk)))
        if not profiles:
            return changed
        by_profile = fragments_of(session, [p.profile_id for p in profiles])
        for profile in profiles:
            attributes, origins = resolved(rule, by_profile[profile.profile_id])
            if (attributes, origins) != (profile.attributes, profile.origins):
                profile.attributes, profile.origins = attributes, origins
                session.add(profile)
                changed += 1
        session.flush()
        for profile in profiles:
            session.expunge(profile)
        for fragments in by_profile.values():
            for fragment in fragments:
                session.expunge(fragment)
        after = profiles[-1].profile_id
