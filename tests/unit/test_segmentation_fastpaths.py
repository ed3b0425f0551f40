"""The streaming hot path's shortcuts hold to what they replace: membership envelopes encoded
straight to bytes equal ``make_envelope``'s, the compiled segment closures equal the AST
interpreter, the Struct walk equals ``MessageToDict``, the raw SQLite upsert stores what the
SQLAlchemy upsert stores, records offered in memory keep what the SQL path keeps, pending
memberships are written as last folded, and the profiles kept between input batches are dropped
whenever anything else commits to the store."""

from __future__ import annotations

import gc
import json
import math
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from google.protobuf import json_format, struct_pb2
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy.dialects import sqlite

from cdp.segmentation.v1 import events_pb2 as ev
from cdp.segmentation.v1 import segmentation_pb2 as pb
from cdp_kit.envelope import (
    Cause,
    Envelope,
    decode_batch,
    deterministic_id,
    encode_batch,
    from_timestamp,
    make_envelope,
)
from cdp_kit.merging import timestamp_ms
from cdp_kit.processor import UnitOfWork
from cdp_kit.store import create_tables, make_engine, sqlite_url, transaction
from cdp_segmentation import store
from cdp_segmentation.evaluate import Event, ProfileData, compile_ast, matches
from cdp_segmentation.membership import Catalog, Changes, membership_id
from cdp_segmentation.profiles import ProfileContext, rule_of, source_of, to_ms
from cdp_segmentation.profiles import _offer as sql_offer
from cdp_segmentation.store import EXITED, REALIZED
from cdp_segmentation.working import (
    FINITE_JSON,
    MEMBERSHIP,
    PROFILE,
    ProfileState,
    WorkingSet,
    _upsert,
    struct_dict,
)

AT = datetime(2026, 6, 1, 12, 30, 15, 123456, tzinfo=UTC)
Rows = list[tuple[Any, ...]]


# ------------------------------------------------------------------- membership envelopes
def expected_envelope(segment_id: str, profile_id: str, status: str, at: datetime, cause: str, by: Cause) -> Envelope:
    payload = ev.MembershipChanged(
        segment_id=segment_id,
        profile_id=profile_id,
        status=ev.MEMBERSHIP_STATUS_REALIZED if status == REALIZED else ev.MEMBERSHIP_STATUS_EXITED,
        cause=cause,
    )
    payload.at.FromDatetime(at)
    return make_envelope(
        payload,
        event_id=deterministic_id("membership", segment_id, profile_id, cause),
        subject_key=profile_id,
        occurred_at=at,
        cause=by,
    )


@pytest.mark.parametrize(
    ("profile_id", "at", "by"),
    [
        ("p0000001", AT, Cause("segmentation-reads-profile", 42)),
        ("x" * 200, AT, Cause(command_id="clock:1")),  # lengths beyond one varint byte
        ("é" * 9000, AT.astimezone(timezone(timedelta(hours=5))), Cause("s", 2**40)),  # three-byte lengths
        ("", datetime(1970, 1, 1, tzinfo=UTC), Cause()),  # empty fields are left out, as protobuf does
    ],
)
def test_encoded_membership_changes_equal_make_envelope(profile_id: str, at: datetime, by: Cause) -> None:
    changes = Changes(cast(UnitOfWork, SimpleNamespace(cause=by)), at, "fragment:" + "f" * 150)
    wanted = []
    for segment_id, status in [("seg-a", REALIZED), ("seg-b" * 30, EXITED), ("", REALIZED)]:
        changes.add(segment_id, profile_id, status)
        wanted.append(expected_envelope(segment_id, profile_id, status, at, changes.cause, by))
    for encoded, want in zip(changes.encoded, wanted, strict=True):
        got = Envelope.FromString(encoded)
        assert got == want
        assert encoded == want.SerializeToString(deterministic=True)  # the very bytes protobuf writes
        assert got.payload.value == want.payload.value
    # Through the kit's batch encoding (which appends recorded_at) and back.
    recorded = datetime(2026, 6, 2, tzinfo=UTC)
    decoded = decode_batch(encode_batch(changes.encoded, recorded))
    for got, want in zip(decoded, wanted, strict=True):
        want.recorded_at.FromDatetime(recorded)
        assert got == want
    assert changes.folded_at == from_timestamp(wanted[0].occurred_at)


@given(st.text(), st.text(), st.text())
def test_membership_id_is_the_kits_deterministic_id(segment_id: str, profile_id: str, cause: str) -> None:
    assert membership_id(segment_id, profile_id, cause) == deterministic_id("membership", segment_id, profile_id, cause)


