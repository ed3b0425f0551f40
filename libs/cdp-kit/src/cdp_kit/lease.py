"""Active/standby: one active instance of a service at a time, under a lease in a NATS KV bucket.

Several instances of a service may run (``CDP_LEASE_TTL_S`` > 0), each with a store of its own.
One holds the lease and is **active**: it consumes its inputs, decides, appends and serves its
RPCs. The others are **standbys**: they keep their stores current by replaying the log read-only
(``Processor.follow``) and wait. nats-py has no API for ADR-42 pinned consumers yet, so the lease is
a key of its own per service in the bucket ``CDP_LEASES`` (stream ``KV_CDP_LEASES``), written with
the KV compare-and-set (``Nats-Expected-Last-Subject-Sequence``), as Kubernetes' leader election
does with a Lease object:

* **acquire**: a key nobody holds is created (expected sequence 0). A held key is taken over when
  its revision has not changed for ``ttl_s`` by the standby's own monotonic clock (no two clocks
  are compared), with a compare-and-set against the revision it watched; of several standbys,
  one wins. The winner's revision is its **epoch**.
* **renew**: the active rewrites the key every ``ttl_s / 3`` against its last revision. A refused
  renewal means another instance took over: the lease is lost and the process steps down.
* **valid**: the active acts on the world (a delivery to a destination) only while its last
  renewal was *sent* less than ``0.75 * ttl_s`` ago, so an instance that was frozen (SIGSTOP, a
  long GC, a partition) never acts after a standby could have taken over.

The lease alone does not stop a deposed instance that wakes up with a decision half-made. That is
the **fence** (``Processor.fence``): the new active first appends a marker (``Cdp-Fence``) to every
subject it owns, so the deposed instance's next append fails its expected-sequence guard; folding
the log to recover, it meets the marker and steps down (``Deposed``) instead of retrying.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import nats.errors
import nats.js.errors
from nats.js import api
from nats.js.client import JetStreamContext

from cdp_kit.errors import CdpError, Conflict, Unavailable
from cdp_kit.streams import LEASE_STREAM, LEASE_SUBJECT_PREFIX
from cdp_kit.telemetry import get_logger


class _Appended(Protocol):
    @property
    def sequence(self) -> int: ...

    @property
    def duplicate(self) -> bool: ...


class EventLog(Protocol):
    """What the lease uses of ``cdp_kit.eventlog.EventLog`` (which builds on this module: provisioning
    makes the bucket)."""

    @property
    def js(self) -> JetStreamContext: ...

    async def append_raw(
        self,
        subject: str,
        data: bytes,
        *,
        msg_id: str,
        expected_last_subject_sequence: int | None = None,
        expected_last_sequence: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> _Appended: ...


log = get_logger(__name__)

# The holder a released lease names: a standby takes it at once.
RELEASED = ""
# How long, as a share of the TTL, an active may act after the last renewal it sent.
VALID_SHARE = 0.75


def lease_subject(service: str) -> str:
    return f"{LEASE_SUBJECT_PREFIX}{service}"


def lease_bucket_config(*, replicas: int = 1, memory: bool = False) -> api.StreamConfig:
    """The bucket's stream as provisioning makes it: a KV bucket keeping one revision per key."""
    return api.StreamConfig(
        name=LEASE_STREAM,
        description="which instance of each service is active (cdp_kit.lease)",
        subjects=[f"{LEASE_SUBJECT_PREFIX}>"],
        allow_direct=True,
        allow_rollup_hdrs=True,
        deny_delete=True,
        deny_purge=False,
        discard=api.DiscardPolicy.NEW,
        max_msgs_per_subject=1,
        num_replicas=replicas,
        storage=api.StorageType.MEMORY if memory else api.StorageType.FILE,
        duplicate_window=120.0,
    )


class LeaseLost(CdpError):
    """Another instance took the lease over: this one must stop acting at once."""


@dataclass(frozen=True)
class Holder:
    """The lease as last written: its revision and who wrote it."""

    revision: int
    instance: str
    epoch: int


