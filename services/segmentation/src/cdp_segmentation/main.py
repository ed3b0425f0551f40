"""Composition root of the segmentation service."""

from __future__ import annotations

from sqlalchemy.engine import Engine

from cdp.segmentation.v1 import segmentation_pb2, segmentation_pb2_grpc
from cdp_kit.envelope import utcnow
from cdp_kit.eventlog import EventLog
from cdp_kit.grpc_server import Registration
from cdp_kit.namespaces import NAMESPACE_TABLES, NamespacesOfIdentity
from cdp_kit.processor import Input, Processor
from cdp_kit.runtime import Service
from cdp_kit.streams import (
    SEGMENTATION_CONFIG,
    SEGMENTATION_MEMBERSHIPS,
    SEGMENTATION_PRIVACY_APPLIED,
    SEGMENTATION_READS_IDENTITY_CONFIG,
    SEGMENTATION_READS_INGEST_CONFIG,
    SEGMENTATION_READS_PRIVACY,
    SEGMENTATION_READS_PROFILE,
)
from cdp_kit.vault import PersonVault
from cdp_segmentation.api import SegmentationServicer
from cdp_segmentation.consumer import DatasetsOfIngest, ProfilesToMemberships
from cdp_segmentation.handlers import SegmentationHandlers
from cdp_segmentation.membership import Catalog
from cdp_segmentation.privacy import PRIVACY_TABLES, PrivacyApplier, PrivacyToSegmentation
from cdp_segmentation.projection import SegmentationProjection
from cdp_segmentation.settings import SegmentationSettings
from cdp_segmentation.store import TABLES


def build_processor(
    engine: Engine,
    eventlog: EventLog,
    *,
    batch_size: int = 256,
    event_cap: int = 5000,
    vault: PersonVault | None = None,
) -> tuple[Processor, Catalog]:
    catalog = Catalog(event_cap)
    catalog.watch(engine)
    # One vault: it opens sealed fragments (segmentation seals nothing), and a privacy request
    # revokes the person's keys in it, so what arrives sealed with them later reads as erased.
    vault = vault if vault is not None else PersonVault.of(eventlog.js)
    privacy = PrivacyToSegmentation(catalog, vault)
    processor = Processor(
        service="segmentation",
        engine=engine,
        eventlog=eventlog,
        tables=[*TABLES, *PRIVACY_TABLES, *NAMESPACE_TABLES],
        own_logs=[SEGMENTATION_CONFIG, SEGMENTATION_MEMBERSHIPS, SEGMENTATION_PRIVACY_APPLIED],
        projection=SegmentationProjection(catalog),
        # Datasets first: a rebuild knows every retention before it replays the events.
        inputs=[
            Input(SEGMENTATION_READS_INGEST_CONFIG, DatasetsOfIngest(catalog)),
            # Identity's namespaces: lookups by identity normalise with their types.
            Input(SEGMENTATION_READS_IDENTITY_CONFIG, NamespacesOfIdentity()),
            Input(SEGMENTATION_READS_PROFILE, ProfilesToMemberships(catalog)),
            # After the profiles: a rebuild erases a person once their fragments are replayed.
            Input(SEGMENTATION_READS_PRIVACY, privacy),
        ],
        batch_size=batch_size,
        vault=vault,
    )
    return processor, catalog


# What a standby answers from its store (docs/operations.md, "Active/standby"): personalisation
# lookups and the other reads, so standbys scale lookups out.
REPLICA_READS = frozenset({"GetProfile", "GetSegment", "ListSegments", "ListMembers", "GetStats"})


def build(
    settings: SegmentationSettings, engine: Engine, eventlog: EventLog, vault: PersonVault | None = None
) -> Service:
    processor, catalog = build_processor(
        engine, eventlog, batch_size=settings.batch_size, event_cap=settings.event_cap, vault=vault
    )
    privacy = processor.inputs[-1].handler
    assert isinstance(privacy, PrivacyToSegmentation)
    applier = PrivacyApplier(processor, catalog, privacy)
    handlers = SegmentationHandlers(processor, catalog, clock_interval_s=settings.clock_interval_s, wall_clock=utcnow)
    name = segmentation_pb2.DESCRIPTOR.services_by_name["SegmentationService"].full_name
    servicer = SegmentationServicer(handlers, phone_region=settings.default_phone_region)
    registration = Registration(
        name,
        segmentation_pb2_grpc.add_SegmentationServiceServicer_to_server,
        servicer,
        replica_reads=REPLICA_READS,
    )
    return Service(
        processor,
        [registration],
        background=[handlers.backfill_loop, handlers.clock_loop, applier.loop],
        closers=[servicer.profiles.close],  # GetProfile's reader threads and their connections
    )
