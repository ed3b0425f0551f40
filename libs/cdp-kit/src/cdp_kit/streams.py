"""Every stream, subject and durable consumer of the platform, declared once.

Subjects carry the key a future partitioning needs: ``cdp.<area>.<partition>.<kind>``.
Each service writes its own subjects (single writer per subject), so appends are
guarded with ``Nats-Expected-Last-Subject-Sequence``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ServiceName = Literal["ingest", "identity", "segmentation", "activation"]
SERVICES: tuple[ServiceName, ...] = ("ingest", "identity", "segmentation", "activation")


@dataclass(frozen=True)
class StreamSpec:
    name: str
    subjects: tuple[str, ...]
    description: str
    # Seconds JetStream keeps publish ids for Nats-Msg-Id dedupe (consumers dedupe for all time).
    duplicate_window_s: float = 120.0


CONFIG = StreamSpec("CDP_CONFIG", ("cdp.config.>",), "schemas, datasets, namespaces, segments, destinations")
COLLECT = StreamSpec("CDP_COLLECT", ("cdp.collect.>",), "raw online events from publishers")
INGEST = StreamSpec("CDP_INGEST", ("cdp.ingest.>",), "validated records and events")
PROFILE = StreamSpec("CDP_PROFILE", ("cdp.profile.>",), "profile fragments, merges, splits")
AUDIENCE = StreamSpec("CDP_AUDIENCE", ("cdp.audience.>",), "membership changes")
DELIVERY = StreamSpec("CDP_DELIVERY", ("cdp.delivery.>",), "delivery outcomes")
DEADLETTER = StreamSpec("CDP_DEADLETTER", ("cdp.deadletter.>",), "invalid input and failed deliveries")
PRIVACY = StreamSpec("CDP_PRIVACY", ("cdp.privacy.>",), "privacy requests and each service's progress")

ALL_STREAMS: tuple[StreamSpec, ...] = (CONFIG, COLLECT, INGEST, PROFILE, AUDIENCE, DELIVERY, DEADLETTER, PRIVACY)

# The per-identity keys of crypto-shredding: a KV bucket (cdp_kit.vault), its stream and subjects.
KEY_BUCKET = "CDP_KEYS"
KEY_STREAM = f"KV_{KEY_BUCKET}"
KEY_SUBJECT_PREFIX = f"$KV.{KEY_BUCKET}."
# Not in ALL_STREAMS (provisioning makes it with its own configuration: cdp_kit.vault); every
# service checks at start that it exists.
KEYS = StreamSpec(KEY_STREAM, (f"{KEY_SUBJECT_PREFIX}>",), "per-identity keys of personal data")


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

INGEST_READS_COLLECT = ConsumerSpec("ingest-collect", COLLECT, "cdp.collect.>")
IDENTITY_READS_INGEST = ConsumerSpec("identity-ingest", INGEST, "cdp.ingest.>")
SEGMENTATION_READS_PROFILE = ConsumerSpec("segmentation-profile", PROFILE, "cdp.profile.>")
ACTIVATION_READS_PROFILE = ConsumerSpec("activation-profile", PROFILE, "cdp.profile.>")
ACTIVATION_READS_AUDIENCE = ConsumerSpec("activation-audience", AUDIENCE, "cdp.audience.>")
ACTIVATION_READS_SEGMENTS = config_input("activation", "segmentation")
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


SERVICE_LOGS: dict[str, ServiceLogs] = {
    "ingest": ServiceLogs(
        (INGEST_CONFIG, INGEST_RECORDS, INGEST_DEADLETTER, poison_log("ingest")),
        (INGEST_READS_IDENTITY_CONFIG, INGEST_READS_COLLECT),
    ),
    "identity": ServiceLogs(
        (IDENTITY_CONFIG, IDENTITY_FRAGMENTS, poison_log("identity")),
        (IDENTITY_READS_INGEST,),
    ),
    "segmentation": ServiceLogs(
        (SEGMENTATION_CONFIG, SEGMENTATION_MEMBERSHIPS, poison_log("segmentation")),
        (SEGMENTATION_READS_INGEST_CONFIG, SEGMENTATION_READS_IDENTITY_CONFIG, SEGMENTATION_READS_PROFILE),
    ),
    "activation": ServiceLogs(
        (ACTIVATION_CONFIG, ACTIVATION_DELIVERIES, poison_log("activation")),
        (ACTIVATION_READS_SEGMENTS, ACTIVATION_READS_PROFILE, ACTIVATION_READS_AUDIENCE),
    ),
}
