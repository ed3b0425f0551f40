"""The audience language's limits (language.LIMITS): a definition too long, too deep, with too many
conditions or list items is refused with INVALID_ARGUMENT naming the rule and the place, before
anything recursive reads it; a definition at every limit parses, round-trips as protobuf and
compiles and runs on SQLite (whose parser stack and expression depth the limits are set under);
``in [...]`` compiles to one IN per kind and agrees with the Python evaluator."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine

from cdp.segmentation.v1 import segmentation_pb2 as pb
from cdp_kit.errors import InvalidInput
from cdp_segmentation import store
from cdp_segmentation.evaluate import ProfileData, compile_ast
from cdp_segmentation.language import (
    MAX_CONDITIONS,
    MAX_DEPTH,
    MAX_ITEMS,
    MAX_ITEMS_TOTAL,
    MAX_LENGTH,
    parse,
    parse_computed,
)
from cdp_segmentation.sql import matching, matching_all, matching_query

GOLD = 'tier = "gold"'


def ors(n: int) -> str:
    return " or ".join(f'tier = "g{i}"' for i in range(n))


def listed(n: int, start: int = 0) -> str:
    return "[" + ", ".join(f'"v{i}"' for i in range(start, start + n)) + "]"


def numbers(n: int, start: int = 0) -> str:
    return "[" + ",".join(str(i) for i in range(start, start + n)) + "]"


def refused(query: str, *, computed: bool = False) -> tuple[str, str, str]:
    with pytest.raises(InvalidInput) as caught:
        (parse_computed if computed else parse)(query)
    [violation] = caught.value.violations
    return violation.field, violation.rule, violation.message


# What the tester sent (all reached INTERNAL errors or ran for minutes before the limits).
@pytest.mark.parametrize(
    ("query", "rule", "field"),
    [
        ("not " * 50 + GOLD, "nesting", f"query:1:{16 * 4 + 1}"),  # the 17th not
        ("not " * 100 + GOLD, "nesting", f"query:1:{16 * 4 + 1}"),
        ("not " * 300 + GOLD, "nesting", f"query:1:{16 * 4 + 1}"),
        ("not " * 500 + GOLD, "nesting", f"query:1:{16 * 4 + 1}"),
        ("not " * 50_000 + GOLD, "max_length", "query"),
        (ors(101), "max_conditions", None),
        (ors(400), "max_conditions", None),
        (ors(600), "max_conditions", None),
        (ors(1000), "max_conditions", None),
        (f"tier in {listed(1000)}", "max_items", "query:1:9"),
        ("(" * 5000 + GOLD + ")" * 5000, "nesting", "query:1:17"),
        ("[" * 5000 + "]" * 5000, "nesting", "query:1:17"),
        ("tier in " + "[" * 40 + "1" + "]" * 40, "nesting", "query:1:25"),
        (" and ".join(f"tier in {numbers(MAX_ITEMS, i * MAX_ITEMS)}" for i in range(5)), "max_items", None),
        ("a" * (MAX_LENGTH + 1), "max_length", "query"),
    ],
)
def test_the_testers_queries_are_refused_with_the_rule_and_the_place(query: str, rule: str, field: str | None) -> None:
    got_field, got_rule, hint = refused(query)
    assert got_rule == rule, (got_rule, hint)
    if field is not None:
        assert got_field == field
    assert got_field.startswith("query")
    limit = {"nesting": MAX_DEPTH, "max_conditions": MAX_CONDITIONS, "max_length": f"{MAX_LENGTH:,}"}.get(rule)
    if limit is not None:
        assert str(limit) in hint  # the hint states the limit


def test_the_place_is_the_first_thing_over_the_limit_on_its_line() -> None:
    # The 101st condition, on the third line.
    query = ors(50) + "\n and \n" + ors(51)
    assert refused(query)[:2] == (f"query:3:{len(ors(50)) + 5}", "max_conditions")
    # A bracket after a string holding brackets and a newline: strings do not count.
    query = 'name = "((((\n[[[[" and\n  ' + "(" * (MAX_DEPTH + 1) + GOLD + ")" * (MAX_DEPTH + 1)
    assert refused(query)[:2] == (f"query:3:{3 + MAX_DEPTH}", "nesting")
    # Nesting counts where conditions too, wherever they are.
    inner = "not " * MAX_DEPTH + "total > 1"
    field, rule, _ = refused(f"count(order where {inner}) >= 1 within 7d")
    assert (field, rule) == (f"query:1:{len('count(order where ') + (MAX_DEPTH - 1) * 4 + 1}", "nesting")


def test_computed_attributes_have_the_same_limits() -> None:
    assert refused("count(order where " + "not " * 40 + "a = 1)", computed=True)[1] == "nesting"
    assert refused("count(order where " + ors(101) + ")", computed=True)[1] == "max_conditions"
    assert refused("count(order where " + "(" * 40 + "a = 1" + ")" * 40 + ")", computed=True)[1] == "nesting"
    assert refused("count(order)" + " " * MAX_LENGTH, computed=True)[1] == "max_length"
    at_limit = "count(order where " + "not " * (MAX_DEPTH - 1) + "a = 1) within 7d"
    assert parse_computed(at_limit).pattern.where.HasField("negate")


# --------------------------------------------------------------------------- at the limits
def _alternating(levels: int, leaf: str) -> str:
    """``levels`` nested not / or / and around ``leaf``, each and/or beside a `!=` (the deepest SQL)."""
    query = leaf
    for i in range(levels):
        op = ("not", "or", "and")[i % 3]
        query = f"not ({query})" if op == "not" else f'(tier != "x{i}" {op} {query})'
    return query


LEAVES = [
    'tier != "gold"',
    'tags contains "x"',
    'name starts_with "a"',
    'consent email_marketing = "y"',
    "has email",
    "score not exists",
]
DEEP = [
    "not " * MAX_DEPTH + 'tier != "gold"',
    "(" * MAX_DEPTH + GOLD + ")" * MAX_DEPTH,
    _alternating(MAX_DEPTH - 1, 'tier in ["a", 1, true]'),
    *(_alternating(MAX_DEPTH, leaf) for leaf in LEAVES),
    _alternating(MAX_DEPTH - 1, "sum(order.total) > 3 within 7d"),  # the event is a level
    # A where inside nesting: the event condition (and each sequence step) is a level.
    *(
        "not " * k + f"count(order where {'not ' * (MAX_DEPTH - k - 1)}total != 3) >= 1 within 7d"
        for k in range(MAX_DEPTH)
    ),
    *(
        "not " * k + f"(cart_add where {'not ' * (MAX_DEPTH - k - 1)}total != 3) within 7d not followed by "
        f"(order where {'not ' * (MAX_DEPTH - k - 1)}total != 3) within 1h"
        for k in range(MAX_DEPTH)
    ),
    *(
        _alternating(k, f"count(order where {_alternating(MAX_DEPTH - k - 1, 'total != 3')}) >= 1 within 7d")
        for k in range(0, MAX_DEPTH, 3)
    ),
]
WIDE = [
    ors(MAX_CONDITIONS),
    " and ".join(f'tier != "g{i}"' for i in range(MAX_CONDITIONS)),
    f"tier in {listed(MAX_ITEMS)}",
    " or ".join(f"tier in {listed(MAX_ITEMS, i * MAX_ITEMS)}" for i in range(MAX_ITEMS_TOTAL // MAX_ITEMS)),
    "tier in [" + ", ".join(str(i) for i in range(MAX_ITEMS)) + "]",
]


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    engine = sa.create_engine("sqlite://")
    for table in store.TABLES:
        table.create(engine)
    with engine.begin() as conn:
        conn.execute(sa.insert(store.ProfileRow.__table__), PROFILES)  # type: ignore[attr-defined]
    yield engine
    engine.dispose()


PROFILE_VALUES: list[Any] = ["gold", "v7", "3", 3, 3.0, 2.5, True, False, None, [1], {"a": 1}, "", 0]
PROFILES: list[dict[str, Any]] = [
    {"profile_id": f"p{i:02d}", "attributes": {"tier": v}, "sources": {}, "computed": {}, "events": 0}
    for i, v in enumerate(PROFILE_VALUES)
] + [{"profile_id": "p99", "attributes": {}, "sources": {}, "computed": {}, "events": 0}]


def _at_the_limit(engine: Engine, query: str) -> set[str]:
    ast = parse(query)
    assert pb.Expression.FromString(ast.SerializeToString()) == ast  # within protobuf's depth
    segment = pb.Segment(id="s", name="s", query=query, ast=ast)
    assert pb.Segment.FromString(segment.SerializeToString()) == segment
    with engine.connect() as conn:
        found = matching(conn, ast, 0, {})
        assert matching_all(conn, {"s": ast}, 0, {})["s"] == found
    test = compile_ast(ast)
    streamed = {
        p["profile_id"] for p in PROFILES if test(ProfileData(dict(p["attributes"]), set(), set(), lambda: ()), 0)
    }
    assert found == streamed, query
    return found


@pytest.mark.parametrize("query", DEEP, ids=[f"deep{i}" for i in range(len(DEEP))])
def test_the_deepest_definitions_allowed_compile_and_run_on_sqlite(engine: Engine, query: str) -> None:
    _at_the_limit(engine, query)


@pytest.mark.parametrize("query", WIDE, ids=["or", "and", "in", "in-total", "in-numbers"])
def test_the_widest_definitions_allowed_compile_and_run_on_sqlite(engine: Engine, query: str) -> None:
    _at_the_limit(engine, query)


def test_a_definition_of_the_longest_length_allowed_parses() -> None:
    query = f"tier in {listed(300)}"
    query += " " * (MAX_LENGTH - len(query))
    assert len(query) == MAX_LENGTH
    assert len(parse(query).comparison.value.list_value.items) == 300


# --------------------------------------------------------------------------- `in` compiled flat
def _kind(value: Any) -> str | None:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    return "string" if isinstance(value, str) else None


@pytest.mark.parametrize(
    ("items", "values"),
    [
        ('"gold", "v7"', ["gold", "v7"]),
        ("3", [3]),  # numbers match numbers (3 = 3.0), never the string "3" nor true
        ("2.5, 0", [2.5, 0]),
        ('"3"', ["3"]),
        ("true", [True]),
        ("false", [False]),  # false is not 0, nor a missing value
        ("true, false", [True, False]),
        ('"gold", 3, true, ""', ["gold", 3, True, ""]),
        ("", []),
        ("[1]", []),  # a nested list matches nothing, as in the Python evaluator
    ],
)
def test_in_keeps_typed_equality_as_one_in_per_kind(engine: Engine, items: str, values: list[Any]) -> None:
    expected = {
        p["profile_id"]
        for p in PROFILES
        if "tier" in p["attributes"]
        and any(_kind(p["attributes"]["tier"]) == _kind(v) and p["attributes"]["tier"] == v for v in values)
    }
    assert _at_the_limit(engine, f"tier in [{items}]") == expected


def test_a_long_in_list_is_not_one_or_per_item() -> None:
    ast = parse(f"tier in {listed(MAX_ITEMS)}")
    dialects: list[sa.Dialect] = [sqlite.dialect(), postgresql.dialect()]  # type: ignore[no-untyped-call]
    for dialect in dialects:
        sql = str(matching_query(ast, dialect.name, 0, {}).compile(dialect=dialect))
        assert sql.count(" OR ") == 0, dialect.name


# --------------------------------------------------------------------------- windows and dates
@pytest.mark.parametrize(
    ("query", "rule", "field"),
    [
        # A number of 400 digits was a float infinity (OverflowError), 10^20 days out of protobuf's
        # int64, 10^13 days out of SQLite's integers: all INTERNAL errors before.
        ("count(order) > 1 within " + "9" * 400 + "d", "window", "query:1:25"),
        ("count(order) > 1 within 99999999999999999999d", "window", "query:1:25"),
        ("count(order) > 1 within 9999999999999d", "window", "query:1:25"),
        ("a within 36501d followed by b within 1h", "window", "query:1:10"),
        ("a followed by b within 99999999999999999d", "window", "query:1:24"),
        ("count(order) > 1 between 9999-12-31 and 9999-12-31", "date", "query:1:41"),  # the day after
    ],
)
def test_windows_and_dates_out_of_range_are_refused(query: str, rule: str, field: str) -> None:
    assert refused(query)[:2] == (field, rule)


def test_the_longest_window_and_the_last_date_run_on_sqlite(engine: Engine) -> None:
    everyone = {p["profile_id"] for p in PROFILES}  # none has an event: count = 0 holds for all
    now = 1_700_000_000_000
    with engine.connect() as conn:
        for query in ("count(order) = 0 within 36500d", "count(order) = 0 between 0001-01-01 and 9999-12-30"):
            assert matching(conn, parse(query), now, {}) == everyone, query
        assert matching(conn, parse("a within 36500d not followed by b within 36499d"), now, {}) == set()
    assert parse_computed("sum(order.total) within 36500d").window.within_seconds == 36_500 * 86_400
