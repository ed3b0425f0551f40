"""Defining many segments: each definition is parsed and compiled once, not every segment again
at each new one (defining the 1,000th segment cost ~20 times the first), and what is cached never
outlives the definition it was made from."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy.engine import Engine

from cdp.segmentation.v1 import segmentation_pb2 as pb
from cdp_kit.eventlog import EventLog
from cdp_segmentation import store
from cdp_segmentation.evaluate import compile_ast
from tests.integration.test_segmentation_service import engine, service

__all__ = ["engine"]  # the fixture


async def test_a_new_segment_compiles_itself_only(
    engine: Engine, eventlog: EventLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    compiled: list[str] = []

    def counting(ast: pb.Expression) -> Any:
        compiled.append(ast.WhichOneof("node") or "")
        return compile_ast(ast)

    monkeypatch.setattr("cdp_segmentation.membership.compile_ast", counting)
    handlers = await service(engine, eventlog)
    for k in range(1, 6):
        await handlers.create_segment(f"s{k}", f"score >= {k}")
    with handlers.processor.read() as session:
        first = handlers.catalog.segments(session)
    assert [s.name for s in first] == ["s1", "s2", "s3", "s4", "s5"]
    assert len(compiled) == 5  # each once, whatever how often the catalog was invalidated

    await handlers.create_segment("s6", "in segment s5")
    with handlers.processor.read() as session:
        again = handlers.catalog.segments(session)
    assert len(compiled) == 6
    assert [s.name for s in again][-1] == "s6"  # in dependency order, after what it reads
    assert next(s for s in again if s.name == "s1") is first[0]  # the very same compiled segment


def test_a_parsed_segment_is_a_copy_and_follows_its_definition() -> None:
    body = {"id": "seg-x", "name": "x", "query": "score >= 1"}
    row = store.SegmentRow(id="seg-x", name="x", body=body)
    parsed = store.segment_of(row)
    parsed.query = "changed by a caller"
    assert store.segment_of(row).query == "score >= 1"  # the cache is not the caller's copy
    changed = store.SegmentRow(id="seg-x", name="x", body={**body, "query": "score >= 2"})
    assert store.segment_of(changed).query == "score >= 2"  # a new definition is parsed again
