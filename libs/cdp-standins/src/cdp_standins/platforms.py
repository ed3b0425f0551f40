"""Local stand-ins for destination platforms, for tests, the benchmark and the demo.

One aiohttp server on loopback validates every request exactly as the platform documents
it (paths, headers, body shape, hashing, batch limits; docs/activation.md),
answers 400 with a reason when a request is wrong, and keeps what it accepted (deduped by
the platform's idempotency key where it has one). Faults can be queued per platform:
429 with Retry-After, 500, a platform error body, a slow answer, or a hang.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import parse_qs

import phonenumbers
import pycountry
from aiohttp import web

HEX64 = re.compile(r"^[a-f0-9]{64}$")
E164 = re.compile(r"^\+[1-9][0-9]{1,14}$")
MAID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
ISO_DATE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")
# SHA-256 of "": an empty value was hashed instead of dropped.
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


@dataclass
class Fault:
    """One queued misbehaviour: status (429, 500, 400 …), optional body and Retry-After,
    a delay before answering, or ``hang`` (never answers)."""

    status: int = 0
    body: Any = None
    retry_after: float | None = None
    delay_s: float = 0.0
    hang: bool = False


class Invalid(Exception):
    pass


def check(condition: bool, reason: str) -> None:
    if not condition:
        raise Invalid(reason)


def check_sha256(value: Any, what: str) -> None:
    """A lower-case SHA-256 hex digest, and not the digest of an empty value."""
    check(isinstance(value, str) and bool(HEX64.match(value)), f"{what} is not a SHA-256 hex digest")
    check(value != EMPTY_SHA256, f"{what} is the SHA-256 of an empty value")


def check_maid(value: Any, what: str) -> None:
    """A mobile advertising id as sent unhashed: a lower-case UUID, not the all-zero one."""
    check(isinstance(value, str) and bool(MAID.match(value)), f"{what} is not a lower-case advertising id")
    check(value.replace("-", "").strip("0") != "", f"{what} is the zeroed (tracking-limited) id")


def valid_e164(value: Any) -> bool:
    """E.164 ("+", country code, at most 15 digits) and a number phonenumbers holds valid."""
    if not isinstance(value, str) or not E164.match(value):
        return False
    try:
        return phonenumbers.is_valid_number(phonenumbers.parse(value, None))
    except phonenumbers.NumberParseException:
        return False


def check_phone(value: Any, what: str) -> None:
    check(valid_e164(value), f"{what} must be a valid E.164 number")


def check_country(value: Any, what: str) -> None:
    """An assigned ISO 3166-1 alpha-2 code in upper case."""
    ok = isinstance(value, str) and len(value) == 2 and value.isupper()
    check(ok and pycountry.countries.get(alpha_2=value) is not None, f"{what} is not ISO 3166-1 alpha-2")


@dataclass
class LocalPlatforms:
    webhook_secret: str = "local-webhook-secret"
    meta_token: str = "meta-token"
    google_token: str = "google-token"
    google_developer_token: str = "dev-token"
    snap_token: str = "snap-token"
    tiktok_token: str = "tiktok-token"
    linkedin_token: str = "linkedin-token"
    braze_key: str = "braze-key"
    mailchimp_key: str = "0123456789abcdef-us6"
    twilio_sid: str = "AC" + "0" * 32
    twilio_token: str = "twilio-token"
    klaviyo_key: str = "pk_local"
    sfmc_client_id: str = "sf-client"
    sfmc_client_secret: str = "sf-secret"
    ttd_token: str = "ttd-token"
    _klaviyo_ids: dict[str, str] = field(default_factory=dict)
    _ttd_uploads: dict[str, str] = field(default_factory=dict)
    # Users deleted (privacy): "braze:<external_id>", "klaviyo:email:<email>", "klaviyo:phone_number:<e164>".
    deleted: list[str] = field(default_factory=list)
    # Numbers that replied STOP (Twilio answers 21610).
    stopped: set[str] = field(default_factory=set)

    faults: dict[str, deque[Fault]] = field(default_factory=lambda: defaultdict(deque))
    # What each platform holds: audience key -> set of identifiers.
    members: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    # Accepted requests per platform (idempotent repeats counted once) and every request seen.
    accepted: dict[str, list[Any]] = field(default_factory=lambda: defaultdict(list))
    # Wall-clock arrival time (time.time()) of each accepted webhook request, in step with
    # accepted["webhook"]: what end-to-end latency is measured against.
    accepted_at: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    seen: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    duplicates: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    rejected: list[str] = field(default_factory=list)
    _keys: set[str] = field(default_factory=set)
    _jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    _runner: web.AppRunner | None = None
    _release: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""

    # ------------------------------------------------------------------ life
    async def start(self) -> str:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/webhook{tail:.*}", self._wrap("webhook", self.webhook))
        app.router.add_route("*", "/{version}/{audience}/users", self._wrap("meta", self.meta))
        app.router.add_post(
            r"/{version}/customers/{cid}/offlineUserDataJobs:create", self._wrap("google", self.g_create)
        )
        app.router.add_post(
            r"/{version}/customers/{cid}/offlineUserDataJobs/{job}:addOperations", self._wrap("google", self.g_add)
        )
        app.router.add_post(
            r"/{version}/customers/{cid}/offlineUserDataJobs/{job}:run", self._wrap("google", self.g_run)
        )
        app.router.add_route("*", "/v1/segments/{segment}/users", self._wrap("snap", self.snap))
        app.router.add_post("/open_api/v1.3/segment/mapping/", self._wrap("tiktok", self.tiktok))
        app.router.add_post("/rest/dmpSegments/{segment}/users", self._wrap("linkedin", self.linkedin))
        app.router.add_post("/users/track", self._wrap("braze", self.braze))
        app.router.add_post("/users/delete", self._wrap("braze", self.braze_delete))
        app.router.add_post("/3.0/lists/{list_id}", self._wrap("mailchimp", self.mc_batch))
        app.router.add_post("/3.0/lists/{list_id}/members/{hash}/tags", self._wrap("mailchimp", self.mc_tags))
        app.router.add_post(
            "/3.0/lists/{list_id}/members/{hash}/actions/delete-permanent", self._wrap("mailchimp", self.mc_delete)
        )
        app.router.add_post("/2010-04-01/Accounts/{sid}/Messages.json", self._wrap("twilio", self.twilio))
        app.router.add_post("/api/profile-bulk-import-jobs", self._wrap("klaviyo", self.kl_import))
        app.router.add_get("/api/profiles", self._wrap("klaviyo", self.kl_lookup))
        app.router.add_delete("/api/lists/{list_id}/relationships/profiles", self._wrap("klaviyo", self.kl_remove))
        app.router.add_post("/api/data-privacy-deletion-jobs", self._wrap("klaviyo", self.kl_delete))
        app.router.add_post("/v2/token", self._wrap("sfmc", self.sf_token))
        app.router.add_post("/data/v1/async/dataextensions/key:{key}/rows", self._wrap("sfmc", self.sf_rows))
        app.router.add_post("/v3/crmdata/segment/{advertiser}/{crm}", self._wrap("ttd", self.ttd_segment))
        app.router.add_put("/ttd-upload/{ref}", self._wrap("ttd", self.ttd_upload))
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()

    def fail(self, platform: str, *faults: Fault) -> None:
        self.faults[platform].extend(faults)

    def _wrap(self, platform: str, handler: Any) -> Any:
        async def handle(request: web.Request) -> web.StreamResponse:
            self.seen[platform] += 1
            body = await request.read()
            queue = self.faults[platform]
            if queue:
                fault = queue.popleft()
                if fault.hang:
                    await self._release.wait()  # until stop(): a destination that never answers
                    return web.Response(status=503)
                if fault.delay_s:
                    await asyncio.sleep(fault.delay_s)
                if fault.status:
                    headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
                    return web.json_response(fault.body or {"error": "injected"}, status=fault.status, headers=headers)
            try:
                result = handler(request, body)
                if asyncio.iscoroutine(result):
                    result = await result
            except Invalid as exc:
                self.rejected.append(f"{platform}: {exc}")
                return web.json_response({"error": {"message": str(exc), "code": 100}}, status=400)
            assert isinstance(result, web.StreamResponse)
            return result

        return handle

    def _once(self, platform: str, key: str) -> bool:
        """True the first time an idempotency key is seen."""
        full = f"{platform}:{key}"
        if full in self._keys:
            self.duplicates[platform] += 1
            return False
        self._keys.add(full)
        return True

    @staticmethod
    def _json(body: bytes) -> Any:
        try:
            return json.loads(body)
        except ValueError:
            raise Invalid("body is not JSON") from None

    @staticmethod
    def _bearer(request: web.Request, token: str) -> None:
        check(request.headers.get("Authorization") == f"Bearer {token}", "bad or missing bearer token")

    # ------------------------------------------------------------- webhook
    def webhook(self, request: web.Request, body: bytes) -> web.Response:
        expected = "sha256=" + hmac.new(self.webhook_secret.encode(), body, hashlib.sha256).hexdigest()
        check(hmac.compare_digest(request.headers.get("X-CDP-Signature", ""), expected), "bad HMAC signature")
        check(request.headers.get("Content-Type", "").startswith("application/json"), "Content-Type must be JSON")
        key = request.headers.get("Idempotency-Key", "")
        check(bool(key), "Idempotency-Key missing")
        data = self._json(body)
        check(data.get("action") in ("add", "remove") or "members" in data, "action must be add or remove")
        if self._once("webhook", key):
            self.accepted_at["webhook"].append(time.time())
            self.accepted["webhook"].append(data)
            segment = data.get("segment", "")
            records = data.get("records") or data.get("members") or []
            action = data.get("action") or ("add" if data.get("status") == "realized" else "remove")
            for rec in records:
                (
                    self.members[f"webhook:{segment}"].add
                    if action == "add"
                    else self.members[f"webhook:{segment}"].discard
                )(rec["profile_id"])
        return web.json_response({"ok": True})

    # ----------------------------------------------------------------- Meta
    META_KEYS: ClassVar[frozenset[str]] = frozenset(
        {
            "EXTERN_ID",
            "EMAIL",
            "PHONE",
            "GEN",
            "DOBY",
            "DOBM",
            "DOBD",
            "LN",
            "FN",
            "FI",
            "CT",
            "ST",
            "ZIP",
            "MADID",
            "COUNTRY",
        }
    )
    META_UNHASHED: ClassVar[frozenset[str]] = frozenset({"EXTERN_ID", "MADID"})

    def meta(self, request: web.Request, body: bytes) -> web.Response:
        check(request.method in ("POST", "DELETE"), "method must be POST (add) or DELETE (remove)")
        check(re.fullmatch(r"v[0-9]+\.[0-9]", request.match_info["version"]) is not None, "bad API version")
        self._bearer(request, self.meta_token)
        data = self._json(body)
        payload, session = data.get("payload", {}), data.get("session", {})
        schema, rows = payload.get("schema"), payload.get("data")
        check(
            isinstance(schema, list) and bool(schema) and set(schema) <= self.META_KEYS, "payload.schema: unknown key"
        )
        check(isinstance(rows, list) and 0 < len(rows) <= 10_000, "payload.data: 1..10000 rows")
        for field_name in ("session_id", "batch_seq", "last_batch_flag", "estimated_num_total"):
            check(field_name in session, f"session.{field_name} missing")
        check(len(set(schema)) == len(schema), "payload.schema: a key appears twice")
        for row in rows:
            check(isinstance(row, list) and len(row) == len(schema), "row length differs from schema")
            for key, value in zip(schema, row, strict=True):
                if value and key == "MADID":
                    check_maid(value, "MADID")
                elif value and key not in self.META_UNHASHED:
                    check_sha256(value, key)
            check(any(row), "row has no key")
        audience = request.match_info["audience"]
        if self._once("meta", f"{session['session_id']}:{session['batch_seq']}:{request.method}"):
            self.accepted["meta"].append(data)
            target = self.members[f"meta:{audience}"]
            for row in rows:
                ident = next(v for v in row if v)
                (target.add if request.method == "POST" else target.discard)(ident)
        return web.json_response(
            {
                "audience_id": audience,
                "session_id": session["session_id"],
                "num_received": len(rows),
                "num_invalid_entries": 0,
                "invalid_entry_samples": {},
            }
        )

    # --------------------------------------------------------------- Google
    def _google_headers(self, request: web.Request) -> None:
        self._bearer(request, self.google_token)
        check(request.headers.get("developer-token") == self.google_developer_token, "developer-token missing")

    def g_create(self, request: web.Request, body: bytes) -> web.Response:
        self._google_headers(request)
        job = self._json(body).get("job", {})
        check(job.get("type") == "CUSTOMER_MATCH_USER_LIST", "job.type must be CUSTOMER_MATCH_USER_LIST")
        meta = job.get("customerMatchUserListMetadata", {})
        cid = request.match_info["cid"]
        check(str(meta.get("userList", "")).startswith(f"customers/{cid}/userLists/"), "userList resource name")
        job_id = str(len(self._jobs) + 1)
        name = f"customers/{cid}/offlineUserDataJobs/{job_id}"
        self._jobs[name] = {"list": meta["userList"], "ops": [], "consent": meta.get("consent")}
        return web.json_response({"resourceName": name})

    def g_add(self, request: web.Request, body: bytes) -> web.Response:
        self._google_headers(request)
        name = f"customers/{request.match_info['cid']}/offlineUserDataJobs/{request.match_info['job']}"
        check(name in self._jobs, "unknown job")
        data = self._json(body)
        ops = data.get("operations", [])
        check(isinstance(ops, list) and bool(ops), "operations required")
        total = 0
        for op in ops:
            check(len(op) == 1 and next(iter(op)) in ("create", "remove"), "operation is create or remove")
            ids = next(iter(op.values())).get("userIdentifiers", [])
            check(0 < len(ids) <= 20, "1..20 userIdentifiers per UserData")
            total += len(ids)
            for ident in ids:
                check(len(ident) == 1, "UserIdentifier is a oneof")
                kind, value = next(iter(ident.items()))
                if kind in ("hashedEmail", "hashedPhoneNumber"):
                    check_sha256(value, kind)
                elif kind == "addressInfo":
                    check_sha256(value.get("hashedFirstName"), "hashedFirstName")
                    check_sha256(value.get("hashedLastName"), "hashedLastName")
                    check_country(value.get("countryCode"), "countryCode")
                    check(bool(str(value.get("postalCode", "")).strip()), "postalCode")
                else:
                    raise Invalid(f"unsupported identifier {kind}")
        check(total <= 100_000, "more than 100,000 identifiers in one request")
        self._jobs[name]["ops"].extend(ops)
        return web.json_response({})

    def g_run(self, request: web.Request, body: bytes) -> web.Response:
        self._google_headers(request)
        name = f"customers/{request.match_info['cid']}/offlineUserDataJobs/{request.match_info['job']}"
        check(name in self._jobs, "unknown job")
        job = self._jobs[name]
        target = self.members[f"google:{job['list']}"]
        for op in job["ops"]:
            kind, user = next(iter(op.items()))
            check(kind == "remove" or job["consent"] is not None, "create jobs need consent")
            first = next(iter(user["userIdentifiers"][0].values()))
            (target.add if kind == "create" else target.discard)(first)
        self.accepted["google"].append(job)
        return web.json_response({"name": name, "done": False})

    # --------------------------------------------------------- Snap, TikTok, LinkedIn
    def snap(self, request: web.Request, body: bytes) -> web.Response:
        check(request.method in ("POST", "DELETE"), "POST or DELETE")
        self._bearer(request, self.snap_token)
        users = self._json(body).get("users", [])
        check(len(users) == 1 and len(users[0].get("schema", [])) == 1, "one schema per request")
        schema = users[0]["schema"][0]
        check(schema in ("EMAIL_SHA256", "PHONE_SHA256", "MOBILE_AD_ID_SHA256"), "schema")
        data = users[0].get("data", [])
        check(0 < len(data) <= 100_000, "1..100,000 identifiers")
        target = self.members[f"snap:{request.match_info['segment']}"]
        for (value,) in data:
            check_sha256(value, schema)
            (target.add if request.method == "POST" else target.discard)(value)
        self.accepted["snap"].append(users)
        return web.json_response({"request_status": "SUCCESS"})

    def tiktok(self, request: web.Request, body: bytes) -> web.Response:
        check(request.headers.get("Access-Token") == self.tiktok_token, "Access-Token")
        data = self._json(body)
        check(data.get("action") in ("add", "delete"), "action add|delete")
        schema = data.get("id_schema", [])
        known = {"EMAIL_SHA256", "PHONE_SHA256", "IDFA_SHA256", "AAID_SHA256"}
        check(bool(schema) and set(schema) <= known and len(set(schema)) == len(schema), "id_schema")
        for user in data.get("batch_data", []):
            check(len(user) == len(schema), "each user has one entry per id_schema position")
            check(any(user), "a user with no id")
            for id_type, item in zip(schema, user, strict=True):
                if item:
                    check_sha256(item.get("id"), id_type)
                    check(bool(item.get("audience_ids")), "audience_ids")
                    target = self.members[f"tiktok:{item['audience_ids'][0]}"]
                    (target.add if data["action"] == "add" else target.discard)(item["id"])
        self.accepted["tiktok"].append(data)
        return web.json_response({"code": 0, "message": "OK"})

    def linkedin(self, request: web.Request, body: bytes) -> web.Response:
        self._bearer(request, self.linkedin_token)
        check(request.headers.get("X-RestLi-Method") == "BATCH_CREATE", "X-RestLi-Method: BATCH_CREATE")
        check(request.headers.get("X-Restli-Protocol-Version") == "2.0.0", "X-Restli-Protocol-Version")
        check(re.fullmatch(r"[0-9]{6}", request.headers.get("LinkedIn-Version", "")) is not None, "LinkedIn-Version")
        elements = self._json(body).get("elements", [])
        check(0 < len(elements) <= 5000, "1..5000 elements")
        target = self.members[f"linkedin:{request.match_info['segment']}"]
        for el in elements:
            check(el.get("action") in ("ADD", "REMOVE"), "action ADD|REMOVE")
            for uid in el.get("userIds", []):
                check(uid.get("idType") in ("SHA256_EMAIL", "SHA512_EMAIL", "GOOGLE_AID"), "idType")
                if uid["idType"] == "SHA256_EMAIL":
                    check_sha256(uid["idValue"], "SHA256_EMAIL")
                elif uid["idType"] == "GOOGLE_AID":
                    check_maid(uid["idValue"], "GOOGLE_AID")
                (target.add if el["action"] == "ADD" else target.discard)(uid["idValue"])
        self.accepted["linkedin"].append(elements)
        return web.json_response({"elements": [{"status": 201} for _ in elements]})

    # ----------------------------------------------------------- email, SMS
    def braze(self, request: web.Request, body: bytes) -> web.Response:
        self._bearer(request, self.braze_key)
        attributes = self._json(body).get("attributes", [])
        check(0 < len(attributes) <= 75, "1..75 attribute objects")
        for obj in attributes:
            check(bool(obj.get("external_id")), "external_id")
            for value in obj.values():
                if isinstance(value, dict):
                    check(set(value) <= {"add", "remove"}, "array attribute add/remove")
                    for seg in value.get("add", []):
                        self.members[f"braze:{seg}"].add(obj["external_id"])
                    for seg in value.get("remove", []):
                        self.members[f"braze:{seg}"].discard(obj["external_id"])
            if "phone" in obj:
                check_phone(obj["phone"], "phone")
            if "country" in obj:
                check_country(obj["country"], "country")
            if "gender" in obj:
                check(obj["gender"] in ("M", "F", "O", "N", "P", None), "gender is M, F, O, N, P or null")
            if "dob" in obj:
                check(isinstance(obj["dob"], str) and bool(ISO_DATE.match(obj["dob"])), "dob is YYYY-MM-DD")
        self.accepted["braze"].append(attributes)
        return web.json_response({"message": "success", "attributes_processed": len(attributes)})

    BRAZE_DELETE_KEYS: ClassVar[frozenset[str]] = frozenset({"external_ids", "user_aliases", "braze_ids"})

    def braze_delete(self, request: web.Request, body: bytes) -> web.Response:
        """POST /users/delete: external_ids, user_aliases and/or braze_ids, at most 50 in all."""
        self._bearer(request, self.braze_key)
        check(request.headers.get("Content-Type", "").startswith("application/json"), "Content-Type must be JSON")
        data = self._json(body)
        check(isinstance(data, dict) and bool(data) and set(data) <= self.BRAZE_DELETE_KEYS, "unknown field")
        lists = [data.get(k, []) for k in self.BRAZE_DELETE_KEYS]
        check(all(isinstance(v, list) for v in lists), "external_ids, user_aliases, braze_ids are arrays")
        check(0 < sum(len(v) for v in lists) <= 50, "1..50 users per request")
        external_ids = data.get("external_ids", [])
        check(all(isinstance(x, str) and x for x in external_ids), "external_ids are non-empty strings")
        for external in external_ids:
            for key in self.members:
                if key.startswith("braze:"):
                    self.members[key].discard(external)
            self.deleted.append(f"braze:{external}")
        self.accepted["braze_delete"].append(data)
        return web.json_response({"deleted": len(external_ids), "message": "success"}, status=201)

    def _mc_auth(self, request: web.Request) -> None:
        raw = request.headers.get("Authorization", "")
        check(raw.startswith("Basic "), "Basic auth")
        check(base64.b64decode(raw[6:]).decode().split(":", 1)[1] == self.mailchimp_key, "API key")

    def mc_batch(self, request: web.Request, body: bytes) -> web.Response:
        self._mc_auth(request)
        data = self._json(body)
        members = data.get("members", [])
        check(0 < len(members) <= 500, "1..500 members")
        for m in members:
            check("@" in m.get("email_address", ""), "email_address")
            for tag in m.get("tags", []):
                self.members[f"mailchimp:{tag}"].add(hashlib.md5(m["email_address"].lower().encode()).hexdigest())
        self.accepted["mailchimp"].append(data)
        return web.json_response({"new_members": members, "errors": [], "total_created": len(members)})

    def mc_tags(self, request: web.Request, body: bytes) -> web.Response:
        self._mc_auth(request)
        check(re.fullmatch(r"[0-9a-f]{32}", request.match_info["hash"]) is not None, "subscriber_hash is MD5")
        for tag in self._json(body).get("tags", []):
            check(tag.get("status") in ("active", "inactive"), "tag status")
            target = self.members[f"mailchimp:{tag['name']}"]
            (target.add if tag["status"] == "active" else target.discard)(request.match_info["hash"])
        return web.Response(status=204)

    def mc_delete(self, request: web.Request, body: bytes) -> web.Response:
        """Permanently delete a list member (GDPR): 204, or 404 for a member the list does not hold."""
        self._mc_auth(request)
        subscriber = request.match_info["hash"]
        check(re.fullmatch(r"[0-9a-f]{32}", subscriber) is not None, "subscriber_hash is MD5")
        check(not body.strip(), "no request body")
        held = [key for key, members in self.members.items() if key.startswith("mailchimp:") and subscriber in members]
        for key in held:
            self.members[key].discard(subscriber)
        self.deleted.append(f"mailchimp:{subscriber}")
        return web.Response(status=204) if held else web.json_response({"status": 404}, status=404)

    def twilio(self, request: web.Request, body: bytes) -> web.Response:
        raw = request.headers.get("Authorization", "")
        check(raw == "Basic " + base64.b64encode(f"{self.twilio_sid}:{self.twilio_token}".encode()).decode(), "auth")
        form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
        to = form.get("To", "")
        if not valid_e164(to):
            return web.json_response({"code": 21211, "message": "Invalid 'To' Phone Number"}, status=400)
        if form["To"] in self.stopped:
            return web.json_response(
                {"code": 21610, "message": "Attempt to send to unsubscribed recipient"}, status=400
            )
        check(bool(form.get("Body")) and bool(form.get("From")), "From and Body")
        self.members["twilio:sent"].add(form["To"])
        self.accepted["twilio"].append(form)
        return web.json_response({"sid": "SM" + hashlib.md5(body).hexdigest(), "status": "queued"}, status=201)

    # -------------------------------------------------------- Klaviyo, SFMC, TTD
    def _klaviyo_headers(self, request: web.Request) -> None:
        check(request.headers.get("Authorization") == f"Klaviyo-API-Key {self.klaviyo_key}", "Klaviyo-API-Key")
        check(re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", request.headers.get("revision", "")) is not None, "revision")

    def kl_import(self, request: web.Request, body: bytes) -> web.Response:
        self._klaviyo_headers(request)
        check(request.headers.get("Content-Type", "").startswith("application/vnd.api+json"), "JSON:API type")
        check(len(body) <= 5 * 1024 * 1024, "payload over 5 MB")
        data = self._json(body).get("data", {})
        check(data.get("type") == "profile-bulk-import-job", "data.type")
        profiles = data.get("attributes", {}).get("profiles", {}).get("data", [])
        check(0 < len(profiles) <= 10_000, "1..10,000 profiles")
        lists = data.get("relationships", {}).get("lists", {}).get("data", [])
        check(len(lists) == 1 and lists[0].get("type") == "list", "one list relationship")
        for prof in profiles:
            attrs = prof.get("attributes", {})
            check(prof.get("type") == "profile" and ("email" in attrs or "phone_number" in attrs), "profile id")
            if "phone_number" in attrs:
                check_phone(attrs["phone_number"], "phone_number")
            key = attrs.get("email") or attrs["phone_number"]
            pid = self._klaviyo_ids.setdefault(key, f"01K{len(self._klaviyo_ids):023d}")
            self.members[f"klaviyo:{lists[0]['id']}"].add(pid)
        self.accepted["klaviyo"].append(data)
        return web.json_response(
            {"data": {"type": "profile-bulk-import-job", "id": "job", "attributes": {"status": "queued"}}}, status=202
        )

    def kl_lookup(self, request: web.Request, body: bytes) -> web.Response:
        self._klaviyo_headers(request)
        match = re.fullmatch(r'equals\(email,"(.+)"\)', request.query.get("filter", ""))
        check(match is not None, 'filter=equals(email,"...")')
        assert match is not None
        pid = self._klaviyo_ids.get(match.group(1))
        return web.json_response({"data": [{"type": "profile", "id": pid}] if pid else []})

    def kl_delete(self, request: web.Request, body: bytes) -> web.Response:
        """POST /api/data-privacy-deletion-jobs: exactly one of email, phone_number or id; every
        profile that has it is deleted (from every list)."""
        self._klaviyo_headers(request)
        check(request.headers.get("Content-Type", "").startswith("application/vnd.api+json"), "JSON:API type")
        data = self._json(body).get("data", {})
        check(isinstance(data, dict) and data.get("type") == "data-privacy-deletion-job", "data.type")
        profile = data.get("attributes", {}).get("profile", {}).get("data", {})
        check(isinstance(profile, dict) and profile.get("type") == "profile", "attributes.profile.data.type")
        attrs = profile.get("attributes", {})
        check(isinstance(attrs, dict) and len(attrs) == 1, "exactly one of email, phone_number, id")
        key, value = next(iter(attrs.items()))
        check(key in ("email", "phone_number", "id"), "exactly one of email, phone_number, id")
        check(isinstance(value, str) and bool(value.strip()), f"{key} is a non-empty string")
        if key == "phone_number":
            check_phone(value, "phone_number")
        if key == "email":
            check("@" in value and value == value.strip(), "email")
        pid = value if key == "id" else self._klaviyo_ids.get(value)
        if pid is not None:
            for list_key in self.members:
                if list_key.startswith("klaviyo:"):
                    self.members[list_key].discard(pid)
        self.deleted.append(f"klaviyo:{key}:{value}")
        self.accepted["klaviyo_delete"].append(data)
        return web.Response(status=202)

    def kl_remove(self, request: web.Request, body: bytes) -> web.Response:
        self._klaviyo_headers(request)
        data = self._json(body).get("data", [])
        check(0 < len(data) <= 1000, "1..1000 profiles")
        for item in data:
            check(item.get("type") == "profile", "type profile")
            self.members[f"klaviyo:{request.match_info['list_id']}"].discard(item["id"])
        return web.Response(status=204)

    def sf_token(self, request: web.Request, body: bytes) -> web.Response:
        data = self._json(body)
        check(data.get("grant_type") == "client_credentials", "grant_type")
        check(
            (data.get("client_id"), data.get("client_secret")) == (self.sfmc_client_id, self.sfmc_client_secret),
            "client credentials",
        )
        return web.json_response({"access_token": "sf-access", "expires_in": 1080, "token_type": "Bearer"})

    def sf_rows(self, request: web.Request, body: bytes) -> web.Response:
        self._bearer(request, "sf-access")
        items = self._json(body).get("items", [])
        check(bool(items), "items required")
        target = self.members[f"sfmc:{request.match_info['key']}"]
        for item in items:
            check("profile_id" in item and isinstance(item.get("is_member"), bool), "primary key and flag")
            (target.add if item["is_member"] else target.discard)(item["profile_id"])
        self.accepted["sfmc"].append(items)
        return web.json_response({"requestId": hashlib.md5(body).hexdigest(), "resultMessages": []}, status=202)

    def ttd_segment(self, request: web.Request, body: bytes) -> web.Response:
        check(request.headers.get("TTD-Auth") == self.ttd_token, "TTD-Auth")
        data = self._json(body)
        check(data.get("MergeMode") == "Replace", "MergeMode")
        check(data.get("PiiType") in ("EmailHashedUnifiedId2", "PhoneNumberHashedUnifiedId2"), "PiiType")
        ref = f"ref{len(self._ttd_uploads) + 1}"
        self._ttd_uploads[ref] = request.match_info["crm"]
        return web.json_response({"ReferenceId": ref, "Url": f"{self.url}/ttd-upload/{ref}"})

    def ttd_upload(self, request: web.Request, body: bytes) -> web.Response:
        check(request.headers.get("Content-Type", "").startswith("text/plain"), "Content-Type text/plain")
        ref = request.match_info["ref"]
        check(ref in self._ttd_uploads, "unknown upload")
        lines = [line for line in body.decode().split("\n") if line]
        for line in lines:
            check(len(base64.b64decode(line, validate=True)) == 32, "line is not Base64 SHA-256")
        self.members[f"ttd:{self._ttd_uploads.pop(ref)}"] = set(lines)
        self.accepted["ttd"].append(lines)
        return web.Response(status=200)
