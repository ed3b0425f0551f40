"""Active/standby under load (``cdp_kit.lease``, docs/operations.md): all four services run as two
instances each (``CDP_LEASE_TTL_S``), each instance with a store of its own. Mid-load every active
instance is SIGSTOPped past the lease's TTL; their standbys, which have
been following the log, take over; the frozen instances are then resumed and must step down
(exit 75, restarted by the supervisor as standbys) without appending anything. Every person must
reach the webhook exactly once per segment, as in ``test_never_lose``; ``cdp status`` names the
roles."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import grpc
import pytest
from typer.testing import CliRunner

from cdp.common.v1 import admin_pb2
from cdp.identity.v1 import identity_pb2 as id_pb
from cdp_cli.app import app
from cdp_cli.client import Client
from cdp_cli.stack import LOOPBACK, Stack
from cdp_kit.natsserver import free_port
from cdp_kit.parts import PART_HEADER
from cdp_kit.processor import CAUSE_HEADER, FENCE_HEADER
from cdp_kit.streams import IDENTITY_FRAGMENTS, IDENTITY_READS_INGEST, PROFILE
from cdp_standins import LocalPlatforms
from tests.e2e import natsconn
from tests.e2e.chain import read_log
from tests.e2e.test_never_lose import (
    Load,
    Publisher,
    Running,
    assert_exactly_once,
    consumer_delivered,
    platforms,  # noqa: F401  (the fixture)
    set_up,
    settled,
    wait_until,
)

pytestmark = pytest.mark.e2e

TTL_S = 3.0
FAILING_OVER = ("ingest", "identity", "segmentation", "activation")


def lease_env(service: str, instance: str) -> dict[str, str]:
    return {"CDP_LEASE_TTL_S": str(TTL_S), "CDP_INSTANCE": instance, "CDP_FOLLOW_INTERVAL_S": "1"}


class Standby:
    """A second instance of a service beside the stack's: same credentials, its own port and store."""

    def __init__(self, stack: Stack, service: str, root: Path) -> None:
        self.service = service
        self.port = free_port(LOOPBACK)
        data_dir = root / f"{service}-b"
        data_dir.mkdir(parents=True)
        env = stack._service_env(service, self.port)
        env.update({**lease_env(service, f"{service}-b"), "CDP_DATA_DIR": str(data_dir)})
        self.log_path = root / f"{service}-b.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            stack.command(service), env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._log.close()


def replaced(stack: Stack, service: str, pid: int) -> bool:
    return stack.pids.get(service) != pid


def role_is(client: Client, service: str, role: str) -> bool:
    status = role_of(client, service)
    return status is not None and status.role == role


def role_of(client: Client, service: str) -> admin_pb2.ServiceStatus | None:
    try:
        return client.admin(service).GetStatus(admin_pb2.GetStatusRequest(), timeout=5.0)
    except Exception:
        return None


@pytest.fixture
def stack_with_standbys(tmp_path: Path, platforms: LocalPlatforms) -> Iterator[tuple[Running, dict[str, Standby]]]:  # noqa: F811
    with contextlib.ExitStack() as cleanup:
        service_env = {s: lease_env(s, f"{s}-a") for s in FAILING_OVER}
        stack = Stack(tmp_path / "cdp", ready_timeout_s=120.0, service_env=service_env)
        cleanup.enter_context(stack)
        client = cleanup.enter_context(Client(stack.data_dir, addresses=stack.addresses))
        set_up(client, platforms)
        standbys = {s: Standby(stack, s, tmp_path / "standby") for s in FAILING_OVER}
        for standby in standbys.values():
            cleanup.callback(standby.stop)
        yield Running(stack, client, platforms, stack.nats_monitor_port), standbys


