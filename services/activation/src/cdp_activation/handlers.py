"""Activation use cases: destinations, activation plans, governance, redrive."""

from __future__ import annotations

import json

from croniter import croniter  # type: ignore[import-untyped]
from google.protobuf import json_format
from sqlmodel import col, select

from cdp.activation.v1 import activation_pb2 as pb
from cdp.activation.v1 import events_pb2 as ev
from cdp_activation import credentials, governance, store
from cdp_activation.connectors import connector_for
from cdp_activation.credentials import MASK, SECRET_WORDS, is_secret, masked
from cdp_activation.delivery import ACTIONS
from cdp_activation.settings import ActivationSettings
from cdp_kit.envelope import Cause, deterministic_id, make_envelope, utcnow
from cdp_kit.errors import AlreadyExists, FailedPrecondition, InvalidInput, NotFound, Violation
from cdp_kit.keyring import KeyFile, Keyring, KeyringError
from cdp_kit.namespaces import learn
from cdp_kit.processor import Processor, UnitOfWork
from cdp_kit.streams import ACTIVATION_CONFIG, ACTIVATION_DELIVERIES, ACTIVATION_READS_SEGMENTS

__all__ = ["MASK", "SECRET_WORDS", "ActivationHandlers", "is_secret", "masked"]


class ActivationHandlers:
    def __init__(self, processor: Processor, settings: ActivationSettings, keys: KeyFile) -> None:
        self.processor = processor
        self.settings = settings
        self.keys = keys

    @property
    def keyring(self) -> Keyring:
        return self.keys.keyring

    async def create_destination(self, dest: pb.Destination) -> pb.Destination:
        problems: list[Violation] = []
        if not dest.name:
            problems.append(Violation("name", "required", "a destination has a name"))
        if dest.marketing_action not in ACTIONS:
            problems.append(Violation("marketing_action", "enum", f"one of {', '.join(ACTIONS)}"))
        connector = connector_for(dest.connector)
        problems += connector.validate(json_format.MessageToDict(dest.config))
        if problems:
            raise InvalidInput(f"destination {dest.name!r} is invalid", problems)
        new = pb.Destination()
        new.CopyFrom(dest)
        new.id = deterministic_id("destination", dest.name)
        sealed = credentials.seal_config(json_format.MessageToDict(dest.config), self.keyring, new.id)
        new.config.Clear()
        new.config.update(sealed)

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
        return masked(new, self.keyring)

    async def rotate_secrets(self) -> pb.RotateSecretsResponse:
        """Re-read the key file; every destination's secrets re-encrypted under the newest master
        key by an event on the log (a rebuild needs no older key), plain ones from older versions
        encrypted. Answers which key versions no stored secret needs any more."""
        try:
            keyring = self.keys.reload()
        except KeyringError as exc:
            raise FailedPrecondition(f"the master key file cannot be used: {exc}") from exc
        now = utcnow()

        def decide(uow: UnitOfWork) -> int:
            events = []
            for row in uow.session.exec(select(store.DestinationRow).order_by(col(store.DestinationRow.id))):
                config = json_format.MessageToDict(store.destination_of(row).config)
                try:
                    resealed = credentials.reseal_config(config, keyring, row.id)
                except KeyringError as exc:
                    raise FailedPrecondition(f"destination {row.name!r}: {exc}; nothing was rotated") from exc
                if resealed == config and not row.legacy_plain:
                    continue
                rotated = ev.DestinationSecretsRotated(
                    destination_id=row.id, config=credentials.struct_of(resealed), key_id=keyring.newest
                )
                events.append(
                    make_envelope(
                        rotated,
                        event_id=deterministic_id("secrets-rotated", row.id, keyring.newest, json.dumps(config)),
                        subject_key=row.id,
                        occurred_at=now,
                        cause=uow.cause,
                    )
                )
            uow.emit(ACTIVATION_CONFIG, events)
            return len(events)

        count = await self.processor.execute(
            deterministic_id("rotate-secrets", keyring.newest, now.isoformat()), decide
        )
        with self.processor.read() as session:
            in_use: set[str] = set()
            for row in session.exec(select(store.DestinationRow)):
                in_use |= credentials.sealed_key_ids(json_format.MessageToDict(store.destination_of(row).config))
        retirable = [k for k in keyring.key_ids if k != keyring.newest and k not in in_use]
        return pb.RotateSecretsResponse(key_id=keyring.newest, destinations=count, retirable_key_ids=retirable)

    async def activate(self, request: pb.ActivateRequest) -> pb.ActivationPlan:
        schedule = (request.schedule or "streaming").strip()
        if schedule != "streaming" and not croniter.is_valid(schedule):
            raise InvalidInput(
                f"invalid schedule {schedule!r}",
                [Violation("schedule", "cron", 'streaming, or a cron expression ("0 3 * * *"; a 6th field = seconds)')],
            )
        now = utcnow()
        with self.processor.read() as session:
            known = store.segment_by_key(session, request.segment) is not None
        if not known:  # a segment just created: activation learns it from segmentation's config log
            await learn(self.processor, ACTIVATION_READS_SEGMENTS)

        def decide(uow: UnitOfWork) -> pb.ActivationPlan:
            dest = store.destination_by_key(uow.session, request.destination)
            if dest is None:
                raise NotFound(f"destination {request.destination!r} not found")
            segment = store.segment_by_key(uow.session, request.segment)
            if segment is None:
                raise NotFound(f"segment {request.segment!r} not known to activation (yet)")
            destination = store.destination_of(dest)
            connector = connector_for(destination.connector)
            if connector.identity_namespaces is not None and request.identities:
                unusable = [ns for ns in request.identities if ns not in connector.identity_namespaces]
                if len(unusable) == len(request.identities):
                    raise InvalidInput(
                        f"{destination.connector} matches on none of {', '.join(request.identities)}",
                        [Violation("identities", "supported", ", ".join(connector.identity_namespaces))],
                    )
            chains = governance.violations(
                uow.session, destination.marketing_action, [*request.attributes, *request.identities]
            )
            if chains:
                raise FailedPrecondition(
                    f"plan {request.segment} -> {dest.name} violates data-usage policy: " + "; ".join(chains)
                )
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
                occurred_at=now,
                cause=Cause(command_id=plan.id),
            )
            uow.emit(ACTIVATION_CONFIG, [env])
            return plan

        return await self.processor.execute(deterministic_id("activate", request.destination, request.segment), decide)

    async def label_data(self, label: pb.DataLabel) -> pb.DataLabel:
        problems = []
        if label.kind not in ("field", "dataset"):
            problems.append(Violation("kind", "enum", "field or dataset"))
        if not label.name:
            problems.append(Violation("name", "required", "the field or dataset name"))
        if not label.label:
            problems.append(Violation("label", "required", "e.g. C2"))
        if problems:
            raise InvalidInput("invalid data label", problems)
        event_id = deterministic_id("label", label.kind, label.name, label.label)

        def decide(uow: UnitOfWork) -> None:
            if uow.session.get(store.LabelRow, (label.kind, label.name, label.label)) is not None:
                return
            env = make_envelope(
                ev.DataLabeled(label=label),
                event_id=event_id,
                subject_key=label.name,
                occurred_at=utcnow(),
                cause=Cause(command_id=event_id),
            )
            uow.emit(ACTIVATION_CONFIG, [env])

        await self.processor.execute(event_id, decide)
        return label

    async def create_policy(self, policy: pb.Policy) -> pb.Policy:
        problems = []
        if not policy.name:
            problems.append(Violation("name", "required", "a policy has a name"))
        if not policy.label:
            problems.append(Violation("label", "required", "the denied data-usage label"))
        if policy.action not in ACTIONS:
            problems.append(Violation("action", "enum", f"one of {', '.join(ACTIONS)}"))
        if problems:
            raise InvalidInput("invalid policy", problems)
        new = pb.Policy()
        new.CopyFrom(policy)
        new.id = deterministic_id("policy", policy.name)

        def decide(uow: UnitOfWork) -> None:
            if uow.session.exec(select(store.PolicyRow).where(store.PolicyRow.name == policy.name)).first():
                raise AlreadyExists(f"policy {policy.name!r} exists")
            env = make_envelope(
                ev.PolicyCreated(policy=new),
                event_id=new.id,
                subject_key=new.id,
                occurred_at=utcnow(),
                cause=Cause(command_id=new.id),
            )
            uow.emit(ACTIVATION_CONFIG, [env])

        await self.processor.execute(f"policy:{new.id}", decide)
        return new

    async def redrive(self, request: pb.RedriveRequest) -> pb.RedriveResponse:
        now = utcnow()

        def decide(uow: UnitOfWork) -> list[str]:
            # A removal batch whose key is destroyed has nothing left to send: it stays dead.
            query = select(store.BatchRow).where(
                store.BatchRow.status == "dead", col(store.BatchRow.keys_destroyed).is_(False)
            )
            if request.batch_ids:
                query = query.where(col(store.BatchRow.id).in_(list(request.batch_ids)))
            if request.destination:
                dest = store.destination_by_key(uow.session, request.destination)
                if dest is None:
                    raise NotFound(f"destination {request.destination!r} not found")
                query = query.where(store.BatchRow.destination_id == dest.id)
            rows = list(uow.session.exec(query.order_by(col(store.BatchRow.prepared_at))))
            if request.batch_ids and len(rows) < len(set(request.batch_ids)):
                found = {r.id for r in rows}
                missing = sorted(set(request.batch_ids) - found)
                raise NotFound(f"no dead letter with batch id {', '.join(missing)}")
            events = []
            for row in rows:
                redriven = ev.BatchRedriven(batch_id=row.id)
                redriven.at.FromDatetime(now)
                events.append(
                    make_envelope(
                        redriven,
                        event_id=deterministic_id("redrive", row.id, now.isoformat()),
                        subject_key=row.destination_id,
                        occurred_at=now,
                        cause=uow.cause,
                    )
                )
            uow.emit(ACTIVATION_DELIVERIES, events)
            return [r.id for r in rows]

        ids = await self.processor.execute(deterministic_id("redrive", now.isoformat()), decide)
        return pb.RedriveResponse(batch_ids=ids)