# ------------------------------------------------------------------- compiled segments
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-5, 5)
    | st.floats(-5, 5, allow_nan=False)
    | st.sampled_from(["", "a", "ab", "b", "gold", "x"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["a", "b"]), inner, max_size=2),
    max_leaves=6,
)
strings = st.sampled_from(["a", "gold", "b", ""]).map(lambda v: pb.Literal(string_value=v))
scalars = st.one_of(
    strings,
    st.integers(-3, 3).map(lambda v: pb.Literal(number_value=float(v))),
    st.booleans().map(lambda v: pb.Literal(bool_value=v)),
)
lists = st.lists(scalars, max_size=3).map(lambda items: pb.Literal(list_value=pb.ListLiteral(items=items)))
# What the language's type check lets through: `in` a list, `contains`/`starts_with` a string,
# the other operators a scalar of any kind.
operations = st.one_of(
    st.tuples(st.just(pb.COMPARE_OP_IN), lists),
    st.tuples(st.sampled_from([pb.COMPARE_OP_CONTAINS, pb.COMPARE_OP_STARTS_WITH]), strings),
    st.tuples(
        st.sampled_from(
            [pb.COMPARE_OP_EQ, pb.COMPARE_OP_NE, pb.COMPARE_OP_LT, pb.COMPARE_OP_LE, pb.COMPARE_OP_GT, pb.COMPARE_OP_GE]
        ),
        scalars,
    ),
)
paths = st.sampled_from(["a", "b", "a.a", "a.b", "missing"])
comparisons = st.builds(
    lambda path, operation: pb.Expression(comparison=pb.Comparison(path=path, op=operation[0], value=operation[1])),
    paths,
    operations,
)
exists = paths.map(lambda path: pb.Expression(exists=pb.Exists(path=path)))
windows = st.one_of(
    st.just(pb.Window()),
    st.integers(1, 10).map(lambda h: pb.Window(within_seconds=h * 3600)),
    st.just(pb.Window(between=pb.DateRange(from_ms=0, to_ms=5 * 3_600_000))),
)
patterns = st.builds(
    lambda t, where: pb.EventPattern(event_type=t, **({"where": where} if where is not None else {})),
    st.sampled_from(["", "order", "view"]),
    st.none() | comparisons,
)
event_conditions = st.builds(
    lambda agg, pattern, op, value, window: pb.Expression(
        event=pb.EventCondition(
            aggregate=agg,
            pattern=pattern,
            field="a" if agg != pb.AGGREGATE_COUNT else "",
            op=op,
            value=value,
            window=window,
        )
    ),
    st.sampled_from([pb.AGGREGATE_COUNT, pb.AGGREGATE_SUM, pb.AGGREGATE_MIN, pb.AGGREGATE_MAX, pb.AGGREGATE_AVG]),
    patterns,
    st.sampled_from([pb.COMPARE_OP_EQ, pb.COMPARE_OP_NE, pb.COMPARE_OP_LT, pb.COMPARE_OP_GE, pb.COMPARE_OP_GT]),
    st.integers(0, 4).map(float),
    windows,
)
sequences = st.builds(
    lambda first, then, hours, negated, window: pb.Expression(
        sequence=pb.Sequence(first=first, then=then, within_seconds=hours * 3600, negated=negated, first_window=window)
    ),
    patterns,
    patterns,
    st.integers(1, 5),
    st.booleans(),
    windows,  # on the first step: none, within (the edge falls on an event's hour), between
)
leaves = st.one_of(
    comparisons,
    exists,
    event_conditions,
    sequences,
    st.sampled_from(["email", "phone"]).map(lambda n: pb.Expression(identity=pb.IdentityPresence(namespace=n))),
    st.sampled_from(["y", "n"]).map(
        lambda v: pb.Expression(consent=pb.ConsentCondition(purpose="email_marketing", value=v))
    ),
    st.sampled_from(["s1", "s2"]).map(lambda s: pb.Expression(member_of=pb.SegmentMembership(segment_id=s))),
    operations.map(lambda o: pb.Expression(computed=pb.ComputedCondition(name="c", op=o[0], value=o[1]))),
)
expressions = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.lists(inner, min_size=1, max_size=3).map(lambda ts: pb.Expression(all=pb.Junction(terms=ts))),
        st.lists(inner, min_size=1, max_size=3).map(lambda ts: pb.Expression(any=pb.Junction(terms=ts))),
        inner.map(lambda t: pb.Expression(negate=t)),
    ),
    max_leaves=5,
)
events = st.lists(
    st.builds(
        Event,
        st.sampled_from(["order", "view"]),
        st.integers(0, 12).map(lambda h: h * 3_600_000),
        st.dictionaries(st.sampled_from(["a", "b"]), json_values, max_size=2),
    ),
    max_size=5,
)


