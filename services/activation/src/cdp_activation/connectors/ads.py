"""Advertising destinations: hashed identifiers exactly as each platform documents them
(docs/activation.md)."""

from __future__ import annotations

import dataclasses
import hashlib
import re
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
    count_drop,
)

_WHITESPACE = re.compile(r"\s+")


def chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)] or []


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


# Meta keys from profile data: identity namespaces (several may feed one key: a device's
# IDFA or GAID is its MADID), then attributes. Each attribute is (key, normaliser, drop kind).
META_IDENTITY_KEYS = {
    "email": "EMAIL",
    "phone": "PHONE",
    "idfa": "MADID",
    "gaid": "MADID",
    "madid": "MADID",
    "crm_id": "EXTERN_ID",
}
META_ATTRIBUTE_KEYS: dict[str, tuple[str, Callable[[str], str | None], str]] = {
    "first_name": ("FN", ids.name_meta, "name"),
    "last_name": ("LN", ids.name_meta, "name"),
    "gender": ("GEN", ids.gender, "gender"),
    "birth_year": ("DOBY", ids.dob_year, "dob"),
    "birth_month": ("DOBM", ids.dob_month, "dob"),
    "birth_day": ("DOBD", ids.dob_day, "dob"),
    "city": ("CT", ids.city, "name"),
    "state": ("ST", ids.state, "state"),
    "zip": ("ZIP", ids.zip_code, "zip"),
    "postal_code": ("ZIP", ids.zip_code, "zip"),
    "country": ("COUNTRY", ids.country, "country"),
}
META_KINDS = {"EMAIL": "email", "PHONE": "phone", "MADID": "maid", "EXTERN_ID": "external id"}


def in_region(normalise: Callable[[str, str], str | None], region: str) -> Callable[[str], str | None]:
    """A (value, phone region) normaliser bound to one region."""
    return lambda value: normalise(value, region)


def distinct(keys: list[str]) -> list[str]:
    return list(dict.fromkeys(keys))


