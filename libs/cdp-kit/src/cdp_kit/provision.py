"""Provision the streams, as the NATS ``admin`` user: ``python -m cdp_kit.provision``.

Services never create, update or delete a stream (their NATS users may not); this does, once
per deployment and after an upgrade that changes a stream: ``cdp up`` before it starts the
services, ``cdp admin provision`` for an operator, a Kubernetes Job or a compose one-shot
service (every service image holds this module). Idempotent: existing streams are updated.

Reads ``CDP_NATS_URL``, ``CDP_STREAM_REPLICAS``, ``CDP_STREAM_MAX_AGE`` (retention overrides,
``CDP_COLLECT=6h,CDP_DELIVERY=400d``: ``cdp_kit.streams.parse_max_ages``) and the ``CDP_NATS_*`` credentials
(``CDP_NATS_USER=admin``, ``CDP_NATS_PASSWORD_FILE``, ``CDP_NATS_CA_FILE``).
"""

from __future__ import annotations

import asyncio
import os
import sys

from cdp_kit.errors import Unavailable
from cdp_kit.eventlog import EventLog
from cdp_kit.natsauth import NatsAuth
from cdp_kit.streams import ALL_STREAMS, KEYS, parse_max_ages, with_max_ages

MAX_AGE_ENV = "CDP_STREAM_MAX_AGE"


def max_ages_from_env() -> dict[str, float]:
    """The deployment's retention overrides (``CDP_STREAM_MAX_AGE``); ValueError names a bad item."""
    return parse_max_ages(os.environ.get(MAX_AGE_ENV, ""))


async def provision_streams(
    nats_url: str,
    auth: NatsAuth,
    *,
    replicas: int = 1,
    attempts: int = 1,
    max_ages: dict[str, float] | None = None,
) -> None:
    """Create or update every stream; retried ``attempts`` times while NATS is unreachable.

    ``max_ages`` (stream name: seconds, 0 = for ever) overrides the streams' default retention."""
    specs = with_max_ages(ALL_STREAMS, max_ages or {})
    for attempt in range(1, attempts + 1):
        try:
            eventlog = await EventLog.connect(nats_url, "cdp-admin-provision", auth=auth, connect_timeout=10.0)
        except Unavailable:
            if attempt == attempts:
                raise
            await asyncio.sleep(2.0)
            continue
        try:
            await eventlog.ensure_streams(specs, replicas=replicas)
            return
        finally:
            await eventlog.close()


def main() -> int:
    url = os.environ.get("CDP_NATS_URL", "nats://127.0.0.1:4222")
    replicas = int(os.environ.get("CDP_STREAM_REPLICAS", "1"))
    try:
        max_ages = max_ages_from_env()
    except ValueError as exc:
        print(f"{MAX_AGE_ENV}: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(provision_streams(url, NatsAuth.from_env(), replicas=replicas, attempts=60, max_ages=max_ages))
    except Unavailable as exc:
        print(f"provisioning the streams at {url} failed: {exc.message}", file=sys.stderr)
        return 1
    names = ", ".join(s.name for s in ALL_STREAMS)
    print(f"provisioned {len(ALL_STREAMS)} streams and the key bucket {KEYS.name} ({replicas} replicas): {names}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
