"""A profile's graph is stored as one document (``store.ProfileRow.document``): what ``encode_graph``
writes must read back (``read_graph``) as exactly the nodes and links that were in memory, and
equal graphs must give equal documents (rebuilt stores are compared byte for byte)."""

from __future__ import annotations

import random
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from cdp_identity.domain import Rules
from cdp_identity.graph import Link, Node, WorkingSet, read_graph

PID = "p-000000000000000000000001"
keys = st.lists(
    st.tuples(st.sampled_from(["email", "cookie", "gaid", "crm_id"]), st.text(min_size=1, max_size=12)).map(
        lambda t: f"{t[0]}:{t[1]}"
    ),
    min_size=1,
    max_size=12,
    unique=True,
)
seen = st.tuples(
    st.integers(0, 2**62),
    st.integers(0, 2**62),
    st.text(max_size=6),
    st.text(max_size=6),
    st.text(max_size=6),
    st.text(max_size=6),
)


def working_set(nodes: list[Node], links: list[Link]) -> WorkingSet:
    ws = WorkingSet(session=None, rules=Rules.make())  # type: ignore[arg-type]  # encode_graph reads memory only
    for n in nodes:
        ws.nodes[n.key] = n
        ws.adj[n.key] = set()
    ws.members[PID] = {n.key for n in nodes}
    for x in links:
        ws.links[(x.a, x.b)] = x
        ws.adj[x.a].add(x.b)
        ws.adj[x.b].add(x.a)
    return ws


def as_tuples(items: list[Any]) -> list[tuple[Any, ...]]:
    return sorted(tuple(getattr(x, f) for f in x.__slots__ if f != "state") for x in items)


@settings(max_examples=150, deadline=None)
@given(keys, st.data())
def test_a_graph_reads_back_from_its_document_exactly(node_keys: list[str], data: st.DataObject) -> None:
    nodes = [Node(k, k.partition(":")[0], k.partition(":")[2], PID, *data.draw(seen)) for k in node_keys]
    pairs = sorted({(a, b) for a in node_keys for b in node_keys if a < b})
    chosen = data.draw(st.lists(st.sampled_from(pairs), unique=True)) if pairs else []
    links = [Link(a, b, *data.draw(seen)) for a, b in chosen]
    ws = working_set(nodes, links)

    identities, link_count, document = ws.encode_graph(PID)
    read_nodes, read_links = read_graph(PID, document)

    assert (identities, link_count) == (len(nodes), len(links))
    assert as_tuples(read_nodes) == as_tuples(nodes)
    assert as_tuples(read_links) == as_tuples(links)
    # Memory in another order (a rebuild folds the same events) gives the same document.
    shuffled = nodes[:]
    random.Random(len(document)).shuffle(shuffled)
    assert working_set(shuffled, links[::-1]).encode_graph(PID)[2] == document


def test_an_empty_profile_has_an_empty_document() -> None:
    ws = working_set([], [])
    assert ws.encode_graph(PID) == (0, 0, "")
    assert read_graph(PID, "") == ([], [])


def test_a_document_names_each_source_once_and_stores_last_seen_as_an_offset() -> None:
    """The format as docs/identity.md describes it, on one small graph."""
    nodes = [
        Node("cookie:c1", "cookie", "c1", PID, 100, 250, "web", "b1", "web", "b2"),
        Node("email:a@x.io", "email", "a@x.io", PID, 90, 250, "crm", "b0", "web", "b2"),
    ]
    links = [Link("cookie:c1", "email:a@x.io", 100, 250, "web", "b1", "web", "b2")]

    document = working_set(nodes, links).encode_graph(PID)[2]

    assert document == (
        '[[["web","b1"],["web","b2"],["crm","b0"]],'
        '[["cookie:c1",100,150,0,1],["email:a@x.io",90,160,2,1]],'
        "[[0,1,100,150,0,1]]]"
    )
