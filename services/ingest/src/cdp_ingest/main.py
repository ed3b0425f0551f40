"""Composition root of the ingest service."""

from __future__ import annotations

from sqlalchemy.engine import Engine

from cdp.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from cdp_ingest import store
from cdp_ingest.api import IngestServicer
from cdp_ingest.config import ConfigCache
from cdp_ingest.consumer import CollectHandler
from cdp_ingest.handlers import IngestHandlers
from cdp_ingest.privacy import PRIVACY_TABLES, PrivacyApplier, PrivacyToIngest
from cdp_ingest.projection import IngestProjection
from cdp_ingest.settings import IngestSettings
from cdp_ingest.store import TABLES
from cdp_kit.eventlog import EventLog
from cdp_kit.grpc_server import Registration
from cdp_kit.namespaces import NAMESPACE_TABLES, NamespacesOfIdentity
from cdp_kit.processor import Input, Processor
from cdp_kit.runtime import Service
from cdp_kit.streams import (
    INGEST_CONFIG,
    INGEST_DEADLETTER,
    INGEST_PRIVACY_APPLIED,
    INGEST_READS_COLLECT,
    INGEST_READS_IDENTITY_CONFIG,
    INGEST_READS_PRIVACY,
    INGEST_RECORDS,
)
from cdp_kit.vault import PersonVault


def build(settings: IngestSettings, engine: Engine, eventlog: EventLog, vault: PersonVault | None = None) -> Service:
    config = ConfigCache(settings)
    store.DEDUPE.days = settings.event_dedupe_horizon_days
    vault = vault if vault is not None else PersonVault.of(eventlog.js, seal=settings.seal_personal_data)
    privacy = PrivacyToIngest(vault, phone_region=settings.default_phone_region)
    processor = Processor(
        service="ingest",
        engine=engine,
        eventlog=eventlog,
        tables=[*TABLES, *PRIVACY_TABLES, *NAMESPACE_TABLES],
        own_logs=[INGEST_CONFIG, INGEST_RECORDS, INGEST_DEADLETTER, INGEST_PRIVACY_APPLIED],
        projection=IngestProjection(config),
        # Identity's namespaces first: a rebuild knows every namespace's type before it replays events.
        inputs=[
            Input(INGEST_READS_IDENTITY_CONFIG, NamespacesOfIdentity(on_change=config.clear)),
            Input(
                INGEST_READS_COLLECT,
                CollectHandler(
                    config,
                    settings.limits(),
                    vault if settings.seal_personal_data else None,
                    phone_region=settings.default_phone_region,
                ),
                raw=True,
            ),
            # After collect: a rebuild indexes the collect messages before it reads the requests.
            Input(INGEST_READS_PRIVACY, privacy),
        ],
        batch_size=settings.batch_size,
        vault=vault,
    )
    applier = PrivacyApplier(processor, privacy)
    handlers = IngestHandlers(processor, settings, config)
    servicer = IngestServicer(handlers)
    name = ingest_pb2.DESCRIPTOR.services_by_name["IngestService"].full_name
    registrations = [Registration(name, ingest_pb2_grpc.add_IngestServiceServicer_to_server, servicer)]
    return Service(processor, registrations, background=[handlers.keep_readers, applier.loop])
