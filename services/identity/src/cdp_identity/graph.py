"""The graph working set of one SQL transaction.

Deciding and folding happen in memory on the graphs a transaction touches; they are
loaded in bulk (every identity a fetched message names in the identity index, then the
graph documents of their profiles, one row each, which the size guardrail keeps small)
and written back in bulk just before the transaction commits: one row per changed
profile, plus an index row for each new identity and each identity that changed profile.
A rollback throws the working set away with the transaction, so memory never disagrees
with the store, and it only ever holds the graphs of one batch (memory stays bounded
however large the graph grows).

Invariant: a node in memory means its whole profile (every node, every link) is in
memory. Links never span profiles: a profile is one connected component.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy import event
from sqlmodel import Session

from cdp_identity import store
from cdp_identity.bulk import Bulk
from cdp_identity.domain import Namespace, Rules, node_key, profile_id_for
from cdp_kit.collector import CollectorPause

# Node states say which identity index rows to write (NEW: insert; MOVED: its profile changed).
# A profile's state says whether its row is new; every profile whose graph or row changed is in
# ``WorkingSet.changed``.
NEW, CLEAN, MOVED = 0, 1, 2
WS_KEY = "cdp_identity_graph"
PROFILE_COLUMNS = ("profile_id", "ordinal", "founder", "merged_into", "split_from")
PROFILE_ROW = (*PROFILE_COLUMNS, "identities", "links", "document")
# What can change after a profile's row is written (its ordinal, founder and origin never do, and
# leaving the indexed ordinal out of the SET spares its index entry).
PROFILE_CHANGING = ("merged_into", "identities", "links", "document")


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
    changed: set[str] = field(default_factory=set)  # profiles whose row (graph included) must be written
    indexed: dict[str, Node] = field(default_factory=dict)  # nodes whose index row must be written (NEW, MOVED)
    fragments: list[tuple[str, str]] = field(default_factory=list)  # (anchor, source event id)
    new_fragments_by_anchor: dict[str, list[str]] = field(default_factory=dict)
    decisions: list[dict[str, Any]] = field(default_factory=list)
    drops: Counter[tuple[str, str]] = field(default_factory=Counter)
    new_unlinked: list[tuple[str, str]] = field(default_factory=list)
    new_namespaces: list[dict[str, Any]] = field(default_factory=list)
    unread: list[Any] = field(default_factory=list)  # input envelopes of the batch, not yet read
    parsed: dict[str, Any] = field(default_factory=dict)  # input event id -> what was read of it
    read_fragments: dict[str, Any] = field(default_factory=dict)  # own fragment id -> its payload, until folded
    made: dict[str, Made] = field(default_factory=dict)  # own fragment id -> what decided it, until folded
    key_refs: dict[str, str] = field(default_factory=dict)  # key ref -> identity key, to be written
    refs_by_key: dict[str, str] = field(default_factory=dict)  # identity key -> one of its refs, this transaction
    _unlinked: set[tuple[str, str]] | None = None
    _erased: bool | None = None  # whether a privacy request ever erased graph nodes
    _next_ordinal: int | None = None
    _bulk: Bulk | None = None
    _collector: CollectorPause = field(default_factory=CollectorPause)

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
        ws._collector.pause()  # see cdp_kit.collector; resumed in ``_end``
        return ws

    def _forget(self, session: Session) -> None:
        if session.info.get(WS_KEY) is self:
            del session.info[WS_KEY]

    def _end(self, session: Session, transaction: Any) -> None:
        """The transaction is over: let go of the graphs and turn the collector back on. The
        session (in reference cycles, through its event listeners) may keep this object alive
        until the collector runs; emptied, it no longer keeps the batch's objects alive too."""
        if getattr(transaction, "parent", None) is not None:
            return  # a nested transaction (savepoint) ended, not the working set's
        self._forget(session)
        for held in (self.nodes, self.members, self.links, self.adj, self.profiles, self.missing, self.absent):
            held.clear()
        self.changed.clear()
        self.indexed.clear()
        for items in (self.fragments, self.decisions, self.new_unlinked, self.new_namespaces, self.unread):
            items.clear()
        self.new_fragments_by_anchor.clear()
        self.parsed.clear()
        self.read_fragments.clear()
        self.made.clear()
        self.drops.clear()
        self._unlinked = None
        self._erased = None
        self._bulk = None
        self._collector.resume()

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
        """Bring these profiles, each with its whole graph, into memory (one row each)."""
        todo = {p for p in pids if p not in self.members}
        if not todo:
            return
        profiles, decode = self.profiles, self._decode
        for row in self.bulk.select_in(store.PROFILE, (*PROFILE_COLUMNS, "document"), "profile_id", todo):
            pid = row[0]
            if pid not in profiles:
                profiles[pid] = Profile(*row[:5])
            decode(pid, row[5])
        members = self.members
        for pid in todo:
            if pid not in members:
                members[pid] = set()
            if pid not in profiles:
                self.absent.add(pid)

    def _decode(self, pid: str, document: str) -> None:
        """Put a stored graph document in memory. A node or link in memory already is newer than
        the document (it cannot be, as a node in memory means its profile is, but memory wins)."""
        nodes, adj, links = self.nodes, self.adj, self.links
        stored_nodes, stored_links = read_graph(pid, document)
        for node in stored_nodes:
            if node.key not in nodes:
                nodes[node.key] = node
                adj[node.key] = set()
        for x in stored_links:
            if (x.a, x.b) not in links:
                links[(x.a, x.b)] = x
                adj[x.a].add(x.b)
                adj[x.b].add(x.a)
        self.members[pid] = {n.key for n in stored_nodes if nodes[n.key].profile_id == pid}

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

    def erased_any(self) -> bool:
        """Whether a privacy erasure was ever folded (then a missing identity may have been held)."""
        if self._erased is None:
            t = store.PRIVACY_PROGRESS
            self._erased = bool(self.bulk.rows(f"SELECT 1 FROM {t.name} WHERE service = 'identity' LIMIT 1"))
        return self._erased

    def note_erasure(self) -> None:
        self._erased = True

    def forget_all(self) -> None:
        """Forget every graph held in memory (written already): rows were deleted under them."""
        self.write()
        for held in (self.nodes, self.members, self.links, self.adj, self.profiles, self.missing, self.absent):
            held.clear()
        self._unlinked = None
        self._next_ordinal = None
        self._erased = True

    def new_profile_id(self, namespace: str, value: str) -> str:
        if (
            node_key(namespace, value) in self.missing
            and profile_id_for(namespace, value) not in self.profiles
            and not self.erased_any()
        ):
            # Nodes are deleted only by a privacy erasure, and a profile id derived from an identity
            # is only ever made when that identity first appears: without an erasure, an identity
            # the store never held has its id free.
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
        if pid not in self.members and pid not in self.absent:
            self.load_profiles([pid])  # its row and graph, if stored
        if self.profile(pid) is None:
            self.absent.discard(pid)
            self.profiles[pid] = Profile(pid, self.next_ordinal(), founder, "", split_from, NEW)
            self.changed.add(pid)
        self.members.setdefault(pid, set())

    def touch_node(self, namespace: str, value: str, pid: str, at: int, dataset: str, batch_id: str) -> str:
        return self.touch_key(node_key(namespace, value), pid, at, dataset, batch_id)

    def touch_key(self, key: str, pid: str, at: int, dataset: str, batch_id: str) -> str:
        """Record that identity ``key`` was seen at ``at`` in profile ``pid`` (created if new)."""
        self.changed.add(pid)
        node = self.nodes.get(key)
        if node is None:
            self.load([key])
            node = self.nodes.get(key)
        if node is None:
            namespace, _, value = key.partition(":")
            node = Node(key, namespace, value, pid, at, at, dataset, batch_id, dataset, batch_id, NEW)
            self.nodes[key] = self.indexed[key] = node
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
        return key

    def move(self, key: str, pid: str) -> None:
        node = self.nodes[key]
        self.changed.add(node.profile_id)
        self.changed.add(pid)
        self.members.get(node.profile_id, set()).discard(key)
        node.profile_id = pid
        self.members.setdefault(pid, set()).add(key)
        if node.state != NEW:
            node.state = MOVED
            self.indexed[key] = node

    def touch_link(self, a: str, b: str, at: int, dataset: str, batch_id: str) -> None:
        """Record that identities ``a`` and ``b`` were seen together (both touched already, so their
        profile is marked changed)."""
        if b < a:
            a, b = b, a
        link = self.links.get((a, b))
        if link is None:
            self.links[(a, b)] = Link(a, b, at, at, dataset, batch_id, dataset, batch_id)
            adj = self.adj
            adj.setdefault(a, set()).add(b)
            adj.setdefault(b, set()).add(a)
            return
        # A link in memory is in adj already (loaded, or added above earlier in this transaction).
        if at >= link.last_seen:
            link.last_seen, link.last_dataset, link.last_batch_id = at, dataset, batch_id
        if at < link.first_seen:
            link.first_seen, link.dataset, link.batch_id = at, dataset, batch_id

    def remove_link(self, a: str, b: str) -> None:
        a, b = pair(a, b)
        if (a, b) not in self.links:
            self.load([a, b])
        if self.links.pop((a, b), None) is None:
            return
        self.changed.add(self.nodes[a].profile_id)
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
        """Write what changed: the row of each changed profile with its graph document, and the
        identity index rows of new and moved identities. Rows go to the driver sorted by key:
        consecutive rows then land on the same or neighbouring B-tree pages."""
        bulk = self.bulk
        indexed = [self.indexed[k] for k in sorted(self.indexed)]
        bulk.insert(store.NODE, ("key", "profile_id"), [(n.key, n.profile_id) for n in indexed if n.state == NEW])
        bulk.update(store.NODE, ("profile_id",), ("key",), [(n.profile_id, n.key) for n in indexed if n.state == MOVED])
        inserts: list[tuple[Any, ...]] = []
        updates: list[tuple[Any, ...]] = []
        profiles, encode = self.profiles, self.encode_graph
        for pid in sorted(self.changed):
            p = profiles[pid]
            identities, links, graph = encode(pid)
            if p.state == NEW:
                inserts.append((pid, p.ordinal, p.founder, p.merged_into, p.split_from, identities, links, graph))
            else:
                updates.append((p.merged_into, identities, links, graph, pid))
        bulk.insert(store.PROFILE, PROFILE_ROW, inserts)
        bulk.update(store.PROFILE, PROFILE_CHANGING, ("profile_id",), updates)
        bulk.insert(store.FRAGMENT, ("anchor", "source_event_id"), sorted(self.fragments))
        if self.key_refs:
            bulk.insert_new(store.KEY_REF, ("key_ref", "key"), sorted(self.key_refs.items()))
            self.key_refs = {}
            self.refs_by_key = {}
        conn = self.session.connection()
        if self.decisions:
            conn.execute(sa.insert(store.DECISION), self.decisions)
        bulk.insert(store.UNLINKED, ("a", "b"), self.new_unlinked)
        if self.new_namespaces:
            conn.execute(sa.insert(store.NAMESPACE), self.new_namespaces)
        if self.drops:
            self._write_drops(conn)
        self._settle()

    def note_key_refs(self, pairs: Iterable[tuple[str, str]]) -> None:
        """(key ref, identity key) pairs of a fragment, to remember in ``identity_key_ref``."""
        for ref, key in pairs:
            self.key_refs[ref] = key
            self.refs_by_key[key] = ref

    def encode_graph(self, pid: str) -> tuple[int, int, str]:
        """A profile's graph as its stored document (``store.ProfileRow``), with its node and link
        counts. Deterministic: nodes sorted by key, links by their ends' positions, sources
        numbered in the order they are first used."""
        members = self.members.get(pid)
        if not members:
            return 0, 0, ""
        keys = sorted(members)
        nodes, adj, links = self.nodes, self.adj, self.links
        position = {k: i for i, k in enumerate(keys)}
        ends = sorted([(i, position[b]) for i, a in enumerate(keys) for b in adj[a] if a < b])
        sources: dict[tuple[str, str], int] = {}
        source = sources.setdefault
        # Nodes and links are written by two loops of the same shape on purpose: one shared
        # function for the seen fields costs ~2 µs more per profile written (a third of this).
        stored_nodes = []
        for k in keys:
            n = nodes[k]
            first = n.first_seen
            stored_nodes.append(
                (
                    k,
                    first,
                    n.last_seen - first,
                    source((n.dataset, n.batch_id), len(sources)),
                    source((n.last_dataset, n.last_batch_id), len(sources)),
                )
            )
        stored_links = []
        for i, j in ends:
            x = links[(keys[i], keys[j])]
            first = x.first_seen
            stored_links.append(
                (
                    i,
                    j,
                    first,
                    x.last_seen - first,
                    source((x.dataset, x.batch_id), len(sources)),
                    source((x.last_dataset, x.last_batch_id), len(sources)),
                )
            )
        return len(keys), len(stored_links), orjson.dumps((list(sources), stored_nodes, stored_links)).decode()

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
        for n in self.indexed.values():
            n.state = CLEAN
        profiles = self.profiles
        for pid in self.changed:
            profiles[pid].state = CLEAN
        self.indexed.clear()
        self.changed.clear()
        self.fragments.clear()
        self.new_fragments_by_anchor.clear()
        self.decisions.clear()
        self.drops.clear()
        self.new_unlinked.clear()
        self.new_namespaces.clear()


