"""Settings of the identity service (environment variables with the CDP_ prefix)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from cdp_kit.settings import ServiceSettings


class IdentitySettings(ServiceSettings):
    service: ClassVar[str] = "identity"
    default_port: ClassVar[int] = 50052

    default_phone_region: str = Field(default="US", description="Region assumed for phone numbers without +")
