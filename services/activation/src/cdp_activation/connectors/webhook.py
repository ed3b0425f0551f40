"""webhook: JSON batches over HTTP, signed with HMAC-SHA256; segment_share: memberships with
all of a profile's identities to a DMP-style endpoint (Audience Manager sharing)."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any, ClassVar

from pydantic import Field

from cdp_activation.connectors import http
from cdp_activation.connectors.base import Batch, Connector, ConnectorConfig, SendContext, SendResult

SIGNATURE_HEADER = "X-CDP-Signature"
BATCH_HEADER = "Idempotency-Key"


class WebhookConfig(ConnectorConfig):
    base_url: str = Field(min_length=1, pattern=r"^https?://")
    secret: str = Field(min_length=8, description="HMAC-SHA256 key; the signature is sha256=<hex of body>")
    path: str = "/"


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class Webhook(Connector):
    name = "webhook"
    config_model: ClassVar[type[ConnectorConfig]] = WebhookConfig
    idempotent = True

    def body(self, batch: Batch) -> dict[str, Any]:
        return {
            "batch_id": batch.id,
            "segment": batch.segment,
            "action": batch.action,
            "records": [
                {
                    "profile_id": r.profile_id,
                    "identities": {ns: r.identities.get(ns, []) for ns in batch.identities if r.identities.get(ns)},
                    "attributes": {a: r.attributes.get(a) for a in batch.attributes},
                }
                for r in batch.records
            ],
        }

    async def send(self, ctx: SendContext, config: ConnectorConfig, batch: Batch) -> SendResult:
        assert isinstance(config, WebhookConfig)
        body = json.dumps(self.body(batch), separators=(",", ":"), sort_keys=True).encode()
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(config.secret, body),
            BATCH_HEADER: batch.id,
        }
        url = config.base_url.rstrip("/") + config.path
        await http.call(ctx.http, "POST", url, data=body, headers=headers)
        activated = sum(len(r.identities.get(ns, [])) for r in batch.records for ns in batch.identities)
        return SendResult(activated=activated, location=url)


class SegmentShareConfig(WebhookConfig):
    partner: str = Field(min_length=1, description="The DMP partner id")


class SegmentShare(Webhook):
    """Every identity of each profile (not only the plan's) travels with the membership."""

    name = "segment_share"
    config_model: ClassVar[type[ConnectorConfig]] = SegmentShareConfig
    all_identities = True
    identity_rule = "any"

    def body(self, batch: Batch) -> dict[str, Any]:
        return {
            "batch_id": batch.id,
            "segment": batch.segment,
            "status": "realized" if batch.action == "add" else "exited",
            "members": [
                {
                    "profile_id": r.profile_id,
                    "identities": [
                        {"namespace": ns, "value": v} for ns, vs in sorted(r.identities.items()) for v in vs
                    ],
                }
                for r in batch.records
            ],
        }

    async def send(self, ctx: SendContext, config: ConnectorConfig, batch: Batch) -> SendResult:
        assert isinstance(config, SegmentShareConfig)
        result = await super().send(ctx, config, batch)
        result.activated = sum(len(vs) for r in batch.records for vs in r.identities.values())
        return result
