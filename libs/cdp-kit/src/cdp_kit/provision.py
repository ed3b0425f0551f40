"""Provision the streams, as the NATS ``admin`` user: ``python -m cdp_kit.provision``.

Services never create, update or delete a stream (their NATS users may not); this does, once
per deployment and after an upgrade that changes a stream: ``cdp up`` before it starts the
services, ``cdp admin provision`` for an operator, a Kubernetes Job or a compose one-shot
service (every service image holds this module). Idempotent: existing streams are updated.

Reads ``CDP_NATS_URL``, ``CDP_STREAM_REPLICAS`` and the ``CDP_NATS_*`` credentials
(``CDP_NATS_USER=admin``, ``CDP_NATS_PASSWORD_FILE``, ``CDP_NATS_CA_FILE``).
"""

from __future__ import annotations

import asyncio
import os
import sys

from cdp_kit.errors import Unavailable
from cdp_kit.eventlog import EventLog
from cdp_kit.natsauth import NatsAuth
from cdp_kit.streams import ALL_STREAMS, KEYS


async def provision_streams(nats_url: str, auth: NatsAuth, *, replicas: int = 1, attempts: int = 1) -> None:
    """Create or update every stream; retried ``attempts`` times while NATS is unreachable."""
    for attempt in range(1, attempts + 1):
        try:
            eventlog = await EventLog.connect(nats_url, "cdp-admin-provision", auth=auth, connect_timeout=10.0)
        except Unavailable:
            if attempt == attempts:
                raise
            await asyncio.sleep(2.0)
            continue
        try:
            await eventlog.ensure_streams(replicas=replicas)
            return
        finally:
            await eventlog.close()


def main() -> int:
    url = os.environ.get("CDP_NATS_URL", "nats://127.0.0.1:4222")
    replicas = int(os.environ.get("CDP_STREAM_REPLICAS", "1"))
    try:
        asyncio.run(provision_streams(url, NatsAuth.from_env(), replicas=replicas, attempts=60))
    except Unavailable as exc:
        print(f"provisioning the streams at {url} failed: {exc.message}", file=sys.stderr)
        return 1
    names = ", ".join(s.name for s in ALL_STREAMS)
    print(f"provisioned {len(ALL_STREAMS)} streams and the key bucket {KEYS.name} ({replicas} replicas): {names}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
