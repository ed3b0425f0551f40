"""Typed settings from CDP_-prefixed environment variables."""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

import pytest
from pydantic import ValidationError

from cdp_kit.settings import ServiceSettings
from cdp_kit.store import sqlite_url


class DemoSettings(ServiceSettings):
    service: ClassVar[str] = "demo"
    default_port: ClassVar[int] = 50099


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No CDP_ variable of the caller's shell leaks in; relative paths land in tmp_path."""
    for name in list(os.environ):
        if name.upper().startswith("CDP_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def test_defaults() -> None:
    settings = DemoSettings()
    assert settings.nats_url == "nats://127.0.0.1:4222"
    assert settings.data_dir == Path(".cdp")
    assert settings.store_url == ""
    assert settings.grpc_host == "127.0.0.1"
    assert settings.grpc_port == 0
    assert settings.log_format == "json"
    assert settings.log_level == "info"
    assert settings.trace_exporter == "none"
    assert settings.stream_replicas == 1
    assert settings.batch_size == 256
    assert settings.shutdown_grace_s == 5.0


def test_default_port_and_address_come_from_the_class() -> None:
    settings = DemoSettings()
    assert settings.resolved_port() == 50099
    assert settings.address() == "127.0.0.1:50099"
    assert DemoSettings.service == "demo"


def test_cdp_variables_are_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CDP_NATS_URL", "nats://nats.internal:4333")
    monkeypatch.setenv("CDP_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CDP_STORE_URL", "postgresql://u@db/cdp")
    monkeypatch.setenv("CDP_GRPC_HOST", "0.0.0.0")
    monkeypatch.setenv("CDP_GRPC_PORT", "6000")
    monkeypatch.setenv("CDP_LOG_FORMAT", "console")
    monkeypatch.setenv("CDP_LOG_LEVEL", "debug")
    monkeypatch.setenv("CDP_TRACE_EXPORTER", "console")
    monkeypatch.setenv("CDP_STREAM_REPLICAS", "3")
    monkeypatch.setenv("CDP_BATCH_SIZE", "17")
    monkeypatch.setenv("CDP_SHUTDOWN_GRACE_S", "0.5")

    settings = DemoSettings()

    assert settings.nats_url == "nats://nats.internal:4333"
    assert settings.data_dir == tmp_path / "data"
    assert settings.store_url == "postgresql://u@db/cdp"
    assert settings.resolved_store_url() == "postgresql://u@db/cdp"
    assert settings.grpc_host == "0.0.0.0"
    assert settings.grpc_port == 6000
    assert settings.resolved_port() == 6000
    assert settings.address() == "0.0.0.0:6000"
    assert settings.log_format == "console"
    assert settings.log_level == "debug"
    assert settings.trace_exporter == "console"
    assert settings.stream_replicas == 3
    assert settings.batch_size == 17
    assert settings.shutdown_grace_s == 0.5


def test_variable_names_are_case_insensitive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("cdp_batch_size", "9")
    assert DemoSettings().batch_size == 9


def test_unprefixed_and_unknown_variables_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCH_SIZE", "5")
    monkeypatch.setenv("CDP_NOT_A_SETTING", "x")
    settings = DemoSettings()
    assert settings.batch_size == 256
    assert not hasattr(settings, "not_a_setting")


def test_resolved_store_url_defaults_to_sqlite_in_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    data_dir = tmp_path / "nested" / "data"
    monkeypatch.setenv("CDP_DATA_DIR", str(data_dir))

    url = DemoSettings().resolved_store_url()

    assert url == sqlite_url(data_dir / "demo.db")
    assert url.startswith("sqlite:///")
    assert data_dir.is_dir()


def test_resolved_store_url_with_default_data_dir(tmp_path: Path) -> None:
    assert DemoSettings().resolved_store_url() == sqlite_url(Path(".cdp") / "demo.db")
    assert (tmp_path / ".cdp").is_dir()


def test_settings_are_frozen() -> None:
    settings = DemoSettings()
    with pytest.raises(ValidationError):
        settings.batch_size = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CDP_BATCH_SIZE", "0"),
        ("CDP_BATCH_SIZE", "10001"),
        ("CDP_BATCH_SIZE", "many"),
        ("CDP_LOG_FORMAT", "xml"),
        ("CDP_LOG_LEVEL", "trace"),
        ("CDP_TRACE_EXPORTER", "jaeger"),
        ("CDP_STREAM_REPLICAS", "0"),
        ("CDP_STREAM_REPLICAS", "6"),
        ("CDP_SHUTDOWN_GRACE_S", "-1"),
        ("CDP_GRPC_PORT", "http"),
    ],
)
def test_invalid_values_are_refused(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as info:
        DemoSettings()
    assert [err["loc"] for err in info.value.errors()] == [(name.removeprefix("CDP_").lower(),)]


def test_keyword_arguments_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDP_BATCH_SIZE", "9")
    assert DemoSettings(batch_size=11).batch_size == 11
