"""Activation's incremental planner on a real JetStream and SQLite store: a round evaluates only
the profiles the inputs and the delivery log changed, and finds exactly what a full recomputation
of every plan's audience finds; a round with nothing new (a segmentation clock tick included)
evaluates no profile at all.

The processor's inputs are applied by ``catch_up`` and the planner's rounds run by hand, so each
comparison is made on one state: workers deliver only in the steps that say so."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import select

from cdp.segmentation.v1 import events_pb2 as seg_ev
from cdp_activation import store
from cdp_activation.changes import Changes
from cdp_activation.delivery import Deliverer, PlanWork, candidates, evaluate
from cdp_kit.eventlog import EventLog
from cdp_kit.streams import SEGMENTATION_MEMBERSHIPS
from cdp_standins import LocalPlatforms
from tests.integration.test_activation_delivery import T0, Harness, Upstream, _try_activate, until

PEOPLE = [f"p{i}" for i in range(8)]
Found = tuple[frozenset[str], frozenset[str], tuple[tuple[str, str], ...], frozenset[str]]


def summary(adds: Any, removes: Any, excluded: dict[str, str], cleared: Any) -> Found:
    return (
        frozenset(r.profile_id for r in adds),
        frozenset(r.profile_id for r in removes),
        tuple(sorted(excluded.items())),
        frozenset(cleared),
    )


class Planner:
    """The service's planner, its rounds run by hand and recorded, workers only when asked."""

    def __init__(self, harness: Harness) -> None:
        self.harness = harness
        self.processor = harness.processor
        self.deliverer: Deliverer = next(
            owner
            for job in harness.service.background
            if isinstance(owner := getattr(job, "__self__", None), Deliverer)
        )
        self.rounds: dict[str, Found] = {}
        self.workers = False
        cut, wake = self.deliverer._cut, self.deliverer._wake_workers

        async def recorded(item: PlanWork, scheduled: bool, force: bool, now: float) -> tuple[set[str], bool]:
            self.rounds[item.plan.id] = summary(item.adds, item.removes, item.excluded, item.cleared)
            return await cut(item, scheduled, force, now)

        def maybe_wake() -> None:
            if self.workers:
                wake()

        self.deliverer._cut = recorded  # type: ignore[method-assign]
        self.deliverer._wake_workers = maybe_wake  # type: ignore[method-assign]

    def full(self) -> dict[str, Found]:
        """What a full recomputation of every plan's whole audience finds now (reads only)."""
        fresh = Deliverer(self.processor, self.harness.settings, self.harness.keys)
        out: dict[str, Found] = {}
        with self.processor.read() as session:
            for row in session.exec(select(store.PlanRow)):
                ctx = fresh._context(session, row, store.plan_of(row))
                assert ctx is not None
                adds, removes, excluded, cleared, _ = evaluate(session, ctx, candidates(session, ctx.plan))
                if adds or removes or excluded or cleared:
                    out[row.id] = summary(adds, removes, excluded, cleared)
        return out

    async def round(self) -> dict[str, Found]:
        await self.processor.catch_up()
        expected = self.full()
        self.rounds = {}
        await self.deliverer.tick(force=True)
        got = {plan: changes for plan, changes in self.rounds.items() if any(changes)}
        assert got == expected
        return got

    async def deliver(self) -> None:
        """Let the workers send every pending batch, and fold their outcomes."""
        self.workers = True
        self.deliverer._wake_workers()

        def settled() -> bool:
            with self.processor.read() as session:
                return not session.exec(select(store.BatchRow).where(store.BatchRow.status == "pending")).first()

        await until(settled, what="every batch delivered")
        self.workers = False


@pytest.fixture
async def platforms() -> AsyncIterator[LocalPlatforms]:
    servers = LocalPlatforms()
    await servers.start()
    yield servers
    await servers.stop()


@pytest.fixture
def upstream(eventlog: EventLog) -> Upstream:
    return Upstream(eventlog)


