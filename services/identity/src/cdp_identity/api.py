"""The identity gRPC servicer: queries read the store; commands go through the handlers."""

from __future__ import annotations

from typing import Any

import grpc
import sqlalchemy as sa
from google.protobuf.timestamp_pb2 import Timestamp
from sqlmodel import Session

from cdp.common.v1.envelope_pb2 import IdentityValue
from cdp.identity.v1 import events_pb2 as ev
from cdp.identity.v1 import identity_pb2 as pb
from cdp.identity.v1 import identity_pb2_grpc as pb_grpc
from cdp.privacy.v1 import privacy_pb2 as privacy_pb
from cdp.privacy.v1 import privacy_pb2_grpc as privacy_grpc
from cdp_identity import store
from cdp_identity.domain import Rules, node_key, split_key
from cdp_identity.graph import Link, Node, load_rules, read_graph
from cdp_identity.handlers import IdentityHandlers
from cdp_identity.privacy import PrivacyHandlers
from cdp_kit.errors import InvalidInput, NotFound, Violation

Ctx = grpc.aio.ServicerContext[Any, Any]


def timestamp(us: int) -> Timestamp:
    ts = Timestamp()
    ts.seconds, ts.nanos = divmod(us, 1_000_000)
    ts.nanos *= 1000
    return ts


def value_of(key: str) -> IdentityValue:
    ns, value = split_key(key)
    return IdentityValue(namespace=ns, value=value)


