"""Every stream, subject and durable consumer of the platform, declared once.

Subjects carry the key a future partitioning needs: ``cdp.<area>.<partition>.<kind>``.
Each service writes its own subjects (single writer per subject), so appends are
guarded with ``Nats-Expected-Last-Subject-Sequence``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Literal

ServiceName = Literal["ingest", "identity", "segmentation", "activation"]
SERVICES: tuple[ServiceName, ...] = ("ingest", "identity", "segmentation", "activation")


DAY_S = 86_400.0
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNIT_S = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": DAY_S}


@dataclass(frozen=True)
class StreamSpec:
    name: str
    subjects: tuple[str, ...]
    description: str
    # Seconds JetStream keeps publish ids for Nats-Msg-Id dedupe (consumers dedupe for all time).
    duplicate_window_s: float = 120.0
    # Retention (JetStream max_age): messages older than this are removed; 0 keeps them for ever.
    # Overridden per deployment by CDP_STREAM_MAX_AGE (see ``parse_max_ages``); docs/operations.md
    # says what each service does when its input's history ages out.
    max_age_s: float = 0.0


CONFIG = StreamSpec("CDP_CONFIG", ("cdp.config.>",), "schemas, datasets, namespaces, segments, destinations")
# Publishers' raw JSON (plain personal data, not encrypted): ingest consumes it within seconds,
# so it is kept one day, and a privacy delete erases the person's messages before that.
COLLECT = StreamSpec("CDP_COLLECT", ("cdp.collect.>",), "raw online events from publishers", max_age_s=DAY_S)
INGEST = StreamSpec("CDP_INGEST", ("cdp.ingest.>",), "validated records and events")
PROFILE = StreamSpec("CDP_PROFILE", ("cdp.profile.>",), "profile fragments, merges, splits")
AUDIENCE = StreamSpec("CDP_AUDIENCE", ("cdp.audience.>",), "membership changes")
DELIVERY = StreamSpec("CDP_DELIVERY", ("cdp.delivery.>",), "delivery outcomes")
DEADLETTER = StreamSpec(
    "CDP_DEADLETTER", ("cdp.deadletter.>",), "invalid input and failed deliveries", max_age_s=30 * DAY_S
)
PRIVACY = StreamSpec("CDP_PRIVACY", ("cdp.privacy.>",), "privacy requests and each service's progress")

ALL_STREAMS: tuple[StreamSpec, ...] = (CONFIG, COLLECT, INGEST, PROFILE, AUDIENCE, DELIVERY, DEADLETTER, PRIVACY)

# The per-identity keys of crypto-shredding: a KV bucket (cdp_kit.vault), its stream and subjects.
KEY_BUCKET = "CDP_KEYS"
KEY_STREAM = f"KV_{KEY_BUCKET}"
KEY_SUBJECT_PREFIX = f"$KV.{KEY_BUCKET}."
# Not in ALL_STREAMS (provisioning makes it with its own configuration: cdp_kit.vault); every
# service checks at start that it exists.
KEYS = StreamSpec(KEY_STREAM, (f"{KEY_SUBJECT_PREFIX}>",), "per-identity keys of personal data")

# Which instance of each service is active (cdp_kit.lease): a KV bucket, one key per service.
# Made by provisioning beside the key bucket; a service checks it exists when it runs under a lease.
LEASE_BUCKET = "CDP_LEASES"
LEASE_STREAM = f"KV_{LEASE_BUCKET}"
LEASE_SUBJECT_PREFIX = f"$KV.{LEASE_BUCKET}."
LEASES = StreamSpec(LEASE_STREAM, (f"{LEASE_SUBJECT_PREFIX}>",), "which instance of each service is active")


@dataclass(frozen=True)
class OwnLog:
    """A subject one service alone writes, and folds back into its store."""

    name: str
    stream: StreamSpec
    subject: str


@dataclass(frozen=True)
class ConsumerSpec:
    """A durable pull consumer: one service reading another's facts."""

    name: str
    stream: StreamSpec
    filter_subject: str


