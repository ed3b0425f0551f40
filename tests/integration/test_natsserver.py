"""The local nats-server launcher: a killed parent (test run, benchmark) leaves no server behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cdp_kit.natsserver import guarded

SCRIPT = """
import sys, time
from pathlib import Path
from cdp_kit.natsserver import NatsServer
server = NatsServer(Path(sys.argv[1])).start()
print(server.process.pid, flush=True)
time.sleep(600)
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat").read_text().split()[2] if Path(f"/proc/{pid}/stat").exists() else "X"
    return status != "Z"


def test_a_server_dies_with_the_process_that_started_it(tmp_path: Path) -> None:
    parent = subprocess.Popen([sys.executable, "-c", SCRIPT, str(tmp_path / "js")], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    server_pid = int(parent.stdout.readline())
    assert alive(server_pid)
    parent.send_signal(signal.SIGKILL)
    parent.wait(10)
    deadline = time.monotonic() + 10
    while alive(server_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(server_pid)


FORK_HANDLER = """
import os, subprocess, sys
from cdp_kit.natsserver import guarded
# What gRPC does in a parent that uses it: a handler that runs in every forked copy of the
# process (gRPC's restarts its poller there, which then aborts once close_fds has closed its
# epoll descriptor). Here it makes such a copy exit 86 before it can exec.
os.register_at_fork(after_in_child=lambda: os._exit(86))
cmd = [sys.executable, "-c", "pass"]
if sys.argv[1] == "preexec":
    print(subprocess.Popen(cmd, preexec_fn=lambda: None).wait())
else:
    print(subprocess.Popen(guarded(cmd), start_new_session=True).wait())
"""


def test_a_guarded_child_runs_no_fork_handlers_of_its_parent() -> None:
    """Children started through ``guarded`` never run as a forked copy of the parent, so a library's
    fork handlers (gRPC's, which crashed services the supervisor started on a busy machine) cannot
    touch them. The ``preexec`` run shows the handler does fire where a copy runs."""
    codes = {
        how: subprocess.run(
            [sys.executable, "-c", FORK_HANDLER, how], capture_output=True, text=True, check=True
        ).stdout.strip()
        for how in ("guarded", "preexec")
    }
    assert codes == {"guarded": "0", "preexec": "86"}


def test_guarded_looks_the_program_up_in_the_caller() -> None:
    with pytest.raises(FileNotFoundError) as missing:
        guarded(["no-such-program-anywhere"])
    assert missing.value.filename == "no-such-program-anywhere"
