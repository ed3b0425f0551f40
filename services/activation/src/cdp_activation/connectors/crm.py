"""Klaviyo (list relationships + bulk import), Salesforce Marketing Cloud (data extension
rows with a membership flag) and The Trade Desk CRM data (full-list replace of UID2-style
Base64 SHA-256 identifiers)."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any, ClassVar
from urllib.parse import quote

from pydantic import Field

from cdp_activation import identifiers as ids
from cdp_activation.connectors import http
from cdp_activation.connectors.ads import chunks
from cdp_activation.connectors.base import (
    Batch,
    Connector,
    ConnectorConfig,
    DeliveryError,
    Record,
    SendContext,
    SendResult,
    count_drop,
)

# ----------------------------------------------------------------------- Klaviyo


class KlaviyoConfig(ConnectorConfig):
    base_url: str = "https://a.klaviyo.com"
    api_key: str = Field(min_length=1)
    list_id: str = Field(min_length=1)
    revision: str = Field(default="2026-04-15", pattern=r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")
    rate_per_s: float = 10.0  # Klaviyo M tier burst
    phone_region: str = "US"


class Klaviyo(Connector):
    """Adds: one profile bulk-import job (≤10,000 profiles) that upserts the profiles and
    adds them to the list. Removes: look each email up, then DELETE the list relationships
    (≤1,000 per call); removing from a list leaves consent untouched."""

    name = "klaviyo"
    config_model: ClassVar[type[ConnectorConfig]] = KlaviyoConfig
    identity_namespaces = ("email", "phone")
    identity_rule = "any"

    def headers(self, cfg: KlaviyoConfig) -> dict[str, str]:
        return {
            "Authorization": f"Klaviyo-API-Key {cfg.api_key}",
            "revision": cfg.revision,
            "Accept": "application/vnd.api+json",
        }

    erasure = "delete the user"

    def erase_identifiers(self, config: ConnectorConfig, rec: Record) -> dict[str, list[str]]:
        """Klaviyo deletes by ``email`` or ``phone_number`` (E.164), as given: it takes no hashes."""
        assert isinstance(config, KlaviyoConfig)
        out: dict[str, list[str]] = {}
        for key, namespace, normalise in (
            ("email", "email", ids.email_basic),
            ("phone_number", "phone", functools.partial(ids.canonical_phone, default_region=config.phone_region)),
        ):
            for raw in rec.identities.get(namespace, []):
                if (value := normalise(raw)) and value not in out.get(key, []):
                    out.setdefault(key, []).append(value)
        return out

    async def erase(self, ctx: SendContext, config: ConnectorConfig, batch: Batch) -> SendResult:
        """One data-privacy deletion job per identifier (Klaviyo takes exactly one a job, and
        deletes every profile that has it)."""
        assert isinstance(config, KlaviyoConfig)
        root = config.base_url.rstrip("/")
        hdrs = {**self.headers(config), "Content-Type": "application/vnd.api+json"}
        jobs = 0
        for rec in batch.records:
            for key in ("email", "phone_number"):
                for value in rec.identities.get(key, []):
                    body = {
                        "data": {
                            "type": "data-privacy-deletion-job",
                            "attributes": {"profile": {"data": {"type": "profile", "attributes": {key: value}}}},
                        }
                    }
                    url = f"{root}/api/data-privacy-deletion-jobs"
                    await http.call(ctx.http, "POST", url, data=_dump(body), headers=hdrs, classify=klaviyo_error)
                    jobs += 1
        return SendResult(jobs, f"{root}/api/data-privacy-deletion-jobs")

    async def send(self, ctx: SendContext, config: ConnectorConfig, batch: Batch) -> SendResult:
        assert isinstance(config, KlaviyoConfig)
        root = config.base_url.rstrip("/")
        hdrs = {**self.headers(config), "Content-Type": "application/vnd.api+json"}
        people: list[dict[str, Any]] = []
        rejected: dict[str, int] = {}
        for rec in batch.records:
            attrs: dict[str, Any] = {}
            if email := ids.email_basic(rec.first("email")):
                attrs["email"] = email
            if phone := ids.canonical_phone(rec.first("phone"), config.phone_region):
                attrs["phone_number"] = phone
            elif rec.first("phone").strip():
                count_drop(rejected, "phone")  # Klaviyo refuses a number that is not valid E.164
            if attrs:
                attrs["properties"] = {a: rec.attributes[a] for a in batch.attributes if a in rec.attributes}
                people.append(attrs)
        if missing := len(batch.records) - len(people):
            rejected["no valid identifier"] = missing
        if batch.action == "add":
            for part in chunks(people, 10_000):
                body = {
                    "data": {
                        "type": "profile-bulk-import-job",
                        "attributes": {"profiles": {"data": [{"type": "profile", "attributes": p} for p in part]}},
                        "relationships": {"lists": {"data": [{"type": "list", "id": config.list_id}]}},
                    }
                }
                await http.call(
                    ctx.http, "POST", f"{root}/api/profile-bulk-import-jobs", data=_dump(body), headers=hdrs
                )
            return SendResult(len(people), f"{root}/api/lists/{config.list_id}", rejected)
        found: list[str] = []
        for person in people:
            if "email" not in person:
                continue
            condition = "equals(email," + json.dumps(person["email"]) + ")"
            url = f"{root}/api/profiles?filter={quote(condition)}"
            resp = await http.call(ctx.http, "GET", url, headers=self.headers(config))
            data = resp.body.get("data", []) if isinstance(resp.body, dict) else []
            found += [str(d["id"]) for d in data if isinstance(d, dict) and "id" in d]
        for part in chunks(found, 1000):
            removal: dict[str, Any] = {"data": [{"type": "profile", "id": pid} for pid in part]}
            url = f"{root}/api/lists/{config.list_id}/relationships/profiles"
            await http.call(ctx.http, "DELETE", url, data=_dump(removal), headers=hdrs)
        return SendResult(len(found), f"{root}/api/lists/{config.list_id}", rejected)


def klaviyo_error(resp: http.Response) -> DeliveryError | None:
    """Klaviyo's answer by status and error codes only: a deletion's error detail may repeat the
    email or phone it was given, which must not reach a log or the delivery log."""
    error = http.default_error(resp)
    if error is None:
        return None
    found = resp.body.get("errors") if isinstance(resp.body, dict) else None
    codes = sorted({str(e.get("code")) for e in found if isinstance(e, dict) and e.get("code")}) if found else []
    error.reason = f"HTTP {resp.status}: Klaviyo {','.join(codes) or 'error'}"
    return error


def _dump(body: Any) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


# ------------------------------------------------------- Salesforce Marketing Cloud


class SfmcConfig(ConnectorConfig):
    base_url: str = Field(pattern=r"^https?://", description="https://<subdomain>.rest.marketingcloudapis.com")
    auth_url: str = Field(pattern=r"^https?://", description="https://<subdomain>.auth.marketingcloudapis.com")
    client_id: str = Field(min_length=1)
    client_secret: str = Field(min_length=1)
    data_extension_key: str = Field(min_length=1)
    primary_key: str = "profile_id"
    member_column: str = "is_member"


class SalesforceMarketingCloud(Connector):
    """Upserts data extension rows (async rows API): the primary key, the mapped
    attributes and identities, and a membership flag (false = removed)."""

    name = "salesforce_marketing_cloud"
    config_model: ClassVar[type[ConnectorConfig]] = SfmcConfig

    async def token(self, ctx: SendContext, cfg: SfmcConfig) -> str:
        body = {"grant_type": "client_credentials", "client_id": cfg.client_id, "client_secret": cfg.client_secret}
        resp = await http.call(ctx.http, "POST", f"{cfg.auth_url.rstrip('/')}/v2/token", json_body=body)
        token = resp.body.get("access_token") if isinstance(resp.body, dict) else None
        if not token:
            raise DeliveryError("SFMC token answer has no access_token", permanent=True)
        return str(token)

    async def send(self, ctx: SendContext, config: ConnectorConfig, batch: Batch) -> SendResult:
        assert isinstance(config, SfmcConfig)
        token = await self.token(ctx, config)
        url = f"{config.base_url.rstrip('/')}/data/v1/async/dataextensions/key:{config.data_extension_key}/rows"
        items = []
        for rec in batch.records:
            row: dict[str, Any] = {config.primary_key: rec.profile_id, config.member_column: batch.action == "add"}
            row.update({ns: rec.first(ns) for ns in batch.identities if rec.first(ns)})
            if batch.action == "add":
                row.update({a: rec.attributes[a] for a in batch.attributes if a in rec.attributes})
            items.append(row)
        for part in chunks(items, 5000):
            await http.call(
                ctx.http, "POST", url, json_body={"items": part}, headers={"Authorization": f"Bearer {token}"}
            )
        return SendResult(sum(len(i) - 2 for i in items), url)


# ----------------------------------------------------------------- The Trade Desk


class TradeDeskConfig(ConnectorConfig):
    base_url: str = "https://api.thetradedesk.com"
    advertiser_id: str = Field(min_length=1)
    crm_data_id: str = Field(min_length=1)
    auth_token: str = Field(min_length=1)
    pii_type: str = Field(
        default="EmailHashedUnifiedId2", pattern=r"^(EmailHashedUnifiedId2|PhoneNumberHashedUnifiedId2)$"
    )
    phone_region: str = "US"


def _digest_only(raw: str) -> str | None:
    """A hashed namespace has nothing to normalise: only a SHA-256 hex digest is usable."""
    return None


class TradeDeskCrm(Connector):
    """CRM data with MergeMode Replace: every batch uploads the plan's whole audience
    (removal is by omission), as Base64 SHA-256 (UID2 normalisation); warns below the
    1,500-record ingestion minimum."""

    name = "trade_desk_crm"
    config_model: ClassVar[type[ConnectorConfig]] = TradeDeskConfig
    # email_sha256 / phone_sha256 hold SHA-256 hex digests made elsewhere: re-encoded to Base64.
    identity_namespaces = ("email", "phone", "email_sha256", "phone_sha256")
    identity_rule = "any"
    idempotent = True  # a replace of the same list is a no-op
    min_audience = 1500

    def wants_snapshot(self, config: ConnectorConfig) -> bool:
        return True

    @staticmethod
    def identifier(cfg: TradeDeskConfig, rec: Record, rejected: dict[str, int]) -> str | None:
        """The member's first identifier of the list's PII type that normalises, as Base64
        SHA-256 (a value that is already a SHA-256 hex digest is re-encoded, not hashed)."""
        sources: list[tuple[str, str, Callable[[str], str | None]]]
        if cfg.pii_type.startswith("Phone"):
            phone = functools.partial(ids.canonical_phone, default_region=cfg.phone_region)
            sources = [("phone", "phone", phone), ("phone_sha256", "hash", _digest_only)]
        else:
            sources = [("email", "email", ids.email_uid2), ("email_sha256", "hash", _digest_only)]
        for ns, kind, normalise in sources:
            for raw in rec.identities.get(ns, []):
                if value := ids.hashed(raw, normalise, ids.sha256_b64):
                    return value
                if raw.strip():
                    count_drop(rejected, kind)
        return None

    async def send(self, ctx: SendContext, config: ConnectorConfig, batch: Batch) -> SendResult:
        assert isinstance(config, TradeDeskConfig)
        records = batch.snapshot if batch.snapshot is not None else batch.records
        rejected: dict[str, int] = {}
        lines = sorted({v for rec in records if (v := self.identifier(config, rec, rejected))})
        headers = {"TTD-Auth": config.auth_token}
        url = f"{config.base_url.rstrip('/')}/v3/crmdata/segment/{config.advertiser_id}/{config.crm_data_id}"
        body = {"PiiType": config.pii_type, "MergeMode": "Replace", "RetentionEnabled": True}
        resp = await http.call(ctx.http, "POST", url, json_body=body, headers=headers)
        upload = resp.body.get("Url") if isinstance(resp.body, dict) else None
        if not upload:
            raise DeliveryError("TTD answered no upload Url", permanent=False)
        data = ("\n".join(lines) + "\n").encode() if lines else b""
        await http.call(ctx.http, "PUT", str(upload), data=data, headers={"Content-Type": "text/plain"})
        return SendResult(len(lines), url, rejected=rejected, warnings=self.warnings(len(lines)))
