"""Folds segmentation's own events (definitions, memberships) into its store."""

from __future__ import annotations

from google.protobuf import json_format
from sqlmodel import Session

from cdp.segmentation.v1 import events_pb2 as ev
from cdp_kit.envelope import Envelope, from_timestamp, is_a, unpack
from cdp_kit.streams import OwnLog
from cdp_segmentation.store import EXITED, REALIZED, MembershipRow, SegmentRow


class SegmentationProjection:
    def fold(self, session: Session, own: OwnLog, env: Envelope) -> None:
        if is_a(env, ev.SegmentDefined):
            seg = unpack(env, ev.SegmentDefined).segment
            body = json_format.MessageToDict(seg, preserving_proto_field_name=True)
            session.merge(SegmentRow(id=seg.id, name=seg.name, body=body))
        elif is_a(env, ev.MembershipChanged):
            change = unpack(env, ev.MembershipChanged)
            status = REALIZED if change.status == ev.MEMBERSHIP_STATUS_REALIZED else EXITED
            at = from_timestamp(change.at)
            session.merge(
                MembershipRow(segment_id=change.segment_id, profile_id=change.profile_id, status=status, changed_at=at)
            )
        elif is_a(env, ev.SegmentEvaluated):
            row = session.get(SegmentRow, unpack(env, ev.SegmentEvaluated).segment_id)
            if row is not None:
                row.evaluated = True
                session.add(row)
        session.flush()
