"""Batch evaluation: the AST compiled to one SQL query (SQLAlchemy Core) run inside the store.

The same semantics as ``evaluate.py`` on SQLite (json_extract/json_type) and PostgreSQL
(#>, #>>, json_typeof), so a batch run and the streaming evaluator agree on every profile.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from itertools import compress
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.sql.elements import ColumnElement

from cdp.segmentation.v1 import segmentation_pb2 as pb
from cdp_kit.consent import NESTED, attribute_of, spellings_of
from cdp_segmentation.evaluate import compare, literal_value
from cdp_segmentation.store import EVENT, FragmentRow, ProfileIdentityRow, ProfileRow

PROFILE: sa.Table = ProfileRow.__table__  # type: ignore[attr-defined]
FRAGMENT: sa.Table = FragmentRow.__table__  # type: ignore[attr-defined]
IDENTITY: sa.Table = ProfileIdentityRow.__table__  # type: ignore[attr-defined]
Bool = ColumnElement[bool]
AGG = "agg"  # the name of the shared grouped pass over the events in ``matching_all``


@dataclass(frozen=True)
class Json:
    """Typed access to a JSON column at a path, per dialect."""

    column: Any
    path: tuple[str, ...]
    dialect: str

    @property
    def pg(self) -> bool:
        return self.dialect == "postgresql"

    def _pg_path(self) -> Any:
        return sa.literal(list(self.path), type_=postgresql.ARRAY(sa.Text))

    def typeof(self) -> Any:
        if self.pg:
            return sa.func.json_typeof(self.column.op("#>", return_type=sa.JSON)(self._pg_path()))
        return sa.func.json_type(self.column, "$." + ".".join(self.path))

    def kind_is(self, kind: str) -> Bool:
        names = {
            "number": ("number",) if self.pg else ("integer", "real"),
            "string": ("string",) if self.pg else ("text",),
            "bool": ("boolean",) if self.pg else ("true", "false"),
            "array": ("array",),
        }[kind]
        result: Bool = self.typeof().in_(names)
        return result

    def present(self) -> Bool:
        return sa.and_(self.typeof().is_not(None), self.typeof() != "null")

    def text(self) -> Any:
        if self.pg:
            return sa.collate(self.column.op("#>>", return_type=sa.Text)(self._pg_path()), "C")
        return sa.func.json_extract(self.column, "$." + ".".join(self.path))

    def number(self) -> Any:
        if self.pg:
            raw = self.column.op("#>>", return_type=sa.Text)(self._pg_path())
            return sa.case((self.kind_is("number"), sa.cast(raw, sa.Float)), else_=None)
        return sa.case((self.kind_is("number"), sa.func.json_extract(self.column, "$." + ".".join(self.path))))

    def is_true(self) -> Bool:
        if self.pg:
            return sa.and_(self.kind_is("bool"), self.column.op("#>>", return_type=sa.Text)(self._pg_path()) == "true")
        result: Bool = self.typeof() == "true"
        return result

    def list_contains(self, value: str) -> Bool:
        if self.pg:
            node = self.column.op("#>", return_type=sa.JSON)(self._pg_path())
            safe = sa.case((self.kind_is("array"), node), else_=sa.cast(sa.literal("[]"), sa.JSON))
            elem = sa.func.json_array_elements(safe).table_valued("value").alias("elem")
            inner = sa.select(sa.literal(1)).select_from(elem)
            inner = inner.where(
                sa.func.json_typeof(elem.c.value) == "string",
                elem.c.value.op("#>>", return_type=sa.Text)(sa.literal([], type_=postgresql.ARRAY(sa.Text))) == value,
            )
            return sa.exists(inner)
        each = sa.func.json_each(self.column, "$." + ".".join(self.path)).table_valued("value", "type").alias("each")
        inner = sa.select(sa.literal(1)).select_from(each).where(each.c.type == "text", each.c.value == value)
        return sa.and_(self.kind_is("array"), sa.exists(inner))


def _consent_raw(ref: Json) -> Any:
    """A consent value as lower-cased text (SQLite: true/false read as 1/0, which read as y/n)."""
    if ref.pg:
        raw = ref.column.op("#>>", return_type=sa.Text)(ref._pg_path())
    else:
        raw = sa.cast(sa.func.json_extract(ref.column, "$." + ".".join(ref.path)), sa.Text)
    return sa.func.lower(sa.func.trim(raw))


def consent_matches(attributes: Any, purpose: str, value: str, dialect: str) -> Bool:
    """``consent_of(attributes, purpose) == consent_text(value)`` (cdp_kit.consent) in SQL."""
    canonical = Json(attributes, (attribute_of(purpose),), dialect)
    nested = Json(attributes, (NESTED, purpose), dialect)
    text = sa.case(
        (canonical.present(), _consent_raw(canonical)),
        (nested.present(), _consent_raw(nested)),
        else_=None,
    )
    result: Bool = text.in_(sorted(spellings_of(value)))
    return result


OPERATORS: dict[int, Callable[[Any, Any], Bool]] = {
    pb.COMPARE_OP_EQ: lambda a, b: a == b,
    pb.COMPARE_OP_NE: lambda a, b: a != b,
    pb.COMPARE_OP_LT: lambda a, b: a < b,
    pb.COMPARE_OP_LE: lambda a, b: a <= b,
    pb.COMPARE_OP_GT: lambda a, b: a > b,
    pb.COMPARE_OP_GE: lambda a, b: a >= b,
}


def _kind_of(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    return "string"


def _typed_equal(ref: Json, value: Any) -> Bool:
    kind = _kind_of(value)
    if kind == "bool":
        return sa.and_(ref.kind_is("bool"), ref.is_true() if value else sa.not_(ref.is_true()))
    if kind == "number":
        return sa.and_(ref.kind_is("number"), ref.number() == float(value))
    return sa.and_(ref.kind_is("string"), ref.text() == value)


def _typed_in(ref: Json, values: list[Any]) -> Bool:
    """``_typed_equal`` to any of ``values``, as at most one ``IN (…)`` per kind (strings, numbers)
    and one test for booleans: a list of n items is not n ORs deep (SQLite's expression trees stop
    at a depth of 1,000). Strings match strings, numbers numbers (3 = 3.0), booleans booleans; an
    item of no such kind (a nested list) matches nothing, as in ``evaluate.compare``."""
    strings = sorted({v for v in values if isinstance(v, str)})
    numbers = sorted({float(v) for v in values if _kind_of(v) == "number"})
    bools = {v for v in values if isinstance(v, bool)}
    options: list[Bool] = []
    if strings:
        options.append(sa.and_(ref.kind_is("string"), ref.text().in_(strings)))
    if numbers:
        options.append(sa.and_(ref.kind_is("number"), ref.number().in_(numbers)))
    if bools == {True, False}:
        options.append(ref.kind_is("bool"))
    elif bools:
        options.append(_typed_equal(ref, next(iter(bools))))
    return sa.or_(*options) if options else sa.false()


def compare_json(ref: Json, op: int, value: Any) -> Bool:
    if op == pb.COMPARE_OP_IN:
        return _typed_in(ref, list(value))
    if op == pb.COMPARE_OP_CONTAINS:
        if ref.pg:
            substring: Bool = sa.func.strpos(ref.text(), value) > 0
        else:
            substring = sa.func.instr(ref.text(), value) > 0
        return sa.or_(sa.and_(ref.kind_is("string"), substring), ref.list_contains(value))
    if op == pb.COMPARE_OP_STARTS_WITH:
        prefix = sa.func.substr(ref.text(), 1, len(value)) == value
        return sa.and_(ref.kind_is("string"), prefix)
    kind = _kind_of(value)
    if op == pb.COMPARE_OP_NE:
        return sa.and_(ref.present(), sa.not_(_typed_equal(ref, value)))
    if op == pb.COMPARE_OP_EQ:
        return _typed_equal(ref, value)
    operand = ref.number() if kind == "number" else ref.text()
    literal = float(value) if kind == "number" else value
    return sa.and_(ref.kind_is(kind), OPERATORS[op](operand, literal))


def _known(condition: Bool) -> Bool:
    """SQL's unknown (NULL) is false, as in the Python evaluator; `not` must not turn it back into unknown."""
    result: Bool = sa.func.coalesce(condition, sa.false())
    return result