class MetaCustomAudience(Connector):
    name = "meta_custom_audience"
    config_model: ClassVar[type[ConnectorConfig]] = MetaConfig
    idempotent = True  # session_id and batch_seq derive from the batch id
    identity_namespaces = tuple(META_IDENTITY_KEYS)
    identity_rule = "any"
    min_audience = 100

    def payload(self, cfg: MetaConfig, batch: Batch) -> tuple[list[str], list[list[str]], dict[str, int]]:
        """(schema, rows, rejected by reason): one row per member, one column per key; an
        identifier that cannot be normalised leaves its cell blank and is counted."""
        id_keys = distinct([META_IDENTITY_KEYS[ns] for ns in batch.identities if ns in META_IDENTITY_KEYS])
        attr_keys = distinct([META_ATTRIBUTE_KEYS[a][0] for a in batch.attributes if a in META_ATTRIBUTE_KEYS])
        schema = id_keys + attr_keys
        rows: list[list[str]] = []
        rejected: dict[str, int] = {}
        for rec in batch.records:
            row = [self.identity(cfg, key, rec, batch.identities, rejected) for key in id_keys]
            if not any(row):
                rejected["no valid identifier"] = rejected.get("no valid identifier", 0) + 1
                continue
            row += [self.attribute(key, rec, batch.attributes, rejected) for key in attr_keys]
            rows.append(row)
        return schema, rows, rejected

    @staticmethod
    def identity(cfg: MetaConfig, key: str, rec: Record, namespaces: list[str], rejected: dict[str, int]) -> str:
        """The first value of the key's namespaces that normalises; blank if none does."""
        for ns in namespaces:
            if META_IDENTITY_KEYS.get(ns) != key:
                continue
            for raw in rec.identities.get(ns, []):
                if value := MetaCustomAudience.identifier(cfg, key, raw):
                    return value
                if raw.strip():
                    count_drop(rejected, META_KINDS[key])
        return ""

    @staticmethod
    def identifier(cfg: MetaConfig, key: str, raw: str) -> str | None:
        if key == "EMAIL":
            return ids.hashed(raw, ids.email_meta)
        if key == "PHONE":
            return ids.hashed(raw, lambda v: ids.phone_digits(ids.canonical_phone(v, cfg.phone_region)))
        if key == "MADID":
            return ids.madid(raw)  # sent unhashed
        return raw.strip() or None  # EXTERN_ID: sent as is, unhashed

    @staticmethod
    def attribute(key: str, rec: Record, attributes: list[str], rejected: dict[str, int]) -> str:
        for attr in attributes:
            spec = META_ATTRIBUTE_KEYS.get(attr)
            value = rec.attributes.get(attr)
            if spec is None or spec[0] != key or value in (None, ""):
                continue
            if digest := ids.hashed(str(value), spec[1]):
                return digest
            count_drop(rejected, spec[2])
        return ""

    erasure = "remove from the audience"

    def erase_identifiers(self, config: ConnectorConfig, rec: Record) -> dict[str, list[str]]:
        """Every identifier the member could have been matched on, as Meta takes it (EMAIL and
        PHONE SHA-256 hex, MADID and EXTERN_ID unhashed), by Meta key."""
        assert isinstance(config, MetaConfig)
        out: dict[str, list[str]] = {}
        for ns, key in META_IDENTITY_KEYS.items():
            for raw in rec.identities.get(ns, []):
                if (value := self.identifier(config, key, raw)) and value not in out.get(key, []):
                    out.setdefault(key, []).append(value)
        return out

    async def erase(self, ctx: SendContext, config: ConnectorConfig, batch: Batch) -> SendResult:
        """DELETE on the audience's users edge, the body an add would have: one row per
        identifier (each matches on its own), in the session the batch id names."""
        assert isinstance(config, MetaConfig)
        schema = distinct([key for rec in batch.records for key in rec.identities if key in META_KINDS])
        rows: list[list[str]] = []
        for rec in batch.records:
            for key in schema:
                for value in rec.identities.get(key, []):
                    rows.append([value if k == key else "" for k in schema])
        if not rows:
            return SendResult(activated=0)
        url = f"{config.base_url.rstrip('/')}/{config.api_version}/{config.audience_id}/users"
        await self._call(ctx, config, "DELETE", url, schema, rows, batch.id)
        return SendResult(activated=len(rows), location=url)

    @staticmethod
    async def _call(
        ctx: SendContext, config: MetaConfig, method: str, url: str, schema: list[str], rows: list[list[str]], key: str
    ) -> None:
        session_id = int(hashlib.sha256(key.encode()).hexdigest()[:13], 16)
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

    async def send(self, ctx: SendContext, config: ConnectorConfig, batch: Batch) -> SendResult:
        assert isinstance(config, MetaConfig)
        schema, rows, rejected = self.payload(config, batch)
        url = f"{config.base_url.rstrip('/')}/{config.api_version}/{config.audience_id}/users"
        method = "POST" if batch.action == "add" else "DELETE"
        await self._call(ctx, config, method, url, schema, rows, batch.id)
        id_count = sum(1 for key in schema if key in META_IDENTITY_KEYS.values())
        activated = sum(1 for row in rows for v in row[:id_count] if v)
        warnings = self.warnings(ctx.members_after)
        return SendResult(activated=activated, location=url, rejected=rejected, warnings=warnings)


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

    def user_identifiers(self, cfg: GoogleConfig, rec: Record, rejected: dict[str, int]) -> list[dict[str, Any]]:
        """A member's UserIdentifiers; a value that cannot be normalised is left out and counted."""
        out: list[dict[str, Any]] = []
        for raw in rec.identities.get("email", []):
            if value := ids.hashed(raw, lambda v: ids.email_google(v, cfg.gmail_rule)):
                out.append({"hashedEmail": value})
            elif raw.strip():
                count_drop(rejected, "email")
        for raw in rec.identities.get("phone", []):
            if value := ids.hashed(raw, lambda v: ids.canonical_phone(v, cfg.phone_region)):
                out.append({"hashedPhoneNumber": value})
            elif raw.strip():
                count_drop(rejected, "phone")
        if address := self.address(rec, rejected):
            out.append({"addressInfo": address})
        unique: list[dict[str, Any]] = []
        for item in out:
            if item not in unique:
                unique.append(item)
        return unique[:GOOGLE_MAX_PER_USER]

    @staticmethod
    def address(rec: Record, rejected: dict[str, int]) -> dict[str, str] | None:
        """OfflineUserAddressInfo: hashed first and last name, ISO 3166-1 alpha-2 country and
        postal code unhashed. All four are needed; one that does not normalise drops it."""
        attrs = rec.attributes
        raw = {
            "first": attrs.get("first_name"),
            "last": attrs.get("last_name"),
            "country": attrs.get("country"),
            "postal": attrs.get("postal_code") or attrs.get("zip"),
        }
        if any(v in (None, "") for v in raw.values()):
            return None
        first = ids.hashed(str(raw["first"]), ids.google_first_name)
        last = ids.hashed(str(raw["last"]), ids.google_last_name)
        country = ids.country_upper(str(raw["country"]))
        postal = _WHITESPACE.sub(" ", str(raw["postal"]).strip())
        if not (first and last and country and postal):
            checks = (("name", first), ("name", last), ("country", country), ("zip", postal))
            count_drop(rejected, next(kind for kind, value in checks if not value))
            return None
        return {"hashedFirstName": first, "hashedLastName": last, "countryCode": country, "postalCode": postal}

    erasure = "remove from the audience"

    def erase_identifiers(self, config: ConnectorConfig, rec: Record) -> dict[str, list[str]]:
        """hashedEmail and hashedPhoneNumber (SHA-256 hex of Google's normal forms) of every
        email and phone the member had; an address is not needed to remove a member."""
        assert isinstance(config, GoogleConfig)
        out: dict[str, list[str]] = {}
        for item in self.user_identifiers(config, Record(rec.profile_id, rec.identities, {}), {}):
            for key, value in item.items():
                if isinstance(value, str) and value not in out.get(key, []):
                    out.setdefault(key, []).append(value)
        return out

    async def erase(self, ctx: SendContext, config: ConnectorConfig, batch: Batch) -> SendResult:
        """One offline user data job of ``remove`` operations, one UserData per member."""
        assert isinstance(config, GoogleConfig)
        users = [
            [{key: value} for key, values in sorted(rec.identities.items()) for value in values][:GOOGLE_MAX_PER_USER]
            for rec in batch.records
        ]
        return await self._job(ctx, config, batch, [u for u in users if u], {})

    async def send(self, ctx: SendContext, config: ConnectorConfig, batch: Batch) -> SendResult:
        assert isinstance(config, GoogleConfig)
        rejected_by: dict[str, int] = {}
        users = [u for rec in batch.records if (u := self.user_identifiers(config, rec, rejected_by))]
        if missing := len(batch.records) - len(users):
            rejected_by["no valid identifier"] = missing
        return await self._job(ctx, config, batch, users, rejected_by)

    async def _job(
        self,
        ctx: SendContext,
        config: GoogleConfig,
        batch: Batch,
        users: list[list[dict[str, Any]]],
        rejected_by: dict[str, int],
    ) -> SendResult:
        base = f"{config.base_url.rstrip('/')}/{config.api_version}"
        headers = {"Authorization": f"Bearer {config.access_token}", "developer-token": config.developer_token}
        if config.login_customer_id:
            headers["login-customer-id"] = config.login_customer_id
        if not users:
            return SendResult(activated=0, rejected=rejected_by)
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
        if partial:
            rejected_by["rejected by destination"] = partial
        activated = sum(len(u) for u in users) - partial
        return SendResult(activated, location=resource, rejected=rejected_by, warnings=self.warnings(ctx.members_after))