def read_graph(pid: str, document: str) -> tuple[list[Node], list[Link]]:
    """The nodes and links of a stored graph document (``store.ProfileRow``), in its order."""
    if not document:
        return [], []
    sources, stored_nodes, stored_links = orjson.loads(document)
    nodes = []
    for key, first, span, s, t in stored_nodes:
        namespace, _, value = key.partition(":")
        dataset, batch_id = sources[s]
        last_dataset, last_batch_id = sources[t]
        nodes.append(
            Node(key, namespace, value, pid, first, first + span, dataset, batch_id, last_dataset, last_batch_id)
        )
    links = []
    for i, j, first, span, s, t in stored_links:
        dataset, batch_id = sources[s]
        last_dataset, last_batch_id = sources[t]
        links.append(
            Link(nodes[i].key, nodes[j].key, first, first + span, dataset, batch_id, last_dataset, last_batch_id)
        )
    return nodes, links


def load_rules(session: Session, base_rules: Rules) -> Rules:
    """The settings' rules plus every custom namespace in the store."""
    rules = base_rules
    for r in session.execute(sa.select(store.NAMESPACE).order_by(store.NAMESPACE.c.name)).all():
        rules = rules.with_namespace(Namespace(r.name, type_number(r.type), r.unique, r.priority, False, r.description))
    return rules


def type_number(name: str) -> int:
    from cdp.identity.v1 import identity_pb2 as pb

    return pb.NamespaceType.Value(name) if name in pb.NamespaceType.keys() else pb.NAMESPACE_TYPE_CUSTOM  # noqa: SIM118