@settings(max_examples=400, deadline=None)
@given(
    expressions,
    st.dictionaries(st.sampled_from(["a", "b", "consents"]), json_values, max_size=3),
    events,
    st.sets(st.sampled_from(["email", "phone"])),
    st.sets(st.sampled_from(["s1", "s2"])),
    st.dictionaries(st.just("c"), json_values, max_size=1),
)
def test_compiled_segments_equal_the_interpreter(
    ast: pb.Expression,
    attributes: dict[str, Any],
    history: list[Event],
    namespaces: set[str],
    memberships: set[str],
    computed: dict[str, Any],
) -> None:
    data = ProfileData(attributes, namespaces, memberships, lambda: history, computed)
    now = 10 * 3_600_000
    assert compile_ast(ast)(data, now) == matches(ast, data, now)


@settings(max_examples=300, deadline=None)
@given(
    sequences,
    st.lists(
        st.builds(
            Event,
            st.sampled_from(["order", "view"]),
            st.integers(0, 12).map(lambda h: h * 3_600_000),
            st.builds(dict),
        ),
        max_size=14,
    ),
)
def test_compiled_sequences_equal_the_interpreter_on_longer_histories(ast: pb.Expression, history: list[Event]) -> None:
    """The compiled ``followed by`` finds the first answer after each start by bisection."""
    data = ProfileData({}, set(), set(), lambda: history)
    now = 10 * 3_600_000
    assert compile_ast(ast)(data, now) == matches(ast, data, now)


numbers_or_not = st.one_of(st.integers(-3, 9), st.floats(-3, 9, allow_nan=False), st.booleans(), st.just("7"))
numeric_events = st.lists(
    st.builds(
        Event,
        st.sampled_from(["order", "view"]),
        st.integers(0, 12).map(lambda h: h * 3_600_000),
        st.fixed_dictionaries(
            {}, optional={"a": numbers_or_not, "b": st.dictionaries(st.just("c"), numbers_or_not, max_size=1)}
        ),
    ),
    max_size=20,
)
OPS = [pb.COMPARE_OP_EQ, pb.COMPARE_OP_NE, pb.COMPARE_OP_LT, pb.COMPARE_OP_LE, pb.COMPARE_OP_GT, pb.COMPARE_OP_GE]


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([pb.AGGREGATE_COUNT, pb.AGGREGATE_SUM, pb.AGGREGATE_MIN, pb.AGGREGATE_MAX, pb.AGGREGATE_AVG]),
    patterns,
    st.sampled_from(["a", "b.c", "missing"]),
    windows,
    numeric_events,
    st.integers(0, 14),
)
def test_compiled_aggregates_equal_the_interpreter_on_longer_histories(
    agg: pb.Aggregate.ValueType,
    pattern: pb.EventPattern,
    field: str,
    window: pb.Window,
    history: list[Event],
    hours: int,
) -> None:
    """The one-pass aggregates, against every operator and threshold: numbers, non-numbers and
    nested fields, events on the edges of every window kind."""
    data = ProfileData({}, set(), set(), lambda: history)
    now = hours * 3_600_000
    for op in OPS:
        for value in (x / 2 for x in range(-2, 40)):
            cond = pb.EventCondition(
                aggregate=agg,
                pattern=pattern,
                field=field if agg != pb.AGGREGATE_COUNT else "",
                op=op,
                value=value,
                window=window,
            )
            ast = pb.Expression(event=cond)
            assert compile_ast(ast)(data, now) == matches(ast, data, now)


@settings(max_examples=300, deadline=None)
@given(sequences, numeric_events, st.integers(0, 14))
def test_compiled_sequences_equal_the_interpreter_with_fields(
    ast: pb.Expression, history: list[Event], hours: int
) -> None:
    """The one-pass ``followed by``, with ``where`` on fields and any clock."""
    data = ProfileData({}, set(), set(), lambda: history)
    now = hours * 3_600_000
    assert compile_ast(ast)(data, now) == matches(ast, data, now)


# ------------------------------------------------------------------- fragments
def test_struct_walk_equals_message_to_dict() -> None:
    struct = struct_pb2.Struct()
    struct.update({"a": 1, "b": "x", "c": [1, "y", {"z": None}, []], "d": {"e": True, "f": {}}, "g": None, "h": 2.5})
    assert struct_dict(struct) == json_format.MessageToDict(struct)
    assert struct_dict(struct_pb2.Struct()) == {}
    for bad in (math.nan, math.inf, -math.inf):
        refused = struct_pb2.Struct()
        refused.update({"n": bad})
        with pytest.raises(ValueError, match="number_value"):
            struct_dict(refused)


