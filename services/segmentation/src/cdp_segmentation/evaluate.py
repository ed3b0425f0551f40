"""The streaming evaluator: one AST, one profile, in Python. Pure."""

from __future__ import annotations

from typing import Any

from cdp.segmentation.v1 import segmentation_pb2 as pb

MISSING = object()


def lookup(profile: dict[str, Any], path: str) -> Any:
    value: Any = profile
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return MISSING
        value = value[part]
    return value


def literal_value(lit: pb.Literal) -> Any:
    kind = lit.WhichOneof("kind")
    if kind == "list_value":
        return [literal_value(i) for i in lit.list_value.items]
    if kind is None:
        return None
    return getattr(lit, kind)


def _same_kind(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool)
    numeric = (int, float)
    if isinstance(a, numeric) and isinstance(b, numeric):
        return True
    return isinstance(a, str) and isinstance(b, str)


def compare(op: pb.CompareOp.ValueType, actual: Any, expected: Any) -> bool:
    if actual is MISSING or actual is None:
        return False
    if op == pb.COMPARE_OP_IN:
        return any(_same_kind(actual, e) and actual == e for e in expected)
    if op == pb.COMPARE_OP_CONTAINS:
        if isinstance(actual, list):
            return expected in actual
        return isinstance(actual, str) and expected in actual
    if op == pb.COMPARE_OP_STARTS_WITH:
        return isinstance(actual, str) and actual.startswith(expected)
    if not _same_kind(actual, expected):
        return op == pb.COMPARE_OP_NE
    results = {
        pb.COMPARE_OP_EQ: lambda: actual == expected,
        pb.COMPARE_OP_NE: lambda: actual != expected,
        pb.COMPARE_OP_LT: lambda: actual < expected,
        pb.COMPARE_OP_LE: lambda: actual <= expected,
        pb.COMPARE_OP_GT: lambda: actual > expected,
        pb.COMPARE_OP_GE: lambda: actual >= expected,
    }
    return bool(results[op]())


def matches(ast: pb.Expression, profile: dict[str, Any]) -> bool:
    node = ast.WhichOneof("node")
    if node == "comparison":
        cmp = ast.comparison
        return compare(cmp.op, lookup(profile, cmp.path), literal_value(cmp.value))
    if node == "exists":
        return lookup(profile, ast.exists.path) not in (MISSING, None)
    if node == "all":
        return all(matches(t, profile) for t in ast.all.terms)
    if node == "any":
        return any(matches(t, profile) for t in ast.any.terms)
    if node == "negate":
        return not matches(ast.negate, profile)
    return False
