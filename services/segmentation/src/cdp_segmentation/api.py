"""The segmentation gRPC servicer."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from sqlmodel import func, select

from cdp.segmentation.v1 import segmentation_pb2 as pb
from cdp.segmentation.v1 import segmentation_pb2_grpc as pb_grpc
from cdp_kit.errors import NotFound
from cdp_kit.identities import DEFAULT_PHONE_REGION
from cdp_segmentation import store
from cdp_segmentation.handlers import SegmentationHandlers
from cdp_segmentation.lookup import ProfileReader

Ctx = grpc.aio.ServicerContext[Any, Any]


class SegmentationServicer(pb_grpc.SegmentationServiceServicer):
    def __init__(self, handlers: SegmentationHandlers, *, phone_region: str = DEFAULT_PHONE_REGION) -> None:
        self.handlers = handlers
        self.processor = handlers.processor
        self.phone_region = phone_region
        self.profiles = ProfileReader(self.processor.engine, phone_region=phone_region)

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
        return await self.profiles.get(request)

    async def GetStats(self, request: pb.GetStatsRequest, context: Ctx) -> pb.Stats:
        with self.processor.read() as session:
            return pb.Stats(
                profiles=store.profile_count(session),
                identities=session.exec(select(func.count()).select_from(store.ProfileIdentityRow)).one(),
                segments=session.exec(select(func.count()).select_from(store.SegmentRow)).one(),
            )
