"""The graph working set of one SQL transaction.

Deciding and folding happen in memory on the graphs a transaction touches; they are
loaded in bulk (every identity a fetched message names, then every node and link of
their whole graphs, which the size guardrail keeps small) and written back in bulk just
before the transaction commits. A rollback throws the working set away with the
transaction, so memory never disagrees with the store, and it only ever holds the graphs
of one batch (memory stays bounded however large the graph grows).

Invariant: a node in memory means its whole profile (every node, every link) is in
memory. Links never span profiles: a profile is one connected component.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlmodel import Session

from cdp_identity import store
from cdp_identity.domain import Namespace, Rules, node_key, profile_id_for

NEW, DIRTY, CLEAN, DELETED = 0, 1, 2, 3
IN_CHUNK = 500
WS_KEY = "cdp_identity_graph"


@dataclass(slots=True)
class Node:
    key: str
    namespace: str
    value: str
    profile_id: str
    first_seen: int
    last_seen: int
    dataset: str = ""
    batch_id: str = ""
    last_dataset: str = ""
    last_batch_id: str = ""
    state: int = CLEAN


@dataclass(slots=True)
class Link:
    a: str
    b: str
    first_seen: int
    last_seen: int
    dataset: str = ""
    batch_id: str = ""
    last_dataset: str = ""
    last_batch_id: str = ""
    state: int = CLEAN


@dataclass(slots=True)
class Profile:
    profile_id: str
    ordinal: int
    founder: str = ""
    merged_into: str = ""
    split_from: str = ""
    state: int = CLEAN


def pair(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a < b else (b, a)


@dataclass
class WorkingSet:
    session: Session
    rules: Rules
    nodes: dict[str, Node] = field(default_factory=dict)
    members: dict[str, set[str]] = field(default_factory=dict)
    links: dict[tuple[str, str], Link] = field(default_factory=dict)
    adj: dict[str, set[str]] = field(default_factory=dict)
    profiles: dict[str, Profile] = field(default_factory=dict)
    missing: set[str] = field(default_factory=set)
    absent: set[str] = field(default_factory=set)  # profile ids known not to exist
    fragments: list[dict[str, str]] = field(default_factory=list)
    new_fragments_by_anchor: dict[str, list[str]] = field(default_factory=dict)
    decisions: list[dict[str, Any]] = field(default_factory=list)
    drops: Counter[tuple[str, str]] = field(default_factory=Counter)
    new_unlinked: list[tuple[str, str]] = field(default_factory=list)
    new_namespaces: list[dict[str, Any]] = field(default_factory=list)
    _unlinked: set[tuple[str, str]] | None = None
    _next_ordinal: int | None = None

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def of(cls, session: Session, base_rules: Rules) -> WorkingSet:
        ws = session.info.get(WS_KEY)
        if isinstance(ws, WorkingSet):
            return ws
        ws = cls(session, load_rules(session, base_rules))
        session.info[WS_KEY] = ws
        event.listen(session, "before_commit", ws._before_commit)
        event.listen(session, "after_commit", ws._forget)
        event.listen(session, "after_rollback", ws._forget)
        return ws

    def _forget(self, session: Session) -> None:
        if session.info.get(WS_KEY) is self:
            del session.info[WS_KEY]

    # ------------------------------------------------------------------ loading
    def load(self, keys: Iterable[str]) -> None:
        """Bring the graphs of these identities into memory (two or three queries for all of them)."""
        unknown = [k for k in set(keys) if k not in self.nodes and k not in self.missing]
        if not unknown:
            return
        found: set[str] = set()
        pids: set[str] = set()
        for chunk in _chunks(sorted(unknown)):
            for key, pid in (
                self.session.connection()
                .execute(sa.select(store.NODE.c.key, store.NODE.c.profile_id).where(store.NODE.c.key.in_(chunk)))
                .all()
            ):
                found.add(key)
                pids.add(pid)
        self.missing.update(k for k in unknown if k not in found)
        self.load_profiles(pids)

    def load_profiles(self, pids: Iterable[str]) -> None:
        todo = sorted(p for p in set(pids) if p not in self.members)
        if not todo:
            return
        loaded: list[str] = []
        for chunk in _chunks(todo):
            for row in (
                self.session.connection().execute(sa.select(store.NODE).where(store.NODE.c.profile_id.in_(chunk))).all()
            ):
                if row.key in self.nodes:
                    continue
                node = Node(
                    row.key,
                    row.namespace,
                    row.value,
                    row.profile_id,
                    row.first_seen,
                    row.last_seen,
                    row.dataset,
                    row.batch_id,
                    row.last_dataset,
                    row.last_batch_id,
                )
                self.nodes[row.key] = node
                self.adj.setdefault(row.key, set())
                loaded.append(row.key)
            for row in (
                self.session.connection()
                .execute(sa.select(store.PROFILE).where(store.PROFILE.c.profile_id.in_(chunk)))
                .all()
            ):
                if row.profile_id not in self.profiles:
                    self.profiles[row.profile_id] = Profile(
                        row.profile_id, row.ordinal, row.founder, row.merged_into, row.split_from
                    )
        for pid in todo:
            self.members.setdefault(pid, set())
        for key in loaded:
            self.members.setdefault(self.nodes[key].profile_id, set()).add(key)
        for chunk in _chunks(sorted(loaded)):
            for row in self.session.connection().execute(sa.select(store.LINK).where(store.LINK.c.a.in_(chunk))).all():
                if (row.a, row.b) in self.links:
                    continue
                self.links[(row.a, row.b)] = Link(
                    row.a,
                    row.b,
                    row.first_seen,
                    row.last_seen,
                    row.dataset,
                    row.batch_id,
                    row.last_dataset,
                    row.last_batch_id,
                )
                self.adj.setdefault(row.a, set()).add(row.b)
                self.adj.setdefault(row.b, set()).add(row.a)

    def profile(self, pid: str) -> Profile | None:
        if pid in self.absent:
            return None
        if pid not in self.profiles:
            row = (
                self.session.connection()
                .execute(sa.select(store.PROFILE).where(store.PROFILE.c.profile_id == pid))
                .first()
            )
            if row is None:
                self.absent.add(pid)
                return None
            self.profiles[pid] = Profile(row.profile_id, row.ordinal, row.founder, row.merged_into, row.split_from)
        return self.profiles[pid]

    def unlinked(self) -> set[tuple[str, str]]:
        if self._unlinked is None:
            self._unlinked = {(r.a, r.b) for r in self.session.connection().execute(sa.select(store.UNLINKED)).all()}
        return self._unlinked

    def next_ordinal(self) -> int:
        if self._next_ordinal is None:
            current = self.session.connection().execute(sa.select(sa.func.max(store.PROFILE.c.ordinal))).scalar()
            self._next_ordinal = int(current or 0) + 1
        ordinal = self._next_ordinal
        self._next_ordinal += 1
        return ordinal

    def new_profile_id(self, namespace: str, value: str) -> str:
        if node_key(namespace, value) in self.missing and profile_id_for(namespace, value) not in self.profiles:
            # Nodes are never deleted and a profile id derived from an identity is only ever made
            # when that identity first appears: an identity the store never held has its id free.
            pid = profile_id_for(namespace, value)
            self.absent.add(pid)
            return pid
        generation = 0
        while self.profile(profile_id_for(namespace, value, generation)) is not None:
            generation += 1
        return profile_id_for(namespace, value, generation)

    # ------------------------------------------------------------------ reading
    def uniques(self, pid: str) -> dict[str, str]:
        out: dict[str, str] = {}
        for key in self.members.get(pid, ()):
            node = self.nodes[key]
            if self.rules.is_unique(node.namespace):
                out[node.namespace] = node.value
        return out

    def edges_among(self, keys: set[str]) -> list[tuple[str, str]]:
        return [(a, b) for a in keys for b in self.adj.get(a, ()) if a < b and b in keys]

    def fragments_anchored(self, anchors: Sequence[str]) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {a: list(self.new_fragments_by_anchor.get(a, ())) for a in anchors}
        for chunk in _chunks(sorted(anchors)):
            for sid, anchor in (
                self.session.connection()
                .execute(
                    sa.select(store.FRAGMENT.c.source_event_id, store.FRAGMENT.c.anchor).where(
                        store.FRAGMENT.c.anchor.in_(chunk)
                    )
                )
                .all()
            ):
                out[anchor].append(sid)
        return {a: sorted(set(ids)) for a, ids in out.items()}

    # ------------------------------------------------------------------ changing (folds only)
    def add_profile(self, pid: str, founder: str, split_from: str = "") -> None:
        if self.profile(pid) is None:
            self.absent.discard(pid)
            self.profiles[pid] = Profile(pid, self.next_ordinal(), founder, "", split_from, NEW)
        self.members.setdefault(pid, set())

    def touch_node(self, namespace: str, value: str, pid: str, at: int, dataset: str, batch_id: str) -> str:
        key = node_key(namespace, value)
        node = self.nodes.get(key)
        if node is None:
            self.load([key])
            node = self.nodes.get(key)
        if node is None:
            node = Node(key, namespace, value, pid, at, at, dataset, batch_id, dataset, batch_id, NEW)
            self.nodes[key] = node
            self.missing.discard(key)
            self.adj.setdefault(key, set())
            self.members.setdefault(pid, set()).add(key)
            return key
        if node.profile_id != pid:
            self.move(key, pid)
        if at >= node.last_seen:
            node.last_seen, node.last_dataset, node.last_batch_id = at, dataset, batch_id
        if at < node.first_seen:
            node.first_seen, node.dataset, node.batch_id = at, dataset, batch_id
        if node.state == CLEAN:
            node.state = DIRTY
        return key

    def move(self, key: str, pid: str) -> None:
        node = self.nodes[key]
        self.members.get(node.profile_id, set()).discard(key)
        node.profile_id = pid
        self.members.setdefault(pid, set()).add(key)
        if node.state == CLEAN:
            node.state = DIRTY

    def touch_link(self, a: str, b: str, at: int, dataset: str, batch_id: str) -> None:
        a, b = pair(a, b)
        link = self.links.get((a, b))
        if link is None or link.state == DELETED:
            fresh = Link(a, b, at, at, dataset, batch_id, dataset, batch_id, NEW)
            if link is not None:  # deleted earlier in this transaction, in the store: rewrite it
                fresh.state = DIRTY
            self.links[(a, b)] = fresh
        else:
            if at >= link.last_seen:
                link.last_seen, link.last_dataset, link.last_batch_id = at, dataset, batch_id
            if at < link.first_seen:
                link.first_seen, link.dataset, link.batch_id = at, dataset, batch_id
            if link.state == CLEAN:
                link.state = DIRTY
        self.adj.setdefault(a, set()).add(b)
        self.adj.setdefault(b, set()).add(a)

    def remove_link(self, a: str, b: str) -> None:
        a, b = pair(a, b)
        link = self.links.get((a, b))
        if link is None:
            self.load([a, b])
            link = self.links.get((a, b))
        if link is None:
            return
        if link.state == NEW:
            del self.links[(a, b)]
        else:
            link.state = DELETED
        self.adj.get(a, set()).discard(b)
        self.adj.get(b, set()).discard(a)

    def add_fragment(self, source_event_id: str, anchor: str) -> None:
        self.fragments.append({"source_event_id": source_event_id, "anchor": anchor})
        self.new_fragments_by_anchor.setdefault(anchor, []).append(source_event_id)

    def remember_unlink(self, a: str, b: str) -> None:
        entry = pair(a, b) if b else (a, "")
        if entry not in self.unlinked():
            self.unlinked().add(entry)
            self.new_unlinked.append(entry)

    # ------------------------------------------------------------------ writing
    def _before_commit(self, session: Session) -> None:
        if session.info.get(WS_KEY) is self:
            self.write()

    def write(self) -> None:
        conn = self.session.connection()
        new_nodes = [_node_row(n) for n in self.nodes.values() if n.state == NEW]
        dirty_nodes = [_node_row(n, "k_") for n in self.nodes.values() if n.state == DIRTY]
        if new_nodes:
            conn.execute(sa.insert(store.NODE), new_nodes)
        if dirty_nodes:
            conn.execute(_update(store.NODE, ["key"]), dirty_nodes)
        new_links = [_link_row(x) for x in self.links.values() if x.state == NEW]
        dirty_links = [_link_row(x, "k_") for x in self.links.values() if x.state == DIRTY]
        gone = [{"k_a": x.a, "k_b": x.b} for x in self.links.values() if x.state == DELETED]
        if gone:
            conn.execute(
                sa.delete(store.LINK).where(
                    store.LINK.c.a == sa.bindparam("k_a"), store.LINK.c.b == sa.bindparam("k_b")
                ),
                gone,
            )
        if new_links:
            conn.execute(sa.insert(store.LINK), new_links)
        if dirty_links:
            conn.execute(_update(store.LINK, ["a", "b"]), dirty_links)
        new_profiles = [_profile_row(p) for p in self.profiles.values() if p.state == NEW]
        dirty_profiles = [_profile_row(p, "k_") for p in self.profiles.values() if p.state == DIRTY]
        if new_profiles:
            conn.execute(sa.insert(store.PROFILE), new_profiles)
        if dirty_profiles:
            conn.execute(_update(store.PROFILE, ["profile_id"]), dirty_profiles)
        if self.fragments:
            conn.execute(sa.insert(store.FRAGMENT), self.fragments)
        if self.decisions:
            conn.execute(sa.insert(store.DECISION), self.decisions)
        if self.new_unlinked:
            conn.execute(sa.insert(store.UNLINKED), [{"a": a, "b": b} for a, b in self.new_unlinked])
        if self.new_namespaces:
            conn.execute(sa.insert(store.NAMESPACE), self.new_namespaces)
        if self.drops:
            self._write_drops(conn)
        self._settle()

    def _write_drops(self, conn: sa.Connection) -> None:
        existing = {
            (r.namespace, r.rule): r.total
            for r in conn.execute(sa.select(store.DROP)).all()
            if (r.namespace, r.rule) in self.drops
        }
        inserts = [
            {"namespace": ns, "rule": rule, "total": n}
            for (ns, rule), n in self.drops.items()
            if (ns, rule) not in existing
        ]
        updates = [
            {"k_namespace": ns, "k_rule": rule, "total": existing[(ns, rule)] + n}
            for (ns, rule), n in self.drops.items()
            if (ns, rule) in existing
        ]
        if inserts:
            conn.execute(sa.insert(store.DROP), inserts)
        if updates:
            conn.execute(_update(store.DROP, ["namespace", "rule"], ["total"]), updates)

    def _settle(self) -> None:
        """After writing: everything in memory equals the store (a commit may still follow writes)."""
        for n in self.nodes.values():
            n.state = CLEAN
        for key in [k for k, x in self.links.items() if x.state == DELETED]:
            del self.links[key]
        for x in self.links.values():
            x.state = CLEAN
        for p in self.profiles.values():
            p.state = CLEAN
        self.fragments.clear()
        self.new_fragments_by_anchor.clear()
        self.decisions.clear()
        self.drops.clear()
        self.new_unlinked.clear()
        self.new_namespaces.clear()


def load_rules(session: Session, base_rules: Rules) -> Rules:
    """The settings' rules plus every custom namespace in the store."""
    rules = base_rules
    for r in session.execute(sa.select(store.NAMESPACE).order_by(store.NAMESPACE.c.name)).all():
        rules = rules.with_namespace(Namespace(r.name, type_number(r.type), r.unique, r.priority, False, r.description))
    return rules


