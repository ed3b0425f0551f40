"""Garbage on every subject a service consumes, through the real stack.

For each consumed subject, five kinds of bytes no writer would publish (random bytes, a truncated
envelope batch, an envelope of the subject's type holding another payload, 1 MiB, deeply nested JSON).
After each: every service is SERVING, a valid message behind the garbage is applied (its effect is
visible through the services' gRPC APIs), and the consumer(s) name the garbage in a dead letter
(stream, sequence, error class). Every subject but ``cdp.collect.*`` is some service's own log:
its next append there is refused by the guard, and the writer sets the foreign bytes aside as
``own:<log>`` and goes on. On ``cdp.collect.<dataset>`` the garbage is an invalid event: ingest
records it in its own dead letters.
"""

from __future__ import annotations

import csv
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, struct_pb2

from cdp.activation.v1 import activation_pb2 as act
from cdp.common.v1.envelope_pb2 import IdentityValue
from cdp.identity.v1 import events_pb2 as identity_ev
from cdp.identity.v1 import identity_pb2 as id_pb
from cdp.ingest.v1 import events_pb2 as ingest_ev
from cdp.ingest.v1 import ingest_pb2 as ing
from cdp.segmentation.v1 import events_pb2 as seg_ev
from cdp.segmentation.v1 import segmentation_pb2 as seg
from cdp_cli.client import SERVICES, Client
from cdp_cli.skeleton import WEB_SCHEMA, ensure_datasets, retrying
from cdp_cli.stack import Stack
from cdp_kit.envelope import Cause, encode_batch, make_envelope
from tests.e2e.chain import dead_letters, healths, publish, read_log, wait_for
from tests.integration.test_processor import T0

pytestmark = pytest.mark.e2e
FOLDER = "fuzz"
SEGMENT = "all_web"
EFFECT_TIMEOUT_S = 60.0


@dataclass
class Fuzzed:
    stack: Stack
    client: Client
    counter: int = 0

    def next(self) -> int:
        self.counter += 1
        return self.counter


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    root = tmp_path_factory.mktemp("fuzz")
    with (
        Stack(root / "cdp", ready_timeout_s=120.0) as stack,
        Client(stack.data_dir, addresses=stack.addresses) as client,
    ):
        ensure_datasets(client, {"web": WEB_SCHEMA})
        retrying(partial(client.segmentation.CreateSegment, seg.CreateSegmentRequest(name=SEGMENT, query="has cookie")))
        config = struct_pb2.Struct()
        config.update({"folder": FOLDER, "format": "csv"})
        destination = act.Destination(
            name="fuzz_drop", connector="file_export", config=config, marketing_action="email_marketing"
        )
        retrying(lambda: client.activation.CreateDestination(act.CreateDestinationRequest(destination=destination)))
        activate = act.ActivateRequest(destination="fuzz_drop", segment=SEGMENT, identities=["email"])
        activate.schedule = "streaming"
        wait_for("activation to know the segment", partial(_known, client, activate), EFFECT_TIMEOUT_S)
        yield Fuzzed(stack, client)


def _known(client: Client, request: act.ActivateRequest) -> bool | None:
    try:
        client.activation.Activate(request)
    except grpc.RpcError as err:
        if isinstance(err, grpc.Call) and err.code() == grpc.StatusCode.NOT_FOUND:
            return None
        raise
    return True


# ----------------------------------------------------------------------------- the garbage

KINDS = ["random_bytes", "truncated_batch", "wrong_payload_type", "one_mib", "deep_json"]


