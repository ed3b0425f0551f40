"""The embedded stack as real processes: nats-server plus the services, supervised.

The first test runs the real four services. The others check the supervisor itself
(restarts, failed starts, `cdp up` and its signals, no orphans after a ``kill -9``)
with small stand-in services that only serve gRPC health and status, so they do not
depend on what the services do.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from typer.testing import CliRunner

from cdp.activation.v1 import activation_pb2 as act
from cdp.activation.v1 import activation_pb2_grpc as act_grpc
from cdp_cli.app import app
from cdp_cli.client import SERVICES, Client, check_health
from cdp_cli.stack import Stack, StackError

pytestmark = pytest.mark.e2e

CDP = str(Path(sys.executable).parent / "cdp")


# --------------------------------------------------------------------------- process helpers


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def wait_until(condition: object, timeout_s: float = 20.0, what: str = "condition") -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def assert_all_gone(pids: list[int]) -> None:
    wait_until(lambda: not [p for p in pids if alive(p)], 15.0, f"processes {pids} to exit")


def status_json(data_dir: Path) -> dict[str, dict[str, object]]:
    result = CliRunner().invoke(app, ["--data-dir", str(data_dir), "status", "--json"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    services: dict[str, dict[str, object]] = json.loads(result.stdout)["services"]
    return services


# --------------------------------------------------------------------------- the real services


@pytest.fixture
def real_stack(tmp_path: Path) -> Iterator[Stack]:
    stack = Stack(tmp_path / "data", ready_timeout_s=120.0)
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


def test_real_stack_serves_restarts_and_stops_cleanly(real_stack: Stack) -> None:
    stack_file = json.loads(real_stack.stack_file.read_text())
    assert stack_file["pid"] == os.getpid()
    assert stack_file["nats_url"] == real_stack.nats_url
    assert set(stack_file["services"]) == set(SERVICES)
    for service, address in stack_file["services"].items():
        assert check_health(address, auth=real_stack.grpc_auth) == "SERVING", service
        assert check_health(address) == "UNREACHABLE", service  # TLS only: plaintext gets nothing
    assert_grpc_is_authenticated(real_stack)
    # Every service started with the stack's PII hash key (a service without one does not start).
    key_file = real_stack.pii_hash_key_file
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = key_file.read_bytes()
    assert len(bytes.fromhex(key.decode())) == 32

    services = status_json(real_stack.data_dir)
    assert set(services) == set(SERVICES)
    for name, report in services.items():
        assert report["health"] == "SERVING"
        status = report["status"]
        assert isinstance(status, dict)
        assert status["service"] == name
        assert status["ready"] is True

    before = real_stack.pids["ingest"]
    real_stack.kill("ingest")
    real_stack.wait_serving("ingest", timeout_s=60.0)
    assert real_stack.pids["ingest"] != before
    assert real_stack.restarts["ingest"] == 1
    assert status_json(real_stack.data_dir)["ingest"]["health"] == "SERVING"

    spawned = real_stack.all_pids()
    real_stack.stop()
    assert_all_gone(spawned)
    assert not real_stack.stack_file.exists()
    assert children_of(os.getpid()) == []

    # The key outlives the stack: a new one would give every value a new tag.
    with Stack(real_stack.data_dir, ["ingest"], ready_timeout_s=120.0) as again:
        assert again.pii_hash_key_file.read_bytes() == key


def assert_grpc_is_authenticated(stack: Stack) -> None:
    """Security on the real services: no token is UNAUTHENTICATED, a reader creating a destination
    PERMISSION_DENIED, and the secrets on disk are the owner's only."""
    assert stack.secrets is not None
    assert stat.S_IMODE(stack.secrets.root.stat().st_mode) == 0o700
    for path in stack.secrets.root.rglob("*"):
        assert stat.S_IMODE(path.stat().st_mode) == (0o600 if path.is_file() else 0o700), path
    address = stack.addresses["activation"]
    ca = stack.secrets.pki.ca_cert.read_bytes()
    request = act.CreateDestinationRequest(destination=act.Destination(name="hook", connector="webhook"))
    with grpc.secure_channel(address, grpc.ssl_channel_credentials(ca)) as anonymous:
        with pytest.raises(grpc.RpcError) as caught:
            act_grpc.ActivationServiceStub(anonymous).CreateDestination(request, timeout=30)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with Client(stack.data_dir, addresses=stack.addresses, role="reader") as reader:
        with pytest.raises(grpc.RpcError) as caught:
            reader.activation.CreateDestination(request, timeout=30)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert reader.activation.ListPlans(act.ListPlansRequest(), timeout=30) is not None


