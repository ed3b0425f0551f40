"""Each connector against a loopback server that validates requests as the platform
documents them (cdp_standins): paths, headers, body shape, hashing, limits."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cdp_activation import identifiers as ids
from cdp_activation.connectors import Batch, DeliveryError, Record, SendContext, SendResult, connector_for
from cdp_standins import Fault, LocalPlatforms

RECORDS = [
    Record(
        "p1",
        {"email": ["Jo.Ann+x@gmail.com"], "phone": ["(650) 555-0101"]},
        {"first_name": "Jo", "last_name": "Ann", "country": "US", "postal_code": "94045"},
    ),
    Record("p2", {"email": ["  Bob@Example.com "]}, {"first_name": "Bob"}),
    Record("p3", {"phone": ["+0000000000"]}, {}),  # nothing usable: rejected, never hashed
]


INVALID_PHONE = "phone dropped: not a valid phone number"


@pytest.fixture
async def platforms() -> AsyncIterator[LocalPlatforms]:
    servers = LocalPlatforms()
    await servers.start()
    yield servers
    await servers.stop()


async def send(
    name: str,
    config: dict[str, Any],
    action: str = "add",
    identities: list[str] | None = None,
    records: list[Record] | None = None,
    tmp: Path = Path("/tmp"),
) -> SendResult:
    connector = connector_for(name)
    cfg = connector.parse(config)
    batch = Batch(
        id=f"b-{action}",
        plan_id="plan",
        destination=name,
        segment="gold",
        action=action,  # type: ignore[arg-type]
        sequence=1,
        records=records if records is not None else RECORDS,
        identities=identities or ["email", "phone"],
        attributes=["first_name"],
    )
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=cfg.timeout_s)) as http:
        return await connector.send(SendContext(http=http, export_root=tmp, members_after=2), cfg, batch)


async def test_activation_google_customer_match_job_flow(platforms: LocalPlatforms) -> None:
    cfg = {
        "base_url": platforms.url,
        "customer_id": "1234567890",
        "user_list_id": "42",
        "developer_token": platforms.google_developer_token,
        "access_token": platforms.google_token,
    }
    result = await send("google_customer_match", cfg)
    assert not platforms.rejected, platforms.rejected
    held = platforms.members["google:customers/1234567890/userLists/42"]
    assert held == {ids.sha256_hex("joann@gmail.com"), ids.sha256_hex("bob@example.com")}  # gmail rule applied
    assert result.rejected == {"no valid identifier": 1, INVALID_PHONE: 1}  # p3's "+0000000000"
    assert result.activated == 4  # p1 email + phone + address, p2 email
    job = platforms.accepted["google"][0]
    p1 = job["ops"][0]["create"]["userIdentifiers"]
    assert {"hashedPhoneNumber": ids.sha256_hex("+16505550101")} in p1
    address = {
        "hashedFirstName": ids.sha256_hex("jo"),
        "hashedLastName": ids.sha256_hex("ann"),
        "countryCode": "US",
        "postalCode": "94045",
    }
    assert {"addressInfo": address} in p1
    assert job["consent"] == {"adUserData": "GRANTED", "adPersonalization": "GRANTED"}
    await send("google_customer_match", cfg, action="remove")
    assert held == set()


async def test_activation_google_concurrent_modification_is_transient(platforms: LocalPlatforms) -> None:
    cfg = {
        "base_url": platforms.url,
        "customer_id": "1234567890",
        "user_list_id": "42",
        "developer_token": platforms.google_developer_token,
        "access_token": platforms.google_token,
    }
    body = {
        "error": {
            "code": 400,
            "status": "INVALID_ARGUMENT",
            "details": [{"errors": [{"errorCode": {"databaseError": "CONCURRENT_MODIFICATION"}}]}],
        }
    }
    platforms.fail("google", Fault(400, body=body))
    with pytest.raises(DeliveryError) as err:
        await send("google_customer_match", cfg)
    assert not err.value.permanent
    platforms.fail("google", Fault(403, body={"error": {"code": 403, "status": "PERMISSION_DENIED"}}))
    with pytest.raises(DeliveryError) as err:
        await send("google_customer_match", cfg)
    assert err.value.permanent


async def test_activation_meta_error_codes_classified(platforms: LocalPlatforms) -> None:
    cfg = {"base_url": platforms.url, "audience_id": "7", "access_token": platforms.meta_token}
    platforms.fail("meta", Fault(400, body={"error": {"code": 17, "error_subcode": 2446079, "message": "limit"}}))
    with pytest.raises(DeliveryError) as err:
        await send("meta_custom_audience", cfg)
    assert not err.value.permanent
    platforms.fail("meta", Fault(400, body={"error": {"code": 190, "message": "token"}}))
    with pytest.raises(DeliveryError) as err:
        await send("meta_custom_audience", cfg)
    assert err.value.permanent
    assert "190" in err.value.reason
    platforms.fail("meta", Fault(429, retry_after=7))
    with pytest.raises(DeliveryError) as err:
        await send("meta_custom_audience", cfg)
    assert err.value.retry_after == 7
    assert not err.value.permanent
    result = await send("meta_custom_audience", cfg)
    assert not platforms.rejected
    # Meta: no gmail rule; phone digits without "+"
    assert platforms.members["meta:7"] == {ids.sha256_hex("jo.ann+x@gmail.com"), ids.sha256_hex("bob@example.com")}
    row = platforms.accepted["meta"][0]["payload"]["data"][0]
    assert row[1] == ids.sha256_hex("16505550101")
    assert result.rejected == {"no valid identifier": 1, INVALID_PHONE: 1}  # p3's "+0000000000"
    assert result.warnings == ["audience of 2 is below the meta_custom_audience minimum of 100"]


async def test_activation_snap_tiktok_linkedin(platforms: LocalPlatforms) -> None:
    await send("snap_audience", {"base_url": platforms.url, "segment_id": "s", "access_token": platforms.snap_token})
    assert platforms.members["snap:s"] == {
        ids.sha256_hex("jo.ann+x@gmail.com"),
        ids.sha256_hex("bob@example.com"),
        ids.sha256_hex("16505550101"),
    }
    await send(
        "tiktok_audience",
        {"base_url": platforms.url, "advertiser_id": "a", "audience_id": "t", "access_token": platforms.tiktok_token},
    )
    assert platforms.members["tiktok:t"] == {
        ids.sha256_hex("joann@gmail.com"),
        ids.sha256_hex("bob@example.com"),
        ids.sha256_hex("16505550101"),
    }
    tiktok = platforms.accepted["tiktok"][0]
    assert tiktok["id_schema"] == ["EMAIL_SHA256", "PHONE_SHA256"]
    assert len(tiktok["batch_data"]) == 2
    assert tiktok["batch_data"][1][1] == {}  # p2 has no phone: empty position
    await send(
        "linkedin_audience",
        {"base_url": platforms.url, "segment_id": "l", "access_token": platforms.linkedin_token},
        identities=["email"],
    )
    assert platforms.members["linkedin:l"] == {ids.sha256_hex("jo.ann+x@gmail.com"), ids.sha256_hex("bob@example.com")}
    await send(
        "snap_audience",
        {"base_url": platforms.url, "segment_id": "s", "access_token": platforms.snap_token},
        action="remove",
    )
    assert platforms.members["snap:s"] == set()
    assert not platforms.rejected, platforms.rejected


async def test_activation_mailchimp_braze(platforms: LocalPlatforms) -> None:
    mc = {"base_url": platforms.url, "api_key": platforms.mailchimp_key, "list_id": "L1"}
    result = await send("mailchimp", mc, identities=["email"])
    assert result.activated == 2
    held = platforms.members["mailchimp:gold"]
    assert held == {ids.md5_hex("jo.ann+x@gmail.com"), ids.md5_hex("bob@example.com")}
    await send("mailchimp", mc, action="remove", identities=["email"])
    assert held == set()
    braze = {"base_url": platforms.url, "api_key": platforms.braze_key}
    await send("braze", braze, identities=["email"])
    assert platforms.members["braze:gold"] == {"p1", "p2", "p3"}
    assert platforms.accepted["braze"][0][0]["phone"] == "+16505550101"
    await send("braze", braze, action="remove", identities=["email"])
    assert platforms.members["braze:gold"] == set()
    assert not platforms.rejected, platforms.rejected


async def test_activation_twilio_sms_suppresses_stop_repliers(platforms: LocalPlatforms) -> None:
    platforms.stopped.add("+16505550102")
    cfg = {
        "base_url": platforms.url,
        "account_sid": platforms.twilio_sid,
        "auth_token": platforms.twilio_token,
        "from_number": "+16505550000",
        "message": "Hello from the CDP",
    }
    records = [
        Record("a", {"phone": ["(650) 555-0101"]}, {}),
        Record("b", {"phone": ["650 555 0102"]}, {}),
        Record("c", {"phone": ["+0000000000"]}, {}),
    ]
    result = await send("twilio_sms", cfg, identities=["phone"], records=records)
    assert result.activated == 1
    assert result.rejected == {"replied STOP (21610)": 1, "no valid phone": 1}
    assert platforms.members["twilio:sent"] == {"+16505550101"}
    platforms.fail("twilio", Fault(429, retry_after=1))
    with pytest.raises(DeliveryError) as err:
        await send("twilio_sms", cfg, identities=["phone"], records=records[:1])
    assert not err.value.permanent
    assert err.value.retry_after == 1


async def test_activation_segment_share_sends_every_identity(platforms: LocalPlatforms) -> None:
    cfg = {"base_url": platforms.url + "/webhook", "secret": platforms.webhook_secret, "partner": "dmp-1"}
    records = [Record("p1", {"email": ["a@example.com"], "cookie": ["ck1"], "crm_id": ["C1"]}, {})]
    result = await send("segment_share", cfg, identities=["email"], records=records)
    assert result.activated == 3
    sent = platforms.accepted["webhook"][0]
    assert sent["status"] == "realized"
    assert {(i["namespace"], i["value"]) for i in sent["members"][0]["identities"]} == {
        ("email", "a@example.com"),
        ("cookie", "ck1"),
        ("crm_id", "C1"),
    }


@pytest.mark.parametrize("secret", ["wrong-secret-123"])
async def test_activation_webhook_bad_signature_is_refused(platforms: LocalPlatforms, secret: str) -> None:
    with pytest.raises(DeliveryError) as err:
        await send("webhook", {"base_url": platforms.url + "/webhook", "secret": secret}, identities=["email"])
    assert err.value.permanent
    assert "HMAC" in err.value.reason


async def test_activation_klaviyo_bulk_import_and_list_removal(platforms: LocalPlatforms) -> None:
    cfg = {"base_url": platforms.url, "api_key": platforms.klaviyo_key, "list_id": "LST"}
    result = await send("klaviyo", cfg)
    assert result.activated == 2
    assert result.rejected == {"no valid identifier": 1, INVALID_PHONE: 1}  # p3's "+0000000000"
    assert len(platforms.members["klaviyo:LST"]) == 2
    job = platforms.accepted["klaviyo"][0]["attributes"]["profiles"]["data"]
    assert job[0]["attributes"]["phone_number"] == "+16505550101"
    assert job[1]["attributes"]["email"] == "bob@example.com"
    await send("klaviyo", cfg, action="remove")
    assert platforms.members["klaviyo:LST"] == set()
    assert not platforms.rejected, platforms.rejected


async def test_activation_salesforce_marketing_cloud_rows_with_flag(platforms: LocalPlatforms) -> None:
    cfg = {
        "base_url": platforms.url,
        "auth_url": platforms.url,
        "client_id": platforms.sfmc_client_id,
        "client_secret": platforms.sfmc_client_secret,
        "data_extension_key": "DE1",
    }
    await send("salesforce_marketing_cloud", cfg, identities=["email"])
    assert platforms.members["sfmc:DE1"] == {"p1", "p2", "p3"}
    assert platforms.accepted["sfmc"][0][0]["first_name"] == "Jo"
    await send("salesforce_marketing_cloud", cfg, action="remove", records=RECORDS[:1], identities=["email"])
    assert platforms.members["sfmc:DE1"] == {"p2", "p3"}
    bad = {**cfg, "client_secret": "wrong"}
    with pytest.raises(DeliveryError) as err:
        await send("salesforce_marketing_cloud", bad)
    assert err.value.permanent
    assert not [r for r in platforms.rejected if "credentials" not in r]


async def test_activation_trade_desk_replaces_the_list_with_base64_uid2_hashes(platforms: LocalPlatforms) -> None:
    cfg = {"base_url": platforms.url, "advertiser_id": "adv", "crm_data_id": "crm1", "auth_token": platforms.ttd_token}
    result = await send("trade_desk_crm", cfg)
    assert platforms.members["ttd:crm1"] == {ids.sha256_b64("joann@gmail.com"), ids.sha256_b64("bob@example.com")}
    assert result.warnings == ["audience of 2 is below the trade_desk_crm minimum of 1500"]
    assert not platforms.rejected, platforms.rejected


async def test_activation_file_export_to_a_local_sftp_server(tmp_path: Path) -> None:
    import asyncssh

    root = tmp_path / "sftp-root"
    root.mkdir()
    host_key = asyncssh.generate_private_key("ssh-ed25519")

    class Server(asyncssh.SSHServer):
        def begin_auth(self, username: str) -> bool:
            return True

        def password_auth_supported(self) -> bool:
            return True

        def validate_password(self, username: str, password: str) -> bool:
            return (username, password) == ("drop", "s3cret-pass")

    def sftp_factory(chan: asyncssh.SSHServerChannel[bytes]) -> asyncssh.SFTPServer:
        return asyncssh.SFTPServer(chan, chroot=str(root).encode())

    server = await asyncssh.listen(
        "127.0.0.1", 0, server_factory=Server, server_host_keys=[host_key], sftp_factory=sftp_factory
    )
    port = server.sockets[0].getsockname()[1]
    known = f"[127.0.0.1]:{port} {host_key.export_public_key().decode().strip()}"
    try:
        cfg = {
            "target": "sftp",
            "sftp_host": "127.0.0.1",
            "sftp_port": port,
            "sftp_username": "drop",
            "sftp_password": "s3cret-pass",
            "sftp_path": "/exports",
            "sftp_known_hosts": known,
            "format": "csv",
            "split_rows": 2,
            "folder": "crm",
        }
        result = await send("file_export", cfg, records=RECORDS, tmp=tmp_path)
        folder = root / "exports" / "crm"
        assert sorted(p.name for p in folder.iterdir()) == ["gold-00001.csv", "gold-00002.csv", "gold.manifest.json"]
        assert result.location.startswith(f"sftp://127.0.0.1:{port}/exports/crm/")
        # a smaller audience leaves no stale part behind
        await send("file_export", cfg, records=RECORDS[:2], tmp=tmp_path)
        assert sorted(p.name for p in folder.iterdir()) == ["gold.csv", "gold.manifest.json"]
        with pytest.raises(DeliveryError) as err:
            await send("file_export", {**cfg, "sftp_password": "wrong"}, tmp=tmp_path)
        assert err.value.permanent
    finally:
        server.close()
        await server.wait_closed()


async def test_activation_file_export_to_an_fsspec_filesystem(tmp_path: Path) -> None:
    import fsspec  # type: ignore[import-untyped]

    cfg = {"target": "fsspec", "fsspec_url": "memory://bucket/cdp", "format": "jsonl", "gzip": True}
    await send("file_export", cfg, records=RECORDS, tmp=tmp_path)
    fs = fsspec.filesystem("memory")
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls("/bucket/cdp/file_export", detail=False)) == [
        "gold.jsonl.gz",
        "gold.manifest.json",
    ]
    problems = connector_for("file_export").validate({"target": "fsspec"})
    assert any("fsspec_url" in v.rule or "fsspec_url" in str(v) for v in problems), problems


# Data as it really comes: an alpha-3 country, a state with digits, an invalid number, MAIDs
# in the identity graph's idfa/gaid namespaces, a zeroed IDFA, a SHA-256 made elsewhere.
IDFA = "AECE52E7-03EE-455A-B3C4-E57283966239"
GAID = "38400000-8cf0-11bd-b23e-10b96e40000d"
REAL = [
    Record(
        "r1",
        {"email": ["Ann@Example.com"], "phone": ["9112340375"], "idfa": [IDFA]},
        {"first_name": "Ann", "last_name": "Lee", "country": "IRL", "state": "123abc ", "postal_code": "D02 X285"},
    ),
    Record("r2", {"phone": ["+44 844 412 4653"], "gaid": [GAID], "idfa": ["00000000-0000-0000-0000-000000000000"]}, {}),
    Record("r3", {"email_sha256": [ids.sha256_hex("user@example.com")]}, {}),
]


async def test_activation_real_identifiers_through_the_local_platforms(platforms: LocalPlatforms) -> None:
    tiktok = {
        "base_url": platforms.url,
        "advertiser_id": "a",
        "audience_id": "t",
        "access_token": platforms.tiktok_token,
    }
    result = await send("tiktok_audience", tiktok, identities=["email", "phone", "idfa", "gaid"], records=REAL)
    sent = platforms.accepted["tiktok"][0]
    assert sent["id_schema"] == ["EMAIL_SHA256", "PHONE_SHA256", "IDFA_SHA256", "AAID_SHA256"]
    assert [[item.get("id") for item in user] for user in sent["batch_data"]] == [
        [ids.sha256_hex("ann@example.com"), None, ids.sha256_hex(IDFA.lower()), None],
        [None, ids.sha256_hex("448444124653"), None, ids.sha256_hex(GAID)],
    ]
    assert result.rejected == {
        "phone dropped: not a valid phone number": 1,
        "maid dropped: not a mobile advertising id (or a zeroed, tracking-limited one)": 1,
        "no valid identifier": 1,
    }

    meta = {"base_url": platforms.url, "audience_id": "9", "access_token": platforms.meta_token}
    batch_attrs = ["country", "state"]
    connector = connector_for("meta_custom_audience")
    cfg = connector.parse(meta)
    body = Batch("m", "plan", "meta", "gold", "add", 1, REAL, ["email", "phone", "idfa", "gaid"], batch_attrs)
    async with aiohttp.ClientSession() as http:
        await connector.send(SendContext(http=http, export_root=Path("/tmp"), members_after=2), cfg, body)
    payload = platforms.accepted["meta"][0]["payload"]
    assert payload["schema"] == ["EMAIL", "PHONE", "MADID", "COUNTRY", "ST"]
    assert payload["data"][0] == [
        ids.sha256_hex("ann@example.com"),
        "",  # 9112340375 is not a valid number: left blank, never +19112340375
        IDFA.lower(),
        ids.sha256_hex("ie"),  # IRL is Ireland, not ir (Iran)
        ids.sha256_hex("abc"),
    ]
    assert payload["data"][1][:3] == ["", ids.sha256_hex("448444124653"), GAID]

    google = {
        "base_url": platforms.url,
        "customer_id": "1234567890",
        "user_list_id": "42",
        "developer_token": platforms.google_developer_token,
        "access_token": platforms.google_token,
    }
    await send("google_customer_match", google, records=REAL[:1])
    (op,) = platforms.accepted["google"][0]["ops"]
    assert op["create"]["userIdentifiers"][1]["addressInfo"]["countryCode"] == "IE"
    assert all("hashedPhoneNumber" not in ident for ident in op["create"]["userIdentifiers"])

    ttd = {"base_url": platforms.url, "advertiser_id": "adv", "crm_data_id": "c9", "auth_token": platforms.ttd_token}
    await send("trade_desk_crm", ttd, identities=["email", "email_sha256"], records=REAL)
    assert platforms.members["ttd:c9"] == {
        ids.sha256_b64("ann@example.com"),
        "tMmiiTI7IaAcPpQPFQ65uMVCWH8av9jw4cwf/F5HVRQ=",  # the hex digest re-encoded, not hashed again
    }
    twilio = {
        "base_url": platforms.url,
        "account_sid": platforms.twilio_sid,
        "auth_token": platforms.twilio_token,
        "from_number": "+16505550000",
        "message": "hi",
    }
    sms = await send("twilio_sms", twilio, identities=["phone"], records=REAL[:2])
    assert platforms.members["twilio:sent"] == {"+448444124653"}
    assert sms.rejected == {"no valid phone": 1}
    assert not platforms.rejected, platforms.rejected


async def post(url: str, body: Any, headers: dict[str, str], method: str = "POST") -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.request(method, url, json=body, headers=headers) as resp:
        return resp.status, await resp.json(content_type=None)


@pytest.mark.parametrize(
    ("name", "path", "body", "reason"),
    [
        (
            "meta-unhashed-email",
            "/v25.0/9/users",
            {"payload": {"schema": ["EMAIL"], "data": [["ann@example.com"]]}},
            "EMAIL is not a SHA-256 hex digest",
        ),
        (
            "meta-empty-hash",
            "/v25.0/9/users",
            {"payload": {"schema": ["PHONE"], "data": [[ids.sha256_hex("")]]}},
            "PHONE is the SHA-256 of an empty value",
        ),
        (
            "meta-madid-upper",
            "/v25.0/9/users",
            {"payload": {"schema": ["MADID"], "data": [[IDFA]]}},
            "MADID is not a lower-case advertising id",
        ),
        (
            "google-country-alpha3",
            "/v24/customers/1234567890/offlineUserDataJobs/1:addOperations",
            {
                "operations": [
                    {
                        "create": {
                            "userIdentifiers": [
                                {
                                    "addressInfo": {
                                        "hashedFirstName": ids.sha256_hex("ann"),
                                        "hashedLastName": ids.sha256_hex("lee"),
                                        "countryCode": "IRL",
                                        "postalCode": "D02",
                                    }
                                }
                            ]
                        }
                    }
                ]
            },
            "countryCode is not ISO 3166-1 alpha-2",
        ),
        (
            "tiktok-unhashed-idfa",
            "/open_api/v1.3/segment/mapping/",
            {"action": "add", "id_schema": ["IDFA_SHA256"], "batch_data": [[{"id": IDFA, "audience_ids": ["t"]}]]},
            "IDFA_SHA256 is not a SHA-256 hex digest",
        ),
    ],
    ids=["meta-unhashed-email", "meta-empty-hash", "meta-madid-upper", "google-country-alpha3", "tiktok-unhashed-idfa"],
)
async def test_activation_local_platforms_refuse_wrong_identifiers(
    platforms: LocalPlatforms, name: str, path: str, body: dict[str, Any], reason: str
) -> None:
    if name.startswith("meta"):
        body["session"] = {"session_id": 1, "batch_seq": 1, "last_batch_flag": True, "estimated_num_total": 1}
        headers = {"Authorization": f"Bearer {platforms.meta_token}"}
    elif name.startswith("google"):
        headers = {"Authorization": f"Bearer {platforms.google_token}", "developer-token": "dev-token"}
        job = {"job": {"type": "CUSTOMER_MATCH_USER_LIST", "customerMatchUserListMetadata": {
            "userList": "customers/1234567890/userLists/42"}}}  # fmt: skip
        await post(f"{platforms.url}/v24/customers/1234567890/offlineUserDataJobs:create", job, headers)
    else:
        headers = {"Access-Token": platforms.tiktok_token}
    status, answer = await post(platforms.url + path, body, headers)
    assert status == 400
    assert answer["error"]["message"] == reason


async def test_activation_local_twilio_refuses_an_invalid_number(platforms: LocalPlatforms) -> None:
    cfg = {
        "base_url": platforms.url,
        "account_sid": platforms.twilio_sid,
        "auth_token": platforms.twilio_token,
        "from_number": "+16505550000",
        "message": "hi",
    }
    auth = "Basic " + base64.b64encode(f"{platforms.twilio_sid}:{platforms.twilio_token}".encode()).decode()
    form = "To=%2B19112340375&From=%2B16505550000&Body=hi"  # what the old fallback sent for 9112340375
    async with aiohttp.ClientSession() as http:
        url = f"{platforms.url}/2010-04-01/Accounts/{platforms.twilio_sid}/Messages.json"
        headers = {"Authorization": auth, "Content-Type": "application/x-www-form-urlencoded"}
        async with http.post(url, data=form, headers=headers) as resp:
            assert resp.status == 400
            assert (await resp.json())["code"] == 21211
    numbers = [Record("x", {"phone": ["9112340375"]}, {}), Record("y", {"phone": ["(201) 555-0142"]}, {})]
    result = await send("twilio_sms", cfg, identities=["phone"], records=numbers)
    assert result.rejected == {"no valid phone": 1}
    assert platforms.members["twilio:sent"] == {"+12015550142"}