@dataclass
class Compiler:
    dialect: str
    now_ms: int
    segments: Mapping[str, pb.Segment]
    lo: str = ""
    hi: str | None = None
    # When set, event conditions are not compiled to a grouped subquery each: their aggregates are
    # added here as columns of ONE grouped pass over the events, the subquery ``agg`` (see
    # ``matching_all``), and the condition reads its column.
    pooled: list[Any] | None = None
    # The event types that pass reads (None: any type, a condition names none).
    event_types: set[str] | None = field(default_factory=set)

    def fields(self, ast: pb.Expression, column: Any) -> Bool:
        node = ast.WhichOneof("node")
        if node == "comparison":
            cmp = ast.comparison
            ref = Json(column, tuple(cmp.path.split(".")), self.dialect)
            return compare_json(ref, cmp.op, literal_value(cmp.value))
        if node == "exists":
            return Json(column, tuple(ast.exists.path.split(".")), self.dialect).present()
        if node == "all":
            return sa.and_(sa.true(), *(self.fields(t, column) for t in ast.all.terms))
        if node == "any":
            return sa.or_(sa.false(), *(self.fields(t, column) for t in ast.any.terms))
        if node == "negate":
            return sa.not_(_known(self.fields(ast.negate, column)))
        return sa.false()

    def _pattern(self, pattern: pb.EventPattern, event: Any) -> list[Bool]:
        conds: list[Bool] = [event.c.kind == EVENT, *self._in_range(event.c.profile_id)]
        if pattern.event_type:
            conds.append(event.c.event_type == pattern.event_type)
        if pattern.HasField("where"):
            conds.append(self.fields(pattern.where, event.c.attributes))
        return conds

    def _in_range(self, profile_id: Any) -> list[Bool]:
        """A page of a batch run reads only its own profiles' events."""
        conds: list[Bool] = []
        if self.lo:
            conds.append(profile_id > self.lo)
        if self.hi is not None:
            conds.append(profile_id <= self.hi)
        return conds

    def _window(self, window: pb.Window, ts: Any) -> list[Bool]:
        kind = window.WhichOneof("kind")
        if kind == "within_seconds":
            return [ts > self.now_ms - window.within_seconds * 1000]
        if kind == "between":
            return [ts >= window.between.from_ms, ts < window.between.to_ms]
        return []

    def _pooled_event(self, cond: pb.EventCondition) -> Bool:
        """The condition on this profile's aggregate, computed in the shared pass by a
        conditional aggregate (CASE WHEN matching THEN value END); a profile with no event at all
        has no row in the pass (NULL): its count is 0, its sum 0, its min, max and avg unknown."""
        assert self.pooled is not None
        event = FRAGMENT
        # The indexed columns first: the row (its JSON) is read only for events of the type and window.
        conds = self._pattern(cond.pattern, event)
        matched = sa.and_(sa.true(), *self._window(cond.window, event.c.ts_ms), *conds)
        label = f"a{len(self.pooled)}"
        zero: Any = None
        if cond.aggregate == pb.AGGREGATE_COUNT:
            measure: Any = sa.func.count(sa.case((matched, 1)))
            zero = 0
        else:
            value = Json(event.c.attributes, tuple(cond.field.split(".")), self.dialect).number()
            picked = sa.case((matched, value))
            aggregates: dict[int, Callable[[Any], Any]] = {
                pb.AGGREGATE_SUM: sa.func.sum,
                pb.AGGREGATE_MIN: sa.func.min,
                pb.AGGREGATE_MAX: sa.func.max,
                pb.AGGREGATE_AVG: sa.func.avg,
            }
            measure = aggregates[cond.aggregate](picked)
            zero = 0.0 if cond.aggregate == pb.AGGREGATE_SUM else None
        if self.event_types is not None:
            if cond.pattern.event_type:
                self.event_types.add(cond.pattern.event_type)
            else:
                self.event_types = None
        self.pooled.append(measure.label(label))
        column: Any = sa.literal_column(f"{AGG}.{label}", type_=sa.Float)
        if zero is not None:
            column = sa.func.coalesce(column, zero)
        return _known(OPERATORS[cond.op](column, cond.value))

    def event(self, cond: pb.EventCondition, profile_id: Any) -> Bool:
        """One grouped pass over the events (not a subquery per profile): the profiles whose
        aggregate holds; or, when it holds for a profile with no such events (count < 2, sum = 0),
        every profile but those whose aggregate fails."""
        event = FRAGMENT.alias()
        where = [*self._pattern(cond.pattern, event), *self._window(cond.window, event.c.ts_ms)]
        if cond.aggregate == pb.AGGREGATE_COUNT:
            measure: Any = sa.func.count()
        else:
            value = Json(event.c.attributes, tuple(cond.field.split(".")), self.dialect).number()
            aggregates: dict[int, Callable[[Any], Any]] = {
                pb.AGGREGATE_SUM: lambda v: sa.func.coalesce(sa.func.sum(v), 0.0),
                pb.AGGREGATE_MIN: sa.func.min,
                pb.AGGREGATE_MAX: sa.func.max,
                pb.AGGREGATE_AVG: sa.func.avg,
            }
            measure = aggregates[cond.aggregate](value)
        grouped = sa.select(event.c.profile_id).where(*where).group_by(event.c.profile_id)
        holds = OPERATORS[cond.op](measure, cond.value)
        result: Bool
        if cond.aggregate in (pb.AGGREGATE_COUNT, pb.AGGREGATE_SUM) and compare(cond.op, 0.0, cond.value):
            result = profile_id.not_in(grouped.having(sa.not_(_known(holds))))
        else:
            result = profile_id.in_(grouped.having(holds))
        return result

    def sequence(self, seq: pb.Sequence, profile_id: Any) -> Bool:
        first, then = FRAGMENT.alias(), FRAGMENT.alias()
        width = seq.within_seconds * 1000
        answer = (
            sa.select(sa.literal(1))
            .select_from(then)
            .where(
                then.c.profile_id == first.c.profile_id,
                *self._pattern(seq.then, then),
                then.c.ts_ms > first.c.ts_ms,
                then.c.ts_ms <= first.c.ts_ms + width,
            )
            .correlate_except(then)
        )
        starts = sa.select(first.c.profile_id).where(
            *self._window(seq.first_window, first.c.ts_ms), *self._pattern(seq.first, first)
        )
        if seq.negated:
            starts = starts.where(first.c.ts_ms + width <= self.now_ms, ~sa.exists(answer))
        else:
            starts = starts.where(sa.exists(answer))
        result: Bool = profile_id.in_(starts)
        return result

    def profile(self, ast: pb.Expression, profile: Any) -> Bool:
        node = ast.WhichOneof("node")
        if node in ("comparison", "exists"):
            return self.fields(ast, profile.c.attributes)
        if node == "all":
            return sa.and_(sa.true(), *(self.profile(t, profile) for t in ast.all.terms))
        if node == "any":
            return sa.or_(sa.false(), *(self.profile(t, profile) for t in ast.any.terms))
        if node == "negate":
            return sa.not_(_known(self.profile(ast.negate, profile)))
        if node == "event":
            if self.pooled is not None:
                return self._pooled_event(ast.event)
            return self.event(ast.event, profile.c.profile_id)
        if node == "sequence":
            return self.sequence(ast.sequence, profile.c.profile_id)
        if node == "identity":
            ident = IDENTITY.alias()
            inner = sa.select(sa.literal(1)).select_from(ident)
            inner = inner.where(ident.c.profile_id == profile.c.profile_id, ident.c.namespace == ast.identity.namespace)
            return sa.exists(inner)
        if node == "consent":
            return consent_matches(profile.c.attributes, ast.consent.purpose, ast.consent.value, self.dialect)
        if node == "member_of":
            target = self.segments.get(ast.member_of.segment_id)
            return self.profile(target.ast, profile) if target is not None else sa.false()
        if node == "computed":
            ref = Json(profile.c.computed, (ast.computed.name,), self.dialect)
            return compare_json(ref, ast.computed.op, literal_value(ast.computed.value))
        return sa.false()


