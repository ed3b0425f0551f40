"""A real 3-node JetStream cluster on loopback (``cdp_kit.natsserver.NatsCluster``): the nodes
find each other over routes with mutual TLS, the streams are provisioned at R3, and appends and
a durable consumer keep working when the node a client is connected to, the stream's leader,
is SIGKILLed, and after it is restarted. Plus the ``sync_interval: always`` durability profile.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest

from cdp_kit.errors import Unavailable
from cdp_kit.eventlog import EventLog
from cdp_kit.natsauth import ADMIN, NatsAuth, stack_auth
from cdp_kit.natsserver import (
    ALWAYS,
    NatsCluster,
    NatsServer,
    cluster_config,
    cluster_urls,
    durability_config,
)
from cdp_kit.provision import provision_streams
from cdp_kit.streams import ALL_STREAMS, INGEST, ConsumerSpec

SUBJECT = "cdp.ingest.0.records"
BOUND_S = 60.0  # every wait below is bounded by this


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    with NatsCluster(tmp_path / "cluster", 3, secrets_dir=tmp_path / "secrets") as running:
        yield running


def admin(cluster: NatsCluster) -> NatsAuth:
    assert cluster.secrets_dir is not None
    return stack_auth(cluster.secrets_dir, ADMIN)


def monitor(node: NatsServer, path: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{node.host}:{node.monitor_port}/{path}", timeout=2.0) as reply:
        found: dict[str, Any] = json.loads(reply.read())
        return found


def node_named(cluster: NatsCluster, name: str) -> int:
    """The index of the node whose server name is ``name`` (``cdp-<client port>``)."""
    return next(i for i, node in enumerate(cluster.nodes) if f"cdp-{node.port}" == name)


async def replicas_current(log: EventLog, stream: str) -> tuple[str, list[tuple[str, bool]]]:
    info = await log.js.stream_info(stream)
    assert info.cluster is not None
    peers = [(str(r.name), bool(r.current)) for r in info.cluster.replicas or []]
    return str(info.cluster.leader), peers


async def wait_all_current(log: EventLog, stream: str) -> str:
    """Until the stream has a leader and two current followers; returns the leader's name."""
    deadline = time.monotonic() + BOUND_S
    while True:
        try:
            leader, peers = await replicas_current(log, stream)
            if leader and len(peers) == 2 and all(current for _, current in peers):
                return leader
        except (nats.errors.Error, TimeoutError):
            pass
        assert time.monotonic() < deadline, f"{stream}: replicas not current after {BOUND_S}s"
        await asyncio.sleep(0.2)


async def append_acknowledged(log: EventLog, n: int) -> int:
    """Append message ``n`` (id ``m-<n>``) until JetStream acknowledges it; a retry of an append
    that was stored but whose acknowledgement was lost is recognised as a duplicate."""
    deadline = time.monotonic() + BOUND_S
    while True:
        try:
            return (await log.append_raw(SUBJECT, f"payload {n}".encode(), msg_id=f"m-{n}")).sequence
        except Unavailable:
            assert time.monotonic() < deadline, f"append {n} not acknowledged within {BOUND_S}s"
            await asyncio.sleep(0.2)


class Consumer:
    """A durable consumer read the way a service reads it: in order, acknowledged, and created
    again at its checkpoint (the last applied sequence) when a read fails."""

    def __init__(self, log: EventLog) -> None:
        self.log = log
        self.spec = ConsumerSpec("cluster-test", INGEST, SUBJECT)
        self.applied: list[int] = []
        self.recreated = 0

    async def read_until(self, last: int) -> None:
        deadline = time.monotonic() + BOUND_S
        reader = None
        try:
            while not self.applied or self.applied[-1] < last:
                assert time.monotonic() < deadline, f"read {self.applied[-1:]} of {last} within {BOUND_S}s"
                try:
                    if reader is None:
                        checkpoint = self.applied[-1] if self.applied else 0
                        reader = await self.log.durable(self.spec, checkpoint + 1)
                    for message, raw in await reader.fetch(64, timeout=2.0):
                        self.applied.append(message.sequence)
                        await reader.ack(raw)
                except (Unavailable, nats.errors.Error, TimeoutError):
                    if reader is not None:
                        self.recreated += 1
                        with contextlib.suppress(nats.errors.Error, TimeoutError):
                            await reader.close()
                    reader = None
                    await asyncio.sleep(0.2)
        finally:
            if reader is not None:
                await reader.close()


