"""Limits on hostile input, checked before any parser runs: the depth scan and the size checks
of every reader, and a property: whatever the nesting, reading ends in a row or a clean reject."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdp_ingest.consumer import Rejected, _parse
from cdp_ingest.domain import Validator
from cdp_ingest.limits import CsvRowScan, Limits, json_text, too_deep, value_bytes
from cdp_ingest.parsing import CsvParser, JsonLinesParser, Parsed
from cdp_kit.errors import InvalidInput
from tests.unit.test_ingest_rows import SCHEMA

LIMIT = 32


def nested(depth: int, width: int = 1, opener: str = "[") -> str:
    """JSON ``depth`` levels deep (a scalar at the bottom), each level ``width`` items wide."""
    text = "1"
    for level in range(depth):
        kind = opener if level % 2 == 0 else "{" if opener == "[" else "["
        items = [text] + ["0"] * (width - 1)
        if kind == "[":
            text = "[" + ",".join(items) + "]"
        else:
            text = "{" + ",".join(f'"k{i}":{t}' for i, t in enumerate(items)) + "}"
    return text


def jsonl_rows(data: bytes, limits: Limits | None = None, piece: int = 1 << 16) -> list[Parsed]:
    parser = JsonLinesParser(limits)
    rows = [r for i in range(0, len(data), piece) for r in parser.feed(data[i : i + piece])]
    return rows + [r for chunk in parser.close() for r in chunk]


def csv_rows(data: bytes, limits: Limits, piece: int) -> list[Parsed]:
    parser = CsvParser(limits)
    rows = [r for i in range(0, len(data), piece) for r in parser.feed(data[i : i + piece])]
    return rows + [r for chunk in parser.close() for r in chunk]


def rules(rows: list[Parsed]) -> list[tuple[int, str, str | None]]:
    return [(r[0], r[2][0].field if r[2] else "", r[2][0].rule if r[2] else None) for r in rows]


# ----------------------------------------------------------------------------- the depth scan


def test_depth_exactly_at_the_limit_passes_and_one_more_level_is_too_deep() -> None:
    assert not too_deep(nested(LIMIT), LIMIT)
    assert too_deep(nested(LIMIT + 1), LIMIT)
    assert not too_deep(nested(LIMIT, opener="{"), LIMIT)
    assert too_deep(nested(LIMIT + 1, opener="{"), LIMIT)
    assert json.loads(nested(LIMIT))  # what passes, the parser reads


def test_brackets_inside_strings_do_not_count() -> None:
    text = json.dumps({"note": "[" * 1000 + "{" * 1000, "b": "]]]]"})
    assert not too_deep(text, 2)


def test_escaped_quotes_and_backslashes_do_not_end_a_string() -> None:
    hidden = json.dumps({"a": 'say \\"' + "[" * 100 + '\\" and \\\\'})  # quotes escaped inside the string
    assert not too_deep(hidden, 1)
    # a backslash that ends a string ("...\\") leaves the quote after it closing the string:
    # the brackets that follow are real and count
    real = '["a\\\\", ' + "[" * 40 + "]" * 40 + "]"
    assert json.loads(real)
    assert too_deep(real, LIMIT)


def test_a_deep_document_is_refused_without_recursing() -> None:
    assert too_deep("[" * 100_000 + "]" * 100_000, LIMIT)
    assert too_deep("{" + '"a":{' * 100_000, LIMIT)  # unterminated: still measured, never parsed


def test_json_text_reads_the_characters_the_parser_reads() -> None:
    deep = ("[" * 50 + "]" * 50).encode("utf-16")
    assert too_deep(json_text(deep), LIMIT)
    with pytest.raises(UnicodeDecodeError):
        json_text(b'{"a": "\xff"}')


def test_value_bytes_walks_deep_values_without_recursing() -> None:
    deep: object = 1
    for _ in range(50_000):
        deep = [deep]
    assert value_bytes(deep) > 50_000
    assert value_bytes({"a": "é"}) >= len('{"a":"é"}'.encode())  # near enough, never less


# ----------------------------------------------------------------------------- JSON Lines


def test_jsonl_rows_too_deep_are_rejected_and_the_others_read() -> None:
    lines = [json.dumps({"id": "1"}), '{"id": "2", "x": ' + nested(10_000) + "}", json.dumps({"id": "3"})]
    lines.append('{"id": "4", "x": ' + nested(LIMIT - 1) + "}")  # the row is level 1: exactly at the limit
    lines.append('{"id": "5", "x": ' + nested(LIMIT) + "}")  # one level more
    rows = jsonl_rows(("\n".join(lines) + "\n").encode())
    assert rules(rows) == [(1, "", None), (2, "*", "depth"), (3, "", None), (4, "", None), (5, "*", "depth")]
    assert rows[1][2][0].message == "nesting deeper than 32"
    assert rows[1][2][0].record == "row 2"


def test_jsonl_fields_and_rows_over_their_limits() -> None:
    limits = Limits(field_bytes=100, row_bytes=1000)
    lines = [
        json.dumps({"id": "1", "big": "x" * 150}),
        json.dumps({"id": "2", "nested": {"a": ["y" * 60, "z" * 60]}}),
        json.dumps({"id": "3", **{f"f{i}": "w" * 90 for i in range(20)}}),
        json.dumps({"id": "4"}),
    ]
    rows = jsonl_rows(("\n".join(lines) + "\n").encode(), limits, piece=64)
    assert rules(rows) == [(1, "big", "field_size"), (2, "nested", "field_size"), (3, "*", "row_size"), (4, "", None)]
    assert rows[0][1] == {"id": "1"}  # the over-long value is never kept
    assert rows[0][2][0].message == "field larger than 100 bytes"
    assert rows[2][2][0].message == "row larger than 1000 bytes"


# ----------------------------------------------------------------------------- CSV


def test_a_huge_unquoted_csv_field_is_a_field_size_reject_on_its_row() -> None:
    limits = Limits(field_bytes=1000, row_bytes=4000)
    data = b"id,age,tier\n1,2,a\n2," + b"9" * 50_000 + b",b\n3,4,a\n"
    for piece in (333, 4096, len(data)):
        rows = csv_rows(data, limits, piece)
        assert rules(rows) == [(1, "", None), (2, "age", "field_size"), (3, "", None)]
        assert rows[1][2][0].message == "field larger than 1000 bytes"
        assert rows[1][1] == {}  # measured, never kept


def test_a_quoted_csv_field_over_the_limit_closes_and_reading_goes_on() -> None:
    limits = Limits(field_bytes=1000, row_bytes=4000)
    data = b'id,age,tier\n1,"' + b'x,"",\n' * 2000 + b'",a\n2,3,b\n'
    rows = csv_rows(data, limits, 500)
    assert rules(rows) == [(1, "age", "field_size"), (2, "", None)]


def test_a_csv_row_over_the_limit_with_small_fields_is_a_row_size_reject() -> None:
    limits = Limits(field_bytes=1000, row_bytes=4000)
    header = ",".join(f"c{i}" for i in range(10)).encode()
    long_row = b",".join([b"v" * 900] * 10)
    data = header + b"\n" + long_row + b"\n" + b",".join([b"s"] * 10) + b"\n"
    rows = csv_rows(data, limits, 700)
    assert rules(rows) == [(1, "*", "row_size"), (2, "", None)]
    assert rows[0][2][0].message == "row larger than 4000 bytes"


def test_csv_sizes_exactly_at_the_limits_are_read() -> None:
    limits = Limits(field_bytes=100, row_bytes=400)
    at = b"a," + b"x" * 100 + b"\n"  # a field of exactly 100 bytes
    over = b"a," + b"x" * 101 + b"\n"
    rows = csv_rows(b"id,v\n" + at + over, limits, 50)
    assert rules(rows) == [(1, "", None), (2, "v", "field_size")]


def test_an_unclosed_quote_still_fails_the_file_at_its_end() -> None:
    limits = Limits(field_bytes=100, row_bytes=400)
    data = b'id,v\n1,2\n2,"never closed\n' + b"3,4\n" * 500
    with pytest.raises(InvalidInput) as caught:
        csv_rows(data, limits, 128)
    assert "row 2: *: csv: unbalanced quote" in caught.value.details()


def test_a_header_over_the_limit_fails_the_file() -> None:
    with pytest.raises(InvalidInput) as caught:
        csv_rows(b"id," + b"h" * 500 + b"\n1,2\n", Limits(field_bytes=100, row_bytes=400), 64)
    assert "header: column 2: field_size" in caught.value.details()


def test_the_row_scan_measures_fields_across_pieces_and_stops_at_the_rows_end() -> None:
    scan = CsvRowScan()
    assert scan.feed(b'ab,"c,\nd') == -1
    assert scan.feed(b'""e",fgh') == -1
    assert scan.feed(b"ij\nnext,row\n") == 3
    assert scan.widest == (9, 1)  # '"c,\nd""e"' is field 1
    assert scan.size == len(b'ab,"c,\nd""e",fghij\n')


def test_json_in_a_csv_cell_is_measured_before_it_is_parsed() -> None:
    validator = Validator(SCHEMA, textual=True, drop_unknown=False, max_bytes=10_000_000, max_depth=LIMIT)
    row = {"id": "1", "tags": "[" * 100_000 + "]" * 100_000}
    result = validator.validate(row, 200_000, "row 1")
    assert [(v.field, v.rule, v.message) for v in result.violations] == [("tags", "depth", "nesting deeper than 32")]
    fits = validator.validate({"id": "1", "address": json.dumps({"zip": "1", "x": json.loads(nested(30))})}, 9, "r")
    assert fits.ok  # the cell is the row's level 2: 31 levels below the row fit


# ----------------------------------------------------------------------------- cdp.collect


def test_collect_events_too_deep_are_rejected_before_parsing() -> None:
    with pytest.raises(Rejected) as caught:
        _parse(b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", LIMIT)
    assert [(e.field, e.rule, e.message) for e in caught.value.errors] == [("*", "depth", "nesting deeper than 32")]
    assert _parse(('{"a": ' + nested(LIMIT - 1) + "}").encode(), LIMIT)


# ----------------------------------------------------------------------------- the property


@settings(max_examples=150, deadline=None)
@given(
    depth=st.integers(min_value=LIMIT - 3, max_value=LIMIT + 3) | st.integers(min_value=0, max_value=3000),
    width=st.integers(min_value=1, max_value=4),
    opener=st.sampled_from(["[", "{"]),
    noise=st.sampled_from(["", '"[[[{{"', '"\\"[[["', '"\\\\"']),
    truncate=st.booleans(),
)
def test_any_nesting_ends_in_a_row_or_a_clean_depth_reject(
    depth: int, width: int, opener: str, noise: str, truncate: bool
) -> None:
    inner = nested(depth, width, opener)
    if noise:  # a string of brackets and escapes beside the value, in an array of the row
        text = '{"id": "x", "n": [' + noise + ", " + inner + "]}"
        row_depth = 2 + depth
    else:
        text = '{"id": "x", "n": ' + inner + "}"
        row_depth = 1 + depth
    if truncate:
        text = text[: len(text) // 2]
    rows = jsonl_rows((text + "\n").encode())
    assert len(rows) == 1
    got = [(p.field, p.rule) for p in rows[0][2]]
    if truncate:  # cut short: malformed, or too deep already in the half that is left
        assert got in ([("*", "depth")], [("*", "json")])
    elif row_depth > LIMIT:
        assert got == [("*", "depth")]
    else:
        assert got == []
    assert collect_rule(text.encode()) == (got[0][1] if got else None)  # cdp.collect judges alike


def collect_rule(data: bytes) -> str | None:
    """The rule a collected message is rejected under, or None; anything else raised fails the test."""
    try:
        _parse(data, LIMIT)
    except Rejected as rejected:
        return rejected.errors[0].rule
    return None
