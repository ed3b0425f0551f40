"""Through the ingest service: a schema's event types and consent fields are refused when wrong
(INVALID_ARGUMENT naming each), travel on cdp.config.ingest, reject events of undeclared types
and put a CSV's consent column on the log as the canonical, normalised attribute."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf import json_format, struct_pb2

from cdp.ingest.v1 import events_pb2 as ev
from cdp.ingest.v1 import ingest_pb2 as pb
from cdp_kit.envelope import is_a, unpack
from cdp_kit.streams import INGEST_CONFIG
from tests.integration.test_ingest_service import Ingest, ingest  # noqa: F401  (the fixture)

CRM_CONSENT: dict[str, Any] = {
    "name": "crm_consent",
    "schema_class": "SCHEMA_CLASS_PROFILE",
    "fields": [
        {"name": "crm_id", "type": "FIELD_TYPE_STRING", "identity_namespace": "crm_id", "required": True},
        {"name": "email_consent", "type": "FIELD_TYPE_STRING", "consent_for": "email_marketing"},
    ],
}
ORDERS: dict[str, Any] = {
    "name": "orders_typed",
    "schema_class": "SCHEMA_CLASS_EVENT",
    "fields": [
        {"name": "event_id", "type": "FIELD_TYPE_STRING"},
        {"name": "ts", "type": "FIELD_TYPE_TIMESTAMP"},
        {"name": "type", "type": "FIELD_TYPE_STRING"},
        {"name": "cookie", "type": "FIELD_TYPE_STRING", "identity_namespace": "cookie", "required": True},
        {"name": "amount", "type": "FIELD_TYPE_NUMBER"},
    ],
    "event_id_field": "event_id",
    "timestamp_field": "ts",
    "event_type_field": "type",
    "event_types": ["order"],
}


async def create(service: Ingest, spec: dict[str, Any]) -> pb.Schema:
    schema: pb.Schema = await service.stub.CreateSchema(
        pb.CreateSchemaRequest(schema=json_format.ParseDict(spec, pb.Schema()))
    )
    return schema


async def test_wrong_declarations_are_refused_with_each_reason(ingest: Ingest) -> None:  # noqa: F811
    bad_orders = {**ORDERS, "name": "bad_orders", "event_types": ["order", "Order Placed"]}
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await create(ingest, bad_orders)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "event types are lower_snake_case" in str(refused.value.details())
    bad_crm = {**CRM_CONSENT, "name": "bad_crm"}
    bad_crm["fields"] = [*CRM_CONSENT["fields"], {"name": "optin", "type": "FIELD_TYPE_STRING", "consent_for": "email"}]
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await create(ingest, bad_crm)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "one of email_marketing, sms_marketing, ad_targeting, data_sharing" in str(refused.value.details())


async def test_declarations_travel_on_the_config_log_and_apply_to_rows(ingest: Ingest) -> None:  # noqa: F811
    await create(ingest, CRM_CONSENT)
    await create(ingest, ORDERS)
    await ingest.stub.CreateDataset(
        pb.CreateDatasetRequest(dataset=pb.Dataset(name="crm_c", schema_name="crm_consent", profile_enabled=True))
    )
    await ingest.stub.CreateDataset(
        pb.CreateDatasetRequest(dataset=pb.Dataset(name="orders", schema_name="orders_typed"))
    )
    registered = {}
    async for msg in ingest.eventlog.read(INGEST_CONFIG.stream.name, INGEST_CONFIG.subject):
        for env in msg.events():
            if is_a(env, ev.SchemaRegistered):
                schema = unpack(env, ev.SchemaRegistered).schema
                registered[schema.name] = schema
    assert list(registered["orders_typed"].event_types) == ["order"]
    assert registered["crm_consent"].fields[1].consent_for == "email_marketing"

    report = await ingest.upload(
        b"crm_id,email_consent\nc1,Y\nc2,no\nc3,\nc4,maybe\n", "consent", dataset="crm_c", threshold=0.5
    )
    assert (report.rows_accepted, report.rows_rejected) == (3, 1)
    assert [(g.field, g.rule) for g in report.rejects] == [("email_consent", "consent")]
    records = {r.attributes["crm_id"]: dict(r.attributes) for r in await ingest.records(report.batch_id)}
    assert records["c1"] == {"crm_id": "c1", "email_consent": "Y", "consent_email_marketing": "y"}
    assert records["c2"]["consent_email_marketing"] == "n"
    assert "consent_email_marketing" not in records["c3"]

    event: dict[str, Any] = {
        "event_id": "e1",
        "ts": "2026-01-01T10:00:00Z",
        "type": "order",
        "cookie": "ck1",
        "amount": 12.5,
    }
    events = [struct_pb2.Struct(), struct_pb2.Struct()]
    events[0].update(event)
    events[1].update({**event, "event_id": "e2", "type": "refund"})
    reply = await ingest.stub.PublishEvents(pb.PublishEventsRequest(dataset="orders", events=events))
    assert [r.status for r in reply.results] == [pb.EVENT_STATUS_ACCEPTED, pb.EVENT_STATUS_REJECTED]
    assert [(e.field, e.rule) for e in reply.results[1].errors] == [("type", "event_type")]