@given(st.integers(0, 4_000_000_000), st.integers(0, 999_999_999))
def test_timestamp_ms_equals_the_datetime_path(seconds: int, nanos: int) -> None:
    ts = Timestamp(seconds=seconds, nanos=nanos)
    assert timestamp_ms(ts) == to_ms(from_timestamp(ts))


# ------------------------------------------------------------------- SQLite upsert
def test_raw_sqlite_upsert_stores_what_sqlalchemy_stores(tmp_path: Path) -> None:
    raw, core = (make_engine(sqlite_url(tmp_path / f"{name}.db")) for name in ("raw", "core"))
    for engine in (raw, core):
        create_tables(engine, store.TABLES)
    profile_columns = ("profile_id", "attributes", "sources", "events", "computed", "next_due_ms")
    member_columns = ("segment_id", "profile_id", "status", "changed_at")
    rounds: list[tuple[Rows, Rows]] = [
        (
            [("p1", {"tier": "gold", "n": 1.5}, {"tier": {"ts": 1}}, 2, {"c": 1}, None), ("p0", {}, {}, 0, {}, 7)],
            [("s", "p1", REALIZED, AT), ("s", "p0", EXITED, AT + timedelta(seconds=1))],
        ),
        (  # the same keys again: updates
            # An integer beyond 64 bits (orjson refuses it): the standard encoder writes that row.
            [("p1", {"tier": "silver", "tags": ["a"], "huge": 2**70}, {"tier": {"ts": 2}}, 3, {"c": None}, 5)],
            [("s", "p1", EXITED, AT + timedelta(days=1))],
        ),
    ]
    for profiles, members in rounds:
        with transaction(raw) as session:
            _upsert(session, PROFILE, profile_columns, list(profiles), 1)
            _upsert(session, MEMBERSHIP, member_columns, list(members), 2)
        with core.begin() as conn:
            for table, columns, rows, keys in (
                (PROFILE, profile_columns, profiles, 1),
                (MEMBERSHIP, member_columns, members, 2),
            ):
                insert = sqlite.insert(table)
                stmt = insert.on_conflict_do_update(
                    index_elements=list(columns[:keys]), set_={c: insert.excluded[c] for c in columns[keys:]}
                )
                conn.execute(stmt, [dict(zip(columns, row, strict=True)) for row in rows])
    for table in (PROFILE, MEMBERSHIP):
        stored = []
        for engine in (raw, core):
            with engine.connect() as conn:
                found = conn.exec_driver_sql(f"SELECT * FROM {table.name} ORDER BY 1, 2").all()
            names = [c.name for c in table.columns]
            # The same text (times, numbers, strings); the same JSON values (orjson writes it compactly).
            stored.append(
                [
                    tuple(
                        json.loads(v) if f"{table.name}.{n}" in FINITE_JSON else v
                        for n, v in zip(names, row, strict=True)
                    )
                    for row in found
                ]
            )
        assert stored[0] == stored[1]
        assert stored[0]
    raw.dispose()
    core.dispose()


# ------------------------------------------------------------------- kept profiles
def test_kept_profiles_survive_only_consecutive_working_sets(tmp_path: Path) -> None:
    engine = make_engine(sqlite_url(tmp_path / "kept.db"))
    create_tables(engine, store.TABLES)
    catalog = Catalog()
    catalog.watch(engine)

    def batch(pid: str) -> dict[str, Any]:
        with transaction(engine) as session:
            working = catalog.working_for(session)
            working.load([pid])
            return working.profiles

    first = batch("p1")
    assert batch("p2") is first  # the next input batch starts from the committed profiles
    assert set(first) == {"p1", "p2"}
    with transaction(engine) as session:  # anything else that commits (a command, the clock, DDL)
        store.set_clock(session, 5)
    assert batch("p3") is not first
    kept = batch("p4")

    def failing_batch() -> None:  # a batch that rolls back (e.g. its append failed)
        with transaction(engine) as session:
            catalog.working_for(session).load(["p5"])
            raise RuntimeError("append failed")

    with pytest.raises(RuntimeError, match="append failed"):
        failing_batch()
    assert batch("p6") is not kept
    catalog.invalidate()  # definitions, retention or policy changed
    assert "p6" not in batch("p7")
    unwatched = Catalog()  # not told about the engine's commits: keeps nothing
    with transaction(engine) as session:
        unwatched.working_for(session).load(["p8"])
    with transaction(engine) as session:
        assert "p8" not in unwatched.working_for(session).profiles
    engine.dispose()


