"""Settings of the identity service (environment variables with the CDP_ prefix)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from cdp_identity.domain import DEFAULT_BLOCKLIST, Rules
from cdp_kit.settings import ServiceSettings


class IdentitySettings(ServiceSettings):
    service: ClassVar[str] = "identity"
    default_port: ClassVar[int] = 50052

    identity_blocklist: list[str] = Field(
        default=list(DEFAULT_BLOCKLIST),
        description="Junk identity values that never link anyone (JSON list; compared case-insensitively)",
    )
    unique_namespaces: list[str] = Field(
        default=["crm_id", "loyalty_id"], description="Standard namespaces a graph holds at most one value of"
    )
    max_identities: int = Field(default=50, ge=2, le=10_000, description="Identities per graph before detaching")

    def rules(self) -> Rules:
        return Rules.make(
            blocklist=self.identity_blocklist,
            unique=self.unique_namespaces,
            max_identities=self.max_identities,
            default_phone_region=self.default_phone_region,
        )
