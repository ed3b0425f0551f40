"""The real services: a segment created or explained right after `schema create` is checked
against that schema, never against the types segmentation knew before it."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf import json_format

from cdp.ingest.v1 import ingest_pb2
from cdp.segmentation.v1 import segmentation_pb2
from cdp_cli.client import Client
from cdp_cli.stack import Stack

pytestmark = pytest.mark.e2e
ROUNDS = 25


def event_schema(name: str, types: list[str], amount: str) -> ingest_pb2.CreateSchemaRequest:
    spec: dict[str, Any] = {
        "name": name,
        "schema_class": "SCHEMA_CLASS_EVENT",
        "fields": [
            {"name": "event_id", "type": "FIELD_TYPE_STRING"},
            {"name": "ts", "type": "FIELD_TYPE_TIMESTAMP"},
            {"name": "type", "type": "FIELD_TYPE_STRING"},
            {"name": "amount", "type": amount},
        ],
        "event_id_field": "event_id",
        "timestamp_field": "ts",
        "event_type_field": "type",
        "event_types": types,
    }
    return ingest_pb2.CreateSchemaRequest(schema=json_format.ParseDict(spec, ingest_pb2.Schema()))


def test_a_segment_right_after_schema_create_uses_the_new_types(stack: Stack, client: Client) -> None:
    # The site sends amount as a string, for any event type.
    client.ingest.CreateSchema(event_schema("web", [], "FIELD_TYPE_STRING"), timeout=30)
    for i in range(ROUNDS):
        # Each round a new schema types amount as a number for its own event type: a segmentation
        # still on the older schemas would answer "amount is a string".
        client.ingest.CreateSchema(event_schema(f"orders_{i}", [f"order_{i}"], "FIELD_TYPE_NUMBER"), timeout=30)
        query = f"sum(order_{i}.amount) > 500 within 365d"
        if i % 2:
            explained = client.segmentation.ExplainQuery(segmentation_pb2.ExplainQueryRequest(query=query), timeout=30)
            assert f"event:order_{i}" in explained.reads
        else:
            request = segmentation_pb2.CreateSegmentRequest(name=f"big_{i}", query=query)
            assert client.segmentation.CreateSegment(request, timeout=30).name == f"big_{i}"
    # The string type still holds where no schema lists the event type.
    with pytest.raises(grpc.RpcError) as refused:
        client.segmentation.ExplainQuery(
            segmentation_pb2.ExplainQueryRequest(query="sum(refund.amount) > 1"), timeout=30
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "amount is a string in refund events" in str(refused.value.details())