def matching_query(
    ast: pb.Expression,
    dialect: str,
    now_ms: int,
    segments: Mapping[str, pb.Segment],
    *,
    after: str = "",
    limit: int = 0,
) -> sa.Select[Any]:
    """SELECT the ids of the profiles matching ``ast`` (ordered; a page after ``after`` when limited)."""
    profile = PROFILE.alias("p")
    condition = Compiler(dialect, now_ms, segments).profile(ast, profile)
    query = sa.select(profile.c.profile_id).where(condition).order_by(profile.c.profile_id)
    if after:
        query = query.where(profile.c.profile_id > after)
    if limit:
        query = query.limit(limit)
    return query


def matching(
    conn: sa.Connection,
    ast: pb.Expression,
    now_ms: int,
    segments: Mapping[str, pb.Segment],
    *,
    lo: str = "",
    hi: str | None = None,
) -> set[str]:
    """The profile ids matching ``ast`` in (lo, hi]."""
    profile = PROFILE.alias("p")
    condition = Compiler(conn.dialect.name, now_ms, segments, lo, hi).profile(ast, profile)
    query = sa.select(profile.c.profile_id).where(condition)
    if lo:
        query = query.where(profile.c.profile_id > lo)
    if hi is not None:
        query = query.where(profile.c.profile_id <= hi)
    return set(conn.execute(query).scalars().all())