# ------------------------------------------------------------------ Snap, TikTok, LinkedIn


class RemovalOfHashes(Connector):
    """Erasure through the connector's own audience removal: an erasure record carries each
    namespace's values already in the platform's form (SHA-256 hex, or a MAID where the
    platform takes it unhashed), which the connector's normalisers pass on unchanged
    (``identifiers.hashed`` never hashes a SHA-256 digest again)."""

    erasure = "remove from the audience"

    def erase_forms(self, config: ConnectorConfig) -> dict[str, Callable[[str], str | None]]:
        raise NotImplementedError

    def erase_identifiers(self, config: ConnectorConfig, rec: Record) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for ns, form in self.erase_forms(config).items():
            for raw in rec.identities.get(ns, []):
                if (value := form(raw)) and value not in out.get(ns, []):
                    out.setdefault(ns, []).append(value)
        return out

    async def erase(self, ctx: SendContext, config: ConnectorConfig, batch: Batch) -> SendResult:
        namespaces = sorted({ns for rec in batch.records for ns in rec.identities})
        removal = dataclasses.replace(batch, action="remove", identities=namespaces, attributes=[])
        return await self.send(ctx, config, removal)


def _sha(normalise: Callable[[str], str | None]) -> Callable[[str], str | None]:
    return lambda raw: ids.hashed(raw, normalise)


