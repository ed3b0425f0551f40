"""Every message applied exactly once, through all four services on real servers, while the
connection between a service and NATS fails in the three ways it does in production:

* the service freezes (SIGSTOP) for longer than nats-server's write deadline while the server
  is writing to it: the server reports a slow consumer and drops the connection, and the
  deliveries it had counted as sent never arrive;
* the TCP connection is cut mid-fetch (a proxy between the service and nats-server closes
  both sides);
* nats-server itself restarts (same port, same store) in the middle of the load.

The load is events published on ``cdp.collect.<dataset>`` by an outside publisher, each person
viewing pages twice; two streaming segments over them are activated to a webhook. At the end
every person must be a profile once, a member of both segments once, and delivered to the
webhook once per segment: one lost or doubled event changes ``count(page_view) = 2``, one lost
membership change or fragment leaves a person out of a segment or the webhook, one doubled
delivery shows as a profile added twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import threading
import time
import urllib.request
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import nats
import nats.errors
import pytest
from google.protobuf import struct_pb2

from cdp.activation.v1 import activation_pb2 as act
from cdp.segmentation.v1 import segmentation_pb2 as seg
from cdp_cli.client import Client
from cdp_cli.platforms import local_platforms
from cdp_cli.skeleton import EXISTS, ensure, ensure_datasets, retrying
from cdp_cli.stack import Stack
from cdp_kit.natsauth import PUBLISHER
from cdp_kit.streams import (
    ACTIVATION_READS_AUDIENCE,
    ACTIVATION_READS_PROFILE,
    ACTIVATION_READS_SEGMENTS,
    IDENTITY_READS_INGEST,
    INGEST_READS_COLLECT,
    SEGMENTATION_READS_INGEST_CONFIG,
    SEGMENTATION_READS_PROFILE,
    ConsumerSpec,
    collect_subject,
)
from cdp_kit.testing.proxy import TcpProxy
from cdp_standins import LocalPlatforms
from tests.e2e import natsconn

pytestmark = pytest.mark.e2e

DATASET = "clicks"
DESTINATION = "hook"
# Lowered from nats-server's 10 s, so a 15 s freeze surely outlasts it.
WRITE_DEADLINE_S = 2
FREEZE_S = 15.0
# Bytes nats-server holds for a client beyond what its socket took: the client reads slower
# than the server writes, so a frozen client blocks the server's next write.
PENDING_BYTES = 256 * 1024
SETTLE_TIMEOUT_S = 150.0
SLOW_CONSUMER = "Slow Consumer Detected"
SEGMENTS = {
    # Both views of a person, neither lost nor doubled anywhere on the way.
    "viewed_twice": "count(page_view) = 2",
    "viewed": "count(page_view) >= 1",
}
SCHEMA = {
    "name": "click_event",
    "schema_class": "SCHEMA_CLASS_EVENT",
    "event_id_field": "event_id",
    "timestamp_field": "ts",
    "event_type_field": "type",
    "fields": [
        {"name": "event_id", "type": "FIELD_TYPE_STRING", "required": True},
        {"name": "ts", "type": "FIELD_TYPE_TIMESTAMP", "required": True},
        {"name": "type", "type": "FIELD_TYPE_STRING", "enum_values": ["page_view"]},
        {
            "name": "cookie_id",
            "type": "FIELD_TYPE_STRING",
            "identity_namespace": "cookie",
            "required": True,
        },
        {"name": "page", "type": "FIELD_TYPE_STRING"},
    ],
}


# --------------------------------------------------------------------------- the load


@dataclass(frozen=True)
class Load:
    """``people`` cookies, each viewing two pages; ``page_bytes`` makes the messages large, so
    a service that stops reading leaves megabytes on the server's side of its socket."""

    people: int
    page_bytes: int = 6000

    def cookies(self) -> set[str]:
        return {self.cookie(i) for i in range(self.people)}

    @staticmethod
    def cookie(i: int) -> str:
        return f"ck-{i:06d}"

    def messages(self) -> list[tuple[str, bytes]]:
        """(publisher's message id, JSON payload): every first view, then every second view."""
        out = []
        for view in (1, 2):
            for i in range(self.people):
                event_id = f"pv-{i}-{view}"
                page = f"/p/{i}/{view}/" + "x" * self.page_bytes
                event = {
                    "event_id": event_id,
                    "ts": f"2026-11-01T10:{view:02d}:{i % 60:02d}Z",
                    "type": "page_view",
                    "cookie_id": self.cookie(i),
                    "page": page,
                }
                out.append((event_id, json.dumps(event).encode()))
        return out


