"""Settings of the activation service (environment variables with the CDP_ prefix)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field

from cdp_kit.settings import ServiceSettings


class ActivationSettings(ServiceSettings):
    service: ClassVar[str] = "activation"
    default_port: ClassVar[int] = 50054

    export_dir: Path | None = Field(
        default=None, description="Root of file_export destinations; unset = data_dir/exports"
    )
    delivery_interval_s: float = Field(default=0.5, gt=0, description="How often pending deliveries are sent")

    def resolved_export_dir(self) -> Path:
        return self.export_dir or self.data_dir / "exports"
