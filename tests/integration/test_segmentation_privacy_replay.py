"""Segmentation's rebuild after a privacy delete, on a real nats-server, with fragments sealed as
identity seals them and the person's keys destroyed: the replay reads none of the person's
fragments, so it must not decide their memberships again where the live service, which read
them, decided nothing (the privacy proof's flaky ``ReplayWouldAppend ... segmentation-profile:N``:
identity's merge of the person's web profile into their profile, in its own profile message)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import select

from cdp.common.v1.envelope_pb2 import IdentityValue
from cdp.identity.v1 import events_pb2 as identity_ev
from cdp.privacy.v1 import privacy_pb2 as pb
from cdp.segmentation.v1 import events_pb2 as seg_ev
from cdp_kit.envelope import Cause, Envelope, deterministic_id, is_a, make_envelope, unpack
from cdp_kit.eventlog import EventLog
from cdp_kit.processor import Processor
from cdp_kit.sealing import split_fields
from cdp_kit.store import canonical_dump, make_engine, sqlite_url, with_checkpoint
from cdp_kit.streams import IDENTITY_FRAGMENTS, SEGMENTATION_MEMBERSHIPS
from cdp_kit.vault import PersonVault
from cdp_segmentation.handlers import SegmentationHandlers
from cdp_segmentation.main import build_processor
from cdp_segmentation.membership import Catalog
from cdp_segmentation.privacy import (
    PRIVACY_TABLES,
    PrivacyApplier,
    PrivacyErasedRow,
    PrivacyToSegmentation,
    PrivacyUnreadableRow,
)
from cdp_segmentation.store import TABLES, realized
from tests.integration.test_privacy import request_fact
from tests.integration.test_segmentation_service import DAY, T0

FRAGMENT = identity_ev.ProfileFragment.DESCRIPTOR.full_name
PERSONAL = ("identities", "attributes", "anchor")  # what identity seals of a fragment
ANN = [("crm_id", "C1"), ("email", "ann@example.com")]
ANN_COOKIE = ("cookie", "ck-ann")
BOB = [("crm_id", "C2"), ("email", "bob@example.com")]


class SealingIdentity:
    """Stands in for identity: its facts on its own subject, one message per ``send``, each
    fragment sealed as a whole under the keys of its identities (``cdp_identity.sealing``)."""

    def __init__(self, eventlog: EventLog, vault: PersonVault) -> None:
        self.eventlog = eventlog
        self.vault = vault
        self.n = 0

    def fragment(
        self, profile: str, ids: list[tuple[str, str]], at: datetime, event_type: str = "", **attrs: Any
    ) -> Envelope:
        self.n += 1
        frag = identity_ev.ProfileFragment(
            profile_id=profile,
            source_event_id=f"src-{self.n}",
            dataset="web" if event_type else "crm",
            kind="event" if event_type else "record",
            event_type=event_type,
            identities=[IdentityValue(namespace=ns, value=v) for ns, v in ids],
        )
        frag.attributes.update(attrs)
        frag.occurred_at.FromDatetime(at)
        stripped, personal = split_fields(frag, PERSONAL)
        env = self._envelope(stripped, at)
        env.sealed.append(self.vault.seal(self.vault.refs_for(ids), personal, event_id=env.id, event_type=FRAGMENT))
        return env

    def merged(self, survivor: str, absorbed: str, at: datetime) -> Envelope:
        self.n += 1
        return self._envelope(identity_ev.ProfilesMerged(survivor=survivor, absorbed=[absorbed]), at)

    def split(
        self, profile: str, part: str, fragment_ids: list[str], ids: list[tuple[str, str]], at: datetime
    ) -> Envelope:
        """``profile`` split: ``part`` takes ``fragment_ids`` and ``ids`` (its identities unsealed)."""
        self.n += 1
        moved = identity_ev.SplitPart(
            profile_id=part,
            fragment_ids=fragment_ids,
            identities=[IdentityValue(namespace=ns, value=v) for ns, v in ids],
        )
        return self._envelope(identity_ev.ProfileSplit(profile_id=profile, parts=[moved]), at)

    def _envelope(self, payload: Any, at: datetime) -> Envelope:
        cause = Cause(command_id=f"c{self.n}")
        return make_envelope(payload, event_id=f"id-{self.n}", subject_key="p", occurred_at=at, cause=cause)

    async def send(self, *events: Envelope) -> None:
        await self.vault.commit()  # the keys are in the bucket before what they seal
        await self.eventlog.append(IDENTITY_FRAGMENTS.subject, list(events), msg_id=f"identity-{events[-1].id}")


def dump(engine: Engine) -> dict[str, Any]:
    """The store, less ``seg_privacy_erased``: its counts are what the live store erased, and a
    rebuild that never read the person's fragments erases none of them."""
    kept = [t for t in PRIVACY_TABLES if t.name != PrivacyErasedRow.__tablename__]
    return canonical_dump(engine, with_checkpoint([*TABLES, *kept]))


