"""Email and SMS destinations: Mailchimp (list members + audience tag), Braze (array
custom attribute), Twilio SMS (E.164 numbers; STOP repliers suppressed)."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable
from typing import Any, ClassVar

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


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


class MailchimpConfig(ConnectorConfig):
    base_url: str = ""
    api_key: str = Field(pattern=r"^[0-9a-f]+-[a-z]+[0-9]+$", description="<key>-<data centre>")
    list_id: str = Field(min_length=1)

    def root(self) -> str:
        return self.base_url.rstrip("/") or f"https://{self.api_key.rsplit('-', 1)[1]}.api.mailchimp.com"


class Mailchimp(Connector):
    name = "mailchimp"
    config_model: ClassVar[type[ConnectorConfig]] = MailchimpConfig
    identity_namespaces = ("email",)
    erasure = "delete the user"

    def erase_identifiers(self, config: ConnectorConfig, rec: Record) -> dict[str, list[str]]:
        """The member's subscriber hash (MD5 of the lower-case email): all Mailchimp needs."""
        hashes = [ids.md5_hex(email) for raw in rec.identities.get("email", []) if (email := ids.email_basic(raw))]
        return {"subscriber_hash": list(dict.fromkeys(hashes))} if hashes else {}

    async def erase(self, ctx: SendContext, config: ConnectorConfig, batch: Batch) -> SendResult:
        """POST .../members/{subscriber_hash}/actions/delete-permanent for each member."""
        assert isinstance(config, MailchimpConfig)
        auth = {"Authorization": basic("cdp", config.api_key)}
        lists = f"{config.root()}/3.0/lists/{config.list_id}"
        done = 0
        for rec in batch.records:
            for subscriber in rec.identities.get("subscriber_hash", []):
                url = f"{lists}/members/{subscriber}/actions/delete-permanent"
                await http.call(ctx.http, "POST", url, headers=auth, classify=mailchimp_gone)
                done += 1
        return SendResult(done, lists)

    async def send(self, ctx: SendContext, config: ConnectorConfig, batch: Batch) -> SendResult:
        assert isinstance(config, MailchimpConfig)
        auth = {"Authorization": basic("cdp", config.api_key)}
        lists = f"{config.root()}/3.0/lists/{config.list_id}"
        emails = [(r, e) for r in batch.records if (e := ids.email_basic(r.first("email")))]
        rejected = {"no valid identifier": len(batch.records) - len(emails)} if len(emails) < len(batch.records) else {}
        if batch.action == "add":
            errors = 0
            for part in chunks(emails, 500):
                members = [
                    {
                        "email_address": email,
                        "status_if_new": "subscribed",
                        "merge_fields": {
                            a.upper()[:10]: r.attributes[a] for a in batch.attributes if a in r.attributes
                        },
                        "tags": [batch.segment],
                    }
                    for r, email in part
                ]
                body = {"members": members, "update_existing": True, "sync_tags": False}
                resp = await http.call(ctx.http, "POST", lists, json_body=body, headers=auth)
                errors += len(resp.body.get("errors", [])) if isinstance(resp.body, dict) else 0
            if errors:
                rejected["rejected by destination"] = errors
            return SendResult(len(emails) - errors, lists, rejected)
        for _, email in emails:
            tag = {"tags": [{"name": batch.segment, "status": "inactive"}]}
            url = f"{lists}/members/{ids.md5_hex(email)}/tags"
            await http.call(ctx.http, "POST", url, json_body=tag, headers=auth)
        return SendResult(len(emails), lists, rejected)


def mailchimp_gone(resp: http.Response) -> DeliveryError | None:
    """A member Mailchimp does not hold (404) is as good as deleted."""
    return None if resp.status == 404 else http.default_error(resp)


class BrazeConfig(ConnectorConfig):
    base_url: str = Field(pattern=r"^https?://")
    api_key: str = Field(min_length=1)
    # The identity namespace used as Braze external_id; empty = the CDP profile id.
    external_id_namespace: str = ""
    attribute: str = "cdp_audiences"
    phone_region: str = "US"


def braze_error(resp: http.Response) -> DeliveryError | None:
    error = http.default_error(resp)
    if error is None and isinstance(resp.body, dict) and resp.body.get("message") not in ("success", "queued", None):
        return DeliveryError(f"Braze: {http.short(str(resp.body.get('message')))}", permanent=True)
    return error


BRAZE_DELETE_MAX = 50  # external_ids per /users/delete request

# Braze standard profile fields sent with a documented format: (normaliser, drop kind).
BRAZE_FIELDS: dict[str, tuple[Callable[[str], str | None], str]] = {
    "country": (ids.country_upper, "country"),  # ISO-3166-1 alpha-2
    "gender": (ids.braze_gender, "gender"),  # M, F, O, N or P
    "dob": (ids.iso_date, "dob"),  # YYYY-MM-DD
}


def braze_attributes(rec: Record, attributes: list[str], rejected: dict[str, int]) -> dict[str, Any]:
    """The plan's attributes for one Braze user; standard fields in Braze's format, and one
    that cannot be put in it is left out (and counted) rather than sent wrong."""
    out: dict[str, Any] = {}
    for attr in attributes:
        if attr not in rec.attributes:
            continue
        value = rec.attributes[attr]
        if attr in BRAZE_FIELDS and value not in (None, ""):
            normalise, kind = BRAZE_FIELDS[attr]
            if (value := normalise(str(value))) is None:
                count_drop(rejected, kind)
                continue
        out[attr] = value
    return out


