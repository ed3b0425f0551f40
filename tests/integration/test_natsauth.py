"""NATS security on a real nats-server with the platform's configuration (``cdp_kit.natsauth``):
TLS, per-service users, subject permissions. Every refusal here is the server's own."""

from __future__ import annotations

import asyncio
import json

import nats
import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api
from nats.js.client import JetStreamContext

from cdp_kit.envelope import encode_batch, utcnow
from cdp_kit.errors import Unavailable
from cdp_kit.eventlog import EventLog
from cdp_kit.natsauth import ADMIN, PUBLISHER, NatsAuth, reader_name
from cdp_kit.streams import (
    ACTIVATION_CONFIG,
    CONFIG,
    IDENTITY_FRAGMENTS,
    KEY_STREAM,
    PROFILE,
    SEGMENTATION_MEMBERSHIPS,
    SEGMENTATION_READS_INGEST_CONFIG,
    SEGMENTATION_READS_PROFILE,
    SERVICE_LOGS,
)
from cdp_kit.testing.plugin import SecureNats
from cdp_kit.vault import PersonVault

TOKEN = b'{"destination": "crm", "access_token": "secret-token-123"}'
SHORT_S = 1.0


async def raw_connect(secure: SecureNats, user: str, errors: list[Exception]) -> Client:
    async def collect(exc: Exception) -> None:
        errors.append(exc)

    options = secure.auth(user).connect_options()
    return await nats.connect(secure.url, error_cb=collect, max_reconnect_attempts=0, **options)


def violations(errors: list[Exception]) -> str:
    return " ".join(str(e) for e in errors if "permissions violation" in str(e).lower())


async def wait_violation(errors: list[Exception], subject_part: str) -> None:
    for _ in range(40):
        if subject_part in violations(errors):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"no permissions violation for {subject_part}: {errors}")


async def test_anonymous_and_wrong_credentials_are_refused(secure_nats: SecureNats) -> None:
    trust = NatsAuth(ca_file=secure_nats.auth(ADMIN).ca_file)
    with pytest.raises(Unavailable):
        await EventLog.connect(secure_nats.url, "anonymous", auth=trust, connect_timeout=3)
    wrong = NatsAuth(user="segmentation", password="not-the-password", ca_file=trust.ca_file)
    with pytest.raises(Unavailable):
        await EventLog.connect(secure_nats.url, "guess", auth=wrong, connect_timeout=3)
    plain = secure_nats.url.replace("tls://", "nats://")
    password = secure_nats.auth("segmentation").password
    with pytest.raises(Unavailable):  # no TLS: the server requires it
        await EventLog.connect(plain, "plain", auth=NatsAuth("segmentation", password), connect_timeout=3)
    log = await secure_nats.connect("segmentation")
    assert log.connected
    await log.close()


async def test_a_forged_fragment_is_refused_and_the_owner_writes(secure_nats: SecureNats) -> None:
    admin = await secure_nats.connect(ADMIN)
    errors: list[Exception] = []
    forger = await raw_connect(secure_nats, "segmentation", errors)
    try:
        data = encode_batch([], utcnow())
        with pytest.raises((TimeoutError, nats.errors.NoRespondersError)):
            await forger.jetstream(timeout=SHORT_S).publish(IDENTITY_FRAGMENTS.subject, data)
        await forger.publish("cdp.profile.9.fragments", data)  # core publish, no ack asked
        await forger.flush()
        await wait_violation(errors, "cdp.profile.")
        assert await admin.last_sequence(PROFILE.name) == 0  # nothing stored
        identity = await secure_nats.connect("identity")
        appended = await identity.append_raw(IDENTITY_FRAGMENTS.subject, data, msg_id="f1")
        assert appended.sequence == 1
        await identity.close()
        # segmentation still reads its input, and what it reads is identity's
        seen = [
            m
            async for m in (await secure_nats.connect("segmentation")).read(
                PROFILE.name,
                SEGMENTATION_READS_PROFILE.filter_subject,
                name=reader_name(SEGMENTATION_READS_PROFILE.name),
            )
        ]
        assert [m.sequence for m in seen] == [1]
    finally:
        await forger.close()
        await admin.close()