def members(processor: Processor, name: str) -> list[str]:
    with processor.read() as session:
        return realized(session, deterministic_id("segment", name))


async def changes(eventlog: EventLog) -> list[tuple[str, str, str]]:
    """Every membership change on segmentation's log: (profile, status, cause)."""
    found = []
    async for msg in eventlog.read(SEGMENTATION_MEMBERSHIPS.stream.name, SEGMENTATION_MEMBERSHIPS.subject, 1):
        for env in msg.events():
            if is_a(env, seg_ev.MembershipChanged):
                change = unpack(env, seg_ev.MembershipChanged)
                found.append((change.profile_id, seg_ev.MembershipStatus.Name(change.status), change.cause))
    return found


async def applier(processor: Processor, catalog: Catalog) -> PrivacyApplier:
    privacy = processor.inputs[-1].handler
    assert isinstance(privacy, PrivacyToSegmentation)
    return PrivacyApplier(processor, catalog, privacy)


@dataclass
class Live:
    """A sealing identity on the log and a live segmentation store with the given segments."""

    vault: PersonVault
    identity: SealingIdentity
    engine: Engine
    processor: Processor
    catalog: Catalog


async def live_segmentation(eventlog: EventLog, tmp_path: Path, segments: dict[str, str]) -> Live:
    vault = await PersonVault.bind(eventlog.js)
    engine = make_engine(sqlite_url(tmp_path / "live.db"))
    processor, catalog = build_processor(engine, eventlog)
    processor.create_store()
    await processor.recover()
    handlers = SegmentationHandlers(processor, catalog)
    for name, query in segments.items():
        await handlers.create_segment(name, query)
    return Live(vault, SealingIdentity(eventlog, vault), engine, processor, catalog)


async def test_a_rebuild_does_not_decide_again_for_an_erased_person_whose_merge_live_decided_nothing(
    eventlog: EventLog, tmp_path: Path
) -> None:
    # not_gold holds for a profile with nothing (not for Ann's web profile, which then has nothing to exit).
    setup = await live_segmentation(
        eventlog, tmp_path, {"gold": 'tier = "gold"', "not_gold": 'not (tier = "gold") and count(page_view) = 0'}
    )
    vault, identity, live, processor, catalog = (
        setup.vault,
        setup.identity,
        setup.engine,
        setup.processor,
        setup.catalog,
    )

    # Each catch_up reads one message: its decisions (or none) are its own, as in the live stack
    # when the web login arrives on its own.
    await identity.send(identity.fragment("p-ann", ANN, T0, tier="gold"))
    await identity.send(identity.fragment("p-bob", BOB, T0, tier="silver"))
    await processor.catch_up()
    await identity.send(identity.fragment("p-web", [ANN_COOKIE], T0 + DAY, event_type="page_view"))
    await processor.catch_up()
    # The login names Ann's email: identity merges her web profile into hers.
    login = identity.fragment("p-ann", [ANN_COOKIE, ANN[1]], T0 + DAY, event_type="login")
    await identity.send(identity.merged("p-ann", "p-web", T0 + DAY), login)
    await processor.catch_up()
    assert members(processor, "gold") == ["p-ann"]
    assert members(processor, "not_gold") == ["p-bob"]
    decided = await changes(eventlog)
    assert not [c for c in decided if c[2].startswith("merge:")]  # Ann stays gold: nothing to decide

    refs = sorted(vault.refs_for([*ANN, ANN_COOKIE]))
    requested = pb.PrivacyRequested(request_id="r1", mode=pb.PRIVACY_MODE_DELETE, profile_ids=["p-ann"], key_refs=refs)
    await request_fact(eventlog, requested, erasure=True)
    await processor.catch_up()
    assert await (await applier(processor, catalog)).apply_pending() == 1
    assert members(processor, "gold") == []
    assert members(processor, "not_gold") == ["p-bob"]
    assert processor.vault is not None
    assert await processor.vault.destroy(refs) == 3
    assert sorted(await changes(eventlog)) == sorted([*decided, ("p-ann", "MEMBERSHIP_STATUS_EXITED", "privacy:r1")])

    # The rebuild reads none of Ann's fragments (their keys are gone), then the merge: her profile
    # holds nothing it could evaluate; live, she stayed gold and was not "not_gold".
    rebuilt = make_engine(sqlite_url(tmp_path / "rebuilt.db"))
    again, _ = build_processor(rebuilt, eventlog)
    await again.rebuild()
    assert again.vault is not None
    assert again.vault.erased >= 3
    assert dump(rebuilt) == dump(live)
    with again.read() as session:
        assert session.get(PrivacyUnreadableRow, "p-ann") is None  # cleared by the erasure
    rebuilt.dispose()
    live.dispose()


