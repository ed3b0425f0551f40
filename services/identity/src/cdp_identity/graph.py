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

import gc
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlmodel import Session

from cdp_identity import store
from cdp_identity.bulk import Bulk
from cdp_identity.domain import Namespace, Rules, node_key, profile_id_for

# DIRTY: a node's seen times changed; MOVED: its profile changed too (the profile_id index is rewritten).
NEW, DIRTY, CLEAN, DELETED, MOVED = 0, 1, 2, 3, 4
WS_KEY = "cdp_identity_graph"
NODE_COLUMNS: tuple[str, ...] = ("key", "namespace", "value", "profile_id", "first_seen", "last_seen")
NODE_COLUMNS += ("dataset", "batch_id", "last_dataset", "last_batch_id")
NODE_CHANGING = NODE_COLUMNS[3:]
NODE_SEEN = NODE_COLUMNS[4:]
LINK_COLUMNS = ("a", "b", "first_seen", "last_seen", "dataset", "batch_id", "last_dataset", "last_batch_id")
PROFILE_COLUMNS = ("profile_id", "ordinal", "founder", "merged_into", "split_from")


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


# A fragment decided in this transaction, until it is folded: its payload, its identity keys
# (distinct, strongest first), its anchor and its time in microseconds.
Made = tuple[Any, list[str], str, int]


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
    fragments: list[tuple[str, str]] = field(default_factory=list)  # (anchor, source event id)
    new_fragments_by_anchor: dict[str, list[str]] = field(default_factory=dict)
    decisions: list[dict[str, Any]] = field(default_factory=list)
    drops: Counter[tuple[str, str]] = field(default_factory=Counter)
    new_unlinked: list[tuple[str, str]] = field(default_factory=list)
    new_namespaces: list[dict[str, Any]] = field(default_factory=list)
    unread: list[Any] = field(default_factory=list)  # input envelopes of the batch, not yet read
    parsed: dict[str, Any] = field(default_factory=dict)  # input event id -> what was read of it
    made: dict[str, Made] = field(default_factory=dict)  # own fragment id -> what decided it, until folded
    _unlinked: set[tuple[str, str]] | None = None
    _next_ordinal: int | None = None
    _bulk: Bulk | None = None
    _paused_gc: bool = False

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
        event.listen(session, "after_transaction_end", ws._end)
        ws._pause_gc()
        return ws

    def _forget(self, session: Session) -> None:
        if session.info.get(WS_KEY) is self:
            del session.info[WS_KEY]

    def _pause_gc(self) -> None:
        """Keep CPython's cyclic collector off while the working set lives (it holds no cycles).

        A batch keeps a million or so container objects alive until it commits (nodes, links,
        sets, row tuples); each automatic collection in that time scans all of them, which cost
        a tenth of the processor's CPU even at a 1,000,000 generation-0 threshold. Once the
        transaction ends (commit, rollback or close) the collector is on again and its next
        run finds the batch gone (``_end`` lets go of it). Cyclic garbage made meanwhile waits
        at most one transaction. A collector that was off already (someone else's choice) is
        left alone."""
        if gc.isenabled():
            gc.disable()
            self._paused_gc = True

    def _end(self, session: Session, transaction: Any) -> None:
        """The transaction is over: let go of the graphs and turn the collector back on. The
        session (in reference cycles, through its event listeners) may keep this object alive
        until the collector runs; emptied, it no longer keeps the batch's objects alive too."""
        if getattr(transaction, "parent", None) is not None:
            return  # a nested transaction (savepoint) ended, not the working set's
        self._forget(session)
        for held in (self.nodes, self.members, self.links, self.adj, self.profiles, self.missing, self.absent):
            held.clear()
        for items in (self.fragments, self.decisions, self.new_unlinked, self.new_namespaces, self.unread):
            items.clear()
        self.new_fragments_by_anchor.clear()
        self.parsed.clear()
        self.made.clear()
        self.drops.clear()
        self._unlinked = None
        self._bulk = None
        if self._paused_gc:
            self._paused_gc = False
            gc.enable()

    # ------------------------------------------------------------------ loading
    @property
    def bulk(self) -> Bulk:
        if self._bulk is None:
            self._bulk = Bulk(self.session)
        return self._bulk

    def load(self, keys: Iterable[str]) -> None:
        """Bring the graphs of these identities into memory (a few queries for all of them)."""
        nodes, missing = self.nodes, self.missing
        unknown: set[str] = set()
        for k in keys:
            if k not in nodes and k not in missing:
                unknown.add(k)
        if not unknown:
            return
        found: dict[str, str] = dict(self.bulk.select_in(store.NODE, ("key", "profile_id"), "key", unknown))
        missing.update(unknown.difference(found))
        self.load_profiles(found.values())

    def load_profiles(self, pids: Iterable[str]) -> None:
        todo = {p for p in pids if p not in self.members}
        if not todo:
            return
        nodes, members, adj = self.nodes, self.members, self.adj
        for pid in todo:
            members[pid] = set()
        loaded: list[str] = []
        for row in self.bulk.select_in(store.NODE, NODE_COLUMNS, "profile_id", todo):
            key = row[0]
            if key in nodes:
                continue
            nodes[key] = Node(*row)
            adj.setdefault(key, set())
            members[row[3]].add(key)
            loaded.append(key)
        for row in self.bulk.select_in(store.PROFILE, PROFILE_COLUMNS, "profile_id", todo):
            if row[0] not in self.profiles:
                self.profiles[row[0]] = Profile(*row)
        links = self.links
        for row in self.bulk.select_in(store.LINK, LINK_COLUMNS, "a", loaded):
            a, b = row[0], row[1]
            if (a, b) in links:
                continue
            links[(a, b)] = Link(*row)
            adj.setdefault(a, set()).add(b)
            adj.setdefault(b, set()).add(a)

    def profile(self, pid: str) -> Profile | None:
        if pid in self.absent:
            return None
        if pid not in self.profiles:
            rows = self.bulk.select_in(store.PROFILE, PROFILE_COLUMNS, "profile_id", [pid])
            if not rows:
                self.absent.add(pid)
                return None
            self.profiles[pid] = Profile(*rows[0])
        return self.profiles[pid]

    def unlinked(self) -> set[tuple[str, str]]:
        if self._unlinked is None:
            self._unlinked = {(a, b) for a, b in self.bulk.rows(f"SELECT a, b FROM {store.UNLINKED.name}")}
        return self._unlinked

    def next_ordinal(self) -> int:
        if self._next_ordinal is None:
            [(current,)] = self.bulk.rows(f"SELECT MAX(ordinal) FROM {store.PROFILE.name}")
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
        for sid, anchor in self.bulk.select_in(store.FRAGMENT, ("source_event_id", "anchor"), "anchor", anchors):
            out[anchor].append(sid)
        return {a: sorted(set(ids)) for a, ids in out.items()}

    # ------------------------------------------------------------------ changing (folds only)
    def add_profile(self, pid: str, founder: str, split_from: str = "") -> None:
        if pid in self.profiles and pid in self.members:  # the common case: a known, loaded profile
            return
        if self.profile(pid) is None:
            self.absent.discard(pid)
            self.profiles[pid] = Profile(pid, self.next_ordinal(), founder, "", split_from, NEW)
        self.members.setdefault(pid, set())

    def touch_node(self, namespace: str, value: str, pid: str, at: int, dataset: str, batch_id: str) -> str:
        return self.touch_key(node_key(namespace, value), pid, at, dataset, batch_id)

    def touch_key(self, key: str, pid: str, at: int, dataset: str, batch_id: str) -> str:
        """Record that identity ``key`` was seen at ``at`` in profile ``pid`` (created if new)."""
        node = self.nodes.get(key)
        if node is None:
            self.load([key])
            node = self.nodes.get(key)
        if node is None:
            namespace, _, value = key.partition(":")
            node = Node(key, namespace, value, pid, at, at, dataset, batch_id, dataset, batch_id, NEW)
            self.nodes[key] = node
            self.missing.discard(key)
            self.adj.setdefault(key, set())
            self.members.setdefault(pid, set()).add(key)
            return key
        if node.profile_id != pid:
            self.move(key, pid)
        if at >= node.last_seen and (
            at != node.last_seen or dataset != node.last_dataset or batch_id != node.last_batch_id
        ):
            node.last_seen, node.last_dataset, node.last_batch_id = at, dataset, batch_id
            if node.state == CLEAN:
                node.state = DIRTY
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
        if node.state != NEW:
            node.state = MOVED

    def touch_link(self, a: str, b: str, at: int, dataset: str, batch_id: str) -> None:
        if b < a:
            a, b = b, a
        link = self.links.get((a, b))
        if link is None or link.state == DELETED:
            fresh = Link(a, b, at, at, dataset, batch_id, dataset, batch_id, NEW)
            if link is not None:  # deleted earlier in this transaction, in the store: rewrite it
                fresh.state = DIRTY
            self.links[(a, b)] = fresh
            adj = self.adj
            adj.setdefault(a, set()).add(b)
            adj.setdefault(b, set()).add(a)
            return
        # A link in memory is in adj already (loaded, or added above earlier in this transaction).
        if at >= link.last_seen and (
            at != link.last_seen or dataset != link.last_dataset or batch_id != link.last_batch_id
        ):
            link.last_seen, link.last_dataset, link.last_batch_id = at, dataset, batch_id
            if link.state == CLEAN:
                link.state = DIRTY
        if at < link.first_seen:
            link.first_seen, link.dataset, link.batch_id = at, dataset, batch_id
            if link.state == CLEAN:
                link.state = DIRTY

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
        self.fragments.append((anchor, source_event_id))
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
        """Write what changed. Rows go to the driver sorted by key: consecutive rows then land on
        the same or neighbouring B-tree pages, which SQLite finds in its cache."""
        bulk = self.bulk
        new, seen, moved = _by_state(self.nodes.values(), (NEW, DIRTY, MOVED), attrgetter("key"))
        bulk.insert(store.NODE, NODE_COLUMNS, list(map(_node_row, new)))
        # Most updates only move seen times: leaving profile_id out of their SET spares its index.
        bulk.update(store.NODE, NODE_SEEN, ("key",), list(map(_node_seen_row, seen)))
        bulk.update(store.NODE, NODE_CHANGING, ("key",), list(map(_node_moved_row, moved)))
        deleted, new_links, dirty = _by_state(self.links.values(), (DELETED, NEW, DIRTY), attrgetter("a", "b"))
        bulk.delete(store.LINK, ("a", "b"), [(x.a, x.b) for x in deleted])
        bulk.insert(store.LINK, LINK_COLUMNS, list(map(_link_row, new_links)))
        bulk.update(store.LINK, LINK_COLUMNS[2:], ("a", "b"), list(map(_link_update_row, dirty)))
        profiles = self.profiles.values()
        bulk.insert(store.PROFILE, PROFILE_COLUMNS, [_profile_row(p) for p in profiles if p.state == NEW])
        bulk.update(
            store.PROFILE,
            PROFILE_COLUMNS[1:],
            ("profile_id",),
            [(*_profile_row(p)[1:], p.profile_id) for p in profiles if p.state == DIRTY],
        )
        bulk.insert(store.FRAGMENT, ("anchor", "source_event_id"), sorted(self.fragments))
        conn = self.session.connection()
        if self.decisions:
            conn.execute(sa.insert(store.DECISION), self.decisions)
        bulk.insert(store.UNLINKED, ("a", "b"), self.new_unlinked)
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
            conn.execute(
                sa.update(store.DROP)
                .where(
                    store.DROP.c.namespace == sa.bindparam("k_namespace"), store.DROP.c.rule == sa.bindparam("k_rule")
                )
                .values(total=sa.bindparam("total")),
                updates,
            )

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


