"""The audience language: text -> typed AST (the protobuf ``Expression`` config events store).

    loyalty.tier = "gold" and (lifetime_value >= 500 or vip = true)
    count(order where channel = "store") >= 2 within 90d
    sum(order.total) > 500 within 365d and has email
    (cart_add where price > 0) not followed by order within 1h
    add_to_cart within 7d not followed by purchase within 1h
    consent email_marketing = "y" and in segment gold_members

Parse and type errors carry the line, the column and a hint. See docs/segmentation.md.

Every definition is checked against ``LIMITS`` before it is transformed, type-checked or compiled
(``parse`` and ``parse_computed``, which every entry point uses): its length, its nesting, its
number of conditions and the items of its lists. The tree is walked without recursion, so a
definition too deep for Python, protobuf (100 levels) or SQLite's parser is refused with
INVALID_ARGUMENT naming the rule, never an internal error.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any

from lark import Lark, Token, Transformer, Tree, UnexpectedCharacters, UnexpectedInput, UnexpectedToken
from lark.exceptions import VisitError

from cdp.segmentation.v1 import segmentation_pb2 as pb
from cdp_kit.errors import InvalidInput, Violation

KEYWORDS = "or|and|not|in|exists|true|false|contains|starts_with|where|within|between|has|consent|segment|followed|by"
GRAMMAR = r"""
?start: expr
?expr: or_expr
?or_expr: and_expr (_OR and_expr)*
?and_expr: not_expr (_AND not_expr)*
?not_expr: _NOT not_expr -> negate
         | atom
?atom: comparison
     | exists
     | not_exists
     | event_condition
     | sequence
     | has_identity
     | consent
     | member_of
     | "(" expr ")"
comparison: PATH OP literal
          | PATH _IN array
exists: PATH _EXISTS
not_exists: PATH _NOT _EXISTS
event_condition: AGG "(" PATH [_WHERE expr] ")" OP NUMBER [window]
window: _WITHIN DURATION -> within
      | _BETWEEN DATE _AND DATE -> between
sequence: pattern [window] FOLLOWED_BY pattern _WITHIN DURATION
        | pattern [window] NOT_FOLLOWED_BY pattern _WITHIN DURATION
pattern: PATH
       | "(" PATH _WHERE expr ")"
has_identity: _HAS PATH
consent: _CONSENT PATH "=" STRING
member_of: _IN _SEGMENT PATH
?literal: STRING -> string
        | NUMBER -> number
        | _TRUE -> true
        | _FALSE -> false
        | array
array: "[" [literal ("," literal)*] "]"

OP: "<=" | ">=" | "!=" | "=" | "<" | ">" | "contains" | "starts_with"
AGG.3: /(count|sum|min|max|avg)(?=\s*\()/
FOLLOWED_BY.3: /followed\s+by\b/
NOT_FOLLOWED_BY.3: /not\s+followed\s+by\b/
_OR: "or"
_AND: "and"
_NOT: "not"
_IN: "in"
_EXISTS: "exists"
_TRUE: "true"
_FALSE: "false"
_WHERE: "where"
_WITHIN: "within"
_BETWEEN: "between"
_HAS: "has"
_CONSENT: "consent"
_SEGMENT: "segment"
DURATION.2: /\d+(\.\d+)?[a-z]*/
DATE.2: /\d{4}-\d{2}-\d{2}/
PATH: /(?!(KEYWORDS)\b)(?!(count|sum|min|max|avg)\s*\()[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)*/
STRING: /"([^"\\]|\\.)*"/
NUMBER: /-?\d+(\.\d+)?/
%import common.WS
%ignore WS
""".replace("KEYWORDS", KEYWORDS)

NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")

OPS = {
    "=": pb.COMPARE_OP_EQ,
    "!=": pb.COMPARE_OP_NE,
    "<": pb.COMPARE_OP_LT,
    "<=": pb.COMPARE_OP_LE,
    ">": pb.COMPARE_OP_GT,
    ">=": pb.COMPARE_OP_GE,
    "contains": pb.COMPARE_OP_CONTAINS,
    "starts_with": pb.COMPARE_OP_STARTS_WITH,
}
AGGREGATES = {
    "count": pb.AGGREGATE_COUNT,
    "sum": pb.AGGREGATE_SUM,
    "min": pb.AGGREGATE_MIN,
    "max": pb.AGGREGATE_MAX,
    "avg": pb.AGGREGATE_AVG,
}
UNITS = {
    "s": 1,
    "sec": 1,
    "second": 1,
    "seconds": 1,
    "m": 60,
    "min": 60,
    "minute": 60,
    "minutes": 60,
    "h": 3600,
    "hour": 3600,
    "hours": 3600,
    "d": 86400,
    "day": 86400,
    "days": 86400,
    "w": 604800,
    "week": 604800,
    "weeks": 604800,
}
ORDERED = (pb.COMPARE_OP_LT, pb.COMPARE_OP_LE, pb.COMPARE_OP_GT, pb.COMPARE_OP_GE)
_parser = Lark(GRAMMAR, parser="lalr", propagate_positions=True)
# A computed attribute's function: `sum(store_order.amount where channel = "store") within 90d`.
COMPUTED_GRAMMAR = (
    GRAMMAR.replace("?start: expr", "?start: computed_def\n?expr_start: expr")
    + r"""
