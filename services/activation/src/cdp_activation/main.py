"""Composition root of the activation service."""

from __future__ import annotations

from sqlalchemy.engine import Engine

from cdp.activation.v1 import activation_pb2, activation_pb2_grpc
from cdp_activation.api import ActivationServicer
from cdp_activation.consumer import MembershipsObserver, ProfilesObserver, SegmentsObserver
from cdp_activation.delivery import Deliverer
from cdp_activation.handlers import ActivationHandlers
from cdp_activation.projection import ActivationProjection
from cdp_activation.settings import ActivationSettings
from cdp_activation.store import TABLES
from cdp_kit.eventlog import EventLog
from cdp_kit.grpc_server import Registration
from cdp_kit.processor import Input, Processor
from cdp_kit.runtime import Service
from cdp_kit.streams import (
    ACTIVATION_CONFIG,
    ACTIVATION_DELIVERIES,
    ACTIVATION_READS_AUDIENCE,
    ACTIVATION_READS_PROFILE,
    ACTIVATION_READS_SEGMENTS,
)


def build(settings: ActivationSettings, engine: Engine, eventlog: EventLog) -> Service:
    processor = Processor(
        service="activation",
        engine=engine,
        eventlog=eventlog,
        tables=TABLES,
        own_logs=[ACTIVATION_CONFIG, ACTIVATION_DELIVERIES],
        projection=ActivationProjection(),
        inputs=[
            Input(ACTIVATION_READS_SEGMENTS, SegmentsObserver()),
            Input(ACTIVATION_READS_PROFILE, ProfilesObserver()),
            Input(ACTIVATION_READS_AUDIENCE, MembershipsObserver()),
        ],
        batch_size=settings.batch_size,
    )
    handlers = ActivationHandlers(processor, settings)
    deliverer = Deliverer(processor, settings)
    name = activation_pb2.DESCRIPTOR.services_by_name["ActivationService"].full_name
    registration = Registration(
        name, activation_pb2_grpc.add_ActivationServiceServicer_to_server, ActivationServicer(handlers)
    )
    return Service(processor, [registration], background=[deliverer.run])