# --------------------------------------------------------------------------- the supervisor, with stand-ins

STAND_IN = textwrap.dedent(
    """
    import os, signal, sys, threading
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from cdp.common.v1 import admin_pb2, admin_pb2_grpc

    NAME = __package__.removeprefix("cdp_")
    if os.environ.get("STAND_IN_CRASH") == NAME:
        print("boom: cannot open the store", file=sys.stderr)
        sys.exit(3)

    class Admin(admin_pb2_grpc.AdminServiceServicer):
        def GetStatus(self, request, context):
            consumer = admin_pb2.ConsumerStatus(name=NAME + "-in", stream="CDP_X", stream_last_sequence=4, lag=4)
            return admin_pb2.ServiceStatus(service=NAME, version="0", ready=True, consumers=[consumer])

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    checker = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    admin_pb2_grpc.add_AdminServiceServicer_to_server(Admin(), server)
    address = os.environ["CDP_GRPC_HOST"] + ":" + os.environ["CDP_GRPC_PORT"]
    if os.environ.get("CDP_GRPC_TLS_CERT_FILE"):  # the stack's TLS, as the real services serve it
        key = open(os.environ["CDP_GRPC_TLS_KEY_FILE"], "rb").read()
        cert = open(os.environ["CDP_GRPC_TLS_CERT_FILE"], "rb").read()
        server.add_secure_port(address, grpc.ssl_server_credentials([(key, cert)]))
    else:
        server.add_insecure_port(address)
    server.start()
    stop.wait(0.3)
    checker.set("", health_pb2.HealthCheckResponse.SERVING)
    print('{"event": "serving", "service": "%s"}' % NAME, file=sys.stderr, flush=True)
    stop.wait()
    server.stop(0.5).wait()
    """
)


@pytest.fixture
def stand_ins(tmp_path: Path) -> Path:
    """A folder of fake ``cdp_<service>`` packages; put it first on PYTHONPATH to use them."""
    root = tmp_path / "stand_ins"
    for service in SERVICES:
        package = root / f"cdp_{service}"
        package.mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "__main__.py").write_text(STAND_IN)
    return root


def test_supervisor_restarts_a_killed_service(tmp_path: Path, stand_ins: Path) -> None:
    stack = Stack(tmp_path / "data", env={"PYTHONPATH": str(stand_ins)}, ready_timeout_s=30.0)
    with stack:
        assert set(json.loads(stack.stack_file.read_text())["services"]) == set(SERVICES)
        with pytest.raises(StackError, match="already running"):
            Stack(tmp_path / "data", env={"PYTHONPATH": str(stand_ins)}).start()
        assert stack.stack_file.exists()  # the refused second stack did not touch it

        first = stack.pids["segmentation"]
        stack.kill("segmentation")
        stack.wait_serving("segmentation", timeout_s=20.0)
        assert stack.pids["segmentation"] != first
        assert stack.restarts == {"nats": 0, "ingest": 0, "identity": 0, "segmentation": 1, "activation": 0}

        before_restart = stack.pids["identity"]
        stack.restart("identity")  # graceful, on request: not counted as a crash
        assert stack.pids["identity"] != before_restart
        assert stack.restarts["identity"] == 0

        stack.kill("nats")
        stack.wait_serving("nats", timeout_s=20.0)
        assert stack.restarts["nats"] == 1
        spawned = stack.all_pids()
    assert_all_gone(spawned)
    assert not stack.stack_file.exists()
    assert children_of(os.getpid()) == []
    events = [json.loads(line)["event"] for line in (stack.logs_dir / "stack.log").read_text().splitlines()]
    assert events.count("restarted") == 3  # two after crashes, one on request


def test_children_outlive_the_thread_that_started_the_stack(tmp_path: Path, stand_ins: Path) -> None:
    """PR_SET_PDEATHSIG follows the forking thread: a short-lived caller thread must not take them down."""
    stack = Stack(tmp_path / "data", ["ingest"], env={"PYTHONPATH": str(stand_ins)})
    starter = threading.Thread(target=stack.start)
    starter.start()
    starter.join()
    try:
        time.sleep(0.5)
        assert set(stack.pids) == {"nats", "ingest"}
        assert check_health(stack.addresses["ingest"], auth=stack.grpc_auth) == "SERVING"
        assert stack.restarts == {"nats": 0, "ingest": 0}
    finally:
        stack.stop()
    assert_all_gone(stack.all_pids())


