"""Settings of the segmentation service (environment variables with the CDP_ prefix)."""

from __future__ import annotations

from typing import ClassVar

from cdp_kit.settings import ServiceSettings


class SegmentationSettings(ServiceSettings):
    service: ClassVar[str] = "segmentation"
    default_port: ClassVar[int] = 50053
    # How often the log's clock moves (only while windows, retention or schedules need it).
    clock_interval_s: float = 5.0
    # Events kept per profile; beyond it the oldest are dropped.
    event_cap: int = 5000