class IdentityServicer(pb_grpc.IdentityServiceServicer):
    def __init__(self, handlers: IdentityHandlers) -> None:
        self.handlers = handlers
        self.processor = handlers.processor
        self.base_rules = handlers.projection.rules

    # ----------------------------------------------------------------- queries
    def _lookup(self, session: Session, identity: IdentityValue) -> tuple[Rules, Any]:
        rules = load_rules(session, self.base_rules)
        value, rule, detail = rules.normalise(identity.namespace, identity.value)
        if not identity.namespace or value is None:
            raise InvalidInput(
                "invalid identity", [Violation("identity", rule or "valid", detail or "a namespace and a value")]
            )
        row = session.execute(
            sa.select(store.NODE).where(store.NODE.c.key == node_key(identity.namespace, value))
        ).first()
        if row is None:
            raise NotFound(f"{identity.namespace} not found")
        return rules, row

    @staticmethod
    def _graph(session: Session, profile_id: str) -> tuple[list[Node], list[Link]]:
        document = session.execute(sa.select(store.PROFILE.c.document).where(store.PROFILE.c.profile_id == profile_id))
        return read_graph(profile_id, document.scalar() or "")

    @staticmethod
    def _primary(rules: Rules, nodes: list[Node]) -> IdentityValue:
        best = min(nodes, key=lambda n: (rules.order(n.namespace, n.value)[0], n.first_seen, n.namespace, n.value))
        return IdentityValue(namespace=best.namespace, value=best.value)

    async def Resolve(self, request: pb.ResolveRequest, context: Ctx) -> pb.ResolveResponse:
        with self.processor.read() as session:
            rules, row = self._lookup(session, request.identity)
            nodes, _ = self._graph(session, row.profile_id)
        return pb.ResolveResponse(
            profile_id=row.profile_id,
            identities=[IdentityValue(namespace=n.namespace, value=n.value) for n in nodes],
            primary=self._primary(rules, nodes),
        )

    async def GetGraph(self, request: pb.GetGraphRequest, context: Ctx) -> pb.Graph:
        with self.processor.read() as session:
            rules, row = self._lookup(session, request.identity)
            nodes, links = self._graph(session, row.profile_id)
            keys = [n.key for n in nodes]
            d = store.DECISION.c
            decisions = list(
                session.execute(
                    sa.select(store.DECISION)
                    .where(sa.or_(d.profile_id == row.profile_id, d.identity.in_(keys), d.other.in_(keys)))
                    .order_by(d.at, d.id)
                ).all()
            )
        graph = pb.Graph(profile_id=row.profile_id, primary=self._primary(rules, nodes))
        for n in nodes:
            graph.nodes.append(
                pb.GraphNode(
                    identity=IdentityValue(namespace=n.namespace, value=n.value),
                    type=rules.type_of(n.namespace),  # type: ignore[arg-type]
                    first_seen=timestamp(n.first_seen),
                    last_seen=timestamp(n.last_seen),
                    dataset=n.dataset,
                    batch_id=n.batch_id,
                    last_dataset=n.last_dataset,
                    last_batch_id=n.last_batch_id,
                )
            )
        for x in links:
            graph.links.append(
                pb.GraphLink(
                    a=value_of(x.a),
                    b=value_of(x.b),
                    first_seen=timestamp(x.first_seen),
                    last_seen=timestamp(x.last_seen),
                    dataset=x.dataset,
                    batch_id=x.batch_id,
                    last_dataset=x.last_dataset,
                    last_batch_id=x.last_batch_id,
                )
            )
        for dec in decisions:
            item = pb.Decision(
                rule=dec.rule,
                reason=dec.reason,
                profile_id=dec.profile_id,
                source_event_id=dec.source_event_id,
                at=timestamp(dec.at),
                effect=dec.effect,
                links=[
                    ev.IdentityLink(a=value_of(a), b=value_of(b))
                    for a, _, b in (line.partition("\t") for line in dec.links.splitlines())
                ],
            )
            if dec.identity:
                item.identity.CopyFrom(value_of(dec.identity))
            graph.decisions.append(item)
        return graph

    async def ListNamespaces(self, request: pb.ListNamespacesRequest, context: Ctx) -> pb.ListNamespacesResponse:
        with self.processor.read() as session:
            rules = load_rules(session, self.base_rules)
        spaces = sorted(rules.namespaces.values(), key=lambda ns: (ns.priority, ns.name))
        return pb.ListNamespacesResponse(namespaces=[ns.to_proto() for ns in spaces])

    async def GetStats(self, request: pb.GetStatsRequest, context: Ctx) -> pb.IdentityStats:
        def count(session: Session, table: sa.Table, *where: Any) -> int:
            return int(session.execute(sa.select(sa.func.count()).select_from(table).where(*where)).scalar() or 0)

        with self.processor.read() as session:
            stats = pb.IdentityStats(
                identities=count(session, store.NODE),
                links=int(session.execute(sa.select(sa.func.sum(store.PROFILE.c.links))).scalar() or 0),
                profiles=count(session, store.PROFILE, store.PROFILE.c.merged_into == ""),
                fragments=count(session, store.FRAGMENT),
            )
            for r in session.execute(sa.select(store.DROP).order_by(store.DROP.c.namespace, store.DROP.c.rule)).all():
                stats.dropped.append(pb.DropCount(namespace=r.namespace, rule=r.rule, count=r.total))
            for rule, n in session.execute(
                sa.select(store.DECISION.c.rule, sa.func.count()).group_by(store.DECISION.c.rule)
            ).all():
                stats.decisions[rule] = n
        return stats

    # ----------------------------------------------------------------- commands
    async def CreateNamespace(self, request: pb.CreateNamespaceRequest, context: Ctx) -> pb.Namespace:
        return await self.handlers.create_namespace(request)

    async def Unlink(self, request: pb.UnlinkRequest, context: Ctx) -> pb.UnlinkResponse:
        return await self.handlers.unlink(request)


class PrivacyServicer(privacy_grpc.PrivacyServiceServicer):
    def __init__(self, handlers: PrivacyHandlers) -> None:
        self.handlers = handlers

    async def Submit(self, request: privacy_pb.SubmitPrivacyRequest, context: Ctx) -> privacy_pb.PrivacyRequest:
        return await self.handlers.submit(request)

    async def GetRequest(self, request: privacy_pb.GetPrivacyRequestRequest, context: Ctx) -> privacy_pb.PrivacyRequest:
        return self.handlers.get(request.request_id)

    async def ListRequests(
        self, request: privacy_pb.ListPrivacyRequestsRequest, context: Ctx
    ) -> privacy_pb.ListPrivacyRequestsResponse:
        return privacy_pb.ListPrivacyRequestsResponse(requests=self.handlers.list(min(request.limit or 100, 1000)))