def config_log(service: ServiceName) -> OwnLog:
    return OwnLog(f"{service}-config", CONFIG, f"cdp.config.{service}")


def poison_log(service: str) -> OwnLog:
    """Where a service records the input messages it set aside (see ``cdp_kit.deadletters``)."""
    return OwnLog(f"{service}-poison", DEADLETTER, f"cdp.deadletter.{service}.poison")


def config_input(reader: ServiceName, writer: ServiceName) -> ConsumerSpec:
    return ConsumerSpec(f"{reader}-config-{writer}", CONFIG, f"cdp.config.{writer}")


PARTITION = "0"

INGEST_CONFIG = config_log("ingest")
INGEST_RECORDS = OwnLog("ingest-records", INGEST, f"cdp.ingest.{PARTITION}.records")
# Rejected batch rows and invalid collected events; read by no other service (raw values stay in ingest).
INGEST_DEADLETTER = OwnLog("ingest-deadletter", DEADLETTER, "cdp.deadletter.ingest")
IDENTITY_CONFIG = config_log("identity")
IDENTITY_FRAGMENTS = OwnLog("identity-fragments", PROFILE, f"cdp.profile.{PARTITION}.fragments")
SEGMENTATION_CONFIG = config_log("segmentation")
SEGMENTATION_MEMBERSHIPS = OwnLog("segmentation-memberships", AUDIENCE, f"cdp.audience.{PARTITION}.memberships")
ACTIVATION_CONFIG = config_log("activation")
ACTIVATION_DELIVERIES = OwnLog("activation-deliveries", DELIVERY, f"cdp.delivery.{PARTITION}.outcomes")

# Privacy (cdp.privacy.v1): identity records each request (it alone resolves an identity to the
# whole person); every other service applies it to its store and records that it did; identity
# reads those acknowledgements to complete the request (and only then destroys the person's keys).
PRIVACY_REQUESTS = OwnLog("privacy-requests", PRIVACY, "cdp.privacy.requests")


def privacy_applied_log(service: ServiceName) -> OwnLog:
    return OwnLog(f"privacy-applied-{service}", PRIVACY, f"cdp.privacy.applied.{service}")


def privacy_requests_input(reader: ServiceName) -> ConsumerSpec:
    return ConsumerSpec(f"{reader}-privacy-requests", PRIVACY, PRIVACY_REQUESTS.subject)


IDENTITY_READS_PRIVACY_APPLIED = ConsumerSpec("identity-privacy-applied", PRIVACY, "cdp.privacy.applied.>")
INGEST_PRIVACY_APPLIED = privacy_applied_log("ingest")
INGEST_READS_PRIVACY = privacy_requests_input("ingest")
SEGMENTATION_PRIVACY_APPLIED = privacy_applied_log("segmentation")
SEGMENTATION_READS_PRIVACY = privacy_requests_input("segmentation")

INGEST_READS_COLLECT = ConsumerSpec("ingest-collect", COLLECT, "cdp.collect.>")
IDENTITY_READS_INGEST = ConsumerSpec("identity-ingest", INGEST, "cdp.ingest.>")
SEGMENTATION_READS_PROFILE = ConsumerSpec("segmentation-profile", PROFILE, "cdp.profile.>")
ACTIVATION_READS_PROFILE = ConsumerSpec("activation-profile", PROFILE, "cdp.profile.>")
ACTIVATION_READS_AUDIENCE = ConsumerSpec("activation-audience", AUDIENCE, "cdp.audience.>")
ACTIVATION_READS_SEGMENTS = config_input("activation", "segmentation")
ACTIVATION_READS_PRIVACY = privacy_requests_input("activation")
SEGMENTATION_READS_INGEST_CONFIG = config_input("segmentation", "ingest")
# Identity's custom namespaces (cdp_kit.namespaces): ingest checks rows' identity values and
# segmentation normalises lookups by identity with their types.
INGEST_READS_IDENTITY_CONFIG = config_input("ingest", "identity")
SEGMENTATION_READS_IDENTITY_CONFIG = config_input("segmentation", "identity")