class Lease:
    """One service's lease, as seen by one instance (``instance``)."""

    def __init__(
        self,
        eventlog: EventLog,
        service: str,
        instance: str,
        ttl_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl_s <= 0:
            raise ValueError("a lease needs a TTL above 0 s")
        self.eventlog = eventlog
        self.service = service
        self.instance = instance
        self.ttl_s = ttl_s
        self.clock = clock
        self.subject = lease_subject(service)
        self.epoch = 0  # the revision of the write that acquired it; 0 while not held
        self.revision = 0
        self._sent_at = 0.0
        self.holder: Holder | None = None  # the last holder seen (status)
        # Set by the runtime once this holder has fenced and may serve what an active serves.
        self.serving = False
        self.lost = asyncio.Event()

    @property
    def fence(self) -> str:
        """What this instance's fence marker says (``Processor.fence``)."""
        return f"{self.instance}@{self.epoch}"

    def valid(self) -> bool:
        """May this instance act on the world now (see the module docstring)?"""
        return self.epoch > 0 and not self.lost.is_set() and self.clock() - self._sent_at < VALID_SHARE * self.ttl_s

    async def read(self) -> Holder | None:
        """The lease's last revision, or None when nobody ever held it."""
        try:
            msg = await self.eventlog.js.get_last_msg(LEASE_STREAM, self.subject, direct=True)
        except nats.js.errors.NotFoundError:
            return None
        except (TimeoutError, nats.errors.ConnectionClosedError, nats.errors.NoRespondersError) as exc:
            raise Unavailable(f"reading the lease of {self.service} failed: {type(exc).__name__}") from exc
        try:
            value = json.loads(msg.data or b"{}")
            instance, epoch = str(value["instance"]), int(value["epoch"])
        except (ValueError, KeyError, TypeError):
            instance, epoch = "?", 0
        return Holder(revision=int(msg.seq or 0), instance=instance, epoch=epoch)

    async def _write(self, expected: int, epoch: int | None) -> bool:
        """Compare-and-set the key against revision ``expected``; False if someone else wrote it."""
        sent = self.clock()
        value = json.dumps({"instance": self.instance, "epoch": epoch or 0, "ttl_s": self.ttl_s}).encode()
        try:
            appended = await self.eventlog.append_raw(
                self.subject,
                value,
                msg_id=f"lease:{self.service}:{self.instance}:{expected}",
                expected_last_subject_sequence=expected,
            )
        except Conflict:  # the guard refused it (eventlog.AppendConflict): someone else wrote
            return False
        self.revision = appended.sequence
        if not appended.duplicate:  # a duplicate is an earlier send of ours that went through
            self._sent_at = sent
        return True

    async def acquire(self, poll_s: float | None = None) -> int:
        """Wait until this instance holds the lease; returns its epoch."""
        poll = poll_s if poll_s is not None else max(0.05, min(1.0, self.ttl_s / 5))
        watched: int | None = None
        since = self.clock()
        waiting_logged = False
        while True:
            try:
                holder = await self.read()
                self.holder = holder
                if (
                    holder is None
                    or holder.instance == RELEASED
                    or (holder.instance, holder.epoch) == (self.instance, 0)
                ):
                    # Nobody holds it, its holder released it (a graceful stop), or this instance
                    # died between its two writes of an acquisition: taken at once.
                    won = await self._write(holder.revision if holder else 0, None)
                elif holder.revision != watched:
                    watched, since, won = holder.revision, self.clock(), False
                    if not waiting_logged:
                        log.info("lease_standby", service=self.service, active=holder.instance, ttl_s=self.ttl_s)
                        waiting_logged = True
                elif self.clock() - since >= self.ttl_s:
                    log.warning(
                        "lease_expired_taking_over",
                        service=self.service,
                        previous=holder.instance,
                        unchanged_s=round(self.clock() - since, 2),
                    )
                    won = await self._write(holder.revision, None)
                else:
                    won = False
                if won:
                    # Write the epoch into the value (the first write could not know its revision);
                    # only then is it this instance's (until then it refuses what an active does).
                    epoch = self.revision
                    if not await self._write(self.revision, epoch):
                        continue
                    self.epoch = epoch
                    self.holder = Holder(self.revision, self.instance, self.epoch)
                    log.info("lease_acquired", service=self.service, instance=self.instance, epoch=self.epoch)
                    return self.epoch
            except Unavailable as exc:
                log.warning("lease_unavailable", service=self.service, error=exc.message)
                # What was watched says nothing of the time NATS did not answer: the active could
                # not renew either. Watch afresh, or every NATS outage longer than the TTL would
                # replace a healthy active.
                watched = None
            await asyncio.sleep(poll)

    async def release(self) -> bool:
        """Give the lease up on a graceful stop (after the last append), so a standby takes over at
        once instead of after the TTL. False when it was not held (or no longer: nothing to do)."""
        if not self.epoch or self.lost.is_set():
            return False
        value = json.dumps({"instance": RELEASED, "epoch": 0, "released_by": self.instance}).encode()
        for _attempt in range(3):
            try:
                await self.eventlog.append_raw(
                    self.subject,
                    value,
                    msg_id=f"lease:{self.service}:{self.instance}:release:{self.revision}",
                    expected_last_subject_sequence=self.revision,
                )
                break
            except Conflict as exc:
                # A renewal cancelled by the stop after it was sent may have gone through: if the
                # key is still ours, release it at its true revision.
                holder = None
                with contextlib.suppress(Unavailable):
                    holder = await self.read()
                if holder is None or (holder.instance, holder.epoch) != (self.instance, self.epoch):
                    log.warning("lease_release_failed", service=self.service, error=str(exc))
                    return False
                self.revision = holder.revision
            except Unavailable as exc:
                log.warning("lease_release_failed", service=self.service, error=str(exc))
                return False
        else:
            return False
        self.epoch = 0
        self.lost.set()
        log.info("lease_released", service=self.service, instance=self.instance)
        return True

    async def keep(self) -> None:
        """Renew every ``ttl_s / 3`` until lost (then sets ``lost`` and raises ``LeaseLost``)."""
        while True:
            # A third of the TTL after the last renewal was sent, not after its answer came back.
            await asyncio.sleep(max(self.ttl_s / 20, self._sent_at + self.ttl_s / 3 - self.clock()))
            try:
                renewed = await self._write(self.revision, self.epoch)
            except Unavailable as exc:
                log.warning("lease_renewal_failed", service=self.service, error=exc.message, valid=self.valid())
                continue
            if renewed:
                continue
            holder = None
            with contextlib.suppress(Unavailable):
                holder = await self.read()
            if holder is not None and (holder.instance, holder.epoch) == (self.instance, self.epoch):
                self.revision = holder.revision  # a renewal whose answer was lost went through
                continue
            self.lost.set()
            log.error(
                "lease_lost_stepping_down",
                service=self.service,
                instance=self.instance,
                epoch=self.epoch,
                now_held_by=holder.instance if holder else "?",
            )
            raise LeaseLost(f"{self.service}: the lease (epoch {self.epoch}) was taken over; stepping down")