class Publisher:
    """An outside event publisher on its own thread: JetStream-acknowledged publishes with a
    message id, each retried until acknowledged (through reconnects and a server restart),
    within ``timeout_s`` for the whole load."""

    def __init__(
        self, target: natsconn.NatsTarget, messages: list[tuple[str, bytes]], *, timeout_s: float = 120.0
    ) -> None:
        self.target = target
        self.messages = messages
        self.timeout_s = timeout_s
        self.published = 0
        self.retries = 0
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)

    def start(self) -> Publisher:
        self._thread.start()
        return self

    def join(self) -> None:
        self._thread.join(self.timeout_s + 30.0)
        assert not self._thread.is_alive(), "the publisher did not finish"
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        try:
            asyncio.run(self._publish())
        except BaseException as exc:  # handed to join()
            self.error = exc

    async def _publish(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        nc = await natsconn.connect(self.target, PUBLISHER, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
        try:
            js = nc.jetstream()
            subject = collect_subject(DATASET)
            for msg_id, payload in self.messages:
                while True:
                    try:
                        await js.publish(subject, payload, headers={"Nats-Msg-Id": msg_id}, timeout=5.0)
                        break
                    except (nats.errors.Error, TimeoutError, OSError):
                        if time.monotonic() > deadline:
                            raise
                        self.retries += 1
                        await asyncio.sleep(0.2)
                self.published += 1
        finally:
            await nc.close()


# --------------------------------------------------------------------------- the platform


def set_up(client: Client, platforms: LocalPlatforms) -> None:
    """The dataset, two streaming segments, and both activated to a webhook."""
    ensure_datasets(client, {DATASET: SCHEMA})
    for name, query in SEGMENTS.items():
        ensure(
            partial(client.segmentation.CreateSegment, seg.CreateSegmentRequest(name=name, query=query)), done=EXISTS
        )
    config = struct_pb2.Struct()
    config.update(
        {
            "base_url": platforms.url + "/webhook",
            "secret": platforms.webhook_secret,
            "batch_size": 2000,
            "batch_age_s": 0.2,
            "timeout_s": 30,
            "max_attempts": 50,
        }
    )
    destination = act.Destination(
        name=DESTINATION, connector="webhook", config=config, marketing_action="email_marketing"
    )
    ensure(
        lambda: client.activation.CreateDestination(act.CreateDestinationRequest(destination=destination)), done=EXISTS
    )
    for name in SEGMENTS:
        request = act.ActivateRequest(
            destination=DESTINATION, segment=name, identities=["cookie"], schedule="streaming"
        )
        activate_when_known(client, request)


def activate_when_known(client: Client, request: act.ActivateRequest, timeout_s: float = 60.0) -> None:
    """Activation learns segments from the log: retry NOT_FOUND until it has seen this one."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            retrying(lambda: client.activation.Activate(request))
            return
        except grpc.RpcError as err:
            code = err.code() if isinstance(err, grpc.Call) else None
            if code == grpc.StatusCode.ALREADY_EXISTS:
                return
            if code != grpc.StatusCode.NOT_FOUND or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@dataclass
class Seen:
    """What the platform holds: per segment, how often each cookie was delivered, and more."""

    profiles: int = 0
    members: dict[str, list[str]] = field(default_factory=dict)
    delivered: dict[str, Counter[str]] = field(default_factory=dict)
    removed: int = 0
    dead_letters: int = 0
    lag: int = -1


CONSUMERS = (
    INGEST_READS_COLLECT,
    IDENTITY_READS_INGEST,
    SEGMENTATION_READS_INGEST_CONFIG,
    SEGMENTATION_READS_PROFILE,
    ACTIVATION_READS_SEGMENTS,
    ACTIVATION_READS_PROFILE,
    ACTIVATION_READS_AUDIENCE,
)


def server_pending(target: natsconn.NatsTarget) -> dict[str, tuple[int, int]]:
    """(pending, acknowledgements pending) of each service consumer that has any, as nats-server says."""

    async def query() -> dict[str, tuple[int, int]]:
        nc = await natsconn.connect(target, connect_timeout=2, max_reconnect_attempts=0)
        try:
            js = nc.jetstream()
            out = {}
            for spec in CONSUMERS:
                try:
                    info = await js.consumer_info(spec.stream.name, spec.name, timeout=5.0)
                except nats.errors.Error as exc:
                    out[spec.name] = (-1, -1)
                    print("consumer_info failed", spec.name, type(exc).__name__, exc)
                    continue
                if info.num_pending or info.num_ack_pending:
                    out[spec.name] = (info.num_pending or 0, info.num_ack_pending or 0)
            return out
        finally:
            await nc.close()

    try:
        return asyncio.run(query())
    except (nats.errors.Error, OSError) as exc:
        return {"(server)": (-1, -1), type(exc).__name__: (-1, -1)}


def server_lag(target: natsconn.NatsTarget) -> int:
    """Messages not yet acknowledged by every service's durable consumers, as nats-server
    counts them (-1 if it cannot say now). Asked of the server, not of the services: a service
    busy applying a large batch may not answer its status in time."""

    async def query() -> int:
        nc = await natsconn.connect(target, connect_timeout=2, max_reconnect_attempts=0)
        try:
            js = nc.jetstream()
            total = 0
            for spec in CONSUMERS:
                info = await js.consumer_info(spec.stream.name, spec.name, timeout=5.0)
                total += (info.num_pending or 0) + (info.num_ack_pending or 0)
            return total
        finally:
            await nc.close()

    try:
        return asyncio.run(query())
    except (nats.errors.Error, OSError):
        return -1


def seen(stack: Stack, client: Client, platforms: LocalPlatforms) -> Seen:
    out = Seen(lag=server_lag(stack))
    out.profiles = retrying(lambda: client.segmentation.GetStats(seg.GetStatsRequest())).profiles
    for name in SEGMENTS:
        got = retrying(partial(client.segmentation.ListMembers, seg.ListMembersRequest(segment=name)))
        out.members[name] = list(got.profile_ids)
        out.delivered[name] = Counter()
    for request in list(platforms.accepted["webhook"]):
        for record in request["records"]:
            if request["action"] == "add":
                for cookie in record["identities"].get("cookie", []):
                    out.delivered[request["segment"]][cookie] += 1
            else:
                out.removed += 1
    letters = retrying(lambda: client.activation.ListDeadLetters(act.ListDeadLettersRequest()))
    out.dead_letters = len(letters.dead_letters)
    return out


def settled(running: Running, load: Load, timeout_s: float = SETTLE_TIMEOUT_S) -> Seen:
    """Until nothing is left to read anywhere and the webhook holds everyone (or the time is up)."""
    deadline = time.monotonic() + timeout_s
    current = Seen()
    while time.monotonic() < deadline:
        if server_lag(running.stack) == 0:
            current = seen(running.stack, running.client, running.platforms)
            complete = all(sum(c.values()) >= load.people for c in current.delivered.values())
            if current.lag == 0 and complete:
                return current
        time.sleep(0.5)
    return current


def assert_exactly_once(result: Seen, load: Load, target: natsconn.NatsTarget | None = None) -> None:
    cookies = load.cookies()
    left = server_pending(target) if target is not None and result.lag else {}
    assert result.lag == 0, f"the services did not catch up: pending per consumer {left}"
    assert result.profiles == load.people
    for name in SEGMENTS:
        members = result.members[name]
        assert len(members) == load.people, f"{name}: {len(members)} members, expected {load.people}"
        assert len(set(members)) == len(members), f"{name}: a member listed twice"
        delivered = result.delivered[name]
        missing = cookies - set(delivered)
        doubled = {c: n for c, n in delivered.items() if n != 1}
        assert not missing, f"{name}: {len(missing)} people never delivered, e.g. {sorted(missing)[:5]}"
        assert not doubled, f"{name}: {len(doubled)} people delivered more than once, e.g. {list(doubled.items())[:5]}"
        assert set(delivered) == cookies
    assert result.removed == 0
    assert result.dead_letters == 0


# --------------------------------------------------------------------------- servers and processes


@pytest.fixture
def platforms() -> Iterator[LocalPlatforms]:
    with local_platforms() as running:
        yield running


def wait_until_or_not(check: Callable[[], bool], timeout_s: float, interval_s: float = 0.05) -> bool:
    """Whether ``check`` became true within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval_s)
    return False


def log_lines(path: Path, needle: str) -> list[str]:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return []
    return [line for line in text.splitlines() if needle in line]


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    if not wait_until_or_not(condition, timeout_s):
        raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}")