async def test_segmentation_cannot_read_activations_config(secure_nats: SecureNats) -> None:
    admin = await secure_nats.connect(ADMIN)
    await admin.append_raw(ACTIVATION_CONFIG.subject, TOKEN, msg_id="token")
    await admin.append_raw(SEGMENTATION_READS_INGEST_CONFIG.filter_subject, b"{}", msg_id="ingest")
    errors: list[Exception] = []
    nc = await raw_connect(secure_nats, "segmentation", errors)
    js = nc.jetstream(timeout=SHORT_S)
    refused = (TimeoutError, nats.errors.NoRespondersError, nats.js.errors.APIError)
    try:
        # a consumer on activation's subject, named as segmentation's own reader or not
        for name in (reader_name(SEGMENTATION_READS_INGEST_CONFIG.name), "anything"):
            config = api.ConsumerConfig(
                name=name, filter_subject=ACTIVATION_CONFIG.subject, ack_policy=api.AckPolicy.NONE
            )
            with pytest.raises(refused):
                await js.add_consumer(CONFIG.name, config=config)
        # its own consumer's allowed create subject, with activation's filter in the body
        own = reader_name(SEGMENTATION_READS_INGEST_CONFIG.name)
        body = {"stream_name": CONFIG.name, "config": {"name": own, "filter_subject": ACTIVATION_CONFIG.subject}}
        subject = f"$JS.API.CONSUMER.CREATE.{CONFIG.name}.{own}.{SEGMENTATION_READS_INGEST_CONFIG.filter_subject}"
        reply = await nc.request(subject, json.dumps(body).encode(), timeout=SHORT_S)
        assert json.loads(reply.data).get("error"), reply.data
        body["config"] = {"name": own, "filter_subjects": [ACTIVATION_CONFIG.subject]}
        reply = await nc.request(subject, json.dumps(body).encode(), timeout=SHORT_S)
        assert json.loads(reply.data).get("error"), reply.data
        # unnamed consumers, message gets by sequence or by subject, the legacy durable create
        with pytest.raises(refused):
            await js.pull_subscribe(ACTIVATION_CONFIG.subject, stream=CONFIG.name)
        with pytest.raises(refused):
            await js.get_msg(CONFIG.name, 1)
        with pytest.raises(refused):
            await js.get_msg(CONFIG.name, 1, direct=True)
        with pytest.raises(refused):
            await js.get_last_msg(CONFIG.name, ACTIVATION_CONFIG.subject, direct=True)
        with pytest.raises(refused):
            await nc.request(f"$JS.API.CONSUMER.DURABLE.CREATE.{CONFIG.name}.x", b"{}", timeout=SHORT_S)
        # a last-by-subject get of an allowed subject ignores a body asking for another sequence
        allowed = f"$JS.API.DIRECT.GET.{CONFIG.name}.{SEGMENTATION_READS_INGEST_CONFIG.filter_subject}"
        try:
            reply = await nc.request(allowed, json.dumps({"seq": 1}).encode(), timeout=SHORT_S)
        except refused:
            pass
        else:
            assert TOKEN not in reply.data
        # a plain subscription to the subject is refused by the server
        got: list[bytes] = []

        async def keep(msg: Msg) -> None:
            got.append(msg.data)

        sub = await nc.subscribe(ACTIVATION_CONFIG.subject, cb=keep)
        await wait_violation(errors, ACTIVATION_CONFIG.subject)
        await admin.append_raw(ACTIVATION_CONFIG.subject, TOKEN, msg_id="token-2")
        await asyncio.sleep(0.2)
        assert got == []
        await sub.unsubscribe()
        # the positive control: its own reader on ingest's config works
        mine = await secure_nats.connect("segmentation")
        seen = [
            m.subject async for m in mine.read(CONFIG.name, SEGMENTATION_READS_INGEST_CONFIG.filter_subject, name=own)
        ]
        assert seen == [SEGMENTATION_READS_INGEST_CONFIG.filter_subject]
        await mine.close()
    finally:
        await nc.close()
        await admin.close()


async def test_services_cannot_manage_streams_and_publishers_only_collect(secure_nats: SecureNats) -> None:
    for user in ("segmentation", "identity", PUBLISHER):
        errors: list[Exception] = []
        nc = await raw_connect(secure_nats, user, errors)
        js = nc.jetstream(timeout=SHORT_S)
        try:
            with pytest.raises((TimeoutError, nats.errors.NoRespondersError)):
                await js.add_stream(name="EVIL", subjects=["evil.>"])
            with pytest.raises((TimeoutError, nats.errors.NoRespondersError)):
                await js.delete_stream(PROFILE.name)
            with pytest.raises((TimeoutError, nats.errors.NoRespondersError)):
                await js.purge_stream(PROFILE.name)
        finally:
            await nc.close()
    errors = []
    publisher = await raw_connect(secure_nats, PUBLISHER, errors)
    try:
        ack = await publisher.jetstream(timeout=5).publish("cdp.collect.web", b"{}")
        assert ack.stream == "CDP_COLLECT"
        with pytest.raises((TimeoutError, nats.errors.NoRespondersError)):
            await publisher.jetstream(timeout=SHORT_S).publish("cdp.ingest.0.records", b"{}")
    finally:
        await publisher.close()