def test_only_the_chosen_services_start(tmp_path: Path, stand_ins: Path) -> None:
    with Stack(tmp_path / "data", ["ingest"], env={"PYTHONPATH": str(stand_ins)}) as stack:
        assert list(json.loads(stack.stack_file.read_text())["services"]) == ["ingest"]
        assert set(status_json(stack.data_dir)) == {"ingest"}


def test_failed_start_reports_the_log_tail_and_leaves_nothing(tmp_path: Path, stand_ins: Path) -> None:
    env = {"PYTHONPATH": str(stand_ins), "STAND_IN_CRASH": "identity"}
    stack = Stack(tmp_path / "data", env=env, ready_timeout_s=30.0)
    with pytest.raises(StackError, match="identity exited with code 3 while starting") as failure:
        stack.start()
    assert "boom: cannot open the store" in str(failure.value)
    assert_all_gone(stack.all_pids())
    assert not stack.stack_file.exists()
    assert children_of(os.getpid()) == []
    with Stack(tmp_path / "data", ["ingest"], env={"PYTHONPATH": str(stand_ins)}):  # the data dir is free again
        pass


def test_a_damaged_pii_hash_key_stops_the_start_saying_so_and_leaves_nothing(tmp_path: Path, stand_ins: Path) -> None:
    stack = Stack(tmp_path / "data", ["ingest"], env={"PYTHONPATH": str(stand_ins)})
    stack.pii_hash_key_file.parent.mkdir(parents=True)
    stack.pii_hash_key_file.write_text("not a key")
    with pytest.raises(StackError, match=r"pii-hash\.key does not hold hex text"):
        stack.start()
    assert stack.all_pids() == []
    assert stack.pii_hash_key_file.read_text() == "not a key"  # never replaced: tags would change


def test_cdp_up_that_cannot_start_shows_the_log_tail(tmp_path: Path, stand_ins: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(stand_ins), "STAND_IN_CRASH": "activation"}
    up = subprocess.run([CDP, "up", "--data-dir", str(tmp_path / "data")], env=env, capture_output=True, timeout=90)
    assert up.returncode == 1
    stderr = up.stderr.decode()
    assert "error: activation exited with code 3 while starting" in stderr
    assert "boom: cannot open the store" in stderr
    assert "Traceback" not in stderr
    assert not (tmp_path / "data" / "stack.json").exists()


def start_cdp_up(tmp_path: Path, stand_ins: Path) -> tuple[subprocess.Popen[bytes], Path]:
    data_dir = tmp_path / "data"
    env = {**os.environ, "PYTHONPATH": str(stand_ins), "COLUMNS": "200"}
    up = subprocess.Popen(
        [CDP, "up", "--data-dir", str(data_dir)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    wait_until(lambda: (data_dir / "stack.json").exists() or up.poll() is not None, 60.0, "cdp up to be ready")
    assert up.poll() is None, up.stdout.read().decode() if up.stdout else ""
    return up, data_dir


def test_cdp_up_stops_everything_on_sigterm(tmp_path: Path, stand_ins: Path) -> None:
    up, data_dir = start_cdp_up(tmp_path, stand_ins)
    try:
        children = children_of(up.pid)
        assert len(children) == 1 + len(SERVICES)
        status = subprocess.run([CDP, "--data-dir", str(data_dir), "status", "--json"], capture_output=True, timeout=60)
        assert status.returncode == 0, status.stderr.decode()
        reports = json.loads(status.stdout)["services"]
        assert {name: r["health"] for name, r in reports.items()} == dict.fromkeys(SERVICES, "SERVING")
        assert (
            reports["ingest"]["status"]["consumers"][0]["lag"] == 4
        )  # a number: cdp status --json writes counts as numbers
        up.send_signal(signal.SIGTERM)
        assert up.wait(30) == 0
        output = up.stdout.read().decode() if up.stdout else ""
        assert "stopped" in output
        assert_all_gone(children)
        assert not (data_dir / "stack.json").exists()
    finally:
        up.kill()
        up.wait()


def test_kill_9_of_cdp_up_leaves_no_orphans(tmp_path: Path, stand_ins: Path) -> None:
    up, data_dir = start_cdp_up(tmp_path, stand_ins)
    children = children_of(up.pid)
    assert len(children) == 1 + len(SERVICES)
    up.kill()
    up.wait()
    assert_all_gone(children)
    stale = subprocess.run([CDP, "--data-dir", str(data_dir), "status"], capture_output=True, timeout=60)
    assert stale.returncode == 1
    assert b"stale" in stale.stderr
