"""Sequences with a window on the first step: the syntax, what is refused, what the analysis reads
from it, and that definitions stored before the window existed read and evaluate as they did."""

from __future__ import annotations

import pytest

from cdp.segmentation.v1 import segmentation_pb2 as pb
from cdp_kit.errors import InvalidInput
from cdp_segmentation.analysis import classify, reads_of
from cdp_segmentation.evaluate import Event, ProfileData, compile_ast, matches
from cdp_segmentation.language import parse

HOUR, DAY = 3_600_000, 86_400_000


def sequence(query: str) -> pb.Sequence:
    ast = parse(query)
    assert ast.WhichOneof("node") == "sequence", query
    return ast.sequence


def test_the_first_step_takes_a_window_and_the_second_keeps_its_own() -> None:
    seq = sequence("add_to_cart within 7d not followed by purchase within 1h")
    assert (seq.first.event_type, seq.then.event_type) == ("add_to_cart", "purchase")
    assert seq.first_window == pb.Window(within_seconds=7 * 86400)
    assert (seq.within_seconds, seq.negated) == (3600, True)

    seq = sequence("(cart_add where price > 0) within 7d not followed by order within 1h")
    assert seq.first.where.comparison.path == "price"
    assert seq.first_window.within_seconds == 7 * 86400

    seq = sequence("add_to_cart within 2w followed by (purchase where total > 0) within 90m")
    assert (seq.first_window.within_seconds, seq.within_seconds, seq.negated) == (14 * 86400, 5400, False)
    assert seq.then.where.comparison.path == "total"

    seq = sequence("add_to_cart between 2026-05-01 and 2026-05-31 not followed by purchase within 1d")
    assert seq.first_window.between == pb.DateRange(from_ms=1_777_593_600_000, to_ms=1_780_272_000_000)

    both = parse("add_to_cart within 7d followed by purchase within 1h and vip = true")
    assert [t.WhichOneof("node") for t in both.all.terms] == ["sequence", "comparison"]


# Stored on the log before first_window existed: the text and the AST it was stored with (fields 1-4).
STORED = {
    "cart_add followed by order within 2h": pb.Sequence(
        first=pb.EventPattern(event_type="cart_add"), then=pb.EventPattern(event_type="order"), within_seconds=7200
    ),
    "(cart_add where price > 0) not followed by order within 1h": pb.Sequence(
        first=pb.EventPattern(
            event_type="cart_add",
            where=pb.Expression(
                comparison=pb.Comparison(path="price", op=pb.COMPARE_OP_GT, value=pb.Literal(number_value=0))
            ),
        ),
        then=pb.EventPattern(event_type="order"),
        within_seconds=3600,
        negated=True,
    ),
}


@pytest.mark.parametrize("query", sorted(STORED))
def test_sequences_stored_without_a_first_window_parse_and_evaluate_as_before(query: str) -> None:
    old = STORED[query]
    assert parse(query).sequence.SerializeToString(deterministic=True) == old.SerializeToString(deterministic=True)
    stored = pb.Sequence.FromString(old.SerializeToString())
    assert not stored.HasField("first_window")
    # No window: every A counts, however old (here 30 days), exactly as before.
    history = [Event("cart_add", 0, {"price": 3}), Event("order", HOUR, {})]  # answered
    ast = pb.Expression(sequence=stored)
    now = 30 * DAY
    data = ProfileData({}, set(), set(), lambda: history)
    assert matches(ast, data, now) is compile_ast(ast)(data, now) is (not stored.negated)


@pytest.mark.parametrize(
    ("query", "place", "hint"),
    [
        # Needs an A newer than 1h and at least 1h old: never.
        ("add_to_cart within 1h not followed by purchase within 1h", "1:55", "must be longer than 1h"),
        ("add_to_cart within 30m not followed by purchase within 1h", "1:56", "never matches"),
        ("add_to_cart within 7 followed by purchase within 1h", "1:20", "a window needs a unit"),
        ("add_to_cart within 7d followed by purchase", "1:35", "ends too early"),
        ("add_to_cart.price within 7d followed by purchase within 1h", "1:1", "names an event type"),
    ],
)
def test_refused_with_the_place_and_a_hint(query: str, place: str, hint: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse(query)
    [violation] = caught.value.violations
    assert violation.field == f"query:{place}", (query, violation.field, violation.message)
    assert hint in violation.message, (query, violation.message)


def test_the_windows_that_change_a_sequence_as_the_clock_moves() -> None:
    """What wakes a profile: a positive sequence changes when its A leaves the first window; a
    negated one also when its A's follow-up window ends (an entry)."""
    assert reads_of(parse("a followed by b within 1h")).windows_ms == set()
    assert reads_of(parse("a not followed by b within 1h")).windows_ms == {HOUR}
    assert reads_of(parse("a within 7d followed by b within 1h")).windows_ms == {7 * DAY}
    assert reads_of(parse("a within 7d not followed by b within 1h")).windows_ms == {HOUR, 7 * DAY}
    between = "a between 2026-01-01 and 2026-01-31 followed by b within 1h"
    assert reads_of(parse(between)).windows_ms == set()  # fixed dates: the clock does not move them

    evaluation, reason = classify(parse("a within 7d not followed by b within 1h"), "", {})
    assert evaluation == pb.EVALUATION_STREAMING
    assert "windows (1h, 7d) slide on the log's clock" in reason


@pytest.mark.parametrize("compiled", [False, True])
def test_a_recent_answered_cart_beside_an_old_abandoned_one_is_not_abandoned(compiled: bool) -> None:
    ast = parse("add_to_cart within 7d not followed by purchase within 1h")
    now = 30 * DAY

    def holds(*history: Event) -> bool:
        data = ProfileData({}, set(), set(), lambda: list(history))
        return compile_ast(ast)(data, now) if compiled else matches(ast, data, now)

    old_abandoned = Event("add_to_cart", now - 10 * DAY, {})
    recent, bought = Event("add_to_cart", now - DAY, {}), Event("purchase", now - DAY + HOUR // 2, {})
    assert not holds(old_abandoned, recent, bought)
    assert holds(recent)
    assert not holds(Event("add_to_cart", now - HOUR // 2, {}))  # its hour has not passed yet
    assert holds(Event("add_to_cart", now - HOUR, {}))  # its hour has just passed
    assert not holds(Event("add_to_cart", now - 7 * DAY, {}))  # exactly 7 days old: out of the window
    assert holds(Event("add_to_cart", now - 7 * DAY + 1, {}))
    assert not holds(recent, Event("purchase", recent.ts_ms + HOUR, {}))  # answered at the end of its hour
    assert holds(recent, Event("purchase", recent.ts_ms + HOUR + 1, {}))  # answered too late
