"""Settings of the segmentation service (environment variables with the CDP_ prefix)."""

from __future__ import annotations

from typing import ClassVar

from cdp_kit.settings import ServiceSettings


class SegmentationSettings(ServiceSettings):
    service: ClassVar[str] = "segmentation"
    default_port: ClassVar[int] = 50053
