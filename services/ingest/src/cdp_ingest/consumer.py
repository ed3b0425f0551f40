"""Events published to ``cdp.collect.<dataset>``: validated exactly like PublishEvents.

Valid new events are appended to the records log; events seen before (by id, for all time,
whichever way they came) are dropped; invalid ones become the kit's dead letters (a
``MessageDeadLettered`` on ``cdp.deadletter.ingest.poison``, error class ``Rejected``, the
field errors as its error, the message's masked shape as its excerpt), so the kit's
``RedriveDeadLetters`` applies them again once the dataset or schema is fixed. A raw input:
each message reaches ``decide`` as an envelope whose payload holds the published bytes.

A reject is emitted by ``decide`` rather than raised: raising would make the processor apply
the whole fetched batch again one message at a time to find it, and invalid events are an
ordinary, steady part of a collect stream. Only a redrive (a command, no input cause) raises,
so the kit records a still-invalid event as dead again, one attempt more.

Anyone who can publish on ``cdp.collect`` reaches this code, so a message is measured before
it is parsed (``cdp_ingest.limits``): one too large (``event_size``) or nested too deep
(``depth``) is a dead letter like any invalid event, and the consumer goes on with the next.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlmodel import Session

from cdp.common.v1 import deadletter_pb2 as dl
from cdp.ingest.v1 import ingest_pb2 as pb
from cdp_ingest import store
from cdp_ingest.config import ConfigCache
from cdp_ingest.handlers import event_bytes
from cdp_ingest.limits import Limits, json_text, oversized_fields, too_deep
from cdp_ingest.privacy import Suppression, count_suppressed, index_collect, load_suppression
from cdp_ingest.records import KeyMaker, RecordBuilder, emit_records
from cdp_kit import deadletters
from cdp_kit.envelope import Cause, Envelope, deterministic_id, make_envelope
from cdp_kit.errors import NotFound
from cdp_kit.eventlog import LogMessage
from cdp_kit.identities import Normaliser
from cdp_kit.namespaces import normaliser
from cdp_kit.processor import UnitOfWork
from cdp_kit.streams import INGEST_READS_COLLECT

# Records of collected events carry no receive time of their own: a fixed one keeps replays equal.
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
PREFIX = store.COLLECT_PREFIX


class Rejected(Exception):  # its name is store.REJECTED, the dead letter's error class
    """An invalid collected event. Its text is every field error (``field: rule: message; …``):
    what the dead letter shows as its reason."""

    def __init__(self, reason: str, errors: list[pb.FieldError]) -> None:
        super().__init__("; ".join(f"{e.field}: {e.rule}: {e.message}" for e in errors) or reason)
        self.reason = reason
        self.errors = errors


class CollectHandler:
    """``prefetch`` validates and encodes every message of a fetched batch and looks up the
    event ids of all of them in one query per dataset; ``decide`` then works in memory."""

    def __init__(
        self,
        config: ConfigCache,
        limits: Limits | None = None,
        keys: KeyMaker | None = None,
        *,
        phone_region: str = "US",
    ) -> None:
        self.config = config
        self.keys = keys
        self.limits = limits or Limits()
        self.phone_region = phone_region
        self._suppression = Suppression()
        self._normaliser: Normaliser | None = None
        self._verdicts: dict[str, Verdict] = {}
        self._seen: dict[str, set[str]] = {}
        self._builders: dict[str, RecordBuilder] = {}

    def prefetch(self, session: Session, envelopes: Sequence[Envelope]) -> None:
        self._verdicts = {}
        self._seen = {}
        self._normaliser = None
        self._suppression = load_suppression(session, phone_region=self.phone_region)
        keys: dict[str, list[str]] = {}
        for env in envelopes:
            verdict = self._judge(session, env.subject_key.removeprefix(PREFIX), env.payload.value)
            self._verdicts[env.id] = verdict
            if isinstance(verdict, Accepted):
                keys.setdefault(verdict.dataset, []).append(verdict.key)
        for dataset, wanted in keys.items():
            self._seen[dataset] = store.seen_keys(session, dataset, wanted)

    def observe(self, session: Session, msg: LogMessage, env: Envelope) -> None:
        """Ingest keeps nothing of the raw message itself (what it decides is on its own logs) but
        which identities it carried, as keyed hashes: a privacy erasure finds it by them."""
        verdict = self._verdicts.get(env.id)
        if isinstance(verdict, Accepted) and verdict.identities:
            if self._normaliser is None:
                self._normaliser = normaliser(session, phone_region=self.phone_region)
            index_collect(session, msg.sequence, self._normaliser, verdict.identities)

    def decide(self, uow: UnitOfWork, msg: LogMessage, env: Envelope) -> None:
        dataset = msg.subject.removeprefix(PREFIX)
        verdict = self._verdicts.pop(env.id, None)
        if verdict is None:  # not prefetched (a handler used without the processor's prefetch)
            verdict = self._judge(uow.session, dataset, env.payload.value)
        if isinstance(verdict, Accepted):
            if self._suppression and self._suppression.match(verdict.identities) is not None:
                count_suppressed(dataset, 1)  # dropped: a privacy request suppresses the identity
                return
            seen = self._seen.get(dataset)
            if seen is None:
                seen = self._seen[dataset] = store.seen_keys(uow.session, dataset, [verdict.key])
            if verdict.key not in seen:
                seen.add(verdict.key)
                emit_records(uow, dataset, [verdict.data], [verdict.key])
            return
        if not uow.cause.stream:
            # A redrive: the kit applies the message again as a command and dead-letters what raises.
            raise verdict
        uow.emit(uow.processor.poison, [dead_letter(msg, verdict, uow.cause)])

    def _judge(self, session: Session, dataset: str, data: bytes) -> Verdict:
        try:
            return self._accept(session, dataset, data)
        except Rejected as rejected:
            return rejected

    def _accept(self, session: Session, dataset: str, data: bytes) -> Accepted:
        limits = self.limits
        if len(data) > limits.event_bytes:  # before anything else reads it
            raise _one("*", "event_size", f"event larger than {limits.event_bytes} bytes")
        try:
            target = self.config.target(session, dataset)
        except NotFound as exc:
            raise Rejected(exc.message, [pb.FieldError(field="dataset", rule="exists", message=exc.message)]) from exc
        if not target.is_event:
            raise _one("dataset", "class", f"dataset {dataset!r} holds profile records, not events")
        value = _parse(data, limits.max_depth)
        if len(data) > limits.field_bytes:  # only an event this long can hold a field this long
            over = sorted(oversized_fields(value, limits.field_bytes))
            if over:
                message = f"field larger than {limits.field_bytes} bytes"
                errors = [pb.FieldError(field=name, rule="field_size", message=message) for name in over]
                raise Rejected(f"{over[0]}: field_size: {message}", errors)
        result = target.validator(textual=False).validate(value, len(data), "message")
        if result.violations:
            errors = [pb.FieldError(field=v.field, rule=v.rule, message=v.message) for v in result.violations]
            first = result.violations[0]
            raise Rejected(f"{first.field}: {first.rule}: {first.message}", errors)
        builder = self._builders.get(dataset)
        if builder is None:
            builder = self._builders[dataset] = RecordBuilder(dataset, pb.SCHEMA_CLASS_EVENT, "", EPOCH, keys=self.keys)
        return Accepted(
            dataset, builder.key_of(result.event_id), event_bytes(builder, result), tuple(result.identities)
        )


def dead_letter(msg: LogMessage, rejected: Rejected, cause: Cause) -> Envelope:
    """The kit's dead letter of a rejected message: what the processor would write had it raised."""
    consumer = INGEST_READS_COLLECT.name
    letter = deadletters.describe(consumer, msg, rejected)
    return make_envelope(
        dl.MessageDeadLettered(dead_letter=letter, attempt=0),
        event_id=deterministic_id("dead-letter", consumer, msg.sequence, 0),
        subject_key=consumer,
        occurred_at=msg.stored_at or EPOCH,
        cause=cause,
    )


@dataclass(frozen=True)
class Accepted:
    dataset: str
    key: str
    data: bytes
    identities: tuple[tuple[str, str], ...] = ()


Verdict = Accepted | Rejected


def _one(field: str, rule: str, message: str) -> Rejected:
    return Rejected(f"{field}: {rule}: {message}", [pb.FieldError(field=field, rule=rule, message=message)])


def _parse(data: bytes, max_depth: int) -> dict[str, Any]:
    """The event's JSON object; its depth is measured on the text before ``json.loads`` runs
    (which would raise ``RecursionError`` on a deep enough one and stop the consumer)."""
    try:
        text = json_text(data)
    except UnicodeDecodeError:
        raise _one("*", "encoding", "invalid UTF-8") from None
    if too_deep(text, max_depth):
        raise _one("*", "depth", f"nesting deeper than {max_depth}")
    try:
        value = json.loads(text)
    except ValueError as exc:
        msg = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        raise _one("*", "json", f"not valid JSON: {msg}") from None
    if not isinstance(value, dict):
        raise _one("*", "json", f"an event is a JSON object, not {type(value).__name__}")
    return value
