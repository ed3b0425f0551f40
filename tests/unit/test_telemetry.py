"""Logging (structlog JSON), PII hashing and W3C trace context propagation."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from opentelemetry import trace

from cdp_kit.telemetry import (
    configure_logging,
    configure_pii_hash,
    configure_tracing,
    context_from,
    get_logger,
    pii_hash,
    scrub,
    trace_headers,
    tracer,
    value_shape,
)


@pytest.fixture(autouse=True)
def reset_structlog() -> Iterator[None]:
    """configure_logging changes process-wide state: put it back after each test."""
    yield
    structlog.contextvars.clear_contextvars()
    structlog.reset_defaults()


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# ------------------------------------------------------------------ pii_hash


def test_pii_hash_is_stable() -> None:
    assert pii_hash("alice@example.com") == pii_hash("alice@example.com")


def test_pii_hash_differs_for_different_values() -> None:
    assert pii_hash("alice@example.com") != pii_hash("bob@example.com")
    assert pii_hash("alice@example.com") != pii_hash("Alice@example.com")


@pytest.mark.parametrize("value", ["alice@example.com", "+4915112345678", "Zoë Müller", "1970-01-01"])
def test_pii_hash_does_not_contain_the_input(value: str) -> None:
    hashed = pii_hash(value)
    assert value not in hashed
    assert hashed.startswith("k:")
    assert len(hashed) == 2 + 16
    int(hashed[2:], 16)


def test_pii_hash_is_keyed_so_a_dictionary_of_phones_cannot_reverse_it(pii_hash_key: bytes) -> None:
    """The old tag (plain SHA-256) of every phone of a range is one computation away; the keyed
    tag matches none of them, is the HMAC-SHA256 of the deployment's key, and changes with the key."""
    phone = "+4915112345678"
    unkeyed = {"h:" + hashlib.sha256(f"+49151123456{n:02d}".encode()).hexdigest()[:12] for n in range(100)}
    assert pii_hash(phone) not in unkeyed
    assert pii_hash(phone)[2:] not in {tag[2:] for tag in unkeyed}
    assert pii_hash(phone) == "k:" + hmac.new(pii_hash_key, phone.encode(), hashlib.sha256).hexdigest()[:16]
    try:
        configure_pii_hash(b"another deployment's 32-byte key")
        assert pii_hash(phone) != "k:" + hmac.new(pii_hash_key, phone.encode(), hashlib.sha256).hexdigest()[:16]
    finally:
        configure_pii_hash(pii_hash_key)


def test_a_key_shorter_than_32_bytes_is_refused() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        configure_pii_hash(b"short")


def test_value_shape_keeps_the_shape_and_nothing_else() -> None:
    assert value_shape("Ann-Marie 42", 40) == "xxx-xxxxx 99"
    assert value_shape("Zoë", 40) == "xxx"
    assert value_shape("a\u0000b", 40) == "x.x"
    assert value_shape("x" * 50, 40) == "x" * 40 + "…"


# ------------------------------------------------------------------ logging


