"""The NATS permission table (cdp_kit.natsauth) against what the services really do."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NatsClient

from cdp_kit.eventlog import EventLog
from cdp_kit.natsauth import ADMIN, KEY_DESTROYERS, KEY_MAKERS, PUBLISHER, USERS, permissions, server_config
from cdp_kit.store import make_engine, sqlite_url
from cdp_kit.streams import KEY_STREAM, KEY_SUBJECT_PREFIX, SERVICE_LOGS, SERVICES


def builders() -> dict[str, tuple[Any, Any]]:
    from cdp_activation.main import build as activation
    from cdp_activation.settings import ActivationSettings
    from cdp_identity.main import build as identity
    from cdp_identity.settings import IdentitySettings
    from cdp_ingest.main import build as ingest
    from cdp_ingest.settings import IngestSettings
    from cdp_segmentation.main import build as segmentation
    from cdp_segmentation.settings import SegmentationSettings

    return {
        "ingest": (ingest, IngestSettings),
        "identity": (identity, IdentitySettings),
        "segmentation": (segmentation, SegmentationSettings),
        "activation": (activation, ActivationSettings),
    }


@pytest.mark.parametrize("service", SERVICES)
def test_service_logs_are_what_each_service_builds(service: str, tmp_path: Path) -> None:
    """SERVICE_LOGS, which permissions come from, holds exactly each processor's own logs and inputs."""
    build, settings_type = builders()[service]
    settings = settings_type(data_dir=tmp_path)
    engine = make_engine(sqlite_url(tmp_path / f"{service}.db"))
    try:
        built = build(settings, engine, EventLog(NatsClient()))
        processor = built.processor
        assert {own.subject for own in processor.own_logs} == {own.subject for own in SERVICE_LOGS[service].own_logs}
        assert [inp.spec for inp in processor.inputs] == list(SERVICE_LOGS[service].inputs)
    finally:
        engine.dispose()


def test_each_subject_has_one_writer_and_no_service_manages_streams() -> None:
    writers: dict[str, list[str]] = {}
    for service in SERVICES:
        allowed = permissions(service).publish
        for subject in allowed:
            if not subject.startswith("$"):
                writers.setdefault(subject, []).append(service)
            for forbidden in ("STREAM.CREATE", "STREAM.UPDATE", "STREAM.DELETE", "STREAM.PURGE", "STREAM.MSG.GET"):
                assert forbidden not in subject, (service, subject)
            by_sequence = subject.startswith("$JS.API.DIRECT.GET.") and subject.count(".") <= 4
            assert not by_sequence or subject == f"$JS.API.DIRECT.GET.{KEY_STREAM}", subject  # keys: batch get
            key_writer = service in (*KEY_MAKERS, *KEY_DESTROYERS) and subject == f"{KEY_SUBJECT_PREFIX}>"
            assert ">" not in subject or key_writer or subject.startswith(("$JS.ACK.", "$JS.API.")), subject
        assert permissions(service).subscribe == (f"_INBOX_{service}.>",)
    assert all(len(owners) == 1 for owners in writers.values()), writers
    assert not any(s.startswith("cdp.collect") for s in writers)
    assert permissions(PUBLISHER).publish == ("cdp.collect.>",)
    assert permissions(ADMIN).publish == (">",)


def test_only_ingest_and_activation_make_keys_and_only_identity_and_activation_erase_them() -> None:
    """Ingest seals what it accepts, identity erases a person's keys; activation makes and erases
    the keys of its privacy removal batches. Segmentation only reads keys."""
    for service in SERVICES:
        allowed = permissions(service).publish
        assert f"$JS.API.DIRECT.GET.{KEY_STREAM}.{KEY_SUBJECT_PREFIX}>" in allowed
        writes = service in ("ingest", "identity", "activation")
        assert (f"{KEY_SUBJECT_PREFIX}>" in allowed) == writes, service
        erases = service in ("identity", "activation")
        assert (f"$JS.API.STREAM.MSG.DELETE.{KEY_STREAM}" in allowed) == erases, service
        assert not any(s.startswith(f"$JS.API.STREAM.PURGE.{KEY_STREAM}") for s in allowed)


def test_segmentation_may_read_only_its_inputs() -> None:
    allowed = " ".join(permissions("segmentation").publish)
    assert "cdp.config.activation" not in allowed
    assert "cdp.profile.0.fragments " not in allowed + " "  # reads cdp.profile.>, writes none of it
    assert "cdp.config.ingest" in allowed


def test_server_config_names_every_user_and_holds_no_secret_without_passwords() -> None:
    text = server_config()
    for user in USERS:
        assert f'user: "{user}"' in text
        assert f"$CDP_NATS_{user.upper()}_PASSWORD" in text
    literal = server_config(dict.fromkeys(USERS, "pw-123"))
    assert literal.count('"pw-123"') == len(USERS)


def test_only_ingest_identity_and_activation_may_erase_and_only_what_they_erase() -> None:
    """Privacy: ingest erases a person's raw messages on CDP_COLLECT by sequence, identity the
    person's keys in the key bucket (crypto-shredding), activation the keys of its removal
    batches; no one else deletes anything."""
    erases = {
        "ingest": ["$JS.API.STREAM.MSG.DELETE.CDP_COLLECT"],
        "identity": ["$JS.API.STREAM.MSG.DELETE.KV_CDP_KEYS"],
        "activation": ["$JS.API.STREAM.MSG.DELETE.KV_CDP_KEYS"],
    }
    for service in SERVICES:
        erasing = [s for s in permissions(service).publish if ".MSG.DELETE." in s]
        assert erasing == erases.get(service, []), service


def test_a_privacy_request_completes_once_every_applier_applied() -> None:
    from cdp_kit.streams import privacy_appliers

    # Activation is one: the person's keys wait for its removals.
    assert set(privacy_appliers()) == {"ingest", "segmentation", "activation"}
    assert "identity" not in privacy_appliers()
