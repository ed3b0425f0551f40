"""Composition root of the activation service."""

from __future__ import annotations

from sqlalchemy.engine import Engine

from cdp.activation.v1 import activation_pb2, activation_pb2_grpc
from cdp_activation.api import ActivationServicer
from cdp_activation.changes import Changes
from cdp_activation.consumer import MembershipsObserver, ProfilesObserver, SegmentsObserver
from cdp_activation.delivery import Deliverer
from cdp_activation.handlers import ActivationHandlers
from cdp_activation.privacy import ACTIVATION_PRIVACY_APPLIED, PrivacyAcks, PrivacyHandler
from cdp_activation.projection import ActivationProjection
from cdp_activation.settings import ActivationSettings
from cdp_activation.store import TABLES
from cdp_kit.eventlog import EventLog
from cdp_kit.grpc_server import Registration
from cdp_kit.keyring import KeyFile, ensure_key_file
from cdp_kit.processor import Input, Processor
from cdp_kit.runtime import Service
from cdp_kit.streams import (
    ACTIVATION_CONFIG,
    ACTIVATION_DELIVERIES,
    ACTIVATION_READS_AUDIENCE,
    ACTIVATION_READS_PRIVACY,
    ACTIVATION_READS_PROFILE,
    ACTIVATION_READS_SEGMENTS,
)
from cdp_kit.telemetry import get_logger
from cdp_kit.vault import PersonVault

log = get_logger(__name__)


def build(settings: ActivationSettings, engine: Engine, eventlog: EventLog, keys: KeyFile | None = None) -> Service:
    keys = keys or master_keys(settings)
    vault = PersonVault.of(eventlog.js, seal=settings.seal_personal_data)
    changes = Changes()  # what the folds changed, for the planner's next round
    processor = Processor(
        service="activation",
        engine=engine,
        eventlog=eventlog,
        tables=TABLES,
        own_logs=[ACTIVATION_CONFIG, ACTIVATION_DELIVERIES, ACTIVATION_PRIVACY_APPLIED],
        projection=ActivationProjection(keys, changes),
        inputs=[
            Input(ACTIVATION_READS_SEGMENTS, SegmentsObserver(changes)),
            Input(ACTIVATION_READS_PROFILE, ProfilesObserver(changes)),
            Input(ACTIVATION_READS_AUDIENCE, MembershipsObserver(changes)),
            # Last: a rebuild replays profiles and memberships before it erases them again.
            Input(ACTIVATION_READS_PRIVACY, PrivacyHandler(vault)),
        ],
        batch_size=settings.batch_size,
        vault=vault,  # opens sealed fragments, seals prepared batches; a privacy request revokes in it
    )
    handlers = ActivationHandlers(processor, settings, keys)
    deliverer = Deliverer(processor, settings, keys, changes)
    name = activation_pb2.DESCRIPTOR.services_by_name["ActivationService"].full_name
    registration = Registration(
        name, activation_pb2_grpc.add_ActivationServiceServicer_to_server, ActivationServicer(handlers)
    )
    acks = PrivacyAcks(processor, settings.delivery_interval_s, settings.removal_key_days * 86400.0)
    return Service(processor, [registration], background=[deliverer.run, acks.run])


def master_keys(settings: ActivationSettings) -> KeyFile:
    """The master key file: CDP_MASTER_KEY_FILE (must exist), or ``<data_dir>/secrets/master.key``,
    made (0600) on first start when that variable is unset."""
    path = settings.resolved_master_key_file()
    if settings.master_key_file is None and ensure_key_file(path):
        log.warning("master_key_created", path=str(path), hint="back it up: secrets cannot be decrypted without it")
    return KeyFile(path)
