"""The ingest gRPC servicer: requests in, handlers called, responses out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from cdp.ingest.v1 import ingest_pb2 as pb
from cdp.ingest.v1 import ingest_pb2_grpc as pb_grpc
from cdp_ingest import store
from cdp_ingest.handlers import IngestHandlers
from cdp_kit.errors import NotFound

Ctx = grpc.aio.ServicerContext[Any, Any]


class IngestServicer(pb_grpc.IngestServiceServicer):
    def __init__(self, handlers: IngestHandlers) -> None:
        self.handlers = handlers

    async def CreateSchema(self, request: pb.CreateSchemaRequest, context: Ctx) -> pb.Schema:
        return await self.handlers.create_schema(request.schema)

    async def GetSchema(self, request: pb.GetSchemaRequest, context: Ctx) -> pb.Schema:
        with self.handlers.processor.read() as session:
            if request.version:
                found = store.schema_version(session, request.name, request.version)
            else:
                found = store.latest_schema(session, request.name)
        if found is None:
            raise NotFound(f"schema {request.name!r} not found")
        return found

    async def ListSchemas(self, request: pb.ListSchemasRequest, context: Ctx) -> pb.ListSchemasResponse:
        with self.handlers.processor.read() as session:
            return pb.ListSchemasResponse(schemas=store.all_schemas(session))

    async def CreateDataset(self, request: pb.CreateDatasetRequest, context: Ctx) -> pb.Dataset:
        return await self.handlers.create_dataset(request.dataset)

    async def ListDatasets(self, request: pb.ListDatasetsRequest, context: Ctx) -> pb.ListDatasetsResponse:
        with self.handlers.processor.read() as session:
            return pb.ListDatasetsResponse(datasets=store.all_datasets(session))

    async def IngestFile(self, request_iterator: AsyncIterator[pb.IngestFileChunk], context: Ctx) -> pb.BatchReport:
        return await self.handlers.ingest_file(request_iterator)

    async def IngestFileWithProgress(
        self, request_iterator: AsyncIterator[pb.IngestFileChunk], context: Ctx
    ) -> AsyncIterator[pb.IngestProgress]:
        async for progress in self.handlers.ingest_stream(request_iterator):
            yield progress

    async def GetBatch(self, request: pb.GetBatchRequest, context: Ctx) -> pb.BatchReport:
        return await self.handlers.get_batch(request.batch_id)

    async def ListBatchErrors(self, request: pb.ListBatchErrorsRequest, context: Ctx) -> pb.ListBatchErrorsResponse:
        return await self.handlers.list_batch_errors(request, context)

    async def PublishEvents(self, request: pb.PublishEventsRequest, context: Ctx) -> pb.PublishEventsResponse:
        results = await self.handlers.publish_events(request.dataset, list(request.events))
        return pb.PublishEventsResponse(results=results)

    async def ListDeadLetters(self, request: pb.ListDeadLettersRequest, context: Ctx) -> pb.ListDeadLettersResponse:
        return await self.handlers.list_dead_letters(request)
