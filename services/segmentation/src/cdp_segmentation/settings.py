"""Settings of the segmentation service (environment variables with the CDP_ prefix)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from cdp_kit.settings import ServiceSettings


class SegmentationSettings(ServiceSettings):
    service: ClassVar[str] = "segmentation"
    default_port: ClassVar[int] = 50053
    clock_interval_s: float = Field(
        default=5.0,
        gt=0,
        description="Seconds between clock ticks (only while windows, retention or schedules need them)",
    )
    event_cap: int = Field(default=5000, ge=1, description="Events kept per profile; beyond it the oldest are dropped")