def _matching_all_query(
    dialect: str,
    asts: Mapping[str, pb.Expression],
    now_ms: int,
    segments: Mapping[str, pb.Segment],
    lo: str,
    hi: str | None,
) -> tuple[sa.Select[Any], list[str]]:
    """The statement ``matching_all`` runs, and the keys of its boolean columns (in order)."""
    profile = PROFILE.alias("p")
    pooled: list[Any] = []
    compiler = Compiler(dialect, now_ms, segments, lo, hi, pooled=pooled)
    conditions = {key: compiler.profile(ast, profile) for key, ast in asts.items()}
    columns: list[Any] = [profile.c.profile_id]
    source: Any = profile
    if pooled:
        types = compiler.event_types
        where: list[Bool] = [FRAGMENT.c.kind == EVENT, *compiler._in_range(FRAGMENT.c.profile_id)]
        if types is not None:
            where.append(FRAGMENT.c.event_type.in_(sorted(types)))
        grouped = sa.select(FRAGMENT.c.profile_id, *pooled).where(*where).group_by(FRAGMENT.c.profile_id)
        agg = grouped.subquery(AGG)
        source = profile.outerjoin(agg, agg.c.profile_id == profile.c.profile_id)
    keys = list(conditions)
    columns += [_known(conditions[k]).label(f"s{i}") for i, k in enumerate(keys)]
    query = sa.select(*columns).select_from(source)
    if lo:
        query = query.where(profile.c.profile_id > lo)
    if hi is not None:
        query = query.where(profile.c.profile_id <= hi)
    return query, keys


