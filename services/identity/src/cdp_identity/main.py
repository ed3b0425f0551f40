"""Composition root of the identity service."""

from __future__ import annotations

import gc
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine

from cdp.identity.v1 import identity_pb2, identity_pb2_grpc
from cdp.privacy.v1 import privacy_pb2, privacy_pb2_grpc
from cdp_identity.api import IdentityServicer, PrivacyServicer
from cdp_identity.consumer import RecordsToFragments
from cdp_identity.handlers import IdentityHandlers
from cdp_identity.privacy import PrivacyApplied, PrivacyHandlers
from cdp_identity.projection import IdentityProjection
from cdp_identity.settings import IdentitySettings
from cdp_identity.store import TABLES
from cdp_kit.eventlog import EventLog
from cdp_kit.grpc_server import Registration
from cdp_kit.processor import Input, Processor
from cdp_kit.runtime import Service
from cdp_kit.streams import (
    IDENTITY_CONFIG,
    IDENTITY_FRAGMENTS,
    IDENTITY_READS_INGEST,
    IDENTITY_READS_PRIVACY_APPLIED,
    PRIVACY_REQUESTS,
)
from cdp_kit.vault import PersonVault

SQLITE_CACHE_KIB = 64 * 1024
# A fetched batch allocates millions of objects (graph nodes and links, sets, row tuples) that
# hold no reference cycles; a large share live until the transaction ends. CPython's default
# generation-0 threshold (700) runs the cyclic collector every few records, over a heap that
# holds the working set and the normaliser's memo: a fifth of the processor's CPU. At 100,000
# the collector still scanned the surviving working set ~20 times per 100,000 records (about a
# tenth of the CPU); at 1,000,000 it runs about once per 25,600-record batch (a third of that).
GC_THRESHOLD = (1_000_000, 20, 20)


def collect_less_often() -> None:
    """Raise the cyclic collector's thresholds (process-wide; never lowers them)."""
    current = gc.get_threshold()
    gc.set_threshold(*(max(a, b) for a, b in zip(current, GC_THRESHOLD, strict=True)))


def _sqlite_cache(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA cache_size=-{SQLITE_CACHE_KIB}")
    cursor.execute("PRAGMA temp_store=MEMORY")
    cursor.close()


def sqlite_cache(engine: Engine) -> None:
    """The graph's B-trees are read and written at random: a larger page cache (the default is
    2 MiB) keeps their upper levels in memory. Bounded, per connection."""
    if engine.dialect.name == "sqlite" and not event.contains(engine, "connect", _sqlite_cache):
        event.listen(engine, "connect", _sqlite_cache)


def build_processor(
    settings: IdentitySettings, engine: Engine, eventlog: EventLog, vault: PersonVault | None = None
) -> tuple[Processor, IdentityProjection]:
    sqlite_cache(engine)
    collect_less_often()
    vault = vault if vault is not None else PersonVault.of(eventlog.js, seal=settings.seal_personal_data)
    projection = IdentityProjection(settings.rules(), vault)
    processor = Processor(
        service="identity",
        engine=engine,
        eventlog=eventlog,
        tables=TABLES,
        own_logs=[IDENTITY_CONFIG, IDENTITY_FRAGMENTS, PRIVACY_REQUESTS],
        projection=projection,
        inputs=[
            Input(IDENTITY_READS_INGEST, RecordsToFragments(projection, vault)),
            Input(IDENTITY_READS_PRIVACY_APPLIED, PrivacyApplied()),
        ],
        batch_size=settings.batch_size,
        vault=vault,
    )
    return processor, projection


# What a standby answers from its store (docs/operations.md, "Active/standby").
REPLICA_READS = frozenset({"Resolve", "GetGraph", "ListNamespaces", "GetStats"})


def build(settings: IdentitySettings, engine: Engine, eventlog: EventLog, vault: PersonVault | None = None) -> Service:
    processor, projection = build_processor(settings, engine, eventlog, vault)
    vault = processor.vault
    assert vault is not None
    name = identity_pb2.DESCRIPTOR.services_by_name["IdentityService"].full_name
    servicer = IdentityServicer(IdentityHandlers(processor, projection))
    applied = processor.inputs[1].handler
    assert isinstance(applied, PrivacyApplied)
    privacy = PrivacyHandlers(processor, projection.graph, projection.rules, vault, applied)
    privacy_name = privacy_pb2.DESCRIPTOR.services_by_name["PrivacyService"].full_name
    return Service(
        processor,
        [
            Registration(
                name, identity_pb2_grpc.add_IdentityServiceServicer_to_server, servicer, replica_reads=REPLICA_READS
            ),
            Registration(privacy_name, privacy_pb2_grpc.add_PrivacyServiceServicer_to_server, PrivacyServicer(privacy)),
        ],
        background=[privacy.completer_loop],
    )
