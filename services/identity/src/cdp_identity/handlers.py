"""Identity commands: custom namespaces and unlinks."""

from __future__ import annotations

from cdp.identity.v1 import events_pb2 as ev
from cdp.identity.v1 import identity_pb2 as pb
from cdp_identity.domain import CUSTOM_PRIORITY, NAME_RE, Namespace, node_key
from cdp_identity.engine import Maker, unlink
from cdp_identity.graph import load_rules
from cdp_identity.projection import IdentityProjection
from cdp_identity.sealing import IdentitySealer
from cdp_kit.envelope import Cause, deterministic_id, make_envelope, utcnow
from cdp_kit.errors import AlreadyExists, InvalidInput, NotFound, Violation
from cdp_kit.processor import Processor, UnitOfWork
from cdp_kit.streams import IDENTITY_CONFIG, IDENTITY_FRAGMENTS
from cdp_kit.telemetry import get_logger, pii_hash

log = get_logger(__name__)


class IdentityHandlers:
    def __init__(self, processor: Processor, projection: IdentityProjection) -> None:
        self.processor = processor
        self.projection = projection

    async def create_namespace(self, request: pb.CreateNamespaceRequest) -> pb.Namespace:
        violations = []
        if not NAME_RE.match(request.name):
            violations.append(Violation("name", "pattern", "lower_snake_case, 2-63 characters, starting with a letter"))
        if request.type == pb.NAMESPACE_TYPE_UNSPECIFIED or request.type not in pb.NamespaceType.values():
            violations.append(
                Violation("type", "required", "one of email, phone, cross_device, cookie, device, hashed, custom")
            )
        if request.priority < 0:
            violations.append(Violation("priority", "minimum", "0 (the default) or more"))
        if violations:
            raise InvalidInput("invalid namespace", violations)
        ns = Namespace(
            request.name,
            request.type,
            request.unique,
            request.priority or CUSTOM_PRIORITY,
            False,
            request.description,
        )
        now = utcnow()

        def decide(uow: UnitOfWork) -> pb.Namespace:
            ws = self.projection.graph(uow.session)
            if ns.name in ws.rules.namespaces:
                raise AlreadyExists(f"namespace {ns.name!r} exists")
            created = ev.NamespaceCreated(
                name=ns.name,
                type=pb.NamespaceType.Name(ns.type),  # type: ignore[arg-type]
                unique=ns.unique,
                priority=ns.priority,
                description=ns.description,
            )
            env = make_envelope(
                created,
                event_id=deterministic_id("namespace-created", ns.name),
                subject_key=ns.name,
                occurred_at=now,
                cause=Cause(command_id=f"namespace:{ns.name}"),
            )
            uow.emit(IDENTITY_CONFIG, [env])
            return ns.to_proto()

        return await self.processor.execute(f"namespace:{ns.name}", decide)

    async def unlink(self, request: pb.UnlinkRequest) -> pb.UnlinkResponse:
        key = self._key(request.identity, "identity")
        other = self._key(request.other, "other") if request.HasField("other") else ""
        if other == key:
            raise InvalidInput("invalid unlink", [Violation("other", "different", "an identity other than identity")])
        now = utcnow()
        command_id = deterministic_id("unlink", key, other, now.isoformat())

        def decide(uow: UnitOfWork) -> pb.UnlinkResponse:
            ws = self.projection.graph(uow.session)
            make = Maker(command_id, now, Cause(command_id=command_id), {})
            vault = self.processor.vault
            if vault is not None and vault.sealing:
                make.seal = IdentitySealer(vault, ws)
            decision, split, changed = unlink(
                ws, key, other, request.reason, make, lambda events: uow.emit(IDENTITY_FRAGMENTS, events)
            )
            if decision is None and key not in ws.nodes:
                raise NotFound(f"{request.identity.namespace} not found")
            reply = pb.UnlinkResponse(changed=changed)
            if decision is not None:
                reply.decision.CopyFrom(decision)
            if split is not None:
                reply.split.CopyFrom(split)
            return reply

        reply = await self.processor.execute(command_id, decide)
        log.info("unlinked", identity=pii_hash(key), other=pii_hash(other) if other else "", changed=reply.changed)
        return reply

    def _key(self, identity: object, field: str) -> str:
        from cdp.common.v1.envelope_pb2 import IdentityValue

        assert isinstance(identity, IdentityValue)
        with self.processor.read() as session:
            rules = load_rules(session, self.projection.rules)
        value, rule, detail = rules.normalise(identity.namespace, identity.value)
        if value is None:
            raise InvalidInput(
                f"invalid {field}", [Violation(field, rule or "invalid", detail or "a namespace and a valid value")]
            )
        return node_key(identity.namespace, value)
