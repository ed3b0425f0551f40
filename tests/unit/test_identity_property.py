"""Property: when no guardrail fires, identity's profiles are exactly the connected components
of the records' identities (a reference union-find), whatever the arrival order and however
the records are grouped into transactions. Runs the real decide and fold code on SQLite."""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlmodel import Session

from cdp.identity.v1 import events_pb2 as ev
from cdp_identity import store
from cdp_identity.domain import Rules, node_key
from cdp_identity.engine import Maker, Normaliser, kept_and_dropped, resolve_record
from cdp_identity.projection import IdentityProjection
from cdp_kit.envelope import Cause, Envelope
from cdp_kit.store import create_tables, make_engine
from cdp_kit.streams import IDENTITY_FRAGMENTS
from tests.integration.test_identity_graph import T0

NAMESPACES = ("email", "cookie", "gaid", "phone")
VALUES = {"email": "u{}@example.com", "cookie": "ck{}", "gaid": "g{}", "phone": "+1415555{:04d}"}
identity = st.tuples(st.sampled_from(NAMESPACES), st.integers(0, 7)).map(lambda t: (t[0], VALUES[t[0]].format(t[1])))
records = st.lists(st.lists(identity, min_size=1, max_size=3), min_size=1, max_size=25)


def reference(recs: Sequence[Sequence[tuple[str, str]]]) -> set[frozenset[str]]:
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            x = parent[x]
        return x

    for rec in recs:
        keys = [node_key(*i) for i in rec]
        for k in keys:
            find(k)
        for k in keys[1:]:
            parent[find(k)] = find(keys[0])
    groups: dict[str, set[str]] = {}
    for k in parent:
        groups.setdefault(find(k), set()).add(k)
    return {frozenset(g) for g in groups.values()}


def run(recs: Sequence[Sequence[tuple[str, str]]], per_transaction: int) -> tuple[set[frozenset[str]], int]:
    engine = make_engine("sqlite://")
    create_tables(engine, store.TABLES)
    projection = IdentityProjection(Rules.make())
    normalise = Normaliser()
    decisions = 0
    for start in range(0, len(recs), per_transaction):
        with Session(engine) as session:
            ws = projection.graph(session)
            for n, rec in enumerate(recs[start : start + per_transaction], start):
                kept, dropped = kept_and_dropped(ws.rules, normalise, list(rec))
                fragment = ev.ProfileFragment(source_event_id=f"e{n}", dataset="d")
                make = Maker(f"e{n}", T0, Cause("t", n), {})

                def emit(events: list[Envelope]) -> None:
                    nonlocal decisions
                    for env in events:
                        decisions += env.type.endswith("GraphDecision")
                        projection.fold(session, IDENTITY_FRAGMENTS, env)

                resolve_record(ws, kept, dropped, fragment, make, emit)
            session.commit()
    with engine.connect() as conn:
        rows = conn.execute(sa.select(store.NODE.c.key, store.NODE.c.profile_id)).all()
    engine.dispose()
    profiles: dict[str, set[str]] = {}
    for key, pid in rows:
        profiles.setdefault(pid, set()).add(key)
    return {frozenset(g) for g in profiles.values()}, decisions


@settings(max_examples=60, deadline=None)
@given(records, st.integers(1, 5))
def test_without_guardrails_profiles_are_the_connected_components(
    recs: list[list[tuple[str, str]]], per_transaction: int
) -> None:
    got, decisions = run(recs, per_transaction)
    assert decisions == 0
    assert got == reference(recs)


@settings(max_examples=25, deadline=None)
@given(records, st.randoms(use_true_random=False))
def test_the_partition_does_not_depend_on_arrival_order(recs: list[list[tuple[str, str]]], rnd: object) -> None:
    shuffled = list(recs)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    assert run(shuffled, 3)[0] == run(recs, 1)[0]
