"""Logging (structlog, JSON or console) and tracing (OpenTelemetry) set up once per process.

Trace context travels in NATS headers and gRPC metadata as W3C ``traceparent``.
Log events carry ids and keyed hashes (``pii_hash``), never raw emails, phones or names.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any

import structlog
from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.propagate import extract, inject
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor

from cdp_kit.settings import LogFormat, LogLevel, TraceExporter
from cdp_kit.urlmask import mask_url_credentials

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


# Text shaped like an email address or a phone number (9+ digits, with the usual separators). A
# phone stands on its own: digits inside a word (a hex trace id, a hash, a uuid), an address and
# port, or a date followed by its time are not one. Both run in time linear in the text: a match
# starts only where a run of its characters starts (without the look-behind, a 1 MB run of letters
# with no "@" costs a scan per start, hours in all), and no part of either can match two ways.
EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
PHONE = re.compile(r"(?<![\w./-])\+?\d(?:[\s().-]{0,2}\d){8,}(?![\w:]|\.\d)")
# Log keys whose values the platform itself writes as ids: never masked.
_OWN_ID_KEYS = frozenset({"trace_id", "span_id"})
# A log value longer than this is cut: a caller's 1 MB id must not become a 1 MB log line.
MAX_LOG_VALUE_CHARS = 2000


def scrub(text: str) -> str:
    """Mask anything shaped like an email or a phone in free text (an error that quotes a caller's
    input, what a destination answered), and credentials inside URLs: logs and dead letters keep
    ids and hashes, never these."""
    return PHONE.sub("<phone>", EMAIL.sub("<email>", mask_url_credentials(text)))


def _scrub_strings(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Every string value of every log event, masked and bounded: whatever a message quotes."""
    for key, value in event.items():
        if isinstance(value, str) and key not in _OWN_ID_KEYS:
            # masked before it is cut: a cut through an address would leave a part no pattern knows
            masked = scrub(value)
            if len(masked) > MAX_LOG_VALUE_CHARS:
                masked = masked[:MAX_LOG_VALUE_CHARS] + f"... ({len(value)} chars)"
            event[key] = masked
    return event


def _add_trace_ids(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        event["trace_id"] = format(ctx.trace_id, "032x")
        event["span_id"] = format(ctx.span_id, "016x")
    return event


def configure_logging(service: str, fmt: LogFormat = "json", level: LogLevel = "info") -> None:
    renderer: Any = structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _add_trace_ids,
            structlog.processors.format_exc_info,
            _scrub_strings,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.bind_contextvars(service=service)


def configure_tracing(service: str, exporter: TraceExporter = "none") -> TracerProvider:
    """Tracer and meter providers for the process (the exporter setting covers both)."""
    resource = Resource.create({"service.name": f"cdp-{service}"})
    provider = TracerProvider(resource=resource)
    readers = []
    if exporter == "console":
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter(out=sys.stderr)))
        readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter(out=sys.stderr), 60_000))
    trace.set_tracer_provider(provider)
    metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=readers))
    return provider


def meter(name: str) -> metrics.Meter:
    return metrics.get_meter(name)


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def trace_headers() -> dict[str, str]:
    """The current trace context as headers (NATS) or metadata (gRPC)."""
    carrier: dict[str, str] = {}
    inject(carrier)
    return carrier


def context_from(carrier: Mapping[str, str]) -> otel_context.Context:
    return extract(dict(carrier))


# A keyed tag is "k:" and 16 hex digits (64 bits of HMAC-SHA256). It is a display and log tag:
# nothing joins or links on it (identity links on normalised values), so it only has to tell an
# operator whether two rejects or log lines hold the same value. 64 bits keep a collision unlikely
# below billions of distinct values (birthday bound ~2^32) where 48 bits (12 hex) met one at
# ~16 million; the length does nothing against guessing: without the key no guess can be checked.
# The old unkeyed tags were "h:" and 12 hex digits of plain SHA-256, so either kind is recognisable.
PII_HASH_PREFIX = "k:"
PII_HASH_HEX_DIGITS = 16


class _PiiKey:
    """The process's PII hash key, set once by the composition root (``configure_pii_hash``)."""

    key: bytes | None = None


def configure_pii_hash(key: bytes) -> None:
    """Key ``pii_hash`` for this process with the deployment's secret (see ``cdp_kit.piikey``)."""
    if len(key) < 32:
        raise ValueError("a PII hash key has at least 32 bytes")
    _PiiKey.key = key


def pii_hash_key() -> bytes:
    """The key ``pii_hash`` uses, for a worker process of the same service (never logged)."""
    key = _PiiKey.key
    if key is None:
        raise RuntimeError("no PII hash key configured in this process")
    return key


def pii_hash(value: str) -> str:
    """A short, stable stand-in for a PII value in logs, reports and error messages: HMAC-SHA256
    with the deployment's key, so no one without the key can test a guess (a phone number) against it.
    """
    key = _PiiKey.key
    if key is None:
        raise RuntimeError("pii_hash used before configure_pii_hash: the process has no PII hash key")
    return PII_HASH_PREFIX + hmac.new(key, value.encode(), hashlib.sha256).hexdigest()[:PII_HASH_HEX_DIGITS]


def value_shape(text: str, limit: int) -> str:
    """A value's shape without its content: letters x, digits 9, other printable ASCII kept,
    anything else a dot; at most ``limit`` characters ("…" marks a cut). "Ann-Marie 42" is
    "xxx-xxxxx 99": enough to see a value is a word, a date or blank, nothing of whose it is."""
    shape = "".join(_shape_of(c) for c in text[:limit])
    return shape + ("…" if len(text) > limit else "")


def _shape_of(c: str) -> str:
    if c.isalpha():
        return "x"
    if c.isdigit():
        return "9"
    return c if c.isascii() and c.isprintable() else "."


def get_logger(name: str | None = None) -> Any:
    return structlog.get_logger(name)
