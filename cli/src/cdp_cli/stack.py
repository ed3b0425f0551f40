"""The embedded stack behind ``cdp up``: one ``nats-server`` with JetStream (or, with
``nats_cluster=3``, a 3-node JetStream cluster) and the services as supervised child processes
on loopback ports, all under one data folder.

* ``<data_dir>/nats``        JetStream file store (one server)
* ``<data_dir>/nats-cluster/nats-<i>``  each node's JetStream file store (a cluster)
* ``<data_dir>/logs/*.log``  one log per process (appended), plus ``stack.log`` for the supervisor
* ``<data_dir>/stack.json``  where everything listens, while the stack runs
* ``<data_dir>/secrets/``    0700: ``pki/`` (the stack's CA, the NATS and gRPC certificates),
  ``nats/`` (one password per NATS user, the server's configuration) and ``tokens/`` (a gRPC
  token per role), every file 0600: every service serves gRPC over TLS and checks tokens, and
  ``cdp`` commands use the admin token
* ``<data_dir>/secrets/pii-hash.key``  the deployment's PII hash key (0600, kept across restarts),
  given to every service as ``CDP_PII_HASH_KEY_FILE``
* ``<data_dir>/secrets/master.key``  the master key of secrets at rest (0600, made once, kept)

NATS runs with TLS and the platform's users and permissions (``cdp_kit.natsauth``): each
service connects as itself, the streams are provisioned once by the ``admin`` user before the
services start, and ``cdp`` commands use the credentials in ``secrets/``.

With a cluster the nodes route to each other over mutual TLS (``secrets/pki/nats-route.*``), the
streams are provisioned with as many replicas as there are nodes, and every service is given every
node's URL (``CDP_NATS_URL``, comma-separated), so it fails over when its node is lost; the
supervisor restarts a dead node like a dead service, on the same ports and store. ``durability``
``always`` makes every node fsync before it acknowledges (``sync_interval: always``).

Children never outlive the stack: ``stop()`` terminates them (SIGKILL after a timeout),
a failed ``start()`` stops what it had started, and on Linux every child is spawned with
``PR_SET_PDEATHSIG`` so even a ``kill -9`` of the supervisor takes them down. That signal
follows the *thread* that forked the child, so every child is forked by the supervisor
thread, which lives from ``start()`` until every child has been reaped by ``stop()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, TypeVar

import nats.errors

from cdp_cli.client import SERVICES, STACK_FILE, check_health
from cdp_cli.errors import CliError
from cdp_kit import keyring
from cdp_kit.errors import Unavailable
from cdp_kit.grpc_auth import ClientAuth, LocalSecrets, ensure_local_secrets
from cdp_kit.natsauth import ADMIN, ensure_secrets, stack_auth, stack_env
from cdp_kit.natsserver import (
    DEFAULT_DURABILITY,
    DURABILITIES,
    cluster_config,
    durability_config,
    ensure_route_tls,
    find_binary,
    free_port,
    guarded,
    wait_for_healthz,
)
from cdp_kit.piikey import PiiKeyError, default_key_file, ensure_key_file
from cdp_kit.private import write_private
from cdp_kit.provision import MAX_AGE_ENV, max_ages_from_env, provision_streams

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
NATS = "nats"
CLUSTER_STORE = "nats-cluster"
# How long a provisioning at R3 is retried while a just-formed cluster settles.
PROVISION_TIMEOUT_S = 60.0
SERVING = "SERVING"
LOG_TAIL_LINES = 40
NATS_MAX_PAYLOAD = 8 * 1024 * 1024

CommandFactory = Callable[[str], list[str]]


class StackError(CliError):
    """The stack could not start, or a service did not become ready."""


T = TypeVar("T")


def run_async(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run ``coroutine`` to its end on a loop of its own, in a thread (the caller may have a loop)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def service_command(service: str) -> list[str]:
    """How a service process is started: ``python -m cdp_<service> serve``."""
    return [sys.executable, "-m", f"cdp_{service}", "serve"]


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a log file ('' when there is none)."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 64 * 1024))
            data = handle.read()
    except FileNotFoundError:
        return ""
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])


@dataclass
class Child:
    """One supervised process: its command line, environment, log file and restart history."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    address: str
    new_session: bool = False
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    crashes_in_row: int = 0
    started_at: float = 0.0
    restart_at: float | None = None
    paused: bool = False
    history: list[int] = field(default_factory=list)

    def spawn(self) -> None:
        with self.log_path.open("ab") as out:
            try:
                self.process = subprocess.Popen(
                    guarded(self.argv),
                    env=self.env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=self.new_session,
                )
            except OSError as exc:
                raise StackError(f"cannot start {self.name} ({self.argv[0]}): {exc.strerror or exc}") from None
        self.started_at = time.monotonic()
        self.history.append(self.process.pid)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def exit_code(self) -> int | None:
        return self.process.poll() if self.process is not None else None

    def send(self, sig: signal.Signals) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)

    def wait(self, timeout: float) -> bool:
        """True when the process has exited within ``timeout`` seconds."""
        if self.process is None:
            return True
        try:
            self.process.wait(max(0.0, timeout))
        except subprocess.TimeoutExpired:
            return False
        return True

    def kill_and_reap(self) -> None:
        self.send(signal.SIGKILL)
        self.wait(10.0)

    def tail(self) -> str:
        return log_tail(self.log_path)


