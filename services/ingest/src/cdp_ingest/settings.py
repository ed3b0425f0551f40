"""Settings of the ingest service (environment variables with the CDP_ prefix)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

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
