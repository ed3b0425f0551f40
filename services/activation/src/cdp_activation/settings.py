"""Settings of the activation service (environment variables with the CDP_ prefix)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field

from cdp_kit.settings import ServiceSettings


class ActivationSettings(ServiceSettings):
    service: ClassVar[str] = "activation"
    default_port: ClassVar[int] = 50054

    export_dir: Path | None = Field(
        default=None, description="Root of file_export destinations; unset = data_dir/exports"
    )
    delivery_interval_s: float = Field(default=0.2, gt=0, description="How often membership changes are planned")
    unknown_consent: Literal["y", "n"] = Field(
        default="y", description='Consent assumed when a profile has none for the action ("y" = send)'
    )

    def resolved_export_dir(self) -> Path:
        return self.export_dir or self.data_dir / "exports"
