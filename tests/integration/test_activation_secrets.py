"""Destination secrets at rest: sealed on the log and in the store, opened only to deliver;
master key rotation through the log; plain secrets written by an older version; URL credentials
masked. Real nats-server, real SQLite, real local destination servers."""

# ruff: noqa: F811 (the harness fixtures are imported from the delivery tests)

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlmodel import Session, select

from cdp.activation.v1 import activation_pb2 as pb
from cdp.activation.v1 import events_pb2 as ev
from cdp_activation import credentials
from cdp_activation.store import DestinationRow
from cdp_kit.envelope import Cause, deterministic_id, make_envelope, utcnow
from cdp_kit.errors import FailedPrecondition
from cdp_kit.eventlog import EventLog
from cdp_kit.keyring import add_key, is_sealed, key_id_of, load_keyring, retire_keys
from cdp_kit.processor import UnitOfWork
from cdp_kit.streams import ACTIVATION_CONFIG
from cdp_standins import LocalPlatforms
from tests.integration.test_activation_delivery import (  # noqa: F401 (fixtures)
    FAST,
    Harness,
    Upstream,
    harness,
    people,
    platforms,
    upstream,
)

TOKEN = "whsec-KNOWN-7d41c2e09b5a"  # the webhook's signing secret, searched for in every byte


def files_holding(root: Path, needle: bytes) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes())


def stored_config(harness: Harness, name: str) -> dict[str, Any]:
    with Session(harness.engine) as session:
        row = session.exec(select(DestinationRow).where(DestinationRow.name == name)).one()
        return dict(row.body["config"])


async def hook(harness: Harness, platforms: LocalPlatforms, **extra: Any) -> pb.Destination:
    platforms.webhook_secret = TOKEN
    return await harness.destination("hook", "webhook", base_url=platforms.url + "/webhook", secret=TOKEN, **extra)


async def older_version_creates(harness: Harness, platforms: LocalPlatforms) -> None:
    """What the version before encryption appended: the destination's config as given."""
    platforms.webhook_secret = TOKEN
    dest = pb.Destination(name="hook", connector="webhook", marketing_action="email_marketing")
    dest.config.update({**FAST, "base_url": platforms.url + "/webhook", "secret": TOKEN})
    dest.id = deterministic_id("destination", dest.name)

    def decide(uow: UnitOfWork) -> None:
        env = make_envelope(
            ev.DestinationCreated(destination=dest),
            event_id=deterministic_id("destination-created", dest.id),
            subject_key=dest.id,
            occurred_at=utcnow(),
            cause=Cause(command_id=dest.id),
        )
        uow.emit(ACTIVATION_CONFIG, [env])

    await harness.processor.execute(f"destination:{dest.id}", decide)


async def test_secrets_are_sealed_on_the_log_and_in_the_store_and_opened_to_deliver(
    tmp_path: Path, harness: Harness, upstream: Upstream, platforms: LocalPlatforms
) -> None:
    await upstream.segment()
    shown = await hook(harness, platforms)
    assert shown.config["secret"] == "****"
    await harness.activate("hook", ["email"])
    pids = await people(upstream, 3)
    await harness.settled("hook", 3)
    # the local webhook checks the HMAC signature: the secret was opened in memory to sign
    assert platforms.members["webhook:gold"] == set(pids)

    sealed = stored_config(harness, "hook")["secret"]
    assert is_sealed(sealed)
    assert key_id_of(sealed) == harness.keys.keyring.newest
    await harness.stop()
    # the scan sees the log and the store (the destination's name and URL are there) …
    assert files_holding(tmp_path / "jetstream", b"/webhook")
    assert files_holding(tmp_path, b"/webhook")
    # … and the secret is nowhere: JetStream store, SQLite files, NATS log
    assert files_holding(tmp_path, TOKEN.encode()) == []


async def test_a_sealed_secret_cannot_be_moved_to_another_destination(
    harness: Harness, platforms: LocalPlatforms
) -> None:
    real_id = (await hook(harness, platforms)).id
    sealed = stored_config(harness, "hook")["secret"]
    keyring = harness.keys.keyring
    assert credentials.open_config({"secret": sealed}, keyring, real_id) == {"secret": TOKEN}
    with pytest.raises(Exception, match="wrong key or context"):
        credentials.open_config({"secret": sealed}, keyring, "another-destination")
    with pytest.raises(Exception, match="wrong key or context"):
        credentials.open_config({"other_secret": sealed}, keyring, real_id)


