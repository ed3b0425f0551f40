"""`cdp deadletters` shaping and rendering: kinds told apart, filters, counts, and no personal data."""

from __future__ import annotations

import io

from rich.console import Console

from cdp.activation.v1 import activation_pb2
from cdp.common.v1 import deadletter_pb2 as dl
from cdp_cli import cmd_deadletters as cmd
from cdp_cli import render
from cdp_kit.deadletters import masked_excerpt

RAW = b'{"event_id": "e1", "email": "jane.doe@example.com", "phone": "+33 6 12 34 56 78", "coupon": "X"}'


def reject() -> dl.DeadLetter:
    return dl.DeadLetter(
        consumer="ingest-collect",
        stream="CDP_COLLECT",
        sequence=7,
        subject="cdp.collect.web",
        error_class="Rejected",
        error="coupon: unknown_field: not in the schema",
        excerpt=masked_excerpt(RAW),
        size_bytes=len(RAW),
        state="dead",
    )


def poison() -> dl.DeadLetter:
    return dl.DeadLetter(
        consumer="identity-ingest",
        stream="CDP_INGEST",
        sequence=3,
        subject="cdp.ingest.0.records",
        error_class="DecodeError",
        error="Wire format was corrupt",
        excerpt=masked_excerpt(b"\x00\xffjunk"),
        state="dead",
        redrives=1,
    )


def delivery() -> activation_pb2.DeadLetter:
    return activation_pb2.DeadLetter(
        batch_id="b-1",
        destination="hook",
        plan_id="p-1",
        attempts=1,
        permanent=True,
        reason="HTTP 400: unknown recipient jane.doe@example.com (+33 6 12 34 56 78)",
    )


def letters() -> list[cmd.Letter]:
    return [cmd.kit_letter("ingest", reject()), cmd.kit_letter("identity", poison()), cmd.delivery_letter(delivery())]


def printed(letters: list[cmd.Letter]) -> str:
    buffer = io.StringIO()
    saved = render.out
    render.out = Console(file=buffer, width=250, highlight=False)
    try:
        cmd.print_listing(letters, 100, cmd.counts(letters))
    finally:
        render.out = saved
    return buffer.getvalue()


def test_kinds_where_and_reason_are_told_apart() -> None:
    shown = {x.kind: x for x in letters()}
    assert shown["collect-reject"].where == "dataset web (CDP_COLLECT#7)"
    assert shown["collect-reject"].dataset == "web"
    assert shown["collect-reject"].reason == "coupon: unknown_field: not in the schema"
    assert shown["poison"].where == "identity-ingest CDP_INGEST#3"
    assert shown["poison"].reason == "DecodeError: Wire format was corrupt"
    assert shown["delivery"].where == "hook batch b-1"
    assert shown["delivery"].reason.startswith("HTTP 400")
    assert shown["delivery"].permanent
    # a Rejected error on another service, or on another consumer, is poison, not a reject
    other = dl.DeadLetter(consumer="identity-ingest", error_class="Rejected")
    assert cmd.kit_letter("identity", other).kind == "poison"


def test_the_table_and_counts_carry_no_personal_data() -> None:
    output = printed(letters())
    for secret in ("jane.doe", "example.com", "12 34 56 78", '"X"'):
        assert secret not in output
    assert "<email>" in output
    assert "<phone>" in output
    assert "collect-reject" in output
    assert "per service and kind" in output
    assert cmd.counts(letters()) == {
        "ingest": {"collect-reject": 1},
        "identity": {"poison": 1},
        "activation": {"delivery": 1},
    }
    # the excerpt, shown only in --json, is the masked shape
    assert "jane" not in cmd.kit_letter("ingest", reject()).excerpt


def test_filters_name_kinds_by_their_fields() -> None:
    all_of = letters()
    assert [x.kind for x in all_of if cmd.Filters(dataset="web").keeps(x)] == ["collect-reject"]
    assert [x.kind for x in all_of if cmd.Filters(destination="hook").keeps(x)] == ["delivery"]
    assert [x.kind for x in all_of if cmd.Filters(consumer="identity-ingest").keeps(x)] == ["poison"]
    assert [x.service for x in all_of if cmd.Filters(service="ingest").keeps(x)] == ["ingest"]


def test_a_redrive_by_sequence_needs_its_stream() -> None:
    import pytest

    from cdp_cli.errors import CliError

    with pytest.raises(CliError, match="--sequence needs --consumer"):
        cmd.narrowed(cmd.Filters(), [3], [])
    assert cmd.narrowed(cmd.Filters(), [], ["b-1"]).kind == "delivery"
    assert cmd.named(cmd.kit_letter("identity", poison()), [3], [])
    assert not cmd.named(cmd.delivery_letter(delivery()), [3], [])