def garbage(kind: str, event_type: str, seed: int) -> bytes:
    rng = random.Random(seed)
    if kind == "random_bytes":
        return rng.randbytes(rng.randint(1, 400))
    if kind == "truncated_batch":
        env = make_envelope(IdentityValue(namespace="x", value="y" * 200), **_meta(seed))
        env.type = event_type
        whole = encode_batch([env], T0)
        return whole[: len(whole) // 2]
    if kind == "wrong_payload_type":
        # Says it is the subject's event type; holds another message.
        env = make_envelope(IdentityValue(namespace="cookie", value=f"wrong-{seed}"), **_meta(seed))
        env.type = event_type
        return encode_batch([env], T0)
    if kind == "one_mib":
        return rng.randbytes(1024 * 1024)
    if kind == "deep_json":
        return b'{"a":' * 100_000 + b"1" + b"}" * 100_000
    raise AssertionError(kind)


def _meta(seed: int) -> dict[str, Any]:
    return {"event_id": f"fuzz-{seed}", "subject_key": "fuzz", "occurred_at": T0, "cause": Cause(command_id="fuzz")}


# ----------------------------------------------------------------------------- valid messages and their effects


def web_event(n: int) -> dict[str, Any]:
    return {
        "event_id": f"fuzz-login-{n}",
        "ts": f"2026-11-01T10:{n % 60:02d}:00Z",
        "type": "login",
        "cookie_id": f"ck-fuzz-{n}",
        "email": f"fuzz.{n}@example.com",
    }


def publish_event(client: Client, n: int) -> None:
    request = ing.PublishEventsRequest(dataset="web")
    request.events.add().update(web_event(n))
    reply = retrying(partial(client.ingest.PublishEvents, request))
    assert [r.status for r in reply.results] == [ing.EVENT_STATUS_ACCEPTED], reply


def profile_exists(client: Client, n: int) -> bool | None:
    request = seg.GetProfileRequest(identity=IdentityValue(namespace="cookie", value=f"ck-fuzz-{n}"))
    try:
        client.segmentation.GetProfile(request)
    except grpc.RpcError as err:
        if isinstance(err, grpc.Call) and err.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
            return None
        raise
    return True


def exported(stack: Stack, n: int) -> bool | None:
    """The person is in activation's export of the segment (it applied their profile and membership)."""
    path = stack.data_dir / "exports" / FOLDER / f"{SEGMENT}.csv"
    if not path.exists():
        return None
    rows = list(csv.reader(path.open(newline="")))
    return True if any(f"fuzz.{n}@example.com" in row for row in rows) else None


def through_the_chain(f: Fuzzed, n: int) -> None:
    """A valid event through ingest's gRPC API: identity, segmentation and activation all apply it."""
    publish_event(f.client, n)
    wait_for(f"profile {n} in segmentation", lambda: profile_exists(f.client, n), EFFECT_TIMEOUT_S)
    wait_for(f"person {n} exported by activation", lambda: exported(f.stack, n), EFFECT_TIMEOUT_S)


def through_collect(f: Fuzzed, n: int) -> None:
    publish(f.stack, "cdp.collect.web", json_format.MessageToJson(_struct(web_event(n))).encode())
    wait_for(f"profile {n} in segmentation", lambda: profile_exists(f.client, n), EFFECT_TIMEOUT_S)


def _struct(value: dict[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(value)
    return out


def new_schema(f: Fuzzed, n: int) -> None:
    """A schema through ingest; segmentation learns its attribute from ingest's config log."""
    schema = {
        "name": f"extra_{n}",
        "schema_class": "SCHEMA_CLASS_PROFILE",
        "fields": [
            {"name": "crm_id", "type": "FIELD_TYPE_STRING", "identity_namespace": "crm_id", "required": True},
            {"name": f"attr_{n}", "type": "FIELD_TYPE_STRING"},
        ],
    }
    request = ing.CreateSchemaRequest(schema=json_format.ParseDict(schema, ing.Schema()))
    retrying(partial(f.client.ingest.CreateSchema, request))

    def known() -> bool | None:
        try:
            retrying(partial(f.client.segmentation.ExplainQuery, seg.ExplainQueryRequest(query=f'attr_{n} = "x"')))
        except grpc.RpcError as err:
            if isinstance(err, grpc.Call) and err.code() == grpc.StatusCode.INVALID_ARGUMENT:
                return None
            raise
        return True

    wait_for(f"segmentation to know attr_{n}", known, EFFECT_TIMEOUT_S)


def new_namespace(f: Fuzzed, n: int) -> None:
    """A namespace through identity; ingest learns it from identity's config log (a schema naming it
    is refused until then), and segmentation's reader of that log must drain past the garbage too."""
    name = f"fuzz_ns_{n}"
    create = id_pb.CreateNamespaceRequest(name=name, type=id_pb.NAMESPACE_TYPE_CUSTOM)
    retrying(partial(f.client.identity.CreateNamespace, create))
    schema = {
        "name": f"keyed_{n}",
        "schema_class": "SCHEMA_CLASS_PROFILE",
        "fields": [{"name": "key", "type": "FIELD_TYPE_STRING", "identity_namespace": name, "required": True}],
    }
    request = ing.CreateSchemaRequest(schema=json_format.ParseDict(schema, ing.Schema()))
    retrying(partial(f.client.ingest.CreateSchema, request))


def new_segment(f: Fuzzed, n: int) -> None:
    """A segment through segmentation; activation learns it from segmentation's config log."""
    name = f"fuzz_{n}"
    retrying(partial(f.client.segmentation.CreateSegment, seg.CreateSegmentRequest(name=name, query="has email")))
    request = act.ActivateRequest(destination="fuzz_drop", segment=name, identities=["email"], schedule="streaming")
    wait_for(f"activation to know {name}", partial(_known, f.client, request), EFFECT_TIMEOUT_S)


@dataclass(frozen=True)
class Subject:
    subject: str
    stream: str
    event_type: str
    consumers: dict[str, str]  # service -> consumer that must dead-letter the garbage
    own: tuple[str, str] | None  # (writer service, own log) that sets the garbage aside
    valid: Callable[[Fuzzed, int], None]


SUBJECTS = [
    Subject("cdp.collect.web", "CDP_COLLECT", "", {}, None, through_collect),
    Subject(
        "cdp.ingest.0.records",
        "CDP_INGEST",
        ingest_ev.RecordAccepted.DESCRIPTOR.full_name,
        {"identity": "identity-ingest"},
        ("ingest", "own:ingest-records"),
        through_the_chain,
    ),
    Subject(
        "cdp.profile.0.fragments",
        "CDP_PROFILE",
        identity_ev.ProfileFragment.DESCRIPTOR.full_name,
        {"segmentation": "segmentation-profile", "activation": "activation-profile"},
        ("identity", "own:identity-fragments"),
        through_the_chain,
    ),
    Subject(
        "cdp.audience.0.memberships",
        "CDP_AUDIENCE",
        seg_ev.MembershipChanged.DESCRIPTOR.full_name,
        {"activation": "activation-audience"},
        ("segmentation", "own:segmentation-memberships"),
        through_the_chain,
    ),
    Subject(
        "cdp.config.ingest",
        "CDP_CONFIG",
        ingest_ev.SchemaRegistered.DESCRIPTOR.full_name,
        {"segmentation": "segmentation-config-ingest"},
        ("ingest", "own:ingest-config"),
        new_schema,
    ),
    Subject(
        "cdp.config.identity",
        "CDP_CONFIG",
        identity_ev.NamespaceCreated.DESCRIPTOR.full_name,
        {"ingest": "ingest-config-identity", "segmentation": "segmentation-config-identity"},
        ("identity", "own:identity-config"),
        new_namespace,
    ),
    Subject(
        "cdp.config.segmentation",
        "CDP_CONFIG",
        seg_ev.SegmentDefined.DESCRIPTOR.full_name,
        {"activation": "activation-config-segmentation"},
        ("segmentation", "own:segmentation-config"),
        new_segment,
    ),
]


def letter_for(f: Fuzzed, service: str, consumer: str, stream: str, sequence: int) -> Any:
    def found() -> Any:
        for letter in dead_letters(f.client, service, consumer):
            if letter.stream == stream and letter.sequence == sequence:
                return letter
        return None

    return wait_for(f"{service} to dead-letter {stream} {sequence} as {consumer}", found, EFFECT_TIMEOUT_S)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("target", SUBJECTS, ids=[s.subject for s in SUBJECTS])
def test_garbage_on_a_consumed_subject_is_set_aside_and_what_follows_is_applied(
    fuzzed: Fuzzed, target: Subject, kind: str
) -> None:
    f = fuzzed
    n = f.next()
    data = garbage(kind, target.event_type, n)
    sequence = publish(f.stack, target.subject, data)

    target.valid(f, n)

    assert healths(f.client) == dict.fromkeys(SERVICES, "SERVING")
    if target.stream == "CDP_COLLECT":
        letters = retrying(lambda: f.client.ingest.ListDeadLetters(ing.ListDeadLettersRequest(dataset="web")))
        [letter] = [d for d in letters.dead_letters if d.sequence == sequence]
        assert letter.subject == target.subject
        assert letter.reason
        if kind == "deep_json":  # measured before any parser recursed
            assert "depth" in letter.reason
        return
    for service, consumer in target.consumers.items():
        letter = letter_for(f, service, consumer, target.stream, sequence)
        assert letter.error_class, letter
        assert letter.subject == target.subject
        assert letter.size_bytes == len(data)
    assert target.own is not None
    writer, own = target.own
    if target.subject == "cdp.ingest.0.records" and kind == "wrong_payload_type":
        return  # ingest folds a record only by its envelope's id and subject_key, never its payload: harmless

    aside = letter_for(f, writer, own, target.stream, sequence)
    assert aside.error_class, aside


def test_the_chain_carries_the_person_sealed_and_still_exports_them(fuzzed: Fuzzed) -> None:
    """Crypto-shredding through the running stack (its NATS users and permissions): ingest seals the
    record, identity its fragment, activation its batch; each opens what it reads, so the person
    still reaches the export, and no log holds their email in clear."""
    f = fuzzed
    n = f.next()
    through_the_chain(f, n)
    email = f"fuzz.{n}@example.com".encode()
    for stream, subject in (
        ("CDP_INGEST", "cdp.ingest.>"),
        ("CDP_PROFILE", "cdp.profile.>"),
        ("CDP_DELIVERY", "cdp.delivery.>"),
    ):
        raw = b"".join(m.data for m in read_log(f.stack, stream, subject))
        assert raw, stream
        assert email not in raw, stream