def _chunks(items: Sequence[str]) -> Iterable[Sequence[str]]:
    for i in range(0, len(items), IN_CHUNK):
        yield items[i : i + IN_CHUNK]


def type_number(name: str) -> int:
    from cdp.identity.v1 import identity_pb2 as pb

    return pb.NamespaceType.Value(name) if name in pb.NamespaceType.keys() else pb.NAMESPACE_TYPE_CUSTOM  # noqa: SIM118


def _node_row(n: Node, prefix: str = "") -> dict[str, Any]:
    row: dict[str, Any] = {
        "profile_id": n.profile_id,
        "first_seen": n.first_seen,
        "last_seen": n.last_seen,
        "dataset": n.dataset,
        "batch_id": n.batch_id,
        "last_dataset": n.last_dataset,
        "last_batch_id": n.last_batch_id,
    }
    if prefix:
        row["k_key"] = n.key
    else:
        row.update(key=n.key, namespace=n.namespace, value=n.value)
    return row


def _link_row(x: Link, prefix: str = "") -> dict[str, Any]:
    row: dict[str, Any] = {
        f"{prefix}a": x.a,
        f"{prefix}b": x.b,
        "first_seen": x.first_seen,
        "last_seen": x.last_seen,
        "dataset": x.dataset,
        "batch_id": x.batch_id,
        "last_dataset": x.last_dataset,
        "last_batch_id": x.last_batch_id,
    }
    return row


def _profile_row(p: Profile, prefix: str = "") -> dict[str, Any]:
    return {
        f"{prefix}profile_id": p.profile_id,
        "ordinal": p.ordinal,
        "founder": p.founder,
        "merged_into": p.merged_into,
        "split_from": p.split_from,
    }


def _update(table: sa.Table, keys: list[str], values: list[str] | None = None) -> sa.Update:
    cols = values or [c.name for c in table.columns if c.name not in keys and not _static(table, c.name)]
    return (
        sa.update(table)
        .where(*[table.c[k] == sa.bindparam(f"k_{k}") for k in keys])
        .values({c: sa.bindparam(c) for c in cols})
    )


def _static(table: sa.Table, column: str) -> bool:
    return table is store.NODE and column in ("namespace", "value")
