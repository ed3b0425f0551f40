"""Connecting tests to a running stack's NATS with the credentials ``cdp up`` wrote: the admin's
by default (tests inspect and inject as an operator would), or a given service's / the publisher's.

The stack's NATS requires TLS and a user: an anonymous connection is refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import nats
from nats.aio.client import Client as NatsClient

from cdp_kit.eventlog import EventLog
from cdp_kit.natsauth import ADMIN, NatsAuth, stack_auth
from cdp_kit.natsserver import cluster_urls


class NatsTarget(Protocol):
    """A running stack (``cdp_cli.stack.Stack``) or anything that knows its NATS and its secrets."""

    nats_url: str

    @property
    def secrets_dir(self) -> Path: ...


def auth(target: NatsTarget, user: str = ADMIN) -> NatsAuth:
    return stack_auth(target.secrets_dir, user)


async def connect(target: NatsTarget, user: str = ADMIN, **options: Any) -> NatsClient:
    """``nats.connect`` to the stack as ``user``; ``options`` go to ``nats.connect`` too."""
    return await nats.connect(cluster_urls(target.nats_url), **auth(target, user).connect_options(), **options)


async def eventlog(target: NatsTarget, user: str = ADMIN, name: str = "cdp-test") -> EventLog:
    return await EventLog.connect(target.nats_url, name, auth=auth(target, user))