class SnapConfig(ConnectorConfig):
    base_url: str = "https://adsapi.snapchat.com"
    segment_id: str = Field(min_length=1)
    access_token: str = Field(min_length=1)
    phone_region: str = "US"


SNAP_SCHEMAS: dict[str, tuple[str, str, Callable[[str, str], str | None]]] = {
    "email": ("EMAIL_SHA256", "email", lambda v, r: ids.email_basic(v)),
    "phone": ("PHONE_SHA256", "phone", lambda v, r: ids.phone_digits(ids.canonical_phone(v, r))),
    "idfa": ("MOBILE_AD_ID_SHA256", "maid", lambda v, r: ids.madid(v)),
    "gaid": ("MOBILE_AD_ID_SHA256", "maid", lambda v, r: ids.madid(v)),
    "madid": ("MOBILE_AD_ID_SHA256", "maid", lambda v, r: ids.madid(v)),
}


class SnapAudience(RemovalOfHashes):
    name = "snap_audience"
    config_model: ClassVar[type[ConnectorConfig]] = SnapConfig
    identity_namespaces = tuple(SNAP_SCHEMAS)
    identity_rule = "any"
    min_audience = 1000

    def erase_forms(self, config: ConnectorConfig) -> dict[str, Callable[[str], str | None]]:
        assert isinstance(config, SnapConfig)
        region = config.phone_region
        return {ns: _sha(in_region(spec[2], region)) for ns, spec in SNAP_SCHEMAS.items()}

    @staticmethod
    def hashes(cfg: SnapConfig, batch: Batch, rejected: dict[str, int]) -> dict[str, list[str]]:
        """Schema -> its distinct SHA-256 hex digests; a value that does not normalise is counted."""
        out: dict[str, set[str]] = {}
        for ns in [n for n in batch.identities if n in SNAP_SCHEMAS]:
            schema, kind, normalise = SNAP_SCHEMAS[ns]
            found = out.setdefault(schema, set())
            for rec in batch.records:
                for raw in rec.identities.get(ns, []):
                    if digest := ids.hashed(raw, in_region(normalise, cfg.phone_region)):
                        found.add(digest)
                    elif raw.strip():
                        count_drop(rejected, kind)
        return {schema: sorted(found) for schema, found in out.items() if found}

    async def send(self, ctx: SendContext, config: ConnectorConfig, batch: Batch) -> SendResult:
        assert isinstance(config, SnapConfig)
        url = f"{config.base_url.rstrip('/')}/v1/segments/{config.segment_id}/users"
        method = "POST" if batch.action == "add" else "DELETE"
        headers = {"Authorization": f"Bearer {config.access_token}"}
        activated = 0
        rejected: dict[str, int] = {}
        for schema, hashed in self.hashes(config, batch, rejected).items():
            for part in chunks(hashed, 100_000):  # one schema per request, ≤100,000 identifiers
                body = {"users": [{"schema": [schema], "data": [[h] for h in part]}]}
                await http.call(ctx.http, method, url, json_body=body, headers=headers)
                activated += len(part)
        return SendResult(activated, location=url, rejected=rejected, warnings=self.warnings(ctx.members_after))


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


# TikTok id_schema per namespace: (schema, drop kind, normaliser). MAIDs are sent lower-case
# with their hyphens (TikTok asks for one consistent case), SHA-256 hashed.
TIKTOK_SCHEMAS: dict[str, tuple[str, str, Callable[[str, str], str | None]]] = {
    "email": ("EMAIL_SHA256", "email", lambda v, r: ids.email_tiktok(v)),
    "phone": ("PHONE_SHA256", "phone", lambda v, r: ids.phone_digits(ids.canonical_phone(v, r))),
    "idfa": ("IDFA_SHA256", "maid", lambda v, r: ids.madid(v)),
    "gaid": ("AAID_SHA256", "maid", lambda v, r: ids.madid(v)),
}