@dataclass(frozen=True)
class Backoff:
    """Delay before restarting a crashed child: ``first * 2**(crashes-1)``, capped; reset once stable."""

    first_s: float = 0.5
    max_s: float = 10.0
    stable_after_s: float = 30.0

    def delay(self, crashes_in_row: int) -> float:
        return float(min(self.first_s * 2 ** max(0, crashes_in_row - 1), self.max_s))


class Stack:
    """nats-server plus the chosen services, supervised; a context manager.

    >>> with Stack(Path(".cdp")) as stack:
    ...     stack.addresses["ingest"]
    """

    def __init__(
        self,
        data_dir: Path,
        services: Sequence[str] = SERVICES,
        *,
        env: Mapping[str, str] | None = None,
        ready_timeout_s: float = 90.0,
        stop_timeout_s: float = 15.0,
        backoff: Backoff | None = None,
        poll_interval_s: float = 0.2,
        command: CommandFactory = service_command,
        service_env: Mapping[str, Mapping[str, str]] | None = None,
        nats_config: str = "",
        grpc_security: bool = True,
        nats_cluster: int = 1,
        durability: str = DEFAULT_DURABILITY,
    ) -> None:
        unknown = [s for s in [*services, *(service_env or {})] if s not in SERVICES]
        if unknown or not services:
            raise StackError(f"unknown services {unknown}; choose from {', '.join(SERVICES)}")
        self.data_dir = Path(data_dir).absolute()
        self.services = list(dict.fromkeys(services))
        self.extra_env = dict(env or {})
        # Per-service variables over ``env`` (e.g. one service's CDP_NATS_URL through a proxy).
        self.service_env = {name: dict(values) for name, values in (service_env or {}).items()}
        # Extra lines for nats-server's configuration file (e.g. ``write_deadline: "2s"``).
        self.nats_config = nats_config
        if nats_cluster < 1:
            raise StackError(f"--nats-cluster {nats_cluster}: a cluster has at least one node")
        if durability not in DURABILITIES:
            raise StackError(f"unknown durability {durability!r}; one of {', '.join(DURABILITIES)}")
        # 1: one nats-server (the default); N > 1: an N-node JetStream cluster, streams at RN.
        self.nats_cluster = nats_cluster
        self.durability = durability
        # TLS and tokens on every service's gRPC (off only for benchmarks that compare).
        self.grpc_security = grpc_security
        self.secrets: LocalSecrets | None = None
        self.grpc_auth: ClientAuth | None = None
        self.ready_timeout_s = ready_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.backoff = backoff or Backoff()
        self.poll_interval_s = poll_interval_s
        self.command = command
        self.nats_url = ""
        self.nats_monitor_port = 0
        self._nodes: list[Child] = []
        self._monitor_ports: dict[str, int] = {}
        self._children: dict[str, Child] = {}
        self._lock = threading.RLock()
        self._stopping = False
        self._supervising = False
        self._reaped = threading.Event()
        self._jobs: queue.Queue[tuple[Callable[[], None], Future[None]]] = queue.Queue()
        self._supervisor: threading.Thread | None = None
        self._lock_file: IO[bytes] | None = None
        self._wrote_stack_file = False

    # ----------------------------------------------------------------- paths and state

    @property
    def logs_dir(self) -> Path:
        return self.data_dir / "logs"

    @property
    def pii_hash_key_file(self) -> Path:
        return default_key_file(self.data_dir)

    @property
    def master_key_file(self) -> Path:
        return self.data_dir / "secrets" / "master.key"

    @property
    def secrets_dir(self) -> Path:
        return self.data_dir / "secrets"

    @property
    def stack_file(self) -> Path:
        return self.data_dir / STACK_FILE

    @property
    def clustered(self) -> bool:
        return self.nats_cluster > 1

    @property
    def nats_nodes(self) -> dict[str, str]:
        """``{"nats": "127.0.0.1:port"}``, or ``{"nats-1": ..., "nats-2": ..., ...}`` for a cluster."""
        return {node.name: node.address for node in self._nodes}

    def node_monitor_port(self, name: str) -> int:
        """The monitoring port (``/healthz``, ``/varz``, ``/jsz``) of the node called ``name``."""
        if name not in self._monitor_ports:
            raise StackError(f"{name} is not a NATS node of this stack ({', '.join(self._monitor_ports)})")
        return self._monitor_ports[name]

    @property
    def addresses(self) -> dict[str, str]:
        """``{"ingest": "127.0.0.1:port", ...}`` for the services of this stack."""
        return {name: child.address for name, child in self._children.items()}

    @property
    def pids(self) -> dict[str, int]:
        """Current pids of the running children, nats-server as ``"nats"`` (a cluster's nodes as ``"nats-1"``...)."""
        with self._lock:
            children = self._supervised()
            return {c.name: c.pid for c in children if c.pid is not None and c.alive()}

    @property
    def restarts(self) -> dict[str, int]:
        """How often each child was restarted after exiting unexpectedly."""
        with self._lock:
            children = self._supervised()
            return {c.name: c.restarts for c in children}

    def all_pids(self) -> list[int]:
        """Every pid this stack ever spawned (for checking that none is left)."""
        with self._lock:
            children = self._supervised()
            return [pid for c in children for pid in c.history]

    # ----------------------------------------------------------------- start

    def start(self) -> Stack:
        """Start nats-server and the services, wait until all are SERVING, write stack.json."""
        if self._stopping or self._supervisor is not None:
            raise StackError("a Stack starts once; create a new one to start again")
        try:
            self._acquire_data_dir()
            self._ensure_pii_hash_key()
            keyring.ensure_key_file(self.master_key_file)
            self._ensure_grpc_secrets()
            self._start_supervisor()
            self._start_nats()
            self._provision()
            self._start_services()
            self._write_stack_file()
            self._supervising = True
        except BaseException:
            self.stop()
            raise
        return self

    def _acquire_data_dir(self) -> None:
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        handle = (self.data_dir / "stack.lock").open("ab")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise StackError(f"a stack is already running from {self.data_dir}; stop it first") from None
        self._lock_file = handle

    def _ensure_pii_hash_key(self) -> None:
        try:
            ensure_key_file(self.pii_hash_key_file)
        except PiiKeyError as exc:
            raise StackError(f"{exc}; fix or remove it (a new key gives every value a new tag)") from None

    def _ensure_grpc_secrets(self) -> None:
        """The CA, the services' certificate and the role tokens under ``secrets/`` (kept across runs)."""
        if not self.grpc_security:
            return
        self.secrets = ensure_local_secrets(self.data_dir)
        self.grpc_auth = self.secrets.client("admin")

    def _grpc_env(self) -> dict[str, str]:
        if self.secrets is None:
            return {"CDP_GRPC_INSECURE": "true"}
        return self.secrets.server_env()

    def _nats_config(self, name: str = "nats-server", extra: str = "") -> Path:
        """nats-server's configuration with TLS, users and permissions; it holds passwords (0600)."""
        security = ensure_secrets(self.secrets_dir)
        durability = durability_config(self.durability)
        text = f"max_payload: {NATS_MAX_PAYLOAD}\n{security}{extra}{durability}{self.nats_config}\n"
        return write_private(self.secrets_dir / "nats" / f"{name}.conf", text)

    def _check_store_layout(self) -> None:
        """One data folder holds one log: a cluster's stores are not the single server's, and the
        services' stores remember how far they read the log they were built from."""
        single, cluster = self.data_dir / "nats", self.data_dir / CLUSTER_STORE
        other = single if self.clustered else cluster
        if other.is_dir() and any(other.iterdir()):
            mode = "a single nats-server" if self.clustered else "a NATS cluster"
            raise StackError(
                f"{self.data_dir} holds the log of {mode} ({other}); the services' stores were built from it. "
                "Use another --data-dir (or remove this one) to switch between a single server and a cluster"
            )

    def _start_nats(self) -> None:
        self._check_store_layout()
        try:
            binary = find_binary()
        except FileNotFoundError as exc:
            raise StackError(str(exc)) from None
        count = self.nats_cluster
        ports = [free_port(LOOPBACK) for _ in range(count)]
        monitors = [free_port(LOOPBACK) for _ in range(count)]
        routes = [free_port(LOOPBACK) for _ in range(count)] if self.clustered else []
        route_tls = ensure_route_tls(self.secrets_dir) if self.clustered else None
        for i in range(count):
            name = f"{NATS}-{i + 1}" if self.clustered else NATS
            if self.clustered:
                store = self.data_dir / CLUSTER_STORE / name
                others = [p for j, p in enumerate(routes) if j != i]
                config = self._nats_config(name, cluster_config(routes[i], others, host=LOOPBACK, tls=route_tls))
            else:
                store = self.data_dir / "nats"
                config = self._nats_config()
            store.mkdir(parents=True, exist_ok=True)
            argv = [binary, "-c", str(config), "-js", "-a", LOOPBACK, "-p", str(ports[i])]
            argv += ["-sd", str(store), "-n", f"cdp-{ports[i]}", "-m", str(monitors[i])]
            # Own session: a Ctrl-C in the terminal must not stop NATS before the services drained.
            log_path = self.logs_dir / f"{name}.log"
            node = Child(name, argv, dict(os.environ), log_path, f"{LOOPBACK}:{ports[i]}", new_session=True)
            self._nodes.append(node)
            self._monitor_ports[name] = monitors[i]
            self._spawn(node)
            self._record("spawned", child=name, pid=node.pid, address=node.address)
        self.nats_monitor_port = monitors[0]
        self.nats_url = ",".join(f"tls://{node.address}" for node in self._nodes)
        deadline = time.monotonic() + min(60.0 if self.clustered else 30.0, self.ready_timeout_s)
        for node in self._nodes:
            try:
                # The monitoring port: probing the TLS client port with a bare connect logs a handshake
                # error. A cluster node is ready once it is in contact with the meta leader.
                wait_for_healthz(
                    LOOPBACK,
                    self._monitor_ports[node.name],
                    timeout=max(0.1, deadline - time.monotonic()),
                    cluster=self.clustered,
                )
            except TimeoutError as exc:
                raise self._not_ready(node, str(exc)) from None

    def _provision(self) -> None:
        """Create or update the streams as the ``admin`` user (no service may), with one replica per
        node. A cluster that has just formed may refuse a replicated stream for a moment (its peers
        not yet known to the meta leader): that is retried for a while."""
        deadline = time.monotonic() + (PROVISION_TIMEOUT_S if self.clustered else 0.0)
        while True:
            try:
                run_async(
                    provision_streams(
                        self.nats_url,
                        stack_auth(self.secrets_dir, ADMIN),
                        replicas=self.nats_cluster,
                        max_ages=max_ages_from_env(),
                    )
                )
                return
            except ValueError as exc:
                raise StackError(f"{MAX_AGE_ENV}: {exc}") from None
            except Unavailable as exc:
                failure = exc.message
            except (nats.errors.Error, TimeoutError) as exc:
                if not self.clustered:
                    raise
                failure = f"{type(exc).__name__}: {exc}"
            if time.monotonic() >= deadline:
                raise StackError(f"provisioning the streams failed: {failure}")
            self._record("provision_retry", level=logging.WARNING, reason=failure)
            time.sleep(1.0)

    def _service_env(self, name: str, port: int) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "CDP_NATS_URL": self.nats_url,
                **stack_env(self.secrets_dir, name),
                "CDP_DATA_DIR": str(self.data_dir),
                "CDP_STORE_URL": "",
                "CDP_GRPC_HOST": LOOPBACK,
                "CDP_GRPC_PORT": str(port),
                "CDP_LOG_FORMAT": "json",
                "CDP_PII_HASH_KEY_FILE": str(self.pii_hash_key_file),
                "CDP_MASTER_KEY_FILE": str(self.master_key_file),
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self._grpc_env())
        env.update(self.extra_env)
        env.update(self.service_env.get(name, {}))
        return env

    def _start_services(self) -> None:
        for name in self.services:
            port = free_port(LOOPBACK)
            env = self._service_env(name, port)
            child = Child(name, self.command(name), env, self.logs_dir / f"{name}.log", f"{LOOPBACK}:{port}")
            self._children[name] = child
            self._spawn(child)
            self._record("spawned", child=name, pid=child.pid, address=child.address)
        deadline = time.monotonic() + self.ready_timeout_s
        for child in self._children.values():
            self._wait_until_serving(child, deadline, fail_on_exit=True)

    def _wait_until_serving(self, child: Child, deadline: float, *, fail_on_exit: bool) -> None:
        status = "not started"
        while True:
            if fail_on_exit and not child.alive():
                raise self._not_ready(child, f"exited with code {child.exit_code()} while starting")
            status = check_health(child.address, timeout=1.0, auth=self.grpc_auth)
            if status == SERVING:
                return
            if time.monotonic() >= deadline:
                raise self._not_ready(child, f"not SERVING after {self.ready_timeout_s:g}s (health: {status})")
            time.sleep(self.poll_interval_s)

    def _not_ready(self, child: Child, reason: str) -> StackError:
        tail = child.tail() or "(empty)"
        return StackError(f"{child.name} {reason}; last lines of {child.log_path}:\n{tail}")

    def _write_stack_file(self) -> None:
        content = {
            "nats_url": self.nats_url,
            "nats_monitor_port": self.nats_monitor_port,
            "nats_nodes": {
                node.name: {"address": node.address, "monitor_port": self._monitor_ports[node.name]}
                for node in self._nodes
            },
            "nats_durability": self.durability,
            "secrets_dir": str(self.secrets_dir),
            "services": self.addresses,
            "pid": os.getpid(),
        }
        temporary = self.stack_file.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(content, indent=2) + "\n")
        temporary.replace(self.stack_file)
        self._wrote_stack_file = True

    # ----------------------------------------------------------------- supervision

    def _start_supervisor(self) -> None:
        self._supervisor = threading.Thread(target=self._supervise, name="cdp-stack-supervisor", daemon=True)
        self._supervisor.start()

    def _spawn(self, child: Child) -> None:
        """Fork ``child`` on the supervisor thread (see the module docstring), waiting for it."""
        if threading.current_thread() is self._supervisor:
            child.spawn()
            return
        done: Future[None] = Future()
        self._jobs.put((child.spawn, done))
        done.result(timeout=30.0)

    def _supervise(self) -> None:
        while True:
            try:
                job, done = self._jobs.get(timeout=self.poll_interval_s)
            except queue.Empty:
                if self._reaped.is_set():
                    return
                self._check_all()
                continue
            try:
                job()
                done.set_result(None)
            except BaseException as exc:
                done.set_exception(exc)

    def _check_all(self) -> None:
        with self._lock:
            if self._stopping or not self._supervising:
                return
            for child in self._supervised():
                try:
                    self._check(child)
                except Exception:
                    log.exception("supervision of %s failed", child.name)

    def _supervised(self) -> list[Child]:
        return [*self._nodes, *self._children.values()]

    def _check(self, child: Child) -> None:
        now = time.monotonic()
        if child.paused:
            return
        if child.alive():
            if child.crashes_in_row and now - child.started_at > self.backoff.stable_after_s:
                child.crashes_in_row = 0
            return
        if child.restart_at is None:
            child.crashes_in_row += 1
            delay = self.backoff.delay(child.crashes_in_row)
            child.restart_at = now + delay
            self._record("exited", level=logging.WARNING, child=child.name, code=child.exit_code(), restart_in_s=delay)
        elif now >= child.restart_at:
            child.restart_at = None
            child.restarts += 1
            self._spawn(child)
            self._record("restarted", level=logging.WARNING, child=child.name, pid=child.pid, restarts=child.restarts)

    def kill(self, service: str, *, keep_down: bool = False) -> None:
        """SIGKILL a child (for crash tests); the supervisor restarts it after its backoff, or, with
        ``keep_down``, leaves it down until ``restart`` (e.g. a NATS node lost for a while)."""
        child = self._child(service)
        with self._lock:
            child.paused = child.paused or keep_down
            process = child.process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(10.0)
            self._record("killed", child=service, pid=process.pid)

    def restart(self, service: str, *, wait: bool = True) -> None:
        """Stop a service gracefully (unless it is down), start it again on the same port and wait
        until it is SERVING (``wait=False``: not; e.g. an instance that comes back as a standby,
        which is never ready)."""
        child = self._child(service)
        with self._lock:
            child.paused = True
        try:
            child.send(signal.SIGTERM)
            if not child.wait(self.stop_timeout_s):
                child.kill_and_reap()
            self._spawn(child)
            self._record("restarted", child=service, pid=child.pid, on_request=True)
        finally:
            with self._lock:
                child.paused = False
                child.restart_at = None
        if wait:
            self.wait_serving(service)

    def wait_serving(self, service: str, timeout_s: float | None = None) -> None:
        """Block until ``service`` answers SERVING again (e.g. after ``kill``), or raise StackError.

        For ``"nats"``: until nats-server accepts connections with JetStream enabled. For a cluster
        node (``"nats-2"``): until it is back in the cluster, in contact with the meta leader and
        with its streams current.
        """
        child = self._child(service)
        timeout = self.ready_timeout_s if timeout_s is None else timeout_s
        if child in self._nodes:
            try:
                port = self._monitor_ports[child.name]
                wait_for_healthz(LOOPBACK, port, timeout=timeout, cluster=self.clustered)
            except TimeoutError as exc:
                raise self._not_ready(child, str(exc)) from None
            return
        self._wait_until_serving(child, time.monotonic() + timeout, fail_on_exit=False)

    def _child(self, name: str) -> Child:
        for node in self._nodes:
            if node.name == name:
                return node
        if name not in self._children:
            running = [*(n.name for n in self._nodes), *self._children]
            raise StackError(f"{name} is not part of this stack (it runs {', '.join(running) or 'nothing'})")
        return self._children[name]

    # ----------------------------------------------------------------- stop

    def stop(self) -> None:
        """Terminate the services, then nats-server (every node); SIGKILL whatever outlives the timeout."""
        with self._lock:
            self._stopping = True
        self._terminate(list(self._children.values()))
        if self._nodes:
            self._terminate(self._nodes)
        self._reaped.set()
        if self._supervisor is not None and self._supervisor is not threading.current_thread():
            self._supervisor.join(timeout=10.0)
        self._remove_stack_file()
        self._release_data_dir()

    def _terminate(self, children: Iterable[Child]) -> None:
        running = [c for c in children if c.alive()]
        for child in running:
            child.send(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout_s
        for child in running:
            if not child.wait(deadline - time.monotonic()):
                self._record("stop_timeout", level=logging.WARNING, child=child.name, pid=child.pid)
                child.kill_and_reap()
            self._record("stopped", child=child.name, code=child.exit_code())
        for child in children:
            child.wait(0)  # reap anything that exited on its own

    def _remove_stack_file(self) -> None:
        if self._wrote_stack_file:
            self.stack_file.unlink(missing_ok=True)
            self._wrote_stack_file = False

    def _release_data_dir(self) -> None:
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    # ----------------------------------------------------------------- misc

    def _record(self, event: str, *, level: int = logging.INFO, **fields: Any) -> None:
        """Supervisor events: to ``logging`` and, as JSON lines, to ``logs/stack.log``. No PII here."""
        log.log(level, "%s %s", event, " ".join(f"{k}={v}" for k, v in fields.items()))
        line = {"ts": time.time(), "level": logging.getLevelName(level).lower(), "event": event, **fields}
        with contextlib.suppress(OSError), (self.logs_dir / "stack.log").open("a") as out:
            out.write(json.dumps(line, default=str) + "\n")

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
