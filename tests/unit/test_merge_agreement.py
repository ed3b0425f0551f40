"""Activation's copy of profile attributes agrees with segmentation's merged profile.

The same log (identity's fragments, merges and splits in messages of several events, and
segmentation's merge policy changes) is folded by segmentation's real consumer and projection
and by activation's real observers, each into its own SQLite store. Every profile's attributes,
and the origin (dataset, record time, log sequence, place in the message) each value came from,
must be the same in both, and the winners the plain rule below picks, under both policies,
before and after policy changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy.engine import Engine
from sqlmodel import select

from cdp.identity.v1 import events_pb2 as identity_ev
from cdp.segmentation.v1 import events_pb2 as seg_ev
from cdp.segmentation.v1 import segmentation_pb2 as seg_pb
from cdp_activation import profiles
from cdp_activation import store as act_store
from cdp_activation.consumer import ProfilesObserver, SegmentsObserver
from cdp_kit.envelope import Cause, encode_batch, make_envelope
from cdp_kit.eventlog import LogMessage
from cdp_kit.merging import MergeRule, Origin
from cdp_kit.store import create_tables, make_engine, transaction
from cdp_kit.streams import SEGMENTATION_CONFIG
from cdp_segmentation import store as seg_store
from cdp_segmentation.consumer import ProfilesToMemberships
from cdp_segmentation.membership import Catalog
from cdp_segmentation.privacy import PRIVACY_TABLES as SEG_PRIVACY_TABLES
from cdp_segmentation.projection import SegmentationProjection

DATASETS = ("crm", "loyalty", "pos")
NAMES = ("city", "tier", "consent_email_marketing")
BASE_S = 1_700_000_000
CAUSE = Cause("test", 1)


@dataclass
class Model:
    """What the log says so far: who owns which fragment, and each fragment's values and origin."""

    owner: dict[str, str] = field(default_factory=dict)
    values: dict[str, dict[str, str]] = field(default_factory=dict)
    origin: dict[str, Origin] = field(default_factory=dict)
    live: list[str] = field(default_factory=list)
    rule: MergeRule = field(default_factory=MergeRule)
    made: int = 0

    def new_id(self, prefix: str) -> str:
        self.made += 1
        return f"{prefix}{self.made:03d}"

    def expected(self) -> dict[str, dict[str, tuple[str, Origin]]]:
        """Each profile's winner per attribute: the largest key, by brute force."""
        out: dict[str, dict[str, tuple[str, Origin]]] = {}
        for frag, pid in self.owner.items():
            for name, value in self.values[frag].items():
                mine = self.origin[frag]
                held = out.setdefault(pid, {}).get(name)
                if held is None or self.rule.key_of(mine) > self.rule.key_of(held[1]):
                    out[pid][name] = (value, mine)
        return out


class Logs:
    """The two stores, and the log fed to both."""

    def __init__(self) -> None:
        self.seg: Engine = make_engine("sqlite://")
        self.act: Engine = make_engine("sqlite://")
        create_tables(self.seg, [*seg_store.TABLES, *SEG_PRIVACY_TABLES])  # as segmentation's main builds it
        create_tables(self.act, act_store.TABLES)
        self.catalog = Catalog()
        self.seg_profiles = ProfilesToMemberships(self.catalog)
        self.seg_config = SegmentationProjection(self.catalog)
        self.act_profiles = ProfilesObserver()
        self.act_config = SegmentsObserver()
        self.sequence = 0

    def message(self, payloads: list[Any]) -> LogMessage:
        self.sequence += 1
        at = datetime(2026, 1, 1, tzinfo=UTC)
        envs = [
            make_envelope(p, event_id=f"m{self.sequence}-{i}", subject_key="k", occurred_at=at, cause=CAUSE)
            for i, p in enumerate(payloads)
        ]
        return LogMessage("CDP_PROFILE", self.sequence, "cdp.profile.0.fragments", {}, encode_batch(envs, at))

    def profile_facts(self, payloads: list[Any]) -> None:
        msg = self.message(payloads)
        with transaction(self.seg) as session:
            for env in msg.events():
                self.seg_profiles.observe(session, msg, env)
        with transaction(self.act) as session:
            for env in msg.events():
                self.act_profiles.observe(session, msg, env)

    def policy(self, rule: MergeRule) -> None:
        policy = seg_pb.MergePolicy(kind=seg_pb.MERGE_POLICY_KIND_TIMESTAMP)
        if rule.precedence:
            policy = seg_pb.MergePolicy(
                kind=seg_pb.MERGE_POLICY_KIND_DATASET_PRECEDENCE, datasets=list(rule.precedence)
            )
        msg = self.message([seg_ev.MergePolicySet(policy=policy)])
        [env] = msg.events()
        with transaction(self.seg) as session:
            self.seg_config.fold(session, SEGMENTATION_CONFIG, env)
        with transaction(self.act) as session:
            self.act_config.observe(session, msg, env)

    def segmentation(self) -> dict[str, dict[str, tuple[Any, Origin]]]:
        with transaction(self.seg) as session:
            rows = session.exec(select(seg_store.ProfileRow)).all()
            return {
                r.profile_id: {name: (value, _seg_origin(r.sources[name])) for name, value in r.attributes.items()}
                for r in rows
                if r.attributes
            }

    def activation(self) -> dict[str, dict[str, tuple[Any, Origin]]]:
        with transaction(self.act) as session:
            rows = session.exec(select(act_store.ProfileRow)).all()
            return {
                r.profile_id: {name: (value, Origin(*r.origins[name])) for name, value in r.attributes.items()}
                for r in rows
                if r.attributes
            }

    def close(self) -> None:
        self.seg.dispose()
        self.act.dispose()