def consumer_delivered(target: natsconn.NatsTarget, spec: ConsumerSpec) -> int:
    """How many deliveries a durable consumer has made (0 if it cannot say now)."""

    async def query() -> int:
        nc = await natsconn.connect(target, connect_timeout=2, max_reconnect_attempts=0)
        try:
            info = await nc.jetstream().consumer_info(spec.stream.name, spec.name, timeout=5.0)
            return int(info.delivered.consumer_seq or 0) if info.delivered else 0
        finally:
            await nc.close()

    try:
        return asyncio.run(query())
    except (nats.errors.Error, OSError):
        return 0


@dataclass
class Running:
    stack: Stack
    client: Client
    platforms: LocalPlatforms
    monitor_port: int
    proxy: TcpProxy | None = None

    @property
    def nats_log(self) -> Path:
        return self.stack.logs_dir / "nats.log"

    def service_log(self, name: str) -> Path:
        return self.stack.logs_dir / f"{name}.log"

    def connection(self, service: str) -> dict[str, Any] | None:
        """The service's connection as nats-server's monitoring endpoint shows it (None if it has none)."""
        url = f"http://127.0.0.1:{self.monitor_port}/connz?limit=1024"
        with urllib.request.urlopen(url, timeout=2.0) as answer:
            connz = json.loads(answer.read())
        found = [c for c in connz.get("connections") or [] if c.get("name") == f"cdp-{service}"]
        return found[0] if found else None


