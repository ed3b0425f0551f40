"""The event log: JetStream streams behind a small adapter.

Appends are de-duplicated by ``Nats-Msg-Id`` (the batch's deterministic id) and guarded
with ``Nats-Expected-Last-Subject-Sequence`` (one writer per subject), so a stale or
duplicated writer is refused instead of forking the log. Reads start from any sequence.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api
from nats.js.client import JetStreamContext

from cdp_kit.envelope import EncodedEnvelope, Envelope, decode_batch, encode_batch, utcnow
from cdp_kit.errors import CdpError, Conflict, Unavailable
from cdp_kit.lease import lease_bucket_config
from cdp_kit.natsauth import NatsAuth, getter_name
from cdp_kit.natsserver import cluster_urls
from cdp_kit.streams import ALL_STREAMS, ConsumerSpec, StreamSpec
from cdp_kit.telemetry import get_logger
from cdp_kit.vault import key_bucket_config

log = get_logger(__name__)


class _TlsEofNotice(logging.Filter):
    """Drops asyncio's warning, at each close of a TLS connection, that nats-py's protocol asks to
    keep it half-open (``eof_received`` returns True), which TLS cannot do: harmless, and it
    would add a line to every service's log at every shutdown."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "eof_received() has no effect when using ssl" not in record.getMessage()


logging.getLogger("asyncio").addFilter(_TlsEofNotice())

WRONG_LAST_SEQUENCE = 10071
# JetStream API error codes of a message that is not there (erased already, or never was).
NO_MESSAGE_FOUND = 10037
SEQUENCE_NOT_FOUND = 10043
MSG_ID = "Nats-Msg-Id"
EXPECTED_LAST_SUBJECT_SEQUENCE = "Nats-Expected-Last-Subject-Sequence"
EXPECTED_LAST_SEQUENCE = "Nats-Expected-Last-Sequence"


class AppendConflict(Conflict):
    """The expected-sequence guard refused an append: another writer got there first."""


class AppendRefused(Unavailable):
    """JetStream refused an append for a reason of its own (a stream limit, storage, a payload limit
    below what the kit assumes). Not the input's fault: the work waits, retried and shown as stuck,
    until an operator fixes the server; it is never dead-lettered."""


class StreamMissing(Unavailable):
    """A stream a service needs was not provisioned (it waits and retries: provisioning may follow)."""


class DuplicateAppend(AppendConflict):
    """JetStream already holds a message with this ``Nats-Msg-Id``: what we would append is on the log."""


DRAIN_TIMEOUT_S = 5
# NATS' default max_payload is 1 MiB; one cause's events travel in one message below this.
MAX_MESSAGE_BYTES = 1024 * 1024 - 4096
# At most this many messages per pull request of ``EventLog.read`` (at most 32 MiB in flight). A
# pull request's messages that arrive after its fetch returned wait on the socket while the reader
# applies what it got; megabytes of them stalled the server's writes past its deadline and the
# server dropped the connection (seen when a rebuild read 1,024-message batches of ~1 MiB).
READ_FETCH_MESSAGES = 32
# Fetches in a row that may deliver nothing while messages are pending before a read gives up,
# and how long each fetch waits.
READ_STALLS = 6
READ_FETCH_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Appended:
    sequence: int
    duplicate: bool


@dataclass(frozen=True)
class LogMessage:
    """One message of a stream with the events it carries."""

    stream: str
    sequence: int
    subject: str
    headers: Mapping[str, str]
    data: bytes
    pending: int = 0
    # When JetStream stored the message (the log's own clock, so replays see the same time).
    stored_at: datetime | None = None
    _events: list[Envelope] = field(default_factory=list, repr=False)

    def events(self) -> list[Envelope]:
        if not self._events and self.data:
            self._events.extend(decode_batch(self.data))
        return self._events


def to_log_message(msg: Msg) -> LogMessage:
    meta = msg.metadata
    return LogMessage(
        stream=meta.stream,
        sequence=meta.sequence.stream,
        subject=msg.subject,
        headers=dict(msg.headers or {}),
        data=msg.data,
        pending=meta.num_pending,
        stored_at=meta.timestamp,
    )