def matching_all(
    conn: sa.Connection,
    asts: Mapping[str, pb.Expression],
    now_ms: int,
    segments: Mapping[str, pb.Segment],
    *,
    lo: str = "",
    hi: str | None = None,
) -> dict[str, set[str]]:
    """The profile ids in (lo, hi] matching each of ``asts`` (by key), in ONE query: every event
    aggregate of every segment is a column of a single grouped pass over the events (instead of
    one pass per condition), joined to the profiles; each segment is one boolean column."""
    query, keys = _matching_all_query(conn.dialect.name, asts, now_ms, segments, lo, hi)
    # Columns, not rows: the transpose and the selections run in C, no Python step per row.
    by_column = list(zip(*conn.execute(query), strict=True)) or [() for _ in range(len(keys) + 1)]
    return {key: set(compress(by_column[0], by_column[i])) for i, key in enumerate(keys, start=1)}


# What the store says when one statement is too deep or too large to prepare (SQLite's parser
# stack and expression depth, its bound-variable cap; PostgreSQL's stack depth), lower-cased.
_TOO_COMPLEX = (
    "parser stack overflow",
    "expression tree is too large",
    "too many sql variables",
    "too many terms",
    "stack depth limit exceeded",
)


def too_complex(exc: BaseException) -> str | None:
    """Why ``exc`` says a statement was too complex for the store (None: it says something else).
    The store's own message only: the statement's parameters (literals of the query) are left out."""
    if isinstance(exc, RecursionError):
        return "too deep to compile"
    if isinstance(exc, sa.exc.DBAPIError):
        said = str(exc.orig).strip().splitlines()[0] if str(exc.orig).strip() else ""
        if any(m in said.lower() for m in _TOO_COMPLEX):
            return said
    return None


def check_compiles(conn: sa.Connection, ast: pb.Expression, now_ms: int, segments: Mapping[str, pb.Segment]) -> None:
    """Have the store prepare the statements ``ExplainQuery`` and a batch run execute for ``ast``
    (with LIMIT 0: nothing is read), so a definition too deep or too large for them (e.g. with the
    segments it refers to written out) is refused when it is defined, not when it is evaluated."""
    dialect = conn.dialect.name
    conn.execute(matching_query(ast, dialect, now_ms, segments).limit(0)).all()
    query, _ = _matching_all_query(dialect, {"s": ast}, now_ms, segments, "", None)
    conn.execute(query.limit(0)).all()


# A batch run's session on SQLite: a page cache of 256 MiB (the grouped pass and the profiles stay in
# memory), its temporary sort trees in memory, and the file read through a 1 GiB memory map.
SQLITE_BATCH_PRAGMAS = ("cache_size = -262144", "temp_store = MEMORY", "mmap_size = 1073741824")


def batch_session(conn: sa.Connection) -> None:
    """Tune this connection for a batch run (SQLite pragmas; nothing to do on PostgreSQL)."""
    if conn.dialect.name == "sqlite":
        for pragma in SQLITE_BATCH_PRAGMAS:
            conn.exec_driver_sql(f"PRAGMA {pragma}")
