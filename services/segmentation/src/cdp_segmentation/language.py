"""The audience language: text -> typed AST (the protobuf ``Expression`` config events store).

    loyalty.tier = "gold" and (lifetime_value >= 500 or vip = true)
    country in ["FR", "DE"] and email exists and not city starts_with "Lon"

Parse and type errors carry the line, the column and a hint.
"""

from __future__ import annotations

import re
from typing import Any

from lark import Lark, Token, Transformer, UnexpectedInput

from cdp.segmentation.v1 import segmentation_pb2 as pb
from cdp_kit.errors import InvalidInput, Violation

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
     | "(" expr ")"
comparison: PATH OP literal
          | PATH _IN array
exists: PATH _EXISTS
not_exists: PATH _NOT _EXISTS
?literal: STRING -> string
        | NUMBER -> number
        | _TRUE -> true
        | _FALSE -> false
        | array
array: "[" [literal ("," literal)*] "]"

OP: "<=" | ">=" | "!=" | "=" | "<" | ">" | "contains" | "starts_with"
_OR: "or"
_AND: "and"
_NOT: "not"
_IN: "in"
_EXISTS: "exists"
_TRUE: "true"
_FALSE: "false"
PATH: /(?!(or|and|not|in|exists|true|false|contains|starts_with)\b)[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)*/
STRING: /"([^"\\]|\\.)*"/
NUMBER: /-?\d+(\.\d+)?/
%import common.WS
%ignore WS
"""

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
_parser = Lark(GRAMMAR, parser="lalr", propagate_positions=True)


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


def parse(query: str) -> pb.Expression:
    try:
        tree = _parser.parse(query)
    except UnexpectedInput as exc:
        line, column = exc.line, exc.column
        hint = _hint(exc)
        raise InvalidInput(
            f"cannot parse the audience definition at line {line}, column {column}",
            [Violation(f"query:{line}:{column}", "syntax", hint)],
        ) from exc
    ast = _ToAst().transform(tree)
    assert isinstance(ast, pb.Expression)
    _check_types(ast)
    return ast


def _hint(exc: UnexpectedInput) -> str:
    expected = sorted(getattr(exc, "expected", set()) or getattr(exc, "allowed", set()) or [])
    if expected:
        return f"expected one of: {', '.join(expected[:8])}"
    return "check quotes, parentheses and operators"


def _check_types(ast: pb.Expression) -> None:
    node = ast.WhichOneof("node")
    if node == "comparison":
        cmp = ast.comparison
        kind = cmp.value.WhichOneof("kind")
        ordered = (pb.COMPARE_OP_LT, pb.COMPARE_OP_LE, pb.COMPARE_OP_GT, pb.COMPARE_OP_GE)
        if cmp.op in ordered and kind in ("bool_value", "list_value"):
            raise InvalidInput(
                "type error", [Violation(cmp.path, "type", "order comparisons need a number or a string")]
            )
        if cmp.op in (pb.COMPARE_OP_CONTAINS, pb.COMPARE_OP_STARTS_WITH) and kind != "string_value":
            raise InvalidInput(
                "type error", [Violation(cmp.path, "type", f"{pb.CompareOp.Name(cmp.op)} takes a string")]
            )
    elif node in ("all", "any"):
        for term in getattr(ast, node).terms:
            _check_types(term)
    elif node == "negate":
        _check_types(ast.negate)


def referenced_paths(ast: pb.Expression) -> set[str]:
    node = ast.WhichOneof("node")
    if node == "comparison":
        return {ast.comparison.path}
    if node == "exists":
        return {ast.exists.path}
    if node in ("all", "any"):
        return set().union(*(referenced_paths(t) for t in getattr(ast, node).terms))
    if node == "negate":
        return referenced_paths(ast.negate)
    return set()


def classify(ast: pb.Expression) -> tuple[int, str]:
    """Streaming or batch, and why, for people."""
    paths = ", ".join(sorted(referenced_paths(ast)))
    return (
        pb.EVALUATION_STREAMING,
        f"streaming: only profile attributes are read ({paths}); each profile is re-evaluated when it changes",
    )