class EventLog:
    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()

    @classmethod
    async def connect(
        cls, url: str, name: str, *, connect_timeout: float = 5.0, auth: NatsAuth | None = None
    ) -> EventLog:
        """Connect as ``auth``'s user over TLS when it names an authority (anonymous, plain TCP without).

        ``url`` may list a cluster's nodes, comma-separated: the client connects to one and
        fails over to another when it is lost (it also learns the others from the server)."""

        async def quiet(exc: Exception) -> None:
            log.debug("nats_client_error", error=str(exc))

        # Reconnect for ever once connected; the first connect is bounded so callers can retry.
        nc = Client()
        try:
            await asyncio.wait_for(
                nc.connect(
                    cluster_urls(url),
                    name=name,
                    connect_timeout=max(1, int(connect_timeout)),
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=1,
                    # Closing drains the subscriptions; one left holding delivered messages nobody
                    # will take (a fetch cut short, e.g. by a process frozen and deposed) would hold
                    # shutdown for nats-py's default 30 s. What is not acknowledged is redelivered.
                    drain_timeout=DRAIN_TIMEOUT_S,
                    error_cb=quiet,
                    **(auth or NatsAuth()).connect_options(),
                ),
                timeout=connect_timeout,
            )
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            await nc.close()
            refused = "authorization" in str(exc).lower()
            why = "the server refused the credentials" if refused else type(exc).__name__
            raise Unavailable(f"cannot reach NATS at {url}: {why}") from exc
        return cls(nc)

    async def close(self) -> None:
        if not self.nc.is_closed:
            await self.nc.drain()

    @property
    def connected(self) -> bool:
        return bool(self.nc.is_connected)

    async def ensure_streams(
        self, specs: tuple[StreamSpec, ...] = ALL_STREAMS, *, replicas: int = 1, memory: bool = False
    ) -> None:
        for spec in specs:
            config = api.StreamConfig(
                name=spec.name,
                subjects=list(spec.subjects),
                description=spec.description,
                storage=api.StorageType.MEMORY if memory else api.StorageType.FILE,
                num_replicas=replicas,
                # JetStream refuses a duplicate window longer than the retention.
                duplicate_window=min(spec.duplicate_window_s, spec.max_age_s or spec.duplicate_window_s),
                max_age=spec.max_age_s,
                retention=api.RetentionPolicy.LIMITS,
                allow_direct=True,
            )
            await self._add_or_update(config)
        if {spec.name for spec in specs} >= {spec.name for spec in ALL_STREAMS}:  # the whole platform's
            # The per-identity key bucket of crypto-shredding (cdp_kit.vault) and the bucket of
            # active/standby leases (cdp_kit.lease): made by provisioning, like the streams.
            await self._add_or_update(key_bucket_config(replicas=replicas, memory=memory))
            await self._add_or_update(lease_bucket_config(replicas=replicas, memory=memory))

    async def _add_or_update(self, config: api.StreamConfig) -> None:
        try:
            await self.js.add_stream(config)
        except nats.js.errors.BadRequestError:
            await self.js.update_stream(config)

    async def verify_streams(self, specs: Iterable[StreamSpec]) -> None:
        """Check that the streams exist (services never create them: ``cdp admin provision`` does)."""
        for spec in specs:
            try:
                await self.js.stream_info(spec.name)
            except nats.js.errors.NotFoundError:
                raise StreamMissing(
                    f"stream {spec.name} does not exist: provision the streams with `cdp admin provision` "
                    "(admin credentials) before starting the services"
                ) from None
            except (TimeoutError, nats.errors.ConnectionClosedError, nats.errors.NoRespondersError) as exc:
                raise Unavailable(f"stream info of {spec.name} failed: {type(exc).__name__}") from exc

    async def append(
        self,
        subject: str,
        events: Sequence[Envelope | EncodedEnvelope],
        *,
        msg_id: str,
        expected_last_subject_sequence: int | None = None,
        expected_last_sequence: int | None = None,
        headers: Mapping[str, str] | None = None,
        recorded_at: datetime | None = None,
    ) -> Appended:
        data = encode_batch(events, recorded_at or utcnow())
        return await self.append_raw(
            subject,
            data,
            msg_id=msg_id,
            expected_last_subject_sequence=expected_last_subject_sequence,
            expected_last_sequence=expected_last_sequence,
            headers=headers,
        )

    async def append_raw(
        self,
        subject: str,
        data: bytes,
        *,
        msg_id: str,
        expected_last_subject_sequence: int | None = None,
        expected_last_sequence: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Appended:
        hdrs = dict(headers or {})
        hdrs[MSG_ID] = msg_id
        if expected_last_subject_sequence is not None:
            hdrs[EXPECTED_LAST_SUBJECT_SEQUENCE] = str(expected_last_subject_sequence)
        if expected_last_sequence is not None:
            hdrs[EXPECTED_LAST_SEQUENCE] = str(expected_last_sequence)
        try:
            ack = await self.js.publish(subject, data, headers=hdrs, timeout=10.0)
        except nats.js.errors.APIError as exc:
            if exc.err_code == WRONG_LAST_SEQUENCE:
                raise AppendConflict(f"append to {subject} refused: {exc.description}") from exc
            raise AppendRefused(f"append to {subject} failed: {exc.description}") from exc
        except nats.errors.MaxPayloadError as exc:
            message = f"append to {subject} refused: {len(data)} bytes exceed the server's max_payload"
            raise AppendRefused(message) from exc
        except (TimeoutError, nats.errors.ConnectionClosedError, nats.errors.NoRespondersError) as exc:
            raise Unavailable(f"append to {subject} failed: {type(exc).__name__}") from exc
        return Appended(sequence=ack.seq, duplicate=bool(ack.duplicate))

    async def last_sequence(self, stream: str, subject: str | None = None) -> int:
        """Last sequence of the stream, or of the last message on one exact subject (0 if none)."""
        if subject is None:
            info = await self.js.stream_info(stream)
            return int(info.state.last_seq)
        try:
            # The direct form names the subject in the request subject, where permissions apply.
            msg = await self.js.get_last_msg(stream, subject, direct=True)
        except nats.js.errors.NotFoundError:
            return 0
        return msg.seq or 0

    async def erase(self, stream: str, sequence: int) -> bool:
        """Delete one message by sequence, its bytes overwritten (JetStream's ``MSG.DELETE`` without
        ``no_erase``: a secure erase). False when it was gone already; idempotent."""
        try:
            return bool(await self.js.delete_msg(stream, sequence))
        except nats.js.errors.NotFoundError:
            return False
        except nats.js.errors.APIError as exc:
            if exc.err_code in (NO_MESSAGE_FOUND, SEQUENCE_NOT_FOUND):
                return False
            raise AppendRefused(f"erasing {stream} #{sequence} failed: {exc.description}") from exc
        except (TimeoutError, nats.errors.ConnectionClosedError, nats.errors.NoRespondersError) as exc:
            raise Unavailable(f"erasing {stream} #{sequence} failed: {type(exc).__name__}") from exc

    async def message(self, stream: str, sequence: int, via: ConsumerSpec | None = None) -> LogMessage:
        """One stored message by its stream sequence (a redrive reads its dead letter back).

        With ``via`` (an input) it is read through that input's named getter consumer, filtered
        on the input's subject: what a service may do (a get by sequence names no subject, so
        it is the admin's alone)."""
        if via is not None:
            reader = self.read(stream, via.filter_subject, sequence, batch=1, name=getter_name(via.name))
            async with contextlib.aclosing(reader):
                async for msg in reader:
                    if msg.sequence == sequence:
                        return msg
                    break
            raise CdpError(f"{stream} holds no message {sequence} on {via.filter_subject} (removed by limits?)")
        try:
            raw = await self.js.get_msg(stream, sequence)
        except nats.js.errors.NotFoundError as exc:
            raise CdpError(f"{stream} holds no message {sequence} (removed by the stream's limits?)") from exc
        except (TimeoutError, nats.errors.ConnectionClosedError, nats.errors.NoRespondersError) as exc:
            raise Unavailable(f"reading {stream} message {sequence} failed: {type(exc).__name__}") from exc
        return LogMessage(
            stream=stream,
            sequence=sequence,
            subject=raw.subject or "",
            headers=dict(raw.headers or {}),
            data=raw.data or b"",
            stored_at=raw.time,
        )

    async def read(
        self, stream: str, subject_filter: str, from_sequence: int = 1, *, batch: int = 256, name: str | None = None
    ) -> AsyncGenerator[LogMessage, None]:
        """Every message on ``subject_filter`` from ``from_sequence`` up to the end as of the call.

        ``name`` names the (ephemeral) consumer read through: a service's permissions admit only
        its own names (``cdp_kit.natsauth.reader_name``); one left by a reader that died is replaced."""
        if name is not None:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await self.js.delete_consumer(stream, name)
        config = api.ConsumerConfig(
            name=name,
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=max(1, from_sequence),
            ack_policy=api.AckPolicy.NONE,
            filter_subject=subject_filter,
            # The reader may spend long between fetches applying what it read (a rebuild of a
            # big log): the consumer must outlive that. It is deleted explicitly when done.
            inactive_threshold=3600.0,
            mem_storage=True,
        )
        if name is None:
            sub = await self.js.pull_subscribe(subject_filter, stream=stream, config=config)
        else:
            await self.js.add_consumer(stream, config=config)
            sub = await self.js.pull_subscribe_bind(durable=name, stream=stream)
        info = await sub.consumer_info()
        if name is not None and info.config.opt_start_seq != config.opt_start_seq:
            # Another process replaced the consumer of this name between our create and bind
            # (e.g. two standbys following one log): what it delivers is not what we asked for.
            await sub.unsubscribe()
            raise Unavailable(f"reading {stream}: the reader {name} was replaced by another process; read again")
        delivered = stalls = 0
        try:
            remaining = info.num_pending or 0
            while remaining > 0:
                try:
                    msgs = await sub.fetch(min(batch, remaining, READ_FETCH_MESSAGES), timeout=READ_FETCH_TIMEOUT_S)
                except TimeoutError:  # nats.errors.TimeoutError and asyncio.TimeoutError are ones too
                    stalls += 1
                    if stalls >= READ_STALLS:
                        raise Unavailable(
                            f"reading {stream} stalled: {remaining} messages pending, none delivered "
                            f"in {stalls} fetches of {READ_FETCH_TIMEOUT_S:g} s"
                        ) from None
                    continue
                stalls = 0
                for msg in msgs:
                    # The consumer numbers its deliveries 1, 2, 3...: a gap means messages were
                    # delivered (and, unacknowledged, counted as read) but never reached us.
                    if msg.metadata.sequence.consumer != delivered + 1:
                        raise Unavailable(
                            f"reading {stream} lost messages after delivery {delivered} (got delivery "
                            f"{msg.metadata.sequence.consumer}): read again from the last checkpoint"
                        )
                    delivered += 1
                    item = to_log_message(msg)
                    remaining = item.pending
                    yield item
        finally:
            await sub.unsubscribe()
            with contextlib.suppress(nats.errors.Error):
                await self.js.delete_consumer(stream, info.name)

    async def durable(self, spec: ConsumerSpec, start_sequence: int) -> DurableReader:
        """(Re)create a durable consumer positioned at ``start_sequence``: the store's checkpoint is the truth."""
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await self.js.delete_consumer(spec.stream.name, spec.name)
        config = api.ConsumerConfig(
            durable_name=spec.name,
            name=spec.name,
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=max(1, start_sequence),
            # Acknowledging one message acknowledges every earlier one: a consumer applies in order,
            # so one confirmed ack per applied batch settles it, and an ack lost with a dropped
            # connection is made good by the next one instead of waiting out ack_wait.
            ack_policy=api.AckPolicy.ALL,
            ack_wait=300.0,
            max_deliver=-1,
            max_ack_pending=20_000,
            filter_subject=spec.filter_subject,
        )
        await self.js.add_consumer(spec.stream.name, config=config)
        sub = await self.js.pull_subscribe_bind(durable=spec.name, stream=spec.stream.name)
        reader = DurableReader(spec, sub, self.nc, max(1, start_sequence))
        # Retention (max_age) or a deletion removed history this consumer had not applied: the
        # consumer starts at the first message left. Not a gap to re-read (nothing can bring it
        # back), but never silent: the caller reports it.
        info = await self.js.stream_info(spec.stream.name)
        first = int(info.state.first_seq or 0)
        if first > max(1, start_sequence):
            reader.aged_out = first - max(1, start_sequence)
        return reader

    async def consumer_lag(self, spec: ConsumerSpec) -> tuple[int, int] | None:
        """(delivered-and-acked stream sequence, messages not yet acked) of a durable consumer."""
        try:
            info = await self.js.consumer_info(spec.stream.name, spec.name)
        except nats.js.errors.NotFoundError:
            return None
        return int(info.ack_floor.stream_seq or 0), int(info.num_pending or 0) + int(info.num_ack_pending or 0)


# What one pull request of a durable reader may bring, in bytes. The server buffers a request's
# messages for the client and drops a client holding more than its max_pending (64 MiB) as a slow
# consumer: 256 wide-row messages of ~0.8 MB did that over and over (each drop a gap re-read). The
# reader counts its next request from the size of what it last got, starting from the worst case.
FETCH_BUDGET_BYTES = 16 * 1024 * 1024


class DeliveryGap(Unavailable):
    """A durable consumer delivered messages that never reached this reader (a dropped
    connection, a server restart, a client-side slow-consumer drop). Nothing past the gap may
    be applied: the consumer is re-created at the store's checkpoint and reads again."""


class DurableReader:
    """Reads one durable pull consumer, strictly in order and without gaps.

    JetStream numbers a consumer's deliveries 1, 2, 3... (redeliveries included), and the
    consumer is created afresh at the store's checkpoint, so an unbroken run of delivery
    numbers from 1 means every message past the checkpoint reached us, in stream order. A
    filtered consumer's stream sequences are not contiguous, so the delivery number is what
    is checked. A break raises ``DeliveryGap`` before any message behind it is returned.
    """

    def __init__(self, spec: ConsumerSpec, sub: JetStreamContext.PullSubscription, nc: Client, start: int = 0) -> None:
        self.spec = spec
        self.sub = sub
        self.nc = nc
        self.start = start  # where this reader created the consumer (0: not checked)
        self._verified = start == 0
        self.delivered = 0
        # Stream messages (of any subject) between the start asked for and the stream's first
        # message when the consumer was created: history gone before this consumer read it.
        self.aged_out = 0
        # Deliveries the consumer reported as sent when a fetch last brought nothing.
        self.owed = 0
        # The last message acknowledged (the consumer acknowledges all below it), and whether the
        # server's ack floor was found short of it at the last fetch that brought nothing.
        self._acked: Msg | None = None
        self._acked_delivery = 0
        self._ack_unsettled = False
        self._message_bytes = MAX_MESSAGE_BYTES  # until a fetch says what this input's messages weigh

    def fetch_count(self, batch: int) -> int:
        """How many messages to ask for: ``batch``, or fewer when they would exceed the byte budget."""
        return max(1, min(batch, FETCH_BUDGET_BYTES // self._message_bytes))

    async def ack(self, raw: Msg) -> None:
        """Acknowledge ``raw`` and every delivery before it (one publish, not waited for: an ack lost
        with a dropped connection is made good by the next one, or, at the end of the stream, by
        ``fetch`` once it finds the server's ack floor still short of it)."""
        await raw.ack()
        self._acked, self._acked_delivery = raw, raw.metadata.sequence.consumer

    async def fetch(self, batch: int, timeout: float) -> list[tuple[LogMessage, Msg]]:
        try:
            msgs = await self.sub.fetch(self.fetch_count(batch), timeout=timeout)
        except TimeoutError:  # nats.errors.TimeoutError and asyncio.TimeoutError alike: nothing came
            # Deliveries lost at the end of the stream have no later delivery to reveal them: they
            # would only come back after ack_wait. So ask how many the consumer has delivered. One
            # sent just now may still be on its way: a shortfall is a gap when it is still there at
            # the next fetch that brings nothing.
            if self.delivered < self.owed:
                raise DeliveryGap(
                    f"{self.spec.name} lost deliveries after {self.delivered} (the consumer had delivered "
                    f"{self.owed}, they never came): reading again from the checkpoint"
                ) from None
            info = await self.sub.consumer_info()
            self.owed = (info.delivered.consumer_seq or 0) if info.delivered is not None else 0
            await self._settle((info.ack_floor.consumer_seq or 0) if info.ack_floor is not None else 0)
            return []
        items = []
        for msg in msgs:
            delivery = msg.metadata.sequence.consumer
            if delivery != self.delivered + 1:
                raise DeliveryGap(
                    f"{self.spec.name} lost deliveries after {self.delivered} (got delivery {delivery}, "
                    f"stream sequence {msg.metadata.sequence.stream}): reading again from the checkpoint"
                )
            self.delivered = delivery
            items.append((to_log_message(msg), msg))
        if msgs:
            self._message_bytes = max(1024, sum(len(m.data) for m in msgs) // len(msgs))
        if msgs and not self._verified:
            # The consumer is shared by name: another process (a deposed instance, cdp_kit.lease)
            # may have re-created it at its own checkpoint before these first deliveries. Its
            # numbering would start at 1 too, so ask where the consumer started, once.
            info = await self.sub.consumer_info()
            if info.config.opt_start_seq != self.start:
                raise DeliveryGap(
                    f"{self.spec.name} was re-created by another process (at {info.config.opt_start_seq}, "
                    f"not {self.start}): reading again from the checkpoint"
                )
            self._verified = True
        return items

    async def _settle(self, ack_floor: int) -> None:
        """Send the last ack again if the server's ack floor stayed short of it for two idle fetches
        (the first may have looked before the ack arrived): otherwise JetStream keeps those messages
        pending, and redelivers them, only after ack_wait."""
        short = self._acked is not None and ack_floor < self._acked_delivery
        if short and self._ack_unsettled and self._acked is not None and self._acked.reply:
            await self.nc.publish(self._acked.reply, b"")
        self._ack_unsettled = short

    async def close(self) -> None:
        await asyncio.shield(self.sub.unsubscribe())