class TikTokAudience(RemovalOfHashes):
    name = "tiktok_audience"
    config_model: ClassVar[type[ConnectorConfig]] = TikTokConfig
    identity_namespaces = tuple(TIKTOK_SCHEMAS)
    identity_rule = "any"
    min_audience = 1000

    def erase_forms(self, config: ConnectorConfig) -> dict[str, Callable[[str], str | None]]:
        assert isinstance(config, TikTokConfig)
        region = config.phone_region
        return {ns: _sha(in_region(spec[2], region)) for ns, spec in TIKTOK_SCHEMAS.items()}

    @staticmethod
    def users(
        cfg: TikTokConfig, batch: Batch, rejected: dict[str, int]
    ) -> tuple[list[str], list[list[dict[str, Any]]]]:
        """(id_schema, batch_data): one inner list per member, positions follow id_schema,
        ``{}`` where the member has no usable value; a value that does not normalise is counted."""
        namespaces = [ns for ns in batch.identities if ns in TIKTOK_SCHEMAS] or ["email", "phone"]
        schema = [TIKTOK_SCHEMAS[ns][0] for ns in namespaces]
        users: list[list[dict[str, Any]]] = []
        for rec in batch.records:
            row: list[dict[str, Any]] = []
            for ns in namespaces:
                _, kind, normalise = TIKTOK_SCHEMAS[ns]
                digest = None
                for raw in rec.identities.get(ns, []):
                    if digest := ids.hashed(raw, in_region(normalise, cfg.phone_region)):
                        break
                    if raw.strip():
                        count_drop(rejected, kind)
                row.append({"id": digest, "audience_ids": [cfg.audience_id]} if digest else {})
            if any(row):
                users.append(row)
            else:
                rejected["no valid identifier"] = rejected.get("no valid identifier", 0) + 1
        return schema, users

    async def send(self, ctx: SendContext, config: ConnectorConfig, batch: Batch) -> SendResult:
        assert isinstance(config, TikTokConfig)
        rejected: dict[str, int] = {}
        schema, users = self.users(config, batch, rejected)
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
        return SendResult(
            activated=sum(1 for u in users for item in u if item),
            location=url,
            rejected=rejected,
            warnings=self.warnings(ctx.members_after),
        )


class LinkedInConfig(ConnectorConfig):
    base_url: str = "https://api.linkedin.com"
    segment_id: str = Field(min_length=1)
    access_token: str = Field(min_length=1)
    linkedin_version: str = Field(default="202601", pattern=r"^[0-9]{6}$")


class LinkedInAudience(RemovalOfHashes):
    name = "linkedin_audience"
    config_model: ClassVar[type[ConnectorConfig]] = LinkedInConfig
    identity_namespaces = ("email", "gaid", "google_aid")
    identity_rule = "any"
    min_audience = 300

    def erase_forms(self, config: ConnectorConfig) -> dict[str, Callable[[str], str | None]]:
        # SHA256_EMAIL hex; GOOGLE_AID is sent unhashed.
        return {"email": _sha(ids.email_linkedin), "gaid": ids.madid, "google_aid": ids.madid}

    @staticmethod
    def user_ids(rec: Record, rejected: dict[str, int]) -> list[dict[str, str]]:
        """SHA256_EMAIL (hex) and GOOGLE_AID (the Android advertising id, unhashed): the first
        value of each that normalises; the others that do not are counted."""
        out: list[dict[str, str]] = []
        sources: list[tuple[str, str, list[str], Callable[[str], str | None]]] = [
            ("SHA256_EMAIL", "email", rec.identities.get("email", []), lambda v: ids.hashed(v, ids.email_linkedin)),
            (
                "GOOGLE_AID",
                "maid",
                rec.identities.get("gaid", []) + rec.identities.get("google_aid", []),
                ids.madid,
            ),
        ]
        for id_type, kind, values, normalise in sources:
            for raw in values:
                if value := normalise(raw):
                    out.append({"idType": id_type, "idValue": value})
                    break
                if raw.strip():
                    count_drop(rejected, kind)
        return out

    async def send(self, ctx: SendContext, config: ConnectorConfig, batch: Batch) -> SendResult:
        assert isinstance(config, LinkedInConfig)
        elements = []
        rejected: dict[str, int] = {}
        for rec in batch.records:
            if user_ids := self.user_ids(rec, rejected):
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
        if missing := len(batch.records) - len(elements):
            rejected["no valid identifier"] = missing
        if failed:
            rejected["rejected by destination"] = failed
        return SendResult(
            sum(len(e["userIds"]) for e in elements) - failed, url, rejected, self.warnings(ctx.members_after)
        )
