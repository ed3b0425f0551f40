"""Settings of the ingest service (environment variables with the CDP_ prefix)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from cdp_ingest.limits import (
    DEFAULT_EVENT_BYTES,
    DEFAULT_FIELD_BYTES,
    DEFAULT_MAX_DEPTH,
    DEFAULT_ROW_BYTES,
    MAX_DEPTH_CEILING,
    Limits,
)
from cdp_kit.settings import ServiceSettings


class IngestSettings(ServiceSettings):
    service: ClassVar[str] = "ingest"
    default_port: ClassVar[int] = 50051

    error_threshold: float = Field(default=0.05, ge=0, le=1, description="Share of rejected rows that fails a batch")
    max_profile_record_bytes: int = Field(default=100_000, ge=1, description="Largest accepted profile record")
    max_event_bytes: int = Field(default=10_000, ge=1, description="Largest accepted event")
    max_kept_rejects: int = Field(default=100_000, ge=0, description="Rejected rows kept per batch for listing")
    read_workers: int = Field(
        default=2, ge=0, le=64, description="Processes reading CSV files over 1 MiB (0: read in the service process)"
    )
    # Limits checked on raw input before any parser runs (cdp_ingest.limits says why each
    # default): what is beyond them is rejected with its rule, never handed to json or csv.
    max_json_depth: int = Field(
        default=DEFAULT_MAX_DEPTH,
        ge=1,
        le=MAX_DEPTH_CEILING,
        description="Deepest nesting of a record or event (itself level 1); deeper: rule depth",
    )
    max_field_bytes: int = Field(
        default=DEFAULT_FIELD_BYTES, ge=1, description="Largest field of a file row or event; larger: rule field_size"
    )
    max_row_bytes: int = Field(
        default=DEFAULT_ROW_BYTES, ge=1, description="Largest row of a file, read unparsed; larger: rule row_size"
    )
    max_collect_event_bytes: int = Field(
        default=DEFAULT_EVENT_BYTES,
        ge=1,
        description="Largest message on cdp.collect, read unparsed; larger: rule event_size",
    )

    event_dedupe_horizon_days: int = Field(
        default=30,
        ge=0,
        description="Days an event id is remembered to drop a re-sent event; older ids are forgotten and "
        "such an event is accepted again (0: remember for ever, the index grows without bound)",
    )

    # Until gRPC callers have roles (cdp_kit.access), the one way to let anyone read raw rejects.
    allow_raw_rejects: bool = Field(
        default=False,
        description="With gRPC security off (CDP_GRPC_INSECURE): let every caller ask for rejected rows' raw "
        "values (with security on, the operator role decides alone)",
    )

    def limits(self) -> Limits:
        return Limits(
            max_depth=self.max_json_depth,
            field_bytes=self.max_field_bytes,
            row_bytes=self.max_row_bytes,
            event_bytes=self.max_collect_event_bytes,
        )