# ------------------------------------------------------------------- the cyclic collector
def test_the_collector_is_paused_while_a_working_set_lives_and_only_then(tmp_path: Path) -> None:
    engine = make_engine(sqlite_url(tmp_path / "gc.db"))
    create_tables(engine, store.TABLES)
    catalog = Catalog()
    catalog.watch(engine)
    assert gc.isenabled()
    with transaction(engine) as session:
        catalog.working_for(session).load(["p1"])
        assert not gc.isenabled()
    assert gc.isenabled()  # committed

    def failing_batch() -> None:
        with transaction(engine) as session:
            catalog.working_for(session).load(["p2"])
            raise RuntimeError("append failed")

    with pytest.raises(RuntimeError, match="append failed"):
        failing_batch()
    assert gc.isenabled()  # rolled back
    gc.disable()  # someone else's choice: left as it is
    try:
        with transaction(engine) as session:
            catalog.working_for(session).load(["p3"])
        assert not gc.isenabled()
    finally:
        gc.enable()
    engine.dispose()


# ------------------------------------------------------------------- records and memberships in the working set
records = st.lists(
    st.tuples(
        st.sampled_from(["crm", "web", "pos"]),
        st.integers(0, 4),  # time
        st.integers(0, 4),  # log position: the message's sequence
        st.integers(0, 2),  # and the place in it
        st.dictionaries(st.sampled_from(["tier", "country", "age"]), st.integers(0, 3), min_size=1, max_size=3),
    ),
    max_size=8,
)
policies = st.one_of(
    st.just(pb.MergePolicy(kind=pb.MERGE_POLICY_KIND_TIMESTAMP)),
    st.permutations(["crm", "web", "pos"]).map(
        lambda order: pb.MergePolicy(kind=pb.MERGE_POLICY_KIND_DATASET_PRECEDENCE, datasets=order[:2])
    ),
)


@settings(max_examples=200, deadline=None)
@given(records, policies)
def test_offering_records_in_memory_equals_the_sql_path(sent: list[Any], policy: pb.MergePolicy) -> None:
    """``WorkingSet._offer`` (one comparison per source a record's attributes share) keeps what
    ``profiles._offer`` keeps, attribute by attribute."""
    state = ProfileState("p1", exists=True)
    row = store.ProfileRow(profile_id="p1")
    ctx = cast(ProfileContext, SimpleNamespace(policy=policy, rule=rule_of(policy)))
    working = object.__new__(WorkingSet)
    for i, (dataset, ts, seq, pos, attributes) in enumerate(sent):
        WorkingSet._offer(working, state, attributes, source_of(dataset, ts, seq, pos, f"f{i}"), ctx)
        fragment = store.FragmentRow(
            source_event_id=f"f{i}",
            profile_id="p1",
            dataset=dataset,
            kind="record",
            ts_ms=ts,
            seq=seq,
            pos=pos,
            attributes=attributes,
        )
        sql_offer(row, fragment, rule_of(policy))
    assert (state.attributes, state.sources) == (row.attributes, row.sources)


def test_memberships_are_written_as_last_folded(tmp_path: Path) -> None:
    """Pending memberships are kept by segment, then profile, and written in key order."""
    engine = make_engine(sqlite_url(tmp_path / "members.db"))
    create_tables(engine, store.TABLES)
    catalog = Catalog()
    changes = [
        (s, p, REALIZED if (i * 7) % 3 else EXITED)
        for i, (s, p) in enumerate(
            [
                ("s2", "p1"),
                ("s1", "p2"),
                ("s1", "p1"),
                ("s2", "p1"),
                ("s10", "p3"),
                ("s1", "p2"),
                ("s3", "p9"),
            ]
        )
    ]
    with transaction(engine) as session:
        working = catalog.working_for(session)
        working.load(["p1", "p2", "p3"])
        others = working.fold_memberships(changes, AT)
        working.membership("s1", "p3", REALIZED, AT + timedelta(seconds=1))
    assert others == [("s3", "p9", changes[-1][2])]  # not held: the caller folds it
    expected = {(s, p): (status, AT) for s, p, status in changes[:-1]} | {
        ("s1", "p3"): (REALIZED, AT + timedelta(seconds=1))
    }
    with engine.connect() as conn:
        found = conn.exec_driver_sql("SELECT segment_id, profile_id, status FROM seg_membership").all()
    assert sorted(found) == sorted((s, p, status) for (s, p), (status, _) in expected.items())
    assert working.profiles["p1"].memberships == {"s2": changes[3][2], "s1": changes[2][2]}
    engine.dispose()