@pytest.fixture
async def planner(tmp_path: Path, nats_url: str, eventlog: EventLog) -> AsyncIterator[Planner]:
    harness = Harness(tmp_path, nats_url, eventlog)
    harness.processor.create_store()
    await harness.processor.catch_up()
    harness.processor.ready.set()
    planner = Planner(harness)
    yield planner
    await planner.deliverer.close()


async def set_up(planner: Planner, up: Upstream, platforms: LocalPlatforms) -> None:
    await up.segment()
    await planner.processor.catch_up()
    h = planner.harness
    await h.destination("hook", "webhook", base_url=platforms.url + "/webhook", secret=platforms.webhook_secret)
    await h.destination("file", "file_export", action="ad_targeting", batch_size=3)
    await h.activate("hook", ["email"], ["first_name"])
    await h.activate("file", ["email"], ["first_name"])


async def step(up: Upstream, rng: random.Random, model: dict[str, dict[str, Any]]) -> str:
    """One random change upstream; the model says who should be in the webhook's audience."""
    pid = rng.choice(PEOPLE)
    person = model.setdefault(pid, {"member": False, "email": False, "consent": "u", "consent_at": 0, "alive": True})
    kind = rng.choice(["join", "join", "exit", "email", "consent", "attribute", "merge", "deliver"])
    if not person["alive"] and kind != "deliver":
        return "skip"
    if kind == "join":
        await up.membership(pid)
        person["member"] = True
    elif kind == "exit":
        await up.membership(pid, joined=False)
        person["member"] = False
    elif kind == "email":
        await up.profile(pid, {"email": f"{pid}@example.com"}, {"first_name": pid})
        person["email"] = True
    elif kind == "consent":
        value = rng.choice(["y", "n"])
        await up.profile(pid, {"cookie": f"c-{pid}"}, {"consent_email_marketing": value, "consent_ad_targeting": value})
        person["consent"], person["consent_at"] = value, up.n
    elif kind == "attribute":
        await up.profile(pid, {"cookie": f"c-{pid}"}, {"first_name": f"{pid}-{rng.randrange(100)}"})
    elif kind == "merge":
        other = rng.choice([p for p in PEOPLE if p != pid])
        absorbed = model.get(other)
        if absorbed is None or not absorbed["alive"]:
            return "skip"
        # identity's order: the survivor's facts, then the merge, then segmentation's membership changes
        await up.merge(pid, [other])
        person["email"] = person["email"] or absorbed["email"]
        if absorbed["consent_at"] > person["consent_at"]:  # attributes resolve again: the latest record wins
            person["consent"], person["consent_at"] = absorbed["consent"], absorbed["consent_at"]
        absorbed["alive"] = False
        if absorbed["member"]:
            await up.membership(other, joined=False)
            absorbed["member"] = False
    return kind


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_incremental_rounds_find_what_a_full_recomputation_finds(
    planner: Planner, upstream: Upstream, platforms: LocalPlatforms, seed: int
) -> None:
    await set_up(planner, upstream, platforms)
    await planner.round()  # the first round evaluates every plan whole
    rng = random.Random(seed)
    model: dict[str, dict[str, Any]] = {}
    for _ in range(40):
        if await step(upstream, rng, model) == "deliver":
            await planner.deliver()
        await planner.round()  # asserts: the incremental round's changes == the full recomputation's
    for _ in range(3):  # whatever waited for a delivery (an exit while the add was in flight)
        await planner.deliver()
        await planner.round()
    assert planner.full() == {}
    wanted = {pid for pid, p in model.items() if p["alive"] and p["member"] and p["email"] and p["consent"] != "n"}
    assert platforms.members["webhook:gold"] == wanted
    assert not platforms.rejected


