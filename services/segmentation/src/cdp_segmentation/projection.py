"""Folds segmentation's own events (definitions, memberships, clock, merge policy) into its store."""

from __future__ import annotations

from google.protobuf import json_format
from sqlmodel import Session, select

from cdp.segmentation.v1 import events_pb2 as ev
from cdp_kit.envelope import Envelope, from_timestamp, is_a, unpack
from cdp_kit.streams import SEGMENTATION_PRIVACY_APPLIED, OwnLog
from cdp_segmentation import store
from cdp_segmentation.membership import Catalog
from cdp_segmentation.privacy import fold_applied, fold_privacy_exit, is_privacy_exit, realized_again
from cdp_segmentation.profiles import apply_retention, recompute_all, recompute_computed_all, to_ms
from cdp_segmentation.store import EXITED, REALIZED, ComputedRow, SegmentRow


class SegmentationProjection:
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def fold(self, session: Session, own: OwnLog, env: Envelope) -> None:
        if own.subject == SEGMENTATION_PRIVACY_APPLIED.subject:
            fold_applied(session, env)
            return
        if is_a(env, ev.MembershipChanged):
            change = unpack(env, ev.MembershipChanged)
            if is_privacy_exit(change.cause):
                fold_privacy_exit(session, change.cause, change.profile_id, change.segment_id)
                return
            status = REALIZED if change.status == ev.MEMBERSHIP_STATUS_REALIZED else EXITED
            if status == REALIZED:
                realized_again(session, change.segment_id, change.profile_id)
            at = from_timestamp(change.at)
            self.catalog.fold_membership(session, change.segment_id, change.profile_id, status, at)
            return
        if is_a(env, ev.SegmentDefined):
            seg = unpack(env, ev.SegmentDefined).segment
            body = json_format.MessageToDict(seg, preserving_proto_field_name=True)
            session.merge(SegmentRow(id=seg.id, name=seg.name, body=body))
            self.catalog.invalidate()
        elif is_a(env, ev.SegmentEvaluated):
            done = unpack(env, ev.SegmentEvaluated)
            row = session.get(SegmentRow, done.segment_id)
            if row is not None and row.generation == done.generation:
                row.evaluated = True
                session.add(row)
        elif is_a(env, ev.SegmentBatchEvaluated):
            batch = unpack(env, ev.SegmentBatchEvaluated)
            row = session.get(SegmentRow, batch.segment_id)
            if row is not None:
                row.evaluated = True
                row.last_run_ms = to_ms(from_timestamp(batch.at))
                session.add(row)
        elif is_a(env, ev.ClockTicked):
            self._tick(session, to_ms(from_timestamp(unpack(env, ev.ClockTicked).at)))
        elif is_a(env, ev.MergePolicySet):
            self._merge_policy(session, unpack(env, ev.MergePolicySet))
        elif is_a(env, ev.ComputedAttributeDefined):
            attribute = unpack(env, ev.ComputedAttributeDefined).attribute
            body = json_format.MessageToDict(attribute, preserving_proto_field_name=True)
            session.merge(ComputedRow(name=attribute.name, body=body))
            session.flush()
            self.catalog.invalidate()
            recompute_computed_all(session, self.catalog.context(session))
        session.flush()

    def _tick(self, session: Session, ms: int) -> None:
        if ms <= store.clock_ms(session):
            return
        store.set_clock(session, ms)
        session.flush()
        self.catalog.invalidate()
        apply_retention(session, self.catalog.context(session))

    def _merge_policy(self, session: Session, event: ev.MergePolicySet) -> None:
        store.set_merge_policy(session, event.policy)
        session.flush()
        self.catalog.invalidate()
        recompute_all(session, self.catalog.context(session))
        for row in session.exec(select(SegmentRow)).all():
            row.generation += 1
            row.evaluated = False
            session.add(row)
