"""The ingest gRPC servicer: requests in, handlers called, responses out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import json_format

from cdp.ingest.v1 import ingest_pb2 as pb
from cdp.ingest.v1 import ingest_pb2_grpc as pb_grpc
from cdp_ingest import store
from cdp_ingest.handlers import IngestHandlers
from cdp_kit.errors import InvalidInput, NotFound, Violation

Ctx = grpc.aio.ServicerContext[Any, Any]
MAX_FILE_BYTES = 2 * 1024 * 1024 * 1024


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
        header: pb.IngestFileHeader | None = None
        parts: list[bytes] = []
        size = 0
        async for chunk in request_iterator:
            if chunk.HasField("header"):
                if header is not None:
                    raise InvalidInput("two headers", [Violation("header", "once", "send the header once, first")])
                header = chunk.header
                continue
            if header is None:
                raise InvalidInput("missing header", [Violation("header", "first", "the first chunk is the header")])
            size += len(chunk.data)
            if size > MAX_FILE_BYTES:
                raise InvalidInput("file too large", [Violation("file", "max_size", "split files over 2 GiB")])
            parts.append(chunk.data)
        if header is None:
            raise InvalidInput("empty request", [Violation("header", "required", "no header was sent")])
        return await self.handlers.ingest_file(header, b"".join(parts))

    async def GetBatch(self, request: pb.GetBatchRequest, context: Ctx) -> pb.BatchReport:
        return await self.handlers.get_batch(request.batch_id)

    async def PublishEvents(self, request: pb.PublishEventsRequest, context: Ctx) -> pb.PublishEventsResponse:
        events = [json_format.MessageToDict(e) for e in request.events]
        results = await self.handlers.publish_events(request.dataset, events)
        return pb.PublishEventsResponse(results=results)