class Braze(Connector):
    name = "braze"
    config_model: ClassVar[type[ConnectorConfig]] = BrazeConfig
    identity_namespaces = None

    def required_identities(self, plan_identities: list[str]) -> list[str]:
        return list(plan_identities)

    erasure = "delete the user"

    def erase_identifiers(self, config: ConnectorConfig, rec: Record) -> dict[str, list[str]]:
        """The Braze external_id the user was sent with (the profile id, or the configured namespace)."""
        assert isinstance(config, BrazeConfig)
        external = rec.first(config.external_id_namespace) if config.external_id_namespace else rec.profile_id
        return {"external_id": [external]} if external else {}

    async def erase(self, ctx: SendContext, config: ConnectorConfig, batch: Batch) -> SendResult:
        """POST /users/delete with external_ids, at most 50 a request."""
        assert isinstance(config, BrazeConfig)
        url = f"{config.base_url.rstrip('/')}/users/delete"
        external_ids = list(dict.fromkeys(v for rec in batch.records for v in rec.identities.get("external_id", [])))
        headers = {"Authorization": f"Bearer {config.api_key}"}
        deleted = 0
        for part in chunks(external_ids, BRAZE_DELETE_MAX):
            resp = await http.call(
                ctx.http, "POST", url, json_body={"external_ids": part}, headers=headers, classify=braze_error
            )
            found = resp.body.get("deleted") if isinstance(resp.body, dict) else None
            deleted += found if isinstance(found, int) else len(part)
        return SendResult(deleted, url)

    async def send(self, ctx: SendContext, config: ConnectorConfig, batch: Batch) -> SendResult:
        assert isinstance(config, BrazeConfig)
        url = f"{config.base_url.rstrip('/')}/users/track"
        objects: list[dict[str, Any]] = []
        rejected: dict[str, int] = {}
        for rec in batch.records:
            external = rec.first(config.external_id_namespace) if config.external_id_namespace else rec.profile_id
            if not external:
                continue
            obj: dict[str, Any] = {"external_id": external, config.attribute: {batch.action: [batch.segment]}}
            if batch.action == "add":
                obj.update(braze_attributes(rec, batch.attributes, rejected))
                if phone := ids.canonical_phone(rec.first("phone"), config.phone_region):
                    obj["phone"] = phone
                elif rec.first("phone").strip():
                    count_drop(rejected, "phone")
            objects.append(obj)
        headers = {"Authorization": f"Bearer {config.api_key}"}
        errors = 0
        for part in chunks(objects, 75):
            resp = await http.call(
                ctx.http, "POST", url, json_body={"attributes": part}, headers=headers, classify=braze_error
            )
            errors += len(resp.body.get("errors", [])) if isinstance(resp.body, dict) else 0
        if missing := len(batch.records) - len(objects):
            rejected["no external id"] = missing
        if errors:
            rejected["rejected by destination"] = errors
        return SendResult(len(objects) - errors, url, rejected)


class TwilioConfig(ConnectorConfig):
    base_url: str = "https://api.twilio.com"
    account_sid: str = Field(pattern=r"^AC[0-9a-f]{32}$")
    auth_token: str = Field(min_length=1)
    from_number: str = Field(pattern=r"^\+[1-9][0-9]{1,14}$")
    message: str = Field(min_length=1, max_length=1600)
    phone_region: str = "US"
    concurrency: int = Field(default=4, ge=1, le=32)


STOP_CODES = {21610, 21608, 21211, 21614}


def twilio_error(resp: http.Response) -> DeliveryError | None:
    error = http.default_error(resp)
    code = resp.body.get("code") if isinstance(resp.body, dict) else None
    if error is not None and code in STOP_CODES:
        return DeliveryError(f"Twilio {code}", permanent=True)
    return error


class TwilioSms(Connector):
    """Sends the configured message to each joining member's E.164 number. A number that
    replied STOP (21610) or is invalid is suppressed (counted), not retried."""

    name = "twilio_sms"
    config_model: ClassVar[type[ConnectorConfig]] = TwilioConfig
    identity_namespaces = ("phone",)

    async def send(self, ctx: SendContext, config: ConnectorConfig, batch: Batch) -> SendResult:
        assert isinstance(config, TwilioConfig)
        if batch.action == "remove":
            return SendResult(0, "")
        url = f"{config.base_url.rstrip('/')}/2010-04-01/Accounts/{config.account_sid}/Messages.json"
        auth = {"Authorization": basic(config.account_sid, config.auth_token)}
        numbers = sorted(
            {n for r in batch.records if (n := ids.canonical_phone(r.first("phone"), config.phone_region))}
        )
        rejected: dict[str, int] = {}
        if missing := len(batch.records) - len(numbers):
            rejected["no valid phone"] = missing
        sent = 0
        gate = asyncio.Semaphore(config.concurrency)

        async def one(number: str) -> None:
            nonlocal sent
            form = f"To={_q(number)}&From={_q(config.from_number)}&Body={_q(config.message)}".encode()
            headers = {**auth, "Content-Type": "application/x-www-form-urlencoded"}
            async with gate:
                try:
                    await http.call(ctx.http, "POST", url, data=form, headers=headers, classify=twilio_error)
                    sent += 1
                except DeliveryError as exc:
                    if not exc.reason.startswith("Twilio "):
                        raise
                    reason = "replied STOP (21610)" if "21610" in exc.reason else f"suppressed ({exc.reason})"
                    rejected[reason] = rejected.get(reason, 0) + 1

        await asyncio.gather(*(one(n) for n in numbers))
        return SendResult(sent, url, rejected)


def _q(value: str) -> str:
    from urllib.parse import quote

    return quote(value, safe="")
