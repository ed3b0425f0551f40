"""Advertising destinations: hashed identifiers exactly per ../shared/specs/destinations.md."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, ClassVar

from pydantic import Field

from cdp_activation import identifiers as ids
from cdp_activation.connectors import http
from cdp_activation.connectors.base import (
    Batch,
    Connector,
    ConnectorConfig,
    DeliveryError,
    Record,
    SendContext,
    SendResult,
)


def chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)] or []


def _hashed(value: str | None) -> str:
    return ids.hash_or_none(value) or ""


# ------------------------------------------------------------------------- Meta


META_RETRYABLE = {1, 2, 4, 17, 341, 368, 613, 5000, 21009, 80003, 80004}
META_PERMANENT = {100, 105, 190, 200, 294, 2650, 2655, 1487301, 1487366}
META_MAX_ROWS = 10_000


class MetaConfig(ConnectorConfig):
    base_url: str = "https://graph.facebook.com"
    api_version: str = "v25.0"
    audience_id: str = Field(min_length=1, pattern=r"^[0-9]+$")
    access_token: str = Field(min_length=1)
    phone_region: str = "US"


def meta_error(resp: http.Response) -> DeliveryError | None:
    if 200 <= resp.status < 300:
        return None
    found = resp.body.get("error") if isinstance(resp.body, dict) else None
    error: dict[str, Any] = found if isinstance(found, dict) else {}
    code, sub = error.get("code"), error.get("error_subcode")
    reason = f"HTTP {resp.status}: Meta error {code}/{sub}: {http.short(str(error.get('message', '')))}"
    if code in META_PERMANENT or sub in META_PERMANENT:
        return DeliveryError(reason, permanent=True)
    if code in META_RETRYABLE or resp.status in (408, 429) or resp.status >= 500 or code is not None:
        # Unknown Meta codes are retried (RudderStack practice, spec §1.4).
        return DeliveryError(reason, permanent=False, retry_after=http.retry_after(resp.headers, resp.body))
    return http.default_error(resp)


# Meta keys from profile data: identity namespaces, then attributes.
META_IDENTITY_KEYS = {"email": "EMAIL", "phone": "PHONE", "madid": "MADID", "crm_id": "EXTERN_ID"}
META_ATTRIBUTE_KEYS = {
    "first_name": ("FN", ids.name_meta),
    "last_name": ("LN", ids.name_meta),
    "gender": ("GEN", ids.gender),
    "birth_year": ("DOBY", ids.dob_year),
    "birth_month": ("DOBM", ids.dob_month),
    "birth_day": ("DOBD", ids.dob_day),
    "city": ("CT", ids.city),
    "state": ("ST", ids.state),
    "zip": ("ZIP", ids.zip_code),
    "country": ("COUNTRY", ids.country),
}


class MetaCustomAudience(Connector):
    name = "meta_custom_audience"
    config_model: ClassVar[type[ConnectorConfig]] = MetaConfig
    idempotent = True  # session_id and batch_seq derive from the batch id
    identity_namespaces = ("email", "phone", "madid", "crm_id")
    identity_rule = "any"
    min_audience = 100

    def payload(self, cfg: MetaConfig, batch: Batch) -> tuple[list[str], list[list[str]], int]:
        id_keys = [(ns, META_IDENTITY_KEYS[ns]) for ns in batch.identities if ns in META_IDENTITY_KEYS]
        attr_keys = [(a, *META_ATTRIBUTE_KEYS[a]) for a in batch.attributes if a in META_ATTRIBUTE_KEYS]
        schema = [key for _, key in id_keys] + [key for _, key, _ in attr_keys]
        rows: list[list[str]] = []
        rejected = 0
        for rec in batch.records:
            row = [self.identity(cfg, ns, rec.first(ns)) for ns, _ in id_keys]
            if not any(row):
                rejected += 1
                continue
            for attr, _, normalise in attr_keys:
                value = rec.attributes.get(attr)
                row.append(_hashed(normalise(str(value))) if value not in (None, "") else "")
            rows.append(row)
        return schema, rows, rejected

    @staticmethod
    def identity(cfg: MetaConfig, ns: str, raw: str) -> str:
        if not raw:
            return ""
        if ns == "email":
            return _hashed(ids.email_meta(raw))
        if ns == "phone":
            return _hashed(ids.phone_digits(ids.canonical_phone(raw, cfg.phone_region)))
        if ns == "madid":
            return ids.madid(raw) or ""
        return raw.strip()  # EXTERN_ID: sent as is

    async def send(self, ctx: SendContext, config: ConnectorConfig, batch: Batch) -> SendResult:
        assert isinstance(config, MetaConfig)
        schema, rows, rejected = self.payload(config, batch)
        url = f"{config.base_url.rstrip('/')}/{config.api_version}/{config.audience_id}/users"
        method = "POST" if batch.action == "add" else "DELETE"
        session_id = int(hashlib.sha256(batch.id.encode()).hexdigest()[:13], 16)
        parts = chunks(rows, META_MAX_ROWS)
        for n, part in enumerate(parts, start=1):
            body = {
                "payload": {"schema": schema, "data": part},
                "session": {
                    "session_id": session_id,
                    "batch_seq": n,
                    "last_batch_flag": n == len(parts),
                    "estimated_num_total": len(rows),
                },
            }
            headers = {"Authorization": f"Bearer {config.access_token}"}
            await http.call(ctx.http, method, url, json_body=body, headers=headers, classify=meta_error)
        id_count = sum(1 for key in schema if key in META_IDENTITY_KEYS.values())
        activated = sum(1 for row in rows for v in row[:id_count] if v)
        return SendResult(
            activated=activated,
            location=url,
            rejected={"no valid identifier": rejected} if rejected else {},
            warnings=self.warnings(ctx.members_after),
        )


# ----------------------------------------------------------------------- Google


GOOGLE_RETRYABLE_CODES = {"CONCURRENT_MODIFICATION", "TRANSIENT_ERROR", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"}
GOOGLE_MAX_IDENTIFIERS = 10_000
GOOGLE_MAX_PER_USER = 20


class GoogleConfig(ConnectorConfig):
    base_url: str = "https://googleads.googleapis.com"
    api_version: str = "v24"
    customer_id: str = Field(pattern=r"^[0-9]{10}$")
    user_list_id: str = Field(pattern=r"^[0-9]+$")
    developer_token: str = Field(min_length=1)
    access_token: str = Field(min_length=1)
    login_customer_id: str = Field(default="", pattern=r"^([0-9]{10})?$")
    # Google's Data Manager gmail rule (dots and "+suffix" removed for gmail.com/googlemail.com).
    gmail_rule: bool = True
    phone_region: str = "US"


def google_error(resp: http.Response) -> DeliveryError | None:
    if 200 <= resp.status < 300:
        return None
    text = resp.text
    found = resp.body.get("error") if isinstance(resp.body, dict) else None
    status = found.get("status", "") if isinstance(found, dict) else ""
    reason = f"HTTP {resp.status}: {status or http.short(text)}"
    if any(code in text for code in GOOGLE_RETRYABLE_CODES) or resp.status in (429, 504) or resp.status >= 500:
        matched = next((c for c in GOOGLE_RETRYABLE_CODES if c in text), "")
        return DeliveryError(f"{reason} {matched}".strip(), permanent=False, retry_after=http.retry_after(resp.headers))
    return DeliveryError(reason, permanent=True)


class GoogleCustomerMatch(Connector):
    name = "google_customer_match"
    config_model: ClassVar[type[ConnectorConfig]] = GoogleConfig
    identity_namespaces = ("email", "phone")
    identity_rule = "any"
    min_audience = 100

    def user_identifiers(self, cfg: GoogleConfig, rec: Record) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for raw in rec.identities.get("email", []):
            if value := ids.hash_or_none(ids.email_google(raw, cfg.gmail_rule)):
                out.append({"hashedEmail": value})
        for raw in rec.identities.get("phone", []):
            if value := ids.hash_or_none(ids.canonical_phone(raw, cfg.phone_region)):
                out.append({"hashedPhoneNumber": value})
        first, last = rec.attributes.get("first_name"), rec.attributes.get("last_name")
        country, postal = rec.attributes.get("country"), rec.attributes.get("postal_code")
        if first and last and country and postal:
            out.append(
                {
                    "addressInfo": {
                        "hashedFirstName": _hashed(ids.google_first_name(str(first))),
                        "hashedLastName": _hashed(ids.google_last_name(str(last))),
                        "countryCode": str(country).strip().upper(),
                        "postalCode": str(postal).strip(),
                    }
                }
            )
        unique: list[dict[str, Any]] = []
        for item in out:
            if item not in unique:
                unique.append(item)
        return unique[:GOOGLE_MAX_PER_USER]

    async def send(self, ctx: SendContext, config: ConnectorConfig, batch: Batch) -> SendResult:
        assert isinstance(config, GoogleConfig)
        base = f"{config.base_url.rstrip('/')}/{config.api_version}"
        headers = {"Authorization": f"Bearer {config.access_token}", "developer-token": config.developer_token}
        if config.login_customer_id:
            headers["login-customer-id"] = config.login_customer_id
        users = [u for rec in batch.records if (u := self.user_identifiers(config, rec))]
        rejected = len(batch.records) - len(users)
        if not users:
            return SendResult(activated=0, rejected={"no valid identifier": rejected} if rejected else {})
        metadata: dict[str, Any] = {"userList": f"customers/{config.customer_id}/userLists/{config.user_list_id}"}
        if batch.action == "add":
            metadata["consent"] = {"adUserData": "GRANTED", "adPersonalization": "GRANTED"}
        job = {"job": {"type": "CUSTOMER_MATCH_USER_LIST", "customerMatchUserListMetadata": metadata}}
        created = await http.call(
            ctx.http,
            "POST",
            f"{base}/customers/{config.customer_id}/offlineUserDataJobs:create",
            json_body=job,
            headers=headers,
            classify=google_error,
        )
        resource = created.body.get("resourceName", "") if isinstance(created.body, dict) else ""
        if not resource.startswith(f"customers/{config.customer_id}/offlineUserDataJobs/"):
            raise DeliveryError("offlineUserDataJobs:create answered no job resourceName", permanent=False)
        op = "create" if batch.action == "add" else "remove"
        partial = 0
        group: list[list[dict[str, Any]]] = []
        count = 0
        groups: list[list[list[dict[str, Any]]]] = []
        for user in users:
            if count + len(user) > GOOGLE_MAX_IDENTIFIERS and group:
                groups.append(group)
                group, count = [], 0
            group.append(user)
            count += len(user)
        groups.append(group)
        for part in groups:
            body = {"operations": [{op: {"userIdentifiers": u}} for u in part], "enablePartialFailure": True}
            added = await http.call(
                ctx.http,
                "POST",
                f"{base}/{resource}:addOperations",
                json_body=body,
                headers=headers,
                classify=google_error,
            )
            if isinstance(added.body, dict) and added.body.get("partialFailureError"):
                details = added.body["partialFailureError"].get("details", [])
                partial += sum(len(d.get("errors", [])) for d in details if isinstance(d, dict))
        await http.call(
            ctx.http, "POST", f"{base}/{resource}:run", json_body={}, headers=headers, classify=google_error
        )
        rejected_by = {"no valid identifier": rejected} if rejected else {}
        if partial:
            rejected_by["rejected by destination"] = partial
        activated = sum(len(u) for u in users) - partial
        return SendResult(activated, location=resource, rejected=rejected_by, warnings=self.warnings(ctx.members_after))


# ------------------------------------------------------------------ Snap, TikTok, LinkedIn


class SnapConfig(ConnectorConfig):
    base_url: str = "https://adsapi.snapchat.com"
    segment_id: str = Field(min_length=1)
    access_token: str = Field(min_length=1)
    phone_region: str = "US"


SNAP_SCHEMAS: dict[str, tuple[str, Callable[[str, str], str | None]]] = {
    "email": ("EMAIL_SHA256", lambda v, r: ids.email_basic(v)),
    "phone": ("PHONE_SHA256", lambda v, r: ids.phone_digits(ids.canonical_phone(v, r))),
    "madid": ("MOBILE_AD_ID_SHA256", lambda v, r: ids.madid(v)),
}


class SnapAudience(Connector):
    name = "snap_audience"
    config_model: ClassVar[type[ConnectorConfig]] = SnapConfig
    identity_namespaces = ("email", "phone", "madid")
    identity_rule = "any"
    min_audience = 1000

    async def send(self, ctx: SendContext, config: ConnectorConfig, batch: Batch) -> SendResult:
        assert isinstance(config, SnapConfig)
        url = f"{config.base_url.rstrip('/')}/v1/segments/{config.segment_id}/users"
        method = "POST" if batch.action == "add" else "DELETE"
        headers = {"Authorization": f"Bearer {config.access_token}"}
        activated = 0
        for ns in [n for n in batch.identities if n in SNAP_SCHEMAS]:
            schema, normalise = SNAP_SCHEMAS[ns]
            hashed = sorted(
                {
                    h
                    for r in batch.records
                    for v in r.identities.get(ns, [])
                    if (h := _hashed(normalise(v, config.phone_region)))
                }
            )
            for part in chunks(hashed, 100_000):  # one schema per request, ≤100,000 identifiers
                body = {"users": [{"schema": [schema], "data": [[h] for h in part]}]}
                await http.call(ctx.http, method, url, json_body=body, headers=headers)
                activated += len(part)
        return SendResult(activated, location=url, warnings=self.warnings(ctx.members_after))


class TikTokConfig(ConnectorConfig):
    base_url: str = "https://business-api.tiktok.com"
    advertiser_id: str = Field(min_length=1)
    audience_id: str = Field(min_length=1)
    access_token: str = Field(min_length=1)
    phone_region: str = "US"


def tiktok_error(resp: http.Response) -> DeliveryError | None:
    error = http.default_error(resp)
    if error is not None:
        return error
    code = resp.body.get("code") if isinstance(resp.body, dict) else None
    if code not in (0, None):
        message = http.short(str(resp.body.get("message", "")))
        return DeliveryError(f"TikTok code {code}: {message}", permanent=code != 40100)
    return None


class TikTokAudience(Connector):
    name = "tiktok_audience"
    config_model: ClassVar[type[ConnectorConfig]] = TikTokConfig
    identity_namespaces = ("email", "phone")
    identity_rule = "any"
    min_audience = 1000

    async def send(self, ctx: SendContext, config: ConnectorConfig, batch: Batch) -> SendResult:
        assert isinstance(config, TikTokConfig)
        namespaces = [ns for ns in batch.identities if ns in ("email", "phone")] or ["email", "phone"]
        schema = ["EMAIL_SHA256" if ns == "email" else "PHONE_SHA256" for ns in namespaces]
        users: list[list[dict[str, Any]]] = []
        for rec in batch.records:
            row: list[dict[str, Any]] = []
            for ns in namespaces:
                raw = rec.first(ns)
                value = (
                    ids.email_tiktok(raw)
                    if ns == "email"
                    else ids.phone_digits(ids.canonical_phone(raw, config.phone_region))
                )
                hashed = ids.hash_or_none(value) if raw else None
                row.append({"id": hashed, "audience_ids": [config.audience_id]} if hashed else {})
            if any(row):
                users.append(row)
        url = f"{config.base_url.rstrip('/')}/open_api/v1.3/segment/mapping/"
        body = {
            "advertiser_ids": [config.advertiser_id],
            "action": "add" if batch.action == "add" else "delete",
            "id_schema": schema,
            "batch_data": users,
        }
        if users:
            await http.call(
                ctx.http,
                "POST",
                url,
                json_body=body,
                headers={"Access-Token": config.access_token},
                classify=tiktok_error,
            )
        rejected = len(batch.records) - len(users)
        return SendResult(
            activated=sum(1 for u in users for item in u if item),
            location=url,
            rejected={"no valid identifier": rejected} if rejected else {},
            warnings=self.warnings(ctx.members_after),
        )


class LinkedInConfig(ConnectorConfig):
    base_url: str = "https://api.linkedin.com"
    segment_id: str = Field(min_length=1)
    access_token: str = Field(min_length=1)
    linkedin_version: str = Field(default="202601", pattern=r"^[0-9]{6}$")


class LinkedInAudience(Connector):
    name = "linkedin_audience"
    config_model: ClassVar[type[ConnectorConfig]] = LinkedInConfig
    identity_namespaces = ("email", "google_aid")
    identity_rule = "any"
    min_audience = 300

    async def send(self, ctx: SendContext, config: ConnectorConfig, batch: Batch) -> SendResult:
        assert isinstance(config, LinkedInConfig)
        elements = []
        for rec in batch.records:
            user_ids = [
                {"idType": "SHA256_EMAIL", "idValue": h}
                for v in rec.identities.get("email", [])[:1]
                if (h := _hashed(ids.email_linkedin(v)))
            ]
            user_ids += [{"idType": "GOOGLE_AID", "idValue": v} for v in rec.identities.get("google_aid", [])[:1]]
            if user_ids:
                elements.append({"action": "ADD" if batch.action == "add" else "REMOVE", "userIds": user_ids})
        url = f"{config.base_url.rstrip('/')}/rest/dmpSegments/{config.segment_id}/users"
        headers = {
            "Authorization": f"Bearer {config.access_token}",
            "LinkedIn-Version": config.linkedin_version,
            "X-Restli-Protocol-Version": "2.0.0",
            "X-RestLi-Method": "BATCH_CREATE",
        }
        failed = 0
        for part in chunks(elements, 5000):
            resp = await http.call(ctx.http, "POST", url, json_body={"elements": part}, headers=headers)
            statuses = resp.body.get("elements", []) if isinstance(resp.body, dict) else []
            failed += sum(1 for s in statuses if isinstance(s, dict) and int(s.get("status", 201)) >= 300)
        rejected = (
            {"no valid identifier": len(batch.records) - len(elements)} if len(elements) < len(batch.records) else {}
        )
        if failed:
            rejected["rejected by destination"] = failed
        return SendResult(
            sum(len(e["userIds"]) for e in elements) - failed, url, rejected, self.warnings(ctx.members_after)
        )