def collect_subject(dataset: str) -> str:
    return f"cdp.collect.{dataset}"


@dataclass(frozen=True)
class ServiceLogs:
    """What one service writes (its own logs, dead letters included) and reads (its inputs).

    The services' composition roots use exactly these (a unit test holds them to it), and
    ``cdp_kit.natsauth`` derives each service's NATS permissions from them."""

    own_logs: tuple[OwnLog, ...]
    inputs: tuple[ConsumerSpec, ...]
    # Streams whose messages the service may erase by sequence (JetStream's secure erase): ingest
    # erases an erased person's raw messages on CDP_COLLECT. Nothing else deletes from a stream.
    erases: tuple[StreamSpec, ...] = ()


SERVICE_LOGS: dict[str, ServiceLogs] = {
    "ingest": ServiceLogs(
        (INGEST_CONFIG, INGEST_RECORDS, INGEST_DEADLETTER, INGEST_PRIVACY_APPLIED, poison_log("ingest")),
        (INGEST_READS_IDENTITY_CONFIG, INGEST_READS_COLLECT, INGEST_READS_PRIVACY),
        erases=(COLLECT,),
    ),
    "identity": ServiceLogs(
        (IDENTITY_CONFIG, IDENTITY_FRAGMENTS, PRIVACY_REQUESTS, poison_log("identity")),
        (IDENTITY_READS_INGEST, IDENTITY_READS_PRIVACY_APPLIED),
    ),
    "segmentation": ServiceLogs(
        (SEGMENTATION_CONFIG, SEGMENTATION_MEMBERSHIPS, SEGMENTATION_PRIVACY_APPLIED, poison_log("segmentation")),
        (
            SEGMENTATION_READS_INGEST_CONFIG,
            SEGMENTATION_READS_IDENTITY_CONFIG,
            SEGMENTATION_READS_PROFILE,
            SEGMENTATION_READS_PRIVACY,
        ),
    ),
    "activation": ServiceLogs(
        (ACTIVATION_CONFIG, ACTIVATION_DELIVERIES, privacy_applied_log("activation"), poison_log("activation")),
        (ACTIVATION_READS_SEGMENTS, ACTIVATION_READS_PROFILE, ACTIVATION_READS_AUDIENCE, ACTIVATION_READS_PRIVACY),
    ),
}


def parse_duration_s(text: str) -> float:
    """``"90"``, ``"90s"``, ``"15m"``, ``"24h"``, ``"30d"`` in seconds (``"0"``: for ever)."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a duration (a number with s, m, h or d, e.g. 24h; 0 keeps for ever)")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


def parse_max_ages(text: str) -> dict[str, float]:
    """``CDP_STREAM_MAX_AGE``: ``"CDP_COLLECT=6h,CDP_DELIVERY=400d"``, stream name = duration, comma-separated."""
    names = {spec.name for spec in ALL_STREAMS}
    ages: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, duration = item.partition("=")
        name = name.strip().upper()
        if not sep or name not in names:
            raise ValueError(f"{item!r}: expected STREAM=duration with STREAM one of {', '.join(sorted(names))}")
        ages[name] = parse_duration_s(duration)
    return ages


def with_max_ages(specs: tuple[StreamSpec, ...], ages: dict[str, float]) -> tuple[StreamSpec, ...]:
    """The streams with the deployment's retention overrides applied."""
    return tuple(replace(spec, max_age_s=ages[spec.name]) if spec.name in ages else spec for spec in specs)


def privacy_appliers() -> tuple[str, ...]:
    """The services that apply privacy requests and say so (those with a ``privacy_applied_log``),
    in ``SERVICES`` order: a request completes once every one of them has applied it."""
    return tuple(
        service
        for service in SERVICES
        if any(own.subject == privacy_applied_log(service).subject for own in SERVICE_LOGS[service].own_logs)
    )