def type_number(name: str) -> int:
    from cdp.identity.v1 import identity_pb2 as pb

    return pb.NamespaceType.Value(name) if name in pb.NamespaceType.keys() else pb.NAMESPACE_TYPE_CUSTOM  # noqa: SIM118


# Row tuples for the driver, built in C: the attributes are named like the columns.
_node_row = attrgetter(*NODE_COLUMNS)
_node_seen_row = attrgetter(*NODE_SEEN, "key")
_node_moved_row = attrgetter(*NODE_CHANGING, "key")
_link_row = attrgetter(*LINK_COLUMNS)
_link_update_row = attrgetter(*LINK_COLUMNS[2:], "a", "b")


def _profile_row(p: Profile) -> tuple[Any, ...]:
    return (p.profile_id, p.ordinal, p.founder, p.merged_into, p.split_from)


S = TypeVar("S", Node, Link)


def _by_state(items: Iterable[S], states: tuple[int, ...], key: Callable[[S], Any]) -> list[list[S]]:
    """The items in each of ``states`` (others left out), each list sorted by ``key``."""
    groups: dict[int, list[S]] = {state: [] for state in states}
    for item in items:
        group = groups.get(item.state)
        if group is not None:
            group.append(item)
    return [sorted(groups[state], key=key) for state in states]
