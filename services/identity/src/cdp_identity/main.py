"""Composition root of the identity service."""

from __future__ import annotations

from sqlalchemy.engine import Engine

from cdp.identity.v1 import identity_pb2, identity_pb2_grpc
from cdp_identity.api import IdentityServicer
from cdp_identity.consumer import RecordsToFragments
from cdp_identity.handlers import IdentityHandlers
from cdp_identity.projection import IdentityProjection
from cdp_identity.settings import IdentitySettings
from cdp_identity.store import TABLES
from cdp_kit.eventlog import EventLog
from cdp_kit.grpc_server import Registration
from cdp_kit.processor import Input, Processor
from cdp_kit.runtime import Service
from cdp_kit.streams import IDENTITY_CONFIG, IDENTITY_FRAGMENTS, IDENTITY_READS_INGEST


def build_processor(
    settings: IdentitySettings, engine: Engine, eventlog: EventLog
) -> tuple[Processor, IdentityProjection]:
    projection = IdentityProjection(settings.rules())
    processor = Processor(
        service="identity",
        engine=engine,
        eventlog=eventlog,
        tables=TABLES,
        own_logs=[IDENTITY_CONFIG, IDENTITY_FRAGMENTS],
        projection=projection,
        inputs=[Input(IDENTITY_READS_INGEST, RecordsToFragments(projection))],
        batch_size=settings.batch_size,
    )
    return processor, projection


def build(settings: IdentitySettings, engine: Engine, eventlog: EventLog) -> Service:
    processor, projection = build_processor(settings, engine, eventlog)
    name = identity_pb2.DESCRIPTOR.services_by_name["IdentityService"].full_name
    servicer = IdentityServicer(IdentityHandlers(processor, projection))
    return Service(processor, [Registration(name, identity_pb2_grpc.add_IdentityServiceServicer_to_server, servicer)])
