"""Activation use cases: destinations and activation plans."""

from __future__ import annotations

from google.protobuf import json_format

from cdp.activation.v1 import activation_pb2 as pb
from cdp.activation.v1 import events_pb2 as ev
from cdp_activation import store
from cdp_activation.connectors import connector_for
from cdp_activation.settings import ActivationSettings
from cdp_kit.envelope import Cause, deterministic_id, make_envelope, utcnow
from cdp_kit.errors import AlreadyExists, InvalidInput, NotFound, Violation
from cdp_kit.processor import Processor, UnitOfWork
from cdp_kit.streams import ACTIVATION_CONFIG

ACTIONS = ("email_marketing", "sms_marketing", "ad_targeting", "data_sharing")
SECRET_KEYS = ("secret", "token", "password", "api_key", "key")


def masked(dest: pb.Destination) -> pb.Destination:
    """Credentials never leave the service: every answer masks them."""
    out = pb.Destination()
    out.CopyFrom(dest)
    for key in list(out.config.fields):
        if any(word in key.lower() for word in SECRET_KEYS):
            out.config[key] = "****"
    return out


class ActivationHandlers:
    def __init__(self, processor: Processor, settings: ActivationSettings) -> None:
        self.processor = processor
        self.settings = settings

    async def create_destination(self, dest: pb.Destination) -> pb.Destination:
        problems: list[Violation] = []
        if not dest.name:
            problems.append(Violation("name", "required", "a destination has a name"))
        if dest.marketing_action not in ACTIONS:
            problems.append(Violation("marketing_action", "enum", f"one of {', '.join(ACTIONS)}"))
        connector = connector_for(dest.connector, self.settings.resolved_export_dir())
        problems += connector.validate(json_format.MessageToDict(dest.config))
        if problems:
            raise InvalidInput(f"destination {dest.name!r} is invalid", problems)
        new = pb.Destination()
        new.CopyFrom(dest)
        new.id = deterministic_id("destination", dest.name)

        def decide(uow: UnitOfWork) -> None:
            if store.destination_by_key(uow.session, dest.name) is not None:
                raise AlreadyExists(f"destination {dest.name!r} exists")
            env = make_envelope(
                ev.DestinationCreated(destination=new),
                event_id=deterministic_id("destination-created", new.id),
                subject_key=new.id,
                occurred_at=utcnow(),
                cause=Cause(command_id=new.id),
            )
            uow.emit(ACTIVATION_CONFIG, [env])

        await self.processor.execute(f"destination:{new.id}", decide)
        return masked(new)

    async def activate(self, request: pb.ActivateRequest) -> pb.ActivationPlan:
        schedule = request.schedule or "streaming"
        if schedule != "streaming":
            raise InvalidInput("unsupported schedule", [Violation("schedule", "supported", "streaming")])

        def decide(uow: UnitOfWork) -> pb.ActivationPlan:
            dest = store.destination_by_key(uow.session, request.destination)
            if dest is None:
                raise NotFound(f"destination {request.destination!r} not found")
            segment = store.segment_by_key(uow.session, request.segment)
            if segment is None:
                raise NotFound(f"segment {request.segment!r} not known to activation (yet)")
            plan = pb.ActivationPlan(
                id=deterministic_id("plan", dest.id, segment.id),
                destination=dest.id,
                segment=segment.id,
                attributes=list(request.attributes),
                identities=list(request.identities),
                schedule=schedule,
            )
            if uow.session.get(store.PlanRow, plan.id) is not None:
                raise AlreadyExists(f"segment {segment.name!r} is already activated to {dest.name!r}")
            env = make_envelope(
                ev.PlanCreated(plan=plan),
                event_id=deterministic_id("plan-created", plan.id),
                subject_key=plan.id,
                occurred_at=utcnow(),
                cause=Cause(command_id=plan.id),
            )
            uow.emit(ACTIVATION_CONFIG, [env])
            return plan

        return await self.processor.execute(deterministic_id("activate", request.destination, request.segment), decide)