@pytest.mark.parametrize("fault", ["frozen", "killed", "terminated"])
def test_the_active_frozen_or_killed_is_replaced_by_its_standby_and_nothing_is_lost_or_doubled(
    stack_with_standbys: tuple[Running, dict[str, Standby]], fault: str
) -> None:
    """``frozen``: SIGSTOP past the TTL, then SIGCONT: the woken instance must step down.
    ``killed``: SIGKILL, kept down until the standby took over, then started again.
    ``terminated``: a graceful restart (a rolling update): the lease is released, the standby
    takes it at once, and the restarted instance comes back as a standby."""
    running, standbys = stack_with_standbys
    stack = running.stack
    standby_client = Client(
        stack.data_dir, addresses={**stack.addresses, **{s: b.address for s, b in standbys.items()}}
    )
    for service in FAILING_OVER:
        wait_until(
            partial(role_is, standby_client, service, "standby"),
            60.0,
            f"the {service} standby to say it is one",
        )
        status = role_of(running.client, service)
        assert status is not None
        assert (status.role, status.instance) == ("active", f"{service}-a")
    # A standby is a read replica: it answers reads from its store and refuses every write.
    namespaces = standby_client.identity.ListNamespaces(id_pb.ListNamespacesRequest(), timeout=10.0)
    assert "cookie" in {n.name for n in namespaces.namespaces}
    with pytest.raises(grpc.RpcError) as refused:
        standby_client.identity.CreateNamespace(id_pb.CreateNamespaceRequest(name="loyalty_no"), timeout=10.0)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "standby" in (refused.value.details() or "")
    load = Load(people=int(os.environ.get("CDP_FAILOVER_PEOPLE", "1500")), page_bytes=64)
    publisher = Publisher(stack, load.messages()).start()
    wait_until(lambda: consumer_delivered(stack, IDENTITY_READS_INGEST) > 0, 90.0, "records to reach identity")
    frozen = {s: stack.pids[s] for s in FAILING_OVER}
    stopped_at = time.monotonic()
    for service, pid in frozen.items():
        if fault == "frozen":
            os.kill(pid, signal.SIGSTOP)
        elif fault == "killed":
            stack.kill(service, keep_down=True)
        else:
            stack.restart(service, wait=False)  # SIGTERM, wait for the exit, start again
    try:
        for service in FAILING_OVER:
            wait_until(
                partial(role_is, standby_client, service, "active"),
                TTL_S * 6,
                f"the {service} standby to take over",
            )
        took_over_s = time.monotonic() - stopped_at
        time.sleep(1.0)
    finally:
        for service, pid in frozen.items():
            if fault == "frozen":
                os.kill(pid, signal.SIGCONT)
            elif fault == "killed":
                stack.restart(service, wait=False)  # it comes back as a standby: never ready
    if fault == "frozen":
        # The resumed instances step down: exit 75 (restarted as standbys by the supervisor).
        for service, pid in frozen.items():
            wait_until(partial(replaced, stack, service, pid), 30.0, f"the deposed {service} to exit")
            log = (stack.logs_dir / f"{service}.log").read_text(errors="replace")
            assert "lease_lost_stepping_down" in log or "deposed_stepping_down" in log, log[-3000:]
            assert '"exit_code": 75' in log
    publisher.join()
    # Everything arrives once, served by the new actives.
    result = settled(Running(stack, standby_client, running.platforms, running.monitor_port), load)
    assert_exactly_once(result, load, stack)
    # The fence is on identity's log, after the first instance's, and nothing of the deposed
    # instance follows it.
    markers = [m.headers.get(FENCE_HEADER, "") for m in read_log(stack, PROFILE.name, IDENTITY_FRAGMENTS.subject)]
    fences = [m for m in markers if m]
    assert [f.split("@")[0] for f in fences] == ["identity-a", "identity-b"], fences
    fragments = read_log(stack, PROFILE.name, IDENTITY_FRAGMENTS.subject)
    causes = [m.headers[CAUSE_HEADER] for m in fragments if CAUSE_HEADER in m.headers and PART_HEADER not in m.headers]
    assert len(causes) == len(set(causes)), "an input's fragments were appended twice across the takeover"
    for service in FAILING_OVER:
        status = role_of(standby_client, service)
        assert status is not None
        assert (status.role, status.instance) == ("active", f"{service}-b")
        # The stack's own instance, restarted by the supervisor, comes back as a standby.
        wait_until(partial(role_is, running.client, service, "standby"), 60.0, f"{service}-a to come back as a standby")
    # `cdp status` reaches the stack's own instances: restarted as standbys, they say so, and who is active.
    shown = CliRunner().invoke(app, ["--data-dir", str(stack.data_dir), "status"], env={"COLUMNS": "250"})
    assert shown.exit_code == 1, shown.output  # not ready: a standby
    for service in FAILING_OVER:
        assert f"standby ({service}-a; active: {service}-b)" in shown.output, shown.output
    if fault == "terminated":
        for service in FAILING_OVER:
            log = (stack.logs_dir / f"{service}.log").read_text(errors="replace")
            assert "lease_released" in log, log[-3000:]
    print(json.dumps({"fault": fault, "took_over_s": round(took_over_s, 1), "ttl_s": TTL_S}))
    standby_client.close()
    _ = natsconn  # the stack is a NatsTarget for the helpers above
