"""``cdp status`` while a service is frozen (SIGSTOP) under load: the service does not answer, so it
cannot say how far behind it is; the status says what NATS holds for its consumers, loudly (exit 1
and an error line), and clears once it is resumed and caught up."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cdp_cli.app import app
from cdp_cli.client import Client
from cdp_cli.stack import Stack
from cdp_standins import LocalPlatforms
from tests.e2e.test_never_lose import (
    Load,
    Publisher,
    platforms,  # noqa: F401  (the fixture)
    set_up,
    wait_until,
)

pytestmark = pytest.mark.e2e


def status(data_dir: Path) -> tuple[int, dict[str, Any], str]:
    args = ["--data-dir", str(data_dir), "--timeout", "3", "status"]
    as_json = CliRunner().invoke(app, [*args, "--json"], env={"COLUMNS": "250"})
    shown = CliRunner().invoke(app, args, env={"COLUMNS": "250"})
    return as_json.exit_code, json.loads(as_json.stdout)["services"], shown.output


@pytest.fixture
def running(tmp_path: Path, platforms: LocalPlatforms) -> Iterator[Stack]:  # noqa: F811
    with contextlib.ExitStack() as cleanup:
        stack = Stack(tmp_path / "cdp", ready_timeout_s=120.0)
        cleanup.enter_context(stack)
        client = cleanup.enter_context(Client(stack.data_dir, addresses=stack.addresses))
        set_up(client, platforms)
        yield stack


def test_a_frozen_service_shows_what_nats_holds_for_it_and_clears_when_resumed(running: Stack) -> None:
    stack = running
    pid = stack.pids["segmentation"]
    os.kill(pid, signal.SIGSTOP)
    try:
        load = Load(people=300, page_bytes=64)
        Publisher(stack, load.messages()).start().join()

        def backlog_shown() -> bool:
            code, services, _ = status(stack.data_dir)
            held = services["segmentation"].get("held_by_nats") or []
            return code == 1 and any(h["pending"] + h["ack_pending"] > 0 for h in held)

        wait_until(backlog_shown, 60.0, "cdp status to show segmentation's backlog held by NATS")
        code, services, shown = status(stack.data_dir)
        assert code == 1
        assert services["segmentation"]["status"] is None  # it does not answer
        consumers = {h["consumer"] for h in services["segmentation"]["held_by_nats"]}
        assert "segmentation-profile" in consumers
        assert "held by NATS for services that do not answer" in shown
        assert "segmentation does not answer, and its consumer" in shown
    finally:
        os.kill(pid, signal.SIGCONT)

    def cleared() -> bool:
        code, services, _ = status(stack.data_dir)
        return code == 0 and "held_by_nats" not in services["segmentation"]

    wait_until(cleared, 90.0, "cdp status to clear once segmentation is resumed and caught up")