def test_json_logging_carries_service_and_event(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("demo", "json", "info")

    get_logger("test").info("batch_applied", messages=3, who=pii_hash("alice@example.com"))

    captured = capsys.readouterr()
    assert captured.out == ""
    [line] = json_lines(captured.err)
    assert line["service"] == "demo"
    assert line["event"] == "batch_applied"
    assert line["level"] == "info"
    assert line["messages"] == 3
    assert line["who"] == pii_hash("alice@example.com")
    assert "timestamp" in line


def test_json_logging_filters_below_the_level(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("demo", "json", "warning")
    logger = get_logger("test")

    logger.debug("too_fine")
    logger.info("still_too_fine")
    logger.warning("kept")
    logger.error("kept_too")

    assert [line["event"] for line in json_lines(capsys.readouterr().err)] == ["kept", "kept_too"]


def test_console_logging_is_not_json(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("demo", "console", "info")
    get_logger("test").info("hello_console")
    err = capsys.readouterr().err
    assert "hello_console" in err
    with pytest.raises(json.JSONDecodeError):
        json.loads(err.splitlines()[0])


def test_json_logging_inside_a_span_carries_trace_ids(capsys: pytest.CaptureFixture[str]) -> None:
    configure_tracing("demo")
    configure_logging("demo", "json", "info")

    with tracer("test").start_as_current_span("work") as span:
        get_logger("test").info("in_span")
        ctx = span.get_span_context()

    [line] = json_lines(capsys.readouterr().err)
    assert line["trace_id"] == format(ctx.trace_id, "032x")
    assert line["span_id"] == format(ctx.span_id, "016x")


# ------------------------------------------------------------------ tracing


def test_trace_headers_round_trip_inside_a_span() -> None:
    configure_tracing("demo")

    with tracer("test").start_as_current_span("produce") as span:
        headers = trace_headers()
        produced = span.get_span_context()

    version, trace_id, span_id, flags = headers["traceparent"].split("-")
    assert (version, trace_id, span_id) == ("00", f"{produced.trace_id:032x}", f"{produced.span_id:016x}")
    assert int(flags, 16) & 0x01  # sampled

    received = trace.get_current_span(context_from(headers)).get_span_context()
    assert received.is_valid
    assert received.is_remote
    assert received.trace_id == produced.trace_id
    assert received.span_id == produced.span_id

    with tracer("test").start_as_current_span("consume", context=context_from(headers)) as child:
        assert child.get_span_context().trace_id == produced.trace_id


def test_trace_headers_outside_a_span_are_empty() -> None:
    configure_tracing("demo")
    assert "traceparent" not in trace_headers()


def test_context_from_empty_headers_has_no_span() -> None:
    assert not trace.get_current_span(context_from({})).get_span_context().is_valid


def test_a_log_line_never_carries_an_email_or_a_phone_a_message_quotes(capsys: pytest.CaptureFixture[str]) -> None:
    """Errors quote what a caller sent ("profile 'ann@example.com' not found"): every string value of
    every event is masked, and a huge one is cut, whoever wrote the log call."""
    configure_logging("demo", "json", "info")

    get_logger("test").info(
        "rpc_refused",
        error="profile 'ann.lee@example.com' not found; call +1 415 555 0123",
        huge="x" * 1_000_000,
    )

    [line] = json_lines(capsys.readouterr().err)
    assert line["error"] == "profile '<email>' not found; call <phone>"
    assert len(line["huge"]) < 2_100
    assert line["huge"].endswith("(1000000 chars)")


def test_a_long_value_is_masked_before_it_is_cut(capsys: pytest.CaptureFixture[str]) -> None:
    """An address across the cut would otherwise leave a part of it ("ann.lee@exam...") that no
    pattern knows as an address."""
    configure_logging("demo", "json", "info")
    value = "x " * 995 + "ann.lee@example.com " + "y" * 5_000
    get_logger("test").info("rpc_refused", error=value)
    [line] = json_lines(capsys.readouterr().err)
    assert "ann" not in line["error"]
    assert "example" not in line["error"]
    assert line["error"].endswith(f"({len(value)} chars)")


def test_scrub_keeps_ids_and_short_numbers() -> None:
    assert scrub("sequence 4442 of CDP_PROFILE, batch 9f1c") == "sequence 4442 of CDP_PROFILE, batch 9f1c"


def test_scrub_leaves_hex_ids_whole_but_masks_phones_in_text() -> None:
    # a trace id with a run of 12 digits once came out as 'fdd8...c1ef<phone>f5' in a CI run
    trace_id = "fdd8753fe6a605b60c1ef982636586f5"
    assert scrub(f"trace {trace_id} uuid 0c1e9826-3658-46f5-9826-365860000001") == (
        f"trace {trace_id} uuid 0c1e9826-3658-46f5-9826-365860000001"
    )
    assert scrub("call 0612345678, or (415) 555-0123.") == "call <phone>, or (<phone>."
    assert scrub("phone:+33612345678;") == "phone:<phone>;"
    assert scrub("phone:0612345678") == "phone:<phone>"


@pytest.mark.parametrize(
    "hostile",
    [
        "a" * 1_000_000,  # a letter run with no "@": each start used to rescan the run (hours at 1 MB)
        "a.b" * 300_000,
        "a@" * 300_000,
        "a@b" + ".c" * 400_000 + "@",
        "1" * 1_000_000 + "x",
        "1.1" * 300_000 + "x",
    ],
)
def test_scrub_takes_time_linear_in_the_text(hostile: str) -> None:
    """A caller's 1 MB value quoted in an error must not stall the service that logs it. Growth, not
    speed: the text is scrubbed whole (~100 kB) and a hundredth of it. Linear work grows ~100x; the
    backtracking patterns this replaces grew ~10,000x (~15 s here, ~1,500 s for 1 MB). The bound
    between the two leaves a wide margin for a noisy machine."""
    import time

    def cost(text: str) -> float:
        best = float("inf")
        for _ in range(3):
            start = time.process_time()
            scrub(text)
            best = min(best, time.process_time() - start)
        return max(best, 1e-4)

    whole = hostile[: len(hostile) // 10]
    assert cost(whole) < 1_000 * cost(whole[: len(whole) // 100])


def test_scrub_leaves_times_and_addresses_alone() -> None:
    text = "at 2026-12-02 18:28:39, 2026-12-02T18:28:39.123Z on 127.0.0.1:4222 and nats://10.0.0.12:42221"
    assert scrub(text) == text
