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
    removal_key_days: float = Field(
        default=30.0,
        gt=0,
        description="Days a privacy removal batch not yet delivered keeps the vault key of its records "
        "(a dead letter may be redriven meanwhile); then the key is destroyed and the removal fails for good",
    )
    unknown_consent: Literal["y", "n"] = Field(
        default="y", description='Consent assumed when a profile has none for the action ("y" = send)'
    )

    master_key_file: Path | None = Field(
        default=None,
        description="Master key file (envelope encryption of destination secrets); unset = "
        "data_dir/secrets/master.key, created on first start",
    )

    def resolved_master_key_file(self) -> Path:
        return self.master_key_file or self.data_dir / "secrets" / "master.key"

    def resolved_export_dir(self) -> Path:
        return self.export_dir or self.data_dir / "exports"
