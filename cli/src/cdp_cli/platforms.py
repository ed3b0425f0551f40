"""Local stand-ins for destination platforms, run on a background event loop so the
(synchronous) demo can point destinations at them."""

from __future__ import annotations

import asyncio
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from cdp_standins import LocalPlatforms


@contextmanager
def local_platforms() -> Iterator[LocalPlatforms]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="local-platforms", daemon=True)
    thread.start()
    # Fresh credentials per run: the demo's destinations carry secrets like real ones do.
    platforms = LocalPlatforms(
        webhook_secret=secrets.token_urlsafe(24),
        meta_token=secrets.token_urlsafe(24),
        klaviyo_key="pk_" + secrets.token_hex(16),
    )
    asyncio.run_coroutine_threadsafe(platforms.start(), loop).result(30)
    try:
        yield platforms
    finally:
        asyncio.run_coroutine_threadsafe(platforms.stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