async def test_each_service_does_its_own_work(secure_nats: SecureNats) -> None:
    """What the processor does, as each service: verify streams, append to and read back its own logs,
    create, fetch, ack and inspect its durable consumers, read an input message by sequence."""
    admin = await secure_nats.connect(ADMIN)
    for logs in SERVICE_LOGS.values():
        for spec in logs.inputs:
            subject = spec.filter_subject.replace(">", "0.x") if ">" in spec.filter_subject else spec.filter_subject
            await admin.append_raw(subject, encode_batch([], utcnow()), msg_id=f"in-{spec.name}")
    for service, logs in SERVICE_LOGS.items():
        log = await secure_nats.connect(service)
        try:
            await log.verify_streams([o.stream for o in logs.own_logs] + [i.stream for i in logs.inputs])
            for own in logs.own_logs:
                before = await log.last_sequence(own.stream.name, own.subject)
                await log.append_raw(own.subject, b"x", msg_id=f"own-{own.name}", expected_last_subject_sequence=before)
                read = [m async for m in log.read(own.stream.name, own.subject, name=reader_name(own.name))]
                assert {m.subject for m in read} == {own.subject}
                assert read[-1].data == b"x"
            for spec in logs.inputs:
                reader = await log.durable(spec, 1)
                got = await reader.fetch(10, timeout=2.0)
                assert got, spec.name
                await reader.ack(got[-1][1])
                assert await log.consumer_lag(spec) is not None
                again = await log.message(spec.stream.name, got[0][0].sequence, via=spec)
                assert again.data == got[0][0].data
                assert await log.last_sequence(spec.stream.name) > 0
                await reader.close()
        finally:
            await log.close()
    await admin.close()


async def test_memberships_are_segmentations_alone(secure_nats: SecureNats) -> None:
    activation = await secure_nats.connect("activation")
    try:
        with pytest.raises(Unavailable):
            await activation.append_raw(SEGMENTATION_MEMBERSHIPS.subject, b"x", msg_id="forged")
    finally:
        await activation.close()


async def test_the_key_bucket_ingest_makes_everyone_reads_identity_erases(secure_nats: SecureNats) -> None:
    """Crypto-shredding keys (cdp_kit.vault): provisioning made the bucket, ingest creates keys,
    every service reads them, identity destroys them, and segmentation may do neither (activation
    makes and destroys the keys of its removal batches)."""
    logs = {user: await secure_nats.connect(user) for user in ("ingest", "identity", "segmentation", "activation")}
    try:
        vaults = {user: await PersonVault.bind(log.js) for user, log in logs.items()}
        refs = vaults["ingest"].refs_for([("email", "ann@example.com"), ("email", "bob@example.com")])
        assert await vaults["ingest"].commit() == 2
        for user in ("identity", "segmentation", "activation"):
            await vaults[user].prefetch(refs)
            assert vaults[user].can_seal(refs), user
        forger = vaults["segmentation"]
        forger.refs_for([("email", "eve@example.com")])
        forger.js._timeout = SHORT_S
        with pytest.raises(Unavailable):
            await forger.commit()
        segmentation = logs["segmentation"].js
        with pytest.raises((TimeoutError, nats.errors.NoRespondersError)):
            await nats_js_manager(segmentation).delete_msg(KEY_STREAM, 1)
        for user in ("segmentation", "activation"):
            with pytest.raises((TimeoutError, nats.errors.NoRespondersError)):
                await nats_js_manager(logs[user].js).purge_stream(KEY_STREAM)
        assert await vaults["identity"].destroy(refs[:1]) == 1
        removal = vaults["activation"].refs_for([("privacy-removal", "privacy:req:plan")])
        assert await vaults["activation"].commit() == 1  # a removal batch's key
        assert await vaults["activation"].destroy(removal) == 1
        fresh = await PersonVault.bind(logs["activation"].js)
        await fresh.prefetch(refs)
        assert not fresh.can_seal(refs[:1])
        assert fresh.can_seal(refs[1:])
    finally:
        for log in logs.values():
            await log.close()


def nats_js_manager(js: JetStreamContext) -> JetStreamContext:
    js._timeout = SHORT_S
    return js
