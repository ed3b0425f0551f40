"""Folds identity's own events into the graph. Pure: every decision is already in the event."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp
from sqlmodel import Session

from cdp.common.v1.envelope_pb2 import IdentityValue
from cdp.identity.v1 import events_pb2 as ev
from cdp_identity.domain import Namespace, Rules, node_key
from cdp_identity.graph import Made, WorkingSet, pair, type_number
from cdp_identity.privacy import REQUESTED as PRIVACY_ERASURE
from cdp_identity.privacy import fold_erasure, fold_privacy
from cdp_kit.envelope import Envelope, unpack
from cdp_kit.privacy import KeyVault, NoKeyVault
from cdp_kit.streams import PRIVACY_REQUESTS, OwnLog

FRAGMENT = ev.ProfileFragment.DESCRIPTOR.full_name
MERGED = ev.ProfilesMerged.DESCRIPTOR.full_name
DECISION = ev.GraphDecision.DESCRIPTOR.full_name
SPLIT = ev.ProfileSplit.DESCRIPTOR.full_name
NAMESPACE = ev.NamespaceCreated.DESCRIPTOR.full_name
# The drop count of records that linked no one (rule no_identities) is kept under this namespace.
NO_ONE = "*"


def micros(ts: Timestamp) -> int:
    return ts.seconds * 1_000_000 + ts.nanos // 1000


def key_of(ident: IdentityValue) -> str:
    return node_key(ident.namespace, ident.value)


def links_text(links: list[tuple[str, str]]) -> str:
    return "\n".join(f"{a}\t{b}" for a, b in links)


FRAGMENT_URL = f"type.googleapis.com/{ev.ProfileFragment.DESCRIPTOR.full_name}"


class IdentityProjection:
    def __init__(self, rules: Rules, vault: KeyVault | None = None) -> None:
        self.rules = rules
        self.vault: KeyVault = vault if vault is not None else NoKeyVault()

    def graph(self, session: Session) -> WorkingSet:
        return WorkingSet.of(session, self.rules)

    def prefetch(self, session: Session, own: OwnLog, envelopes: list[Envelope]) -> None:
        """Recovery or a rebuild folds these next: read their fragments once and load the graphs
        of all their identities in a few bulk queries (instead of a few queries per fragment)."""
        ws = self.graph(session)
        keys: list[str] = []
        for env in envelopes:
            # A payload of another type than the envelope says is left to fold's unpack, which refuses it.
            if env.type == FRAGMENT and env.id not in ws.made and env.payload.type_url == FRAGMENT_URL:
                frag = ev.ProfileFragment.FromString(env.payload.value)
                ws.read_fragments[env.id] = frag
                keys += [key_of(i) for i in frag.identities]
        ws.load(keys)

    def fold(self, session: Session, own: OwnLog, env: Envelope) -> None:
        if own.subject == PRIVACY_REQUESTS.subject:
            fold_privacy(session, env)
            return
        kind = env.type
        if kind == PRIVACY_ERASURE:
            fold_erasure(session, self.graph(session), env, self.vault)
            return
        if kind == FRAGMENT:
            ws = self.graph(session)
            made: Made | None = ws.made.pop(env.id, None)  # decided in this transaction
            if made is not None:
                self._made(ws, made)
            else:
                frag = ws.read_fragments.pop(env.id, None)
                self._fragment(ws, frag if frag is not None else unpack(env, ev.ProfileFragment), env)
        elif kind == MERGED:
            self._merged(self.graph(session), unpack(env, ev.ProfilesMerged))
        elif kind == DECISION:
            self._decision(self.graph(session), unpack(env, ev.GraphDecision), env)
        elif kind == SPLIT:
            self._split(self.graph(session), unpack(env, ev.ProfileSplit))
        elif kind == NAMESPACE:
            self._namespace(self.graph(session), unpack(env, ev.NamespaceCreated))

    def _fragment(self, ws: WorkingSet, frag: ev.ProfileFragment, env: Envelope) -> None:
        for d in frag.dropped:
            ws.drops[(d.namespace, d.rule)] += 1
        if not frag.identities:
            return
        keys = [key_of(i) for i in frag.identities]
        ws.load(keys)
        anchor = key_of(frag.anchor) if frag.HasField("anchor") else keys[0]
        pid = frag.profile_id
        ws.add_profile(pid, anchor)
        at = micros(env.occurred_at)
        dataset, batch_id = frag.dataset, frag.batch_id
        for i in frag.identities:
            ws.touch_node(i.namespace, i.value, pid, at, dataset, batch_id)
        for n, a in enumerate(keys):
            for b in keys[n + 1 :]:
                if a != b:
                    ws.touch_link(a, b, at, dataset, batch_id)
        ws.add_fragment(frag.source_event_id, anchor)
        if env.sealed:  # the refs of the fragment's identities, in their order (cdp_identity.consumer)
            ws.note_key_refs(zip(env.sealed[0].key_refs, keys, strict=False))

    def fold_made(self, session: Session, made: Made) -> None:
        """Fold a fragment decided in this transaction (emitted encoded): what ``fold`` does with its envelope."""
        self._made(self.graph(session), made)

    def _made(self, ws: WorkingSet, made: Made) -> None:
        """A fragment decided in this transaction: its identity keys and time are known already."""
        frag, keys, anchor, at = made
        for d in frag.dropped:
            ws.drops[(d.namespace, d.rule)] += 1
        ws.load(keys)
        pid = frag.profile_id
        ws.add_profile(pid, anchor)
        dataset, batch_id = frag.dataset, frag.batch_id
        touch_key, touch_link = ws.touch_key, ws.touch_link
        for key in keys:
            touch_key(key, pid, at, dataset, batch_id)
        for n, a in enumerate(keys):
            for b in keys[n + 1 :]:
                touch_link(a, b, at, dataset, batch_id)
        ws.add_fragment(frag.source_event_id, anchor)

    def _merged(self, ws: WorkingSet, merged: ev.ProfilesMerged) -> None:
        ws.load_profiles([merged.survivor, *merged.absorbed])
        for absorbed in merged.absorbed:
            for key in sorted(ws.members.get(absorbed, set())):
                ws.move(key, merged.survivor)
            profile = ws.profile(absorbed)
            if profile is not None:
                profile.merged_into = merged.survivor
                ws.changed.add(absorbed)

    def _decision(self, ws: WorkingSet, decision: ev.GraphDecision, env: Envelope) -> None:
        for d in decision.dropped:
            ws.drops[(d.namespace, d.rule)] += 1
        removed = [pair(key_of(x.a), key_of(x.b)) for x in decision.removed_links]
        for a, b in removed:
            ws.remove_link(a, b)
        ident = key_of(decision.identity) if decision.HasField("identity") else ""
        other = key_of(decision.other) if decision.HasField("other") else ""
        if decision.remember and ident:
            ws.remember_unlink(ident, other)
        if decision.rule == "no_identities":
            ws.drops[(NO_ONE, "no_identities")] += 1  # records that linked no one
            return
        refused = [pair(key_of(x.a), key_of(x.b)) for x in decision.refused_links]
        ws.decisions.append(
            {
                "id": env.id,
                "rule": decision.rule,
                "reason": decision.reason,
                "effect": "removed" if removed else ("refused" if refused else "remembered"),
                "profile_id": decision.profile_id,
                "identity": ident,
                "other": other,
                "links": links_text(removed or refused),
                "source_event_id": decision.source_event_id,
                "at": micros(env.occurred_at),
            }
        )

    def _split(self, ws: WorkingSet, split: ev.ProfileSplit) -> None:
        ws.load_profiles([split.profile_id])
        for part in split.parts:
            if part.profile_id != split.profile_id:
                founder = key_of(part.founder) if part.HasField("founder") else key_of(part.identities[0])
                ws.add_profile(part.profile_id, founder, split_from=split.profile_id)
            for ident in part.identities:
                key = key_of(ident)
                if key in ws.nodes:
                    ws.move(key, part.profile_id)

    def _namespace(self, ws: WorkingSet, created: ev.NamespaceCreated) -> None:
        if created.name in ws.rules.namespaces:
            return
        ns = Namespace(
            created.name,
            type_number(created.type),
            created.unique,
            created.priority,
            False,
            created.description,
        )
        ws.rules = ws.rules.with_namespace(ns)
        ws.new_namespaces.append(
            {
                "name": ns.name,
                "type": created.type,
                "unique": ns.unique,
                "priority": ns.priority,
                "description": ns.description,
            }
        )