async def test_rotation_reseals_through_the_log_and_a_rebuild_needs_only_the_new_key(
    tmp_path: Path, nats_url: str, eventlog: EventLog, upstream: Upstream, platforms: LocalPlatforms
) -> None:
    first = Harness(tmp_path, nats_url, eventlog)
    await first.start()
    await upstream.segment()
    await hook(first, platforms)
    await first.activate("hook", ["email"])
    await people(upstream, 2)
    await first.settled("hook", 2)
    key_file = first.settings.resolved_master_key_file()
    old = first.keys.keyring.newest

    new = add_key(key_file)
    reply = await first.api.RotateSecrets(pb.RotateSecretsRequest(), None)  # type: ignore[arg-type]
    assert (reply.key_id, reply.destinations, list(reply.retirable_key_ids)) == (new, 1, [old])
    assert key_id_of(stored_config(first, "hook")["secret"]) == new
    again = await first.api.RotateSecrets(pb.RotateSecretsRequest(), None)  # type: ignore[arg-type]
    assert again.destinations == 0  # nothing left under an older key
    await first.stop()

    assert retire_keys(key_file, new) == [old]
    assert load_keyring(key_file).key_ids == (new,)
    second = Harness(tmp_path, nats_url, eventlog)  # reads the key file: only the new key
    await second.processor.rebuild()
    assert key_id_of(stored_config(second, "hook")["secret"]) == new
    await second.start()
    more = await people(upstream, 2, start=10)
    await second.settled("hook", 4)  # signed with the secret opened under the new key
    assert set(more) <= platforms.members["webhook:gold"]
    await second.stop()
    assert files_holding(tmp_path, TOKEN.encode()) == []


async def test_plain_secrets_from_an_older_version_still_load_and_rotation_seals_them_on_the_log(
    tmp_path: Path,
    harness: Harness,
    upstream: Upstream,
    platforms: LocalPlatforms,
) -> None:
    await older_version_creates(harness, platforms)
    await upstream.segment()
    await harness.activate("hook", ["email"])
    await people(upstream, 2)
    await harness.settled("hook", 2)
    assert files_holding(tmp_path / "jetstream", TOKEN.encode())  # the old event holds it …
    assert is_sealed(stored_config(harness, "hook")["secret"])  # … the store never does
    with Session(harness.engine) as session:
        assert session.exec(select(DestinationRow.legacy_plain)).one() is True

    reply = await harness.api.RotateSecrets(pb.RotateSecretsRequest(), None)  # type: ignore[arg-type]
    assert reply.destinations == 1
    await harness.processor.rebuild()
    with Session(harness.engine) as session:
        row = session.exec(select(DestinationRow)).one()
        assert not row.legacy_plain
        assert is_sealed(row.body["config"]["secret"])
    assert (await harness.api.RotateSecrets(pb.RotateSecretsRequest(), None)).destinations == 0  # type: ignore[arg-type]
    await harness.stop()
    assert TOKEN.encode() not in (tmp_path / "activation.db").read_bytes()


async def test_url_credentials_are_sealed_and_masked_in_answers_and_delivery_records(
    tmp_path: Path, harness: Harness, upstream: Upstream, platforms: LocalPlatforms
) -> None:
    await upstream.segment()
    host = platforms.url.split("://", 1)[1]
    url = f"http://ann:{TOKEN}@{host}"
    platforms.webhook_secret = "local-webhook-secret"
    shown = await harness.destination(
        "hook", "webhook", base_url=url, path=f"/webhook?api_key={TOKEN}&v=1", secret="local-webhook-secret"
    )
    assert shown.config["base_url"] == f"http://****@{host}"
    assert shown.config["path"] == "/webhook?api_key=****&v=1"
    listed = await harness.api.ListDestinations(pb.ListDestinationsRequest(), None)  # type: ignore[arg-type]
    assert TOKEN not in str(listed)
    await harness.activate("hook", ["email"])
    await people(upstream, 1)
    await harness.settled("hook", 1)
    deliveries = await harness.api.ListDeliveries(pb.ListDeliveriesRequest(), None)  # type: ignore[arg-type]
    assert deliveries.deliveries[0].location == f"http://****@{host}/webhook?api_key=****&v=1"
    await harness.stop()
    assert files_holding(tmp_path, TOKEN.encode()) == []


async def test_a_destination_whose_key_was_retired_too_early_waits_and_no_other_does(
    harness: Harness, upstream: Upstream, platforms: LocalPlatforms
) -> None:
    await upstream.segment()
    key_file = harness.settings.resolved_master_key_file()
    await harness.destination(
        "meta",
        "meta_custom_audience",
        action="ad_targeting",
        base_url=platforms.url,
        audience_id="7",
        access_token=platforms.meta_token,
    )
    new = add_key(key_file)
    harness.keys.reload()
    await hook(harness, platforms)  # sealed under the new version
    both = key_file.read_text()
    retire_keys(key_file, new)  # without RotateSecrets: meta's token is now unreadable
    harness.keys.reload()
    await harness.activate("meta", ["email"])
    await harness.activate("hook", ["email"])
    pids = await people(upstream, 3)
    await harness.settled("hook", 3)
    assert platforms.members["webhook:gold"] == set(pids)
    assert not platforms.members["meta:7"]
    listed = await harness.api.ListDestinations(pb.ListDestinationsRequest(), None)  # type: ignore[arg-type]
    assert {d.name: d.config["access_token"] for d in listed.destinations if d.name == "meta"} == {"meta": "****"}

    stats = await harness.stats("meta")
    assert any("secrets cannot be decrypted" in w and "is not in the key file" in w for w in stats.warnings)

    with pytest.raises(FailedPrecondition, match=r"destination 'meta': master key .* is not in the key file"):
        await harness.handlers.rotate_secrets()  # refused whole: nothing half-rotated

    key_file.write_text(both)  # the old version back: meta's plan goes on where it waited
    harness.keys.reload()
    await harness.settled("meta", 3)
