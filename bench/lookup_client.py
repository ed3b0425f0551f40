"""The load of ``bench lookup``, a process of its own (as the callers of a personalisation
API are): ``python -m bench.lookup_client ADDRESS CALL MODE N SECONDS KEYS``.

CALL ``profile`` is ``GetProfile`` by cookie ``ck-<k>`` (k random below KEYS, seeded), ``health``
the gRPC health check of the same server (no store: the baseline). MODE ``open``: N calls/s on
a fixed schedule, each latency counted from when the call was due (a slow server is not let
off by a slower schedule); ``closed``: N callers, each calling again when answered. Prints one
JSON line: calls answered, errors (timeouts after 5 s included) and their status codes,
seconds, and every call's latency in seconds (a failed call's is the time until it failed)."""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from collections.abc import Awaitable, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.connect import aio_channel
from cdp.common.v1.envelope_pb2 import IdentityValue
from cdp.segmentation.v1 import segmentation_pb2 as seg
from cdp.segmentation.v1 import segmentation_pb2_grpc as seg_grpc

CALL_TIMEOUT_S = 5.0


async def load(address: str, call: str, mode: str, n: int, seconds: float, keys: int) -> dict[str, object]:
    rng = random.Random(20261203)
    latencies: list[float] = []
    errors = 0
    codes: dict[str, int] = {}
    first_error: list[str] = []
    async with aio_channel(address) as channel:
        await asyncio.wait_for(channel.channel_ready(), 30.0)
        profiles = seg_grpc.SegmentationServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)

        def one() -> Awaitable[object]:
            if call == "health":
                checked: Awaitable[object] = health.Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT_S)
                return checked
            cookie = f"ck-{rng.randrange(keys)}"
            request = seg.GetProfileRequest(identity=IdentityValue(namespace="cookie", value=cookie))
            looked_up: Awaitable[object] = profiles.GetProfile(request, timeout=CALL_TIMEOUT_S)
            return looked_up

        async def timed(due: float, make: Callable[[], Awaitable[object]]) -> None:
            nonlocal errors
            try:
                await make()
            except grpc.RpcError as err:
                errors += 1  # a failed call counts with what it waited (a lower bound of its latency)
                code = err.code().name if isinstance(err, grpc.aio.AioRpcError) else type(err).__name__
                codes[code] = codes.get(code, 0) + 1
                if isinstance(err, grpc.aio.AioRpcError) and not first_error:
                    first_error.append(f"{code}: {err.details()}")
            latencies.append(time.perf_counter() - due)

        for _ in range(20):  # warm the channel and the server's caches a little
            await one()
        start = time.perf_counter()
        end = start + seconds
        if mode == "open":
            tasks = []
            i = 0
            while True:
                due = start + i / n
                if due >= end:
                    break
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(timed(due, one)))
                i += 1
            await asyncio.gather(*tasks)
        else:

            async def caller() -> None:
                while time.perf_counter() < end:
                    await timed(time.perf_counter(), one)

            await asyncio.gather(*(caller() for _ in range(n)))
        elapsed = time.perf_counter() - start
    return {
        "answered": len(latencies) - errors,
        "errors": errors,
        "codes": codes,
        "first_error": first_error[0] if first_error else "",
        "seconds": elapsed,
        "latencies": latencies,
    }


def main() -> None:
    address, call, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    n, seconds, keys = int(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6])
    print(json.dumps(asyncio.run(load(address, call, mode, n, seconds, keys))), flush=True)


if __name__ == "__main__":
    main()