async def test_an_idle_round_and_a_clock_tick_evaluate_no_profile(
    planner: Planner, upstream: Upstream, platforms: LocalPlatforms, eventlog: EventLog
) -> None:
    await set_up(planner, upstream, platforms)
    for pid in PEOPLE:
        await upstream.profile(pid, {"email": f"{pid}@example.com"}, {"first_name": pid})
        await upstream.membership(pid)
    await planner.round()
    await planner.deliver()
    await planner.round()
    assert platforms.members["webhook:gold"] == set(PEOPLE)
    deliverer = planner.deliverer
    evaluated = deliverer.evaluated

    assert await deliverer.tick() == 0  # nothing new
    ticked = seg_ev.ClockTicked()
    ticked.at.FromDatetime(T0 + timedelta(hours=1))
    await upstream._publish(SEGMENTATION_MEMBERSHIPS.subject, ticked, "clock")  # segmentation's clock
    await planner.processor.catch_up()
    assert await deliverer.tick() == 0
    assert deliverer.evaluated == evaluated  # not one profile read again

    await upstream.membership(PEOPLE[0], joined=False)  # one change: that one profile, per plan
    await planner.processor.catch_up()
    assert await deliverer.tick(force=True) == 2
    assert deliverer.evaluated == evaluated + 2


def test_changes_keep_no_profile_while_everything_is_to_be_planned() -> None:
    changes = Changes()  # a start: every plan is planned whole first
    changes.put_back({"p1", "p2"}, {"p3"}, False)
    assert changes.take() == (set(), set(), True)
    changes.put_back({"p1"}, {"p2"}, False)
    assert changes.take() == ({"p1"}, {"p2"}, False)
    changes.put_back({"p1"}, set(), True)
    assert changes.take() == (set(), set(), True)


async def test_a_scheduled_plan_keeps_what_it_collected_through_a_round_that_changes_nothing_for_it(
    planner: Planner, upstream: Upstream, platforms: LocalPlatforms
) -> None:
    """A scheduled plan collects its changes until its cron run; a round between (a change of a
    profile the plan does not hold nor want) must not forget what was collected."""
    await upstream.segment()
    await planner.processor.catch_up()
    h = planner.harness
    await h.destination("yearly", "file_export", folder="yearly")
    await until(lambda: _try_activate(h, "yearly", "0 0 1 1 *"), what="plan")
    await upstream.profile("p0", {"email": "p0@example.com"}, {"first_name": "p0"})
    await upstream.membership("p0")
    await planner.processor.catch_up()
    deliverer = planner.deliverer
    assert await deliverer.tick() == 0  # collected until the cron run
    (plan_id,) = deliverer.planned

    await upstream.profile("p1", {"email": "p1@example.com"}, {"first_name": "p1"})  # no member of gold
    await planner.processor.catch_up()
    assert await deliverer.tick() == 0

    deliverer.next_run[plan_id] = datetime.now(UTC) - timedelta(seconds=1)  # the cron run is due
    assert await deliverer.tick() == 1
    with planner.processor.read() as session:
        (batch,) = session.exec(select(store.BatchRow).where(store.BatchRow.plan_id == plan_id)).all()
    assert [r["profile_id"] for r in batch.records] == ["p0"]


async def test_a_segment_defined_upstream_evaluates_no_profile_of_the_plans_already_planned(
    planner: Planner, upstream: Upstream, platforms: LocalPlatforms
) -> None:
    """Segmentation defining (or defining again) a segment changes no audience by itself: its
    memberships come as their own changes. A plan of it is new, and planned whole then."""
    await set_up(planner, upstream, platforms)
    for pid in PEOPLE:
        await upstream.profile(pid, {"email": f"{pid}@example.com"}, {"first_name": pid})
        await upstream.membership(pid)
    await planner.round()
    deliverer = planner.deliverer
    evaluated = deliverer.evaluated

    await upstream.segment("silver-id", "silver")
    await upstream.segment()  # gold defined again
    await planner.processor.catch_up()
    assert await deliverer.tick() == 0
    assert deliverer.evaluated == evaluated  # not one profile read again

    await upstream.membership(PEOPLE[0], seg_id="silver-id")
    await planner.harness.activate("hook", ["email"], ["first_name"], segment="silver")
    found = await planner.round()  # a new plan: planned whole, as a full recomputation finds
    assert [changes[0] for changes in found.values()] == [frozenset({PEOPLE[0]})]