async def test_a_profile_unreadable_through_someone_else_s_erased_keys_is_evaluated_again_after_that_erasure(
    eventlog: EventLog, tmp_path: Path
) -> None:
    """A record naming two people (a shared device) is sealed under both their keys: once Ann is
    erased, Bob's fragment of it is unreadable, on a rebuild too. Ann's erasure names the keys that
    made it so: from then on Bob's profile is evaluated again (it is not frozen for good)."""
    setup = await live_segmentation(eventlog, tmp_path, {"gold": 'tier = "gold"'})
    vault, identity, live, processor, catalog = (
        setup.vault,
        setup.identity,
        setup.engine,
        setup.processor,
        setup.catalog,
    )
    await identity.send(identity.fragment("p-ann", ANN, T0, tier="gold"))
    await identity.send(identity.fragment("p-bob", [*BOB, ANN_COOKIE], T0, event_type="page_view"))
    await processor.catch_up()

    refs = sorted(vault.refs_for([*ANN, ANN_COOKIE]))
    requested = pb.PrivacyRequested(request_id="r1", mode=pb.PRIVACY_MODE_DELETE, profile_ids=["p-ann"], key_refs=refs)
    await request_fact(eventlog, requested, erasure=True)
    await processor.catch_up()
    assert await (await applier(processor, catalog)).apply_pending() == 1
    assert processor.vault is not None
    assert await processor.vault.destroy(refs) == 3

    # Bob becomes gold after Ann's erasure: evaluated live, and on a rebuild, which read his shared
    # fragment as erased (his profile was unreadable until Ann's erasure).
    await identity.send(identity.fragment("p-bob", BOB, T0 + DAY, tier="gold"))
    await processor.catch_up()
    assert members(processor, "gold") == ["p-bob"]
    rebuilt = make_engine(sqlite_url(tmp_path / "rebuilt.db"))
    again, _ = build_processor(rebuilt, eventlog)
    await again.rebuild()
    assert again.vault is not None
    assert again.vault.erased >= 2  # Ann's fragment and the shared one
    with again.read() as session:
        assert realized(session, deterministic_id("segment", "gold")) == ["p-bob"]
        assert session.exec(select(PrivacyUnreadableRow)).all() == []
    rebuilt.dispose()
    live.dispose()


async def test_a_rebuild_does_not_decide_again_for_a_split_part_that_took_a_fragment_it_cannot_read(
    eventlog: EventLog, tmp_path: Path
) -> None:
    """A record naming Ann's cookie and Bob's email (a shared device), in Ann's profile, moves to
    Bob's new profile in a split. Live, the split decides nothing: Ann stays gold, and Bob's part
    is gold from that record, so neither is "not_gold". Once Ann is erased the record is
    unreadable: a rebuild's Bob part holds nothing of it, so it must not decide Bob's memberships
    at the split (the part is unreadable as the profile it came from was) until Ann's erasure is
    read."""
    setup = await live_segmentation(eventlog, tmp_path, {"not_gold": 'not (tier = "gold")'})
    vault, identity, live, processor, catalog = (
        setup.vault,
        setup.identity,
        setup.engine,
        setup.processor,
        setup.catalog,
    )
    await identity.send(identity.fragment("p-ann", ANN, T0, tier="gold"))
    await processor.catch_up()
    await identity.send(identity.fragment("p-ann", [ANN_COOKIE, BOB[1]], T0 + DAY, tier="gold"))
    await processor.catch_up()
    moved = identity.split("p-ann", "p-bob", [f"src-{identity.n}"], [BOB[1]], T0 + 2 * DAY)
    await identity.send(moved)
    await processor.catch_up()
    assert members(processor, "not_gold") == []
    assert await changes(eventlog) == []  # the split decided nothing live

    refs = sorted(vault.refs_for([*ANN, ANN_COOKIE]))
    requested = pb.PrivacyRequested(request_id="r1", mode=pb.PRIVACY_MODE_DELETE, profile_ids=["p-ann"], key_refs=refs)
    await request_fact(eventlog, requested, erasure=True)
    await processor.catch_up()
    assert await (await applier(processor, catalog)).apply_pending() == 1
    assert processor.vault is not None
    assert await processor.vault.destroy(refs) == 3

    rebuilt = make_engine(sqlite_url(tmp_path / "rebuilt.db"))
    again, _ = build_processor(rebuilt, eventlog)
    await again.rebuild()  # ReplayWouldAppend (Bob's empty part "not_gold") before parts kept the mark
    assert again.vault is not None
    assert again.vault.erased >= 2  # Ann's record and the shared one
    assert await changes(eventlog) == []
    with again.read() as session:
        assert realized(session, deterministic_id("segment", "not_gold")) == []
        assert session.exec(select(PrivacyUnreadableRow)).all() == []  # cleared by Ann's erasure
    rebuilt.dispose()
    live.dispose()