def _seg_origin(source: dict[str, Any]) -> Origin:
    return Origin(source["dataset"], int(source["ts"]), int(source["seq"]), int(source.get("pos", 0)))


def fragment(pid: str, frag: str, dataset: str, ts_s: int, values: dict[str, str]) -> identity_ev.ProfileFragment:
    out = identity_ev.ProfileFragment(profile_id=pid, source_event_id=frag, dataset=dataset, kind="record")
    out.occurred_at.FromSeconds(BASE_S + ts_s)
    out.attributes.update(values)
    return out


rules = st.one_of(
    st.just(MergeRule()),
    st.permutations(DATASETS).flatmap(lambda order: st.integers(1, 3).map(lambda n: MergeRule(tuple(order[:n])))),
)


def records_step(data: st.DataObject, model: Model, logs: Logs) -> None:
    """One message of 1-4 record fragments (ties in record time are frequent)."""
    payloads: list[Any] = []
    for _ in range(data.draw(st.integers(1, 4))):
        reuse: bool = data.draw(st.booleans())
        if reuse and model.live:
            pid = data.draw(st.sampled_from(model.live))
        else:
            pid = model.new_id("p")
            model.live.append(pid)
        frag = model.new_id("f")
        dataset = data.draw(st.sampled_from(DATASETS))
        ts_s = data.draw(st.integers(0, 2))
        names = data.draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=3, unique=True))
        values = {name: f"{frag}.{name}" for name in names}
        model.owner[frag], model.values[frag] = pid, values
        model.origin[frag] = Origin(dataset, (BASE_S + ts_s) * 1000, logs.sequence + 1, len(payloads))
        payloads.append(fragment(pid, frag, dataset, ts_s, values))
    logs.profile_facts(payloads)


def merge_step(data: st.DataObject, model: Model, logs: Logs) -> None:
    survivor = data.draw(st.sampled_from(model.live))
    others = [p for p in model.live if p != survivor]
    absorbed = data.draw(st.lists(st.sampled_from(others), min_size=1, max_size=2, unique=True))
    for frag, pid in model.owner.items():
        if pid in absorbed:
            model.owner[frag] = survivor
    model.live = [p for p in model.live if p not in absorbed]
    logs.profile_facts([identity_ev.ProfilesMerged(survivor=survivor, absorbed=absorbed)])


def split_step(data: st.DataObject, model: Model, logs: Logs) -> None:
    """A profile's fragments go to 2-3 parts; the first part keeps the id unless drawn otherwise,
    and a fragment no part names stays with the split profile."""
    pid = data.draw(st.sampled_from(model.live))
    keeps = data.draw(st.booleans())
    part_ids = [pid if keeps else model.new_id("s")] + [model.new_id("s") for _ in range(data.draw(st.integers(1, 2)))]
    split = identity_ev.ProfileSplit(profile_id=pid)
    parts = {part_id: split.parts.add(profile_id=part_id) for part_id in part_ids}
    for frag in sorted(f for f, owner in model.owner.items() if owner == pid):
        target = data.draw(st.sampled_from([*part_ids, None]))
        if target is not None:
            parts[target].fragment_ids.append(frag)
            model.owner[frag] = target
    model.live += [p for p in part_ids if p not in model.live]
    logs.profile_facts([split])


def policy_step(data: st.DataObject, model: Model, logs: Logs) -> None:
    model.rule = data.draw(rules)
    logs.policy(model.rule)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_activation_resolves_every_attribute_as_segmentation_does(data: st.DataObject) -> None:
    model, logs = Model(), Logs()
    try:
        if data.draw(st.booleans()):
            policy_step(data, model, logs)  # a policy before any profile: the fold, not the re-resolve
        for _ in range(data.draw(st.integers(1, 10))):
            steps = [records_step, policy_step] + ([merge_step] if len(model.live) > 1 else [])
            steps += [split_step] if any(model.owner) else []
            data.draw(st.sampled_from(steps))(data, model, logs)
            expected = model.expected()
            assert logs.segmentation() == expected
            assert logs.activation() == expected
    finally:
        logs.close()


def test_a_policy_change_resolves_profiles_beyond_one_chunk() -> None:
    """More profiles than one re-resolve chunk: every one of them follows the new policy."""
    logs = Logs()
    try:
        for n in range(profiles.CHUNK + 7):
            pid = f"p{n:04d}"
            logs.profile_facts(
                [
                    fragment(pid, f"{pid}-crm", "crm", 2, {"city": "crm"}),
                    fragment(pid, f"{pid}-loy", "loyalty", 1, {"city": "loyalty"}),
                ]
            )
        assert {a["city"][0] for a in logs.activation().values()} == {"crm"}
        logs.policy(MergeRule(("loyalty",)))
        found = logs.activation()
        assert len(found) == profiles.CHUNK + 7
        assert {a["city"][0] for a in found.values()} == {"loyalty"}
        assert found == logs.segmentation()
        with transaction(logs.act) as session:
            assert len(session.exec(select(act_store.MergePolicyRow)).all()) == 1
    finally:
        logs.close()