def assert_route_needs_a_client_certificate(cluster: NatsCluster, index: int) -> None:
    """A TLS handshake on a node's route port fails without a certificate signed by the stack's
    authority, and succeeds (the server then sends its INFO) with the route certificate."""
    assert cluster.secrets_dir is not None
    pki = cluster.secrets_dir / "pki"
    address = (cluster.host, cluster.route_ports[index])
    bare = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    with socket.create_connection(address, timeout=5) as sock, pytest.raises(ssl.SSLError):
        bare.wrap_socket(sock, server_hostname=cluster.host).recv(64)
    routed = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    routed.load_cert_chain(str(pki / "nats-route.crt"), str(pki / "nats-route.key"))
    with (
        socket.create_connection(address, timeout=5) as sock,
        routed.wrap_socket(sock, server_hostname=cluster.host) as tls,
    ):
        assert tls.recv(64).startswith(b"INFO")


def test_routes_use_mutual_tls_and_every_node_names_the_others(tmp_path: Path) -> None:
    config = cluster_config(6222, [6223, 6224])
    assert '"nats-route://127.0.0.1:6223", "nats-route://127.0.0.1:6224"' in config
    assert "tls" not in config


async def test_a_cluster_forms_with_r3_streams_and_survives_the_loss_of_a_node(cluster: NatsCluster) -> None:
    assert len(cluster_urls(cluster.url)) == 3
    routez = monitor(cluster.nodes[0], "routez")
    assert routez["num_routes"] >= 2
    assert_route_needs_a_client_certificate(cluster, 0)
    await provision_streams(cluster.url, admin(cluster), replicas=3)

    probe = await EventLog.connect(cluster.url, "cluster-probe", auth=admin(cluster))
    try:
        for spec in ALL_STREAMS:
            info = await probe.js.stream_info(spec.name)
            assert info.config.num_replicas == 3, spec.name
        leader_name = await wait_all_current(probe, INGEST.name)
    finally:
        await probe.close()
    leader = node_named(cluster, leader_name)

    # A client connected to the stream leader's node first, the others behind it.
    urls = [cluster.nodes[leader].url] + [u for i, u in enumerate(cluster.urls) if i != leader]
    options = admin(cluster).connect_options()
    nc = await nats.connect(urls, dont_randomize=True, max_reconnect_attempts=-1, reconnect_time_wait=0.5, **options)
    log = EventLog(nc)
    consumer = Consumer(log)
    try:
        assert nc.connected_url is not None
        assert nc.connected_url.port == cluster.nodes[leader].port
        for n in range(1, 101):
            assert await append_acknowledged(log, n) == n
        await consumer.read_until(100)

        cluster.kill(leader)  # SIGKILL: the client's node and the stream's leader at once
        assert not cluster.nodes[leader].running()
        sequences = [await append_acknowledged(log, n) for n in range(101, 201)]
        assert sequences == list(range(101, 201))
        assert nc.connected_url is not None
        assert nc.connected_url.port != cluster.nodes[leader].port
        await consumer.read_until(200)
        new_leader, _ = await replicas_current(log, INGEST.name)
        assert new_leader
        assert new_leader != leader_name

        cluster.restart(leader)
        await wait_all_current(log, INGEST.name)  # the restarted node caught up
        sequences = [await append_acknowledged(log, n) for n in range(201, 301)]
        assert sequences == list(range(201, 301))
        await consumer.read_until(300)
        # An append retried after the loss is recognised, not stored twice.
        again = await log.append_raw(SUBJECT, b"payload 150", msg_id="m-150")
        assert again.duplicate
    finally:
        await log.close()
    assert consumer.applied == list(range(1, 301)), "lost, doubled or out of order"
    # The restarted node holds every message too.
    node = cluster.nodes[leader]
    streams = monitor(node, "jsz?streams=true")["account_details"][0]["stream_detail"]
    ingest = next(s for s in streams if s["name"] == INGEST.name)
    assert ingest["state"]["last_seq"] == 300


def test_the_always_profile_fsyncs_every_write(tmp_path: Path) -> None:
    assert durability_config("default") == ""
    assert "sync_interval: always" in durability_config(ALWAYS)
    with pytest.raises(ValueError, match="unknown durability"):
        durability_config("sometimes")
    with NatsServer(tmp_path / "always", config=durability_config(ALWAYS)) as always:
        config = monitor(always, "varz")["jetstream"]["config"]
        assert config.get("sync_always") is True
        assert config["store_dir"].startswith(str(tmp_path / "always"))
    with NatsServer(tmp_path / "default", config="# default durability") as default:
        assert not monitor(default, "varz")["jetstream"]["config"].get("sync_always")