StartStack = Callable[..., Running]


@pytest.fixture
def start_stack(tmp_path: Path, platforms: LocalPlatforms) -> Iterator[StartStack]:
    """Starts the stack (nats-server with a lowered write deadline and its monitoring port, the
    four services), optionally with one service reaching NATS through a ``TcpProxy``; sets the
    platform up. Everything started is stopped at the end, whatever happens."""
    with contextlib.ExitStack() as cleanup:

        def start(*, proxied: str | None = None) -> Running:
            config = f'write_deadline: "{WRITE_DEADLINE_S}s"'
            service_env: dict[str, dict[str, str]] = {}
            proxy = None
            holder: list[Stack] = []
            if proxied is not None:
                proxy = cleanup.enter_context(TcpProxy(lambda: nats_address(holder[0])))
                service_env[proxied] = {"CDP_NATS_URL": f"tls://{proxy.address}"}
            stack = Stack(tmp_path / "cdp", ready_timeout_s=120.0, nats_config=config, service_env=service_env)
            holder.append(stack)
            cleanup.enter_context(stack)
            client = cleanup.enter_context(Client(stack.data_dir, addresses=stack.addresses))
            set_up(client, platforms)
            # the stack's own monitoring port (its readiness probe)
            return Running(stack, client, platforms, stack.nats_monitor_port, proxy)

        yield start


def nats_address(stack: Stack) -> tuple[str, int]:
    host, port = stack.nats_url.split("://", 1)[1].rsplit(":", 1)
    return host, int(port)


# --------------------------------------------------------------------------- the tests