computed_def: CAGG "(" PATH [_WHERE expr] ")" [window]
CAGG.4: /(count|sum|min|max|most_recent)(?=\s*\()/
"""
)
_computed_parser = Lark(COMPUTED_GRAMMAR, parser="lalr", propagate_positions=True)
COMPUTED_AGGREGATES = {
    "count": pb.AGGREGATE_COUNT,
    "sum": pb.AGGREGATE_SUM,
    "min": pb.AGGREGATE_MIN,
    "max": pb.AGGREGATE_MAX,
    "most_recent": pb.AGGREGATE_MOST_RECENT,
}


class LanguageError(Exception):
    """A definition that parses but breaks a rule, at a place in the text."""

    def __init__(self, token: Token | None, rule: str, hint: str, *, at: tuple[int, int] | None = None) -> None:
        super().__init__(hint)
        self.line = token.line if token is not None and token.line is not None else 1
        self.column = token.column if token is not None and token.column is not None else 1
        if at is not None:
            self.line, self.column = at
        self.rule = rule
        self.hint = hint


# ----------------------------------------------------------------------------- limits
# The batch evaluator compiles a definition to ONE SQL expression: SQLite's parser stack
# overflows at about 30 nested `not` (each is NOT coalesce(…)) or 20 nested and/or pairs, and its
# expression trees stop at a depth of 1,000 (an and/or chain of n terms is n deep); the AST is a
# protobuf message (decoders stop at 100 levels; an and/or level is two: Expression, Junction).
# Every limit below is measured to compile and run on SQLite at the limit
# (tests/unit/test_segmentation_limits.py).
MAX_LENGTH = 20_000  # characters
MAX_DEPTH = 16  # nested ( [ and nested not / and / or / where / lists
MAX_CONDITIONS = 100  # comparisons, exists, event conditions, sequences, has, consent, in segment
MAX_ITEMS = 500  # items of one [...] list
MAX_ITEMS_TOTAL = 2_000  # items of all the lists of one definition
# A window in seconds (in milliseconds it is compared with 64-bit times in SQL and protobuf).
MAX_WINDOW_S = 36_500 * 86_400
# The parse-tree nodes that nest a level, and those that are one condition each.
_NESTING = frozenset({"negate", "and_expr", "or_expr", "event_condition", "pattern", "array"})
_CONDITIONS = frozenset(
    {"comparison", "exists", "not_exists", "event_condition", "sequence", "has_identity", "consent", "member_of"}
)
# What the bracket scan reads: whole strings (brackets inside do not count), brackets, newlines.
_SCAN_RE = re.compile(r'"(?:[^"\\]|\\.)*"|[()\[\]\n]')


def check_length(text: str) -> None:
    """Refuse a definition longer than ``MAX_LENGTH`` before anything reads it."""
    if len(text) > MAX_LENGTH:
        hint = f"a definition has at most {MAX_LENGTH:,} characters (this one has {len(text):,})"
        raise InvalidInput(f"definition too long: {hint}", [Violation("query", "max_length", hint)])


def check_brackets(text: str) -> None:
    """Refuse more than ``MAX_DEPTH`` nested ( or [ (outside strings), at the first one too deep.
    A scan of the text, before the parser: nested parentheses leave no trace in the tree."""
    depth, line, line_start = 0, 1, 0
    for match in _SCAN_RE.finditer(text):
        token = match.group()
        if token in ("(", "["):
            depth += 1
            if depth > MAX_DEPTH:
                hint = f"at most {MAX_DEPTH} nested parentheses or brackets; simplify the definition"
                raise LanguageError(None, "nesting", hint, at=(line, match.start() - line_start + 1))
        elif token in (")", "]"):
            depth = max(depth - 1, 0)
        elif "\n" in token:  # a newline, or a string spanning lines
            line += token.count("\n")
            line_start = match.start() + token.rindex("\n") + 1


def check_tree(tree: Tree[Token]) -> None:
    """Refuse a parse tree nested deeper than ``MAX_DEPTH`` (not/and/or/where/lists), with more
    than ``MAX_CONDITIONS`` conditions or lists longer than ``MAX_ITEMS``: walked with a stack
    (no recursion), in text order, so the error is at the first place over a limit."""
    conditions = items = 0
    stack: list[tuple[Tree[Token], int]] = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if node.data in _NESTING:
            depth += 1
            if depth > MAX_DEPTH:
                hint = f"at most {MAX_DEPTH} nested levels of not, and, or, where and lists; simplify the definition"
                raise LanguageError(None, "nesting", hint, at=_place(node))
        if node.data in _CONDITIONS:
            conditions += 1
            if conditions > MAX_CONDITIONS:
                hint = f"at most {MAX_CONDITIONS} conditions in one definition; split it into segments (in segment …)"
                raise LanguageError(None, "max_conditions", hint, at=_place(node))
        if node.data == "array":
            listed = [child for child in node.children if child is not None]
            items += len(listed)
            if len(listed) > MAX_ITEMS:
                hint = f"at most {MAX_ITEMS} items in a list (this one has {len(listed):,})"
                raise LanguageError(None, "max_items", hint, at=_place(node))
            if items > MAX_ITEMS_TOTAL:
                hint = f"at most {MAX_ITEMS_TOTAL:,} list items in one definition, all lists together"
                raise LanguageError(None, "max_items", hint, at=_place(node))
        stack.extend((child, depth) for child in reversed(node.children) if isinstance(child, Tree))


def _place(node: Tree[Token]) -> tuple[int, int]:
    meta = node.meta
    return (getattr(meta, "line", 1), getattr(meta, "column", 1)) if not meta.empty else (1, 1)


def _duration(token: Token) -> int:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([a-z]*)", str(token))
    assert match is not None
    amount, unit = match.groups()
    if not unit:
        raise LanguageError(token, "window", f"a window needs a unit: {amount}d, {amount}h, {amount}w …")
    if unit not in UNITS:
        raise LanguageError(token, "window", f"unknown unit {unit!r}: use s, m, h, d or w (e.g. {amount}d)")
    exact = float(amount) * UNITS[unit]
    if not exact <= MAX_WINDOW_S:  # also inf (a number of 400 digits): no window is that long
        raise LanguageError(token, "window", f"a window is at most {MAX_WINDOW_S // 86400}d (100 years)")
    seconds = int(exact)
    if seconds <= 0:
        raise LanguageError(token, "window", "a window must be longer than zero")
    return seconds


def _date_ms(token: Token, *, end: bool) -> int:
    try:
        day = date.fromisoformat(str(token))
    except ValueError:
        raise LanguageError(token, "date", "dates are YYYY-MM-DD, e.g. 2024-03-31") from None
    try:
        start = datetime(day.year, day.month, day.day, tzinfo=UTC) + (timedelta(days=1) if end else timedelta())
    except OverflowError:  # the day after 9999-12-31
        raise LanguageError(token, "date", "the last end date is 9999-12-30") from None
    return int(start.timestamp() * 1000)


class _ToAst(Transformer[Token, Any]):  # type: ignore[misc]
    def string(self, items: list[Token]) -> pb.Literal:
        text = str(items[0])[1:-1].replace('\\"', '"').replace("\\\\", "\\")
        return pb.Literal(string_value=text)

    def number(self, items: list[Token]) -> pb.Literal:
        return pb.Literal(number_value=float(items[0]))

    def true(self, _items: list[Token]) -> pb.Literal:
        return pb.Literal(bool_value=True)

    def false(self, _items: list[Token]) -> pb.Literal:
        return pb.Literal(bool_value=False)

    def array(self, items: list[pb.Literal | None]) -> pb.Literal:
        return pb.Literal(list_value=pb.ListLiteral(items=[i for i in items if i is not None]))

    def comparison(self, items: list[Any]) -> pb.Expression:
        if len(items) == 2:
            path, value = items
            return pb.Expression(comparison=pb.Comparison(path=str(path), op=pb.COMPARE_OP_IN, value=value))
        path, op, value = items
        _check_comparison(path, op, value)
        return pb.Expression(comparison=pb.Comparison(path=str(path), op=OPS[str(op)], value=value))

    def exists(self, items: list[Token]) -> pb.Expression:
        return pb.Expression(exists=pb.Exists(path=str(items[0])))

    def not_exists(self, items: list[Token]) -> pb.Expression:
        return pb.Expression(negate=pb.Expression(exists=pb.Exists(path=str(items[0]))))

    def negate(self, items: list[pb.Expression]) -> pb.Expression:
        return pb.Expression(negate=items[0])

    def and_expr(self, items: list[pb.Expression]) -> pb.Expression:
        return pb.Expression(all=pb.Junction(terms=items))

    def or_expr(self, items: list[pb.Expression]) -> pb.Expression:
        return pb.Expression(any=pb.Junction(terms=items))

    def within(self, items: list[Token]) -> pb.Window:
        return pb.Window(within_seconds=_duration(items[0]))

    def between(self, items: list[Token]) -> pb.Window:
        start, end = _date_ms(items[0], end=False), _date_ms(items[1], end=True)
        if end <= start:
            raise LanguageError(items[1], "window", "the end date must not be before the start date")
        return pb.Window(between=pb.DateRange(from_ms=start, to_ms=end))

    def event_condition(self, items: list[Any]) -> pb.Expression:
        agg, path, where, op, number, window = items
        aggregate = AGGREGATES[str(agg)]
        event_type, _, field = str(path).partition(".")
        if aggregate == pb.AGGREGATE_COUNT and field:
            raise LanguageError(path, "event", f"count takes an event type, not a field: count({event_type})")
        if aggregate != pb.AGGREGATE_COUNT and not field:
            hint = f"{agg} needs a numeric field of the event: {agg}({event_type}.total)"
            raise LanguageError(path, "event", hint)
        if str(op) not in ("=", "!=", "<", "<=", ">", ">="):
            raise LanguageError(op, "type", f"{agg}(…) is a number: compare it with = != < <= > >=")
        condition = pb.EventCondition(
            aggregate=aggregate,
            pattern=pb.EventPattern(event_type=event_type, where=where)
            if where
            else pb.EventPattern(event_type=event_type),
            field=field,
            op=OPS[str(op)],
            value=float(number),
        )
        if window is not None:
            condition.window.CopyFrom(window)
        return pb.Expression(event=condition)

    def computed_def(self, items: list[Any]) -> pb.ComputedAttribute:
        agg, path, where, window = items
        aggregate = COMPUTED_AGGREGATES[str(agg)]
        event_type, _, field = str(path).partition(".")
        if aggregate == pb.AGGREGATE_COUNT and field:
            raise LanguageError(path, "event", f"count takes an event type, not a field: count({event_type})")
        if aggregate != pb.AGGREGATE_COUNT and not field:
            raise LanguageError(path, "event", f"{agg} needs a field of the event: {agg}({event_type}.amount)")
        attribute = pb.ComputedAttribute(aggregate=aggregate, field=field)
        attribute.pattern.CopyFrom(
            pb.EventPattern(event_type=event_type, where=where) if where else pb.EventPattern(event_type=event_type)
        )
        if window is not None:
            attribute.window.CopyFrom(window)
        return attribute

    def pattern(self, items: list[Any]) -> pb.EventPattern:
        path = items[0]
        if "." in str(path):
            raise LanguageError(
                path, "event", "a sequence step names an event type, e.g. cart_add or (order where total > 0)"
            )
        if len(items) == 2:
            return pb.EventPattern(event_type=str(path), where=items[1])
        return pb.EventPattern(event_type=str(path))

    def sequence(self, items: list[Any]) -> pb.Expression:
        first, window, arrow, then, duration = items
        seq = pb.Sequence(first=first, then=then, within_seconds=_duration(duration))
        seq.negated = arrow.type == "NOT_FOLLOWED_BY"
        if window is not None:
            _check_first_window(window, seq, duration)
            seq.first_window.CopyFrom(window)
        return pb.Expression(sequence=seq)

    def has_identity(self, items: list[Token]) -> pb.Expression:
        return pb.Expression(identity=pb.IdentityPresence(namespace=str(items[0])))

    def consent(self, items: list[Token]) -> pb.Expression:
        value = str(items[1])[1:-1]
        return pb.Expression(consent=pb.ConsentCondition(purpose=str(items[0]), value=value))

    def member_of(self, items: list[Token]) -> pb.Expression:
        return pb.Expression(member_of=pb.SegmentMembership(segment_name=str(items[0])))


def _check_comparison(path: Token, op: Token, value: pb.Literal) -> None:
    kind = value.WhichOneof("kind")
    if OPS[str(op)] in ORDERED and kind in ("bool_value", "list_value"):
        raise LanguageError(op, "type", f"{op} needs a number, a string or a date, not a {kind.split('_')[0]}")
    if str(op) in ("contains", "starts_with") and kind != "string_value":
        raise LanguageError(op, "type", f'{op} takes a string, e.g. {path} {op} "abc"')


def _check_first_window(window: pb.Window, seq: pb.Sequence, duration: Token) -> None:
    """`A within w1 not followed by B within w2` needs an A newer than w1 and at least w2 old:
    refused when no A can be both (w1 <= w2), rather than a segment that is always empty."""
    if seq.negated and window.WhichOneof("kind") == "within_seconds" and window.within_seconds <= seq.within_seconds:
        first, then = seq.first.event_type, seq.then.event_type
        hint = (
            f"a {first} counts as not followed by {then} only once {duration} have passed after it: "
            f"the window of {first} must be longer than {duration} (e.g. within 7d), or the segment never matches"
        )
        raise LanguageError(duration, "window", hint)


def _hint(exc: UnexpectedInput, query: str) -> str:
    if isinstance(exc, UnexpectedToken) and exc.token.type == "NUMBER" and "DURATION" not in exc.expected:
        pass
    if isinstance(exc, UnexpectedCharacters):
        allowed = set(exc.allowed or ())
        if "DURATION" in allowed:
            return "a window is a number with a unit: within 90d, within 12h, within 2w"
        if "DATE" in allowed:
            return "dates are YYYY-MM-DD, e.g. between 2024-01-01 and 2024-03-31"
        char = query[exc.pos_in_stream] if exc.pos_in_stream is not None and exc.pos_in_stream < len(query) else ""
        if char.isupper():
            return "names are lower_snake_case; strings go in double quotes"
        if char == "'":
            return 'strings go in double quotes: "gold"'
    expected = sorted(getattr(exc, "expected", set()) or getattr(exc, "allowed", set()) or [])
    if isinstance(exc, UnexpectedToken) and exc.token.type == "$END":
        return f"the definition ends too early; expected one of: {', '.join(_readable(expected))}"
    if expected:
        return f"expected one of: {', '.join(_readable(expected)[:10])}"
    return "check quotes, parentheses and operators"


_READABLE = {
    "PATH": "a field name",
    "STRING": "a string",
    "NUMBER": "a number",
    "OP": "an operator (= != < <= > >= contains starts_with)",
    "LPAR": "(",
    "RPAR": ")",
    "LSQB": "[",
    "RSQB": "]",
    "COMMA": ",",
    "EQUAL": "=",
    "AGG": "count/sum/min/max/avg",
    "DURATION": "a window like 90d",
    "DATE": "a date YYYY-MM-DD",
}


def _readable(names: list[str]) -> list[str]:
    return sorted({_READABLE.get(n, n.lstrip("_").lower().replace("_", " ")) for n in names})


def parse(query: str, check: Callable[[Tree[Token]], None] | None = None) -> pb.Expression:
    """Text -> AST; ``check`` sees the parse tree (with positions) first, e.g. the schema type check."""
    check_length(query)
    try:
        check_brackets(query)
        tree = _parser.parse(query)
        check_tree(tree)
        if check is not None:
            check(tree)
        ast = _ToAst().transform(tree)
    except UnexpectedInput as exc:
        raise _error("cannot parse the audience definition", exc.line, exc.column, "syntax", _hint(exc, query)) from exc
    except LanguageError as exc:
        raise _error("invalid audience definition", exc.line, exc.column, exc.rule, exc.hint) from exc
    except VisitError as exc:
        inner = exc.orig_exc
        if isinstance(inner, LanguageError):
            raise _error("invalid audience definition", inner.line, inner.column, inner.rule, inner.hint) from exc
        raise
    assert isinstance(ast, pb.Expression)
    return ast


def parse_computed(definition: str, check: Callable[[Tree[Token]], None] | None = None) -> pb.ComputedAttribute:
    """A computed attribute's function -> its definition (aggregate, event pattern, field, window)."""
    check_length(definition)
    try:
        check_brackets(definition)
        tree = _computed_parser.parse(definition)
        check_tree(tree)
        if check is not None:
            check(tree)
        attribute = _ToAst().transform(tree)
    except UnexpectedInput as exc:
        hint = _hint(exc, definition)
        if exc.line == 1 and exc.column == 1:
            hint = "a computed attribute is count(TYPE), sum|min|max|most_recent(TYPE.FIELD) [where …] [within 90d]"
        raise _error("cannot parse the computed attribute", exc.line, exc.column, "syntax", hint) from exc
    except LanguageError as exc:
        raise _error("invalid computed attribute", exc.line, exc.column, exc.rule, exc.hint) from exc
    except VisitError as exc:
        inner = exc.orig_exc
        if isinstance(inner, LanguageError):
            raise _error("invalid computed attribute", inner.line, inner.column, inner.rule, inner.hint) from exc
        raise
    assert isinstance(attribute, pb.ComputedAttribute)
    return attribute


def _error(message: str, line: int, column: int, rule: str, hint: str) -> InvalidInput:
    return InvalidInput(
        f"{message} at line {line}, column {column}: {hint}", [Violation(f"query:{line}:{column}", rule, hint)]
    )


def walk(ast: pb.Expression, visit: Callable[[pb.Expression], None]) -> None:
    """Call ``visit`` on every node of the profile-level tree (not inside event `where` conditions)."""
    visit(ast)
    node = ast.WhichOneof("node")
    if node in ("all", "any"):
        for term in getattr(ast, node).terms:
            walk(term, visit)
    elif node == "negate":
        walk(ast.negate, visit)
