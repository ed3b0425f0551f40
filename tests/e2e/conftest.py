"""Fixtures for tests that run the whole stack as subprocesses."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cdp_cli.client import Client
from cdp_cli.skeleton import DemoData, generate
from cdp_cli.stack import Stack


@pytest.fixture(scope="module")
def demo_data() -> DemoData:
    return generate(people=60, anonymous=6)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    with Stack(tmp_path / "cdp") as running:
        yield running


@pytest.fixture
def client(stack: Stack) -> Iterator[Client]:
    with Client(stack.data_dir, addresses=stack.addresses) as connected:
        yield connected
