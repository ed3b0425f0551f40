"""The segmentation gRPC servicer."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2
from sqlmodel import Session, func, select

from cdp.common.v1.envelope_pb2 import IdentityValue
from cdp.segmentation.v1 import segmentation_pb2 as pb
from cdp.segmentation.v1 import segmentation_pb2_grpc as pb_grpc
from cdp_kit.errors import InvalidInput, NotFound, Violation
from cdp_kit.identities import DEFAULT_PHONE_REGION
from cdp_kit.namespaces import normaliser
from cdp_segmentation import store
from cdp_segmentation.handlers import SegmentationHandlers

Ctx = grpc.aio.ServicerContext[Any, Any]


class SegmentationServicer(pb_grpc.SegmentationServiceServicer):
    def __init__(self, handlers: SegmentationHandlers, *, phone_region: str = DEFAULT_PHONE_REGION) -> None:
        self.handlers = handlers
        self.processor = handlers.processor
        self.phone_region = phone_region

    async def CreateSegment(self, request: pb.CreateSegmentRequest, context: Ctx) -> pb.Segment:
        return await self.handlers.create_segment(request.name, request.query, request.schedule.strip())

    async def ExplainQuery(self, request: pb.ExplainQueryRequest, context: Ctx) -> pb.Explanation:
        return await self.handlers.explain(request.query, request.schedule.strip())

    async def EvaluateSegment(
        self, request: pb.EvaluateSegmentRequest, context: Ctx
    ) -> AsyncIterator[pb.EvaluationProgress]:
        async for progress in self.handlers.evaluate_batch(request.segment):
            yield progress

    async def SetMergePolicy(self, request: pb.SetMergePolicyRequest, context: Ctx) -> pb.MergePolicy:
        return await self.handlers.set_merge_policy(request.policy)

    async def CreateComputedAttribute(
        self, request: pb.CreateComputedAttributeRequest, context: Ctx
    ) -> pb.ComputedAttribute:
        return await self.handlers.create_computed(request.name, request.definition)

    async def ListComputedAttributes(
        self, request: pb.ListComputedAttributesRequest, context: Ctx
    ) -> pb.ListComputedAttributesResponse:
        return pb.ListComputedAttributesResponse(attributes=self.handlers.computed_attributes())

    def _segment(self, key: str) -> pb.Segment:
        with self.processor.read() as session:
            row = store.segment_by_key(session, key)
            if row is None:
                raise NotFound(f"segment {key!r} not found")
            segment = store.segment_of(row)
            segment.size = store.size(session, row.id)
        return segment

    async def GetSegment(self, request: pb.GetSegmentRequest, context: Ctx) -> pb.Segment:
        return self._segment(request.segment)

    async def ListSegments(self, request: pb.ListSegmentsRequest, context: Ctx) -> pb.ListSegmentsResponse:
        with self.processor.read() as session:
            rows = store.all_segments(session)
        return pb.ListSegmentsResponse(segments=[self._segment(r.id) for r in rows])

    async def ListMembers(self, request: pb.ListMembersRequest, context: Ctx) -> pb.ListMembersResponse:
        segment = self._segment(request.segment)
        with self.processor.read() as session:
            members = store.realized(session, segment.id, request.limit)
        return pb.ListMembersResponse(segment_id=segment.id, profile_ids=members)

    async def GetProfile(self, request: pb.GetProfileRequest, context: Ctx) -> pb.Profile:
        with self.processor.read() as session:
            profile_id = request.profile_id
            if request.HasField("identity"):
                profile_id = self._profile_of(session, request.identity)
            if not profile_id:
                raise InvalidInput("missing key", [Violation("key", "required", "a profile id or an identity")])
            row = session.get(store.ProfileRow, profile_id)
            if row is None:
                raise NotFound(f"profile {profile_id!r} not found")
            return profile_message(session, row)

    def _profile_of(self, session: Session, identity: IdentityValue) -> str:
        """The profile holding an identity, normalised as identity normalised it (the kit's
        normaliser). Not found names the namespace only: never the value, nor a hash of it."""
        rules = normaliser(session, phone_region=self.phone_region)
        if identity.namespace not in rules.types:
            raise InvalidInput(
                "unknown namespace",
                [Violation("identity", "unknown_namespace", f"namespace {identity.namespace!r} is not defined")],
            )
        value = rules.lookup(identity.namespace, identity.value)
        found = None if value is None else session.get(store.ProfileIdentityRow, (identity.namespace, value))
        if found is None:
            raise NotFound(f"{identity.namespace} not found")
        return found.profile_id

    async def GetStats(self, request: pb.GetStatsRequest, context: Ctx) -> pb.Stats:
        with self.processor.read() as session:
            return pb.Stats(
                profiles=store.profile_count(session),
                identities=session.exec(select(func.count()).select_from(store.ProfileIdentityRow)).one(),
                segments=session.exec(select(func.count()).select_from(store.SegmentRow)).one(),
            )


RECENT_EVENTS = 20


def profile_message(session: Session, row: store.ProfileRow) -> pb.Profile:
    """Merged attributes with their sources, identities, sources, recent events, memberships."""
    names = {s.id: s.name for s in store.all_segments(session)}
    memberships = store.membership_rows(session, row.profile_id)
    profile = pb.Profile(
        profile_id=row.profile_id,
        identities=[
            IdentityValue(namespace=i.namespace, value=i.value) for i in store.identities_of(session, row.profile_id)
        ],
        segments=sorted(names.get(m.segment_id, m.segment_id) for m in memberships if m.status == store.REALIZED),
        events=row.events,
    )
    for name in sorted(row.attributes):
        attr_value = json_format.ParseDict(row.attributes[name], struct_pb2.Value())
        source = row.sources.get(name, {})
        attribute = pb.ProfileAttribute(name=name, value=attr_value, source_dataset=source.get("dataset", ""))
        if source.get("at"):
            attribute.updated_at.FromDatetime(datetime.fromisoformat(source["at"]))
        profile.attributes.append(attribute)
    for dataset, kind, count, last in store.sources_of(session, row.profile_id):
        source_msg = pb.ProfileSource(dataset=dataset, kind=kind, fragments=count)
        source_msg.last_at.FromDatetime(datetime.fromtimestamp(last / 1000, UTC))
        profile.sources.append(source_msg)
    for event in store.events_of(session, row.profile_id, RECENT_EVENTS):
        item = pb.ProfileEvent(event_id=event.source_event_id, event_type=event.event_type, dataset=event.dataset)
        item.occurred_at.FromDatetime(datetime.fromtimestamp(event.ts_ms / 1000, UTC))
        item.fields.update(event.attributes)
        profile.recent_events.append(item)
    for m in memberships:
        member = pb.ProfileMembership(
            segment_id=m.segment_id, segment_name=names.get(m.segment_id, ""), status=m.status
        )
        member.changed_at.FromDatetime(m.changed_at)
        profile.memberships.append(member)
    values = row.computed or {}
    for definition in store.all_computed(session):
        computed = pb.ProfileComputed(name=definition.name, definition=definition.definition)
        if definition.name in values:
            computed.value.CopyFrom(json_format.ParseDict(values[definition.name], struct_pb2.Value()))
        profile.computed.append(computed)
    return profile
