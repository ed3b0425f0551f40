"""The audience language's limits through the real gRPC server of segmentation (JetStream, SQLite
store): what a tester sent (chained `not`, long `or` chains, a 1,000-item `in`, 5,000 nested
parentheses) is INVALID_ARGUMENT naming the rule from ExplainQuery AND CreateSegment (which used
to accept what explain refused, then backfill for minutes); no error is logged; the service goes on
answering; definitions at the limits are explained and created; a chain of segments too deep for
one SQL statement is refused when defined, naming the query."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from sqlalchemy.engine import Engine
from structlog.testing import capture_logs

from cdp.common.v1 import admin_pb2
from cdp.segmentation.v1 import segmentation_pb2 as pb
from cdp.segmentation.v1 import segmentation_pb2_grpc as pb_grpc
from cdp_kit.eventlog import EventLog
from cdp_kit.grpc_server import GrpcServer, Registration
from cdp_kit.store import make_engine, sqlite_url
from cdp_segmentation.api import SegmentationServicer
from cdp_segmentation.handlers import SegmentationHandlers
from cdp_segmentation.language import MAX_CONDITIONS, MAX_DEPTH, MAX_ITEMS
from cdp_segmentation.main import build_processor
from tests.integration.test_segmentation_service import T0, Identity

SERVICE = pb.DESCRIPTOR.services_by_name["SegmentationService"].full_name
GOLD = 'tier = "gold"'


def ors(n: int) -> str:
    return " or ".join(f'tier = "g{i}"' for i in range(n))


def listed(n: int) -> str:
    return "[" + ", ".join(f'"v{i}"' for i in range(n)) + "]"


REFUSED = [
    ("not " * 50 + GOLD, "nesting"),
    ("not " * 300 + GOLD, "nesting"),
    ("not " * 500 + GOLD, "nesting"),
    ("not " * 50_000 + GOLD, "max_length"),
    (ors(MAX_CONDITIONS + 1), "max_conditions"),
    (ors(600), "max_conditions"),
    (ors(1000), "max_conditions"),
    (f"tier in {listed(1000)}", "max_items"),
    ("(" * 5000 + GOLD + ")" * 5000, "nesting"),
]
AT_THE_LIMITS = [
    "not " * MAX_DEPTH + GOLD,  # an even count: the gold profiles
    "(" * MAX_DEPTH + GOLD + ")" * MAX_DEPTH,
    ors(MAX_CONDITIONS - 1) + " or " + GOLD,
    "tier in [" + ", ".join(f'"v{i}"' for i in range(MAX_ITEMS - 1)) + ', "gold"]',
]


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = make_engine(sqlite_url(tmp_path / "segmentation.db"))
    yield engine
    engine.dispose()


@pytest.fixture
async def stub(engine: Engine, eventlog: EventLog) -> AsyncIterator[pb_grpc.SegmentationServiceAsyncStub]:
    identity = Identity(eventlog)
    for i in range(6):
        tier = "gold" if i % 2 else "silver"
        await identity.record(f"p{i}", "crm", T0, {"email": f"u{i}@example.com"}, tier=tier)
    processor, catalog = build_processor(engine, eventlog)
    processor.create_store()
    await processor.recover()
    await processor.catch_up()
    servicer = SegmentationServicer(SegmentationHandlers(processor, catalog))
    registration = Registration(SERVICE, pb_grpc.add_SegmentationServiceServicer_to_server, servicer)
    server = GrpcServer("127.0.0.1", 0, [registration], _status)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{server.bound_port}", options=[("grpc.max_send_message_length", 1 << 22)]
        ) as channel:
            yield pb_grpc.SegmentationServiceStub(channel)
    finally:
        await server.stop(0.5)
        servicer.profiles.close()


async def _status() -> admin_pb2.ServiceStatus:
    return admin_pb2.ServiceStatus(service="segmentation", ready=True)


async def _refused(call: object, request: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(request, timeout=30)  # type: ignore[operator]
    return caught.value.code(), caught.value.details() or ""


async def test_the_testers_queries_are_invalid_argument_from_explain_and_create(
    stub: pb_grpc.SegmentationServiceAsyncStub,
) -> None:
    with capture_logs() as logged:
        for n, (query, rule) in enumerate(REFUSED):
            code, details = await _refused(stub.ExplainQuery, pb.ExplainQueryRequest(query=query))
            assert (code, f": {rule}: " in details) == (grpc.StatusCode.INVALID_ARGUMENT, True), (rule, details)
            assert "query" in details
            request = pb.CreateSegmentRequest(name=f"bad_{n}", query=query)
            code, details = await _refused(stub.CreateSegment, request)
            assert (code, f": {rule}: " in details) == (grpc.StatusCode.INVALID_ARGUMENT, True), (rule, details)
    assert [e for e in logged if e["log_level"] in ("error", "critical")] == []
    # Nothing was defined; the service answers, and defines and explains as before.
    assert [s.name for s in (await stub.ListSegments(pb.ListSegmentsRequest(), timeout=30)).segments] == []
    explained = await stub.ExplainQuery(pb.ExplainQueryRequest(query=GOLD), timeout=30)
    assert (explained.estimated_size, explained.profiles) == (3, 6)
    await stub.CreateSegment(pb.CreateSegmentRequest(name="gold", query=GOLD), timeout=30)
    members = await stub.ListMembers(pb.ListMembersRequest(segment="gold"), timeout=30)
    assert sorted(members.profile_ids) == ["p1", "p3", "p5"]


async def test_definitions_at_the_limits_are_explained_and_created(stub: pb_grpc.SegmentationServiceAsyncStub) -> None:
    for n, query in enumerate(AT_THE_LIMITS):
        explained = await stub.ExplainQuery(pb.ExplainQueryRequest(query=query), timeout=30)
        assert explained.estimated_size == 3, query[:40]
        await stub.CreateSegment(pb.CreateSegmentRequest(name=f"limit_{n}", query=query), timeout=30)
        members = await stub.ListMembers(pb.ListMembersRequest(segment=f"limit_{n}"), timeout=30)
        assert sorted(members.profile_ids) == ["p1", "p3", "p5"], query[:40]


async def test_a_chain_of_segments_too_deep_for_one_statement_is_refused_when_defined(
    stub: pb_grpc.SegmentationServiceAsyncStub,
) -> None:
    """Each segment is within the limits, but SQL (explain, batch runs) writes out the segments a
    definition refers to: the chain grows until the store cannot prepare it, and is refused then,
    before it is defined, as INVALID_ARGUMENT naming the query (a warning, no error logged)."""
    nots = "not " * (MAX_DEPTH - 2)  # an even count: each link holds for the gold profiles
    await stub.CreateSegment(pb.CreateSegmentRequest(name="link_0", query=nots + GOLD), timeout=30)
    refused_at, answer = None, (grpc.StatusCode.OK, "")
    with capture_logs() as logged:
        for n in range(1, 10):
            request = pb.CreateSegmentRequest(name=f"link_{n}", query=f"{nots}in segment link_{n - 1}")
            try:
                await stub.CreateSegment(request, timeout=30)
            except grpc.aio.AioRpcError as exc:
                refused_at, answer = n, (exc.code(), exc.details() or "")
                break
            members = await stub.ListMembers(pb.ListMembersRequest(segment=f"link_{n}"), timeout=30)
            assert sorted(members.profile_ids) == ["p1", "p3", "p5"]
    assert answer[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert "query: complexity: " in answer[1]
    assert refused_at is not None
    assert [e for e in logged if e["log_level"] in ("error", "critical")] == []
    assert any(e["event"] == "query_too_complex" for e in logged)
    names = [s.name for s in (await stub.ListSegments(pb.ListSegmentsRequest(), timeout=30)).segments]
    assert f"link_{refused_at}" not in names
    code, details = await _refused(
        stub.ExplainQuery, pb.ExplainQueryRequest(query=f"{nots}in segment link_{refused_at - 1}")
    )
    assert (code, "query: complexity: " in details) == (grpc.StatusCode.INVALID_ARGUMENT, True)
