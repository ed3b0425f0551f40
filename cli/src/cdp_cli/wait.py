"""``cdp ingest --wait``: wait until every downstream service has applied what a batch caused.

A batch flows down the pipeline one stream at a time. For each stage the writer's own log is
read from its status once the stage before is done, so its last folded sequence covers what
the batch caused there (a service commits its input checkpoint together with the output it
appended); then every reader's consumer on that stream must have applied up to it:

    ingest --CDP_INGEST--> identity --CDP_PROFILE--> segmentation, activation
                                      segmentation --CDP_AUDIENCE--> activation

Only ``GetStatus`` is used. A stage whose consumer is stuck fails at once, naming it and why.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc

from cdp.common.v1 import admin_pb2
from cdp_cli import render
from cdp_cli.client import Client, describe_rpc_error
from cdp_cli.errors import CliError

STUCK = "stuck"  # ConsumerStatus.state of a consumer without progress for the stall limit


@dataclass(frozen=True)
class Stage:
    writer: str
    stream: str
    readers: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.writer} → {self.stream} → {', '.join(self.readers)}"


PIPELINE: tuple[Stage, ...] = (
    Stage("ingest", "CDP_INGEST", ("identity",)),
    Stage("identity", "CDP_PROFILE", ("segmentation", "activation")),
    Stage("segmentation", "CDP_AUDIENCE", ("activation",)),
)


class WaitFailed(CliError):
    """A stage is stuck, or did not finish in time."""


@dataclass(frozen=True)
class Behind:
    """A consumer that has not yet applied up to the stage's target."""

    service: str
    consumer: admin_pb2.ConsumerStatus
    target: int

    def describe(self) -> str:
        c = self.consumer
        return (
            f"{self.service}'s consumer {c.name} applied {c.applied_sequence} of {self.target} (state {c.state or '?'})"
        )


def _status(client: Client, service: str) -> admin_pb2.ServiceStatus:
    return client.admin(service).GetStatus(admin_pb2.GetStatusRequest(), timeout=client.timeout)


def _folded(status: admin_pb2.ServiceStatus, stream: str) -> int:
    """Last own-log sequence a service holds on ``stream`` (0 when it writes nothing there yet)."""
    return max((o.folded_sequence for o in status.own_logs if o.stream == stream), default=0)


def _behind(service: str, status: admin_pb2.ServiceStatus, stream: str, target: int) -> list[Behind]:
    """The consumers of ``service`` on ``stream`` that still have messages up to ``target`` to apply.

    A consumer's filter may not cover every subject of the stream: up to ``target`` it has
    nothing left once it applied its filter's last message (``stream_last_sequence``)."""
    return [
        Behind(service, c, target)
        for c in status.consumers
        if c.stream == stream and c.applied_sequence < min(target, c.stream_last_sequence)
    ]


def _stuck_failure(stage: Stage, behind: Sequence[Behind]) -> WaitFailed | None:
    for b in behind:
        if b.consumer.state == STUCK:
            return WaitFailed(
                f"stage {stage.name} is stuck: {b.describe()}, no progress for "
                f"{b.consumer.stalled_seconds:.0f} s: {b.consumer.error or 'no error recorded'}"
            )
    return None


def wait_for_stage(client: Client, stage: Stage, readers: Sequence[str], deadline: float, poll_s: float) -> int:
    """Block until every reader applied the stage's writer's log as of now. Returns that sequence."""
    target = _folded(_status(client, stage.writer), stage.stream)
    while True:
        behind: list[Behind] = []
        unreachable: list[str] = []
        for reader in readers:
            try:
                behind += _behind(reader, _status(client, reader), stage.stream, target)
            except grpc.RpcError as exc:
                # A service restarting comes back and catches up from its checkpoint: wait for it.
                unreachable.append(f"{reader}: {describe_rpc_error(exc)}")
        if not behind and not unreachable:
            return target
        if (stuck := _stuck_failure(stage, behind)) is not None:
            raise stuck
        if time.monotonic() >= deadline:
            waiting = [b.describe() for b in behind] + unreachable
            raise WaitFailed(f"timed out in stage {stage.name}: {'; '.join(waiting)}")
        time.sleep(poll_s)


def wait_applied(
    client: Client,
    timeout_s: float,
    *,
    poll_s: float = 0.2,
    on_stage: Callable[[Stage, int], None] | None = None,
) -> None:
    """Wait until every stage of the pipeline applied what is on the log now; services the stack
    does not run are left out (their stages with them)."""
    running = set(client.addresses())
    deadline = time.monotonic() + timeout_s
    for stage in PIPELINE:
        readers = [r for r in stage.readers if r in running]
        if stage.writer not in running or not readers:
            continue
        target = wait_for_stage(client, stage, readers, deadline, poll_s)
        if on_stage is not None:
            on_stage(stage, target)


def wait_downstream(client: Client, timeout_s: float) -> None:
    """``wait_applied`` with each finished stage said on stderr, so that stdout keeps only a
    command's answer (``--json`` stays parseable)."""

    def done(stage: Stage, target: int) -> None:
        render.err.print(f"✓ {stage.name}: applied up to sequence {target}", soft_wrap=True)

    with render.err.status("waiting for the services downstream …"):
        wait_applied(client, timeout_s, on_stage=done)