@pytest.mark.timeout(600)
def test_a_service_frozen_past_the_write_deadline_under_load_loses_nothing(start_stack: StartStack) -> None:
    """Activation is frozen (SIGSTOP) for 15 s, past nats-server's 2 s write deadline, while the
    load flows. Aimed at a moment nats-server is writing it a batch of large fragments faster
    than it reads (bytes pending on the server's side of its socket): the server's write blocks
    past its deadline, it reports a slow consumer and drops the connection, and what it had
    counted as delivered never arrives. Either way nothing is lost or doubled."""
    running = start_stack()
    load = Load(people=3000)
    pid = running.stack.pids["activation"]
    publisher = Publisher(running.stack, load.messages()).start()

    def pending() -> int:
        conn = running.connection("activation")
        return 0 if conn is None else int(conn.get("pending_bytes", 0))

    def server_is_writing() -> bool:
        return pending() >= PENDING_BYTES

    def write_blocked() -> bool:
        """Activation is stopped: bytes the server holds for it that stay held for a second are
        a write the kernel cannot take (its socket buffers are full), which blocks past the deadline."""
        if wait_until_or_not(server_is_writing, 2.0):
            return True
        held_since = None
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            if pending() > 0:
                held_since = held_since or time.monotonic()
                if time.monotonic() - held_since >= 1.0:
                    return True
            else:
                held_since = None
            time.sleep(0.05)
        return False

    # The first freeze lasts 15 s whatever happens, while nats-server writes to activation under
    # load. It drops the connection only if the server's write cannot complete while the process
    # is stopped, and the kernel's socket buffers may take a whole batch: so, until the server
    # drops it, activation is stopped again and the freeze kept only if the server then holds
    # bytes it cannot write (a blocked write, dropped past the deadline).
    wait_until(server_is_writing, 90.0, "nats-server to be writing a batch to activation")
    dropped: list[str] = []
    frozen = 0
    deadline = time.monotonic() + 240.0  # at most ~10 tries of up to 17 s, within the test's timeout
    while not dropped and time.monotonic() < deadline:
        os.kill(pid, signal.SIGSTOP)
        try:
            if not frozen or write_blocked():
                time.sleep(FREEZE_S)
                frozen += 1
        finally:
            os.kill(pid, signal.SIGCONT)
        dropped = [line for line in log_lines(running.nats_log, SLOW_CONSUMER) if "cdp-activation" in line]
        if not dropped and not wait_until_or_not(server_is_writing, 30.0):
            break
    if not dropped:
        # Activation pulls in bounded fetches and keeps up, so the server seldom holds more than
        # the kernel's socket buffers take while it is stopped (no drop in any try in 2 of 4 CI
        # runs on 2026-12-03). It was still frozen past the deadline under load and is checked;
        # the lost deliveries of a dropped connection are made for certain by
        # test_a_connection_cut_mid_fetch_loses_nothing.
        warnings.warn(f"nats-server did not drop the frozen activation ({frozen} freezes of 15 s)", stacklevel=1)
    publisher.join()
    assert_exactly_once(settled(running, load), load, running.stack)
    assert running.stack.pids["activation"] == pid  # the same process recovered, no restart helped


def flowed(proxy: TcpProxy, mib: int) -> bool:
    return proxy.downstream_bytes >= mib * 1024 * 1024


def test_a_connection_cut_mid_fetch_loses_nothing(start_stack: StartStack) -> None:
    """Segmentation reaches NATS through a proxy that cuts the connection (both sides) twice
    while fragments stream to it; it reconnects through the proxy each time."""
    running = start_stack(proxied="segmentation")
    proxy = running.proxy
    assert proxy is not None
    load = Load(people=2000)
    publisher = Publisher(running.stack, load.messages()).start()
    for flowed_mib in (4, 16):
        wait_until(partial(flowed, proxy, flowed_mib), 90.0, f"{flowed_mib} MiB to flow to segmentation")
        assert proxy.sever() >= 1
        wait_until(lambda: proxy.open_connections() >= 1, 30.0, "segmentation to reconnect through the proxy")
    publisher.join()
    assert proxy.severed >= 2
    assert proxy.accepted >= 3  # the first connection and one after each cut
    assert_exactly_once(settled(running, load), load, running.stack)


def test_a_nats_server_restart_mid_load_loses_nothing(start_stack: StartStack) -> None:
    """nats-server stops (SIGTERM) and starts again on the same port and store while the load
    is in every stage: published, read by ingest, turned into fragments and memberships."""
    running = start_stack()
    load = Load(people=2000)
    publisher = Publisher(running.stack, load.messages()).start()
    wait_until(
        lambda: consumer_delivered(running.stack, ACTIVATION_READS_AUDIENCE) > 0,
        90.0,
        "memberships to reach activation",
    )
    before = running.stack.pids["nats"]
    running.stack.restart("nats")
    assert running.stack.pids["nats"] != before
    assert len(log_lines(running.nats_log, "Server is ready")) == 2
    publisher.join()
    assert publisher.retries >= 1  # the publisher saw the restart too
    assert_exactly_once(settled(running, load), load, running.stack)
