"""Folds activation's own events (config, batches and their outcomes) into its store."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from google.protobuf import json_format
from sqlmodel import Session, col, delete, func, select

from cdp.activation.v1 import activation_pb2 as pb
from cdp.activation.v1 import events_pb2 as ev
from cdp.privacy.v1 import privacy_pb2 as privacy_ev
from cdp_activation import credentials, privacy, store
from cdp_activation.batchseal import removal_keys
from cdp_activation.changes import Changes
from cdp_activation.store import (
    BatchRow,
    DeliveryRow,
    DestinationRow,
    ExclusionRow,
    LabelRow,
    PlanMemberRow,
    PlanRow,
    PolicyRow,
)
from cdp_kit.envelope import Envelope, from_timestamp, is_a, unpack
from cdp_kit.keyring import KeyFile
from cdp_kit.streams import OwnLog


def _dict(msg: object) -> dict[str, Any]:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)  # type: ignore[arg-type]


def record_dict(rec: pb.Record) -> dict[str, Any]:
    return {
        "profile_id": rec.profile_id,
        "identities": {ns: list(v.values) for ns, v in sorted(rec.identities.items())},
        "attributes": json_format.MessageToDict(rec.attributes),
    }


# Config events after which every plan is planned whole (rare: a plan, a destination, a label...).
_REPLAN = (ev.DestinationCreated, ev.DestinationSecretsRotated, ev.PlanCreated, ev.DataLabeled, ev.PolicyCreated)


class ActivationProjection:
    def __init__(self, keys: KeyFile, changes: Changes | None = None) -> None:
        self.keys = keys
        # Told which profiles a delivery or an erasure touched (the planner looks at them again).
        self.changes = changes

    def _note(
        self, session: Session, profiles: Iterable[str] = (), delivered: Iterable[str] = (), everything: bool = False
    ) -> None:
        if self.changes is not None:
            self.changes.note(session, profiles, delivered=delivered, everything=everything)

    def fold(self, session: Session, own: OwnLog, env: Envelope) -> None:
        if any(is_a(env, kind) for kind in _REPLAN):
            self._note(session, everything=True)
        if is_a(env, ev.DestinationCreated):
            self._destination(session, unpack(env, ev.DestinationCreated).destination)
        elif is_a(env, ev.DestinationSecretsRotated):
            rotated = unpack(env, ev.DestinationSecretsRotated)
            self._rotated(session, rotated)
        elif is_a(env, ev.PlanCreated):
            plan = unpack(env, ev.PlanCreated).plan
            session.merge(
                PlanRow(id=plan.id, destination_id=plan.destination, segment_id=plan.segment, body=_dict(plan))
            )
        elif is_a(env, ev.DataLabeled):
            label = unpack(env, ev.DataLabeled).label
            session.merge(LabelRow(kind=label.kind, name=label.name, label=label.label))
        elif is_a(env, ev.PolicyCreated):
            policy = unpack(env, ev.PolicyCreated).policy
            session.merge(PolicyRow(id=policy.id, name=policy.name, label=policy.label, action=policy.action))
        elif is_a(env, ev.BatchPrepared):
            self._prepared(session, unpack(env, ev.BatchPrepared).batch, removal_keys(env.sealed))
        elif is_a(env, ev.BatchDelivered):
            # Held now, no longer in flight: a change the planner skipped while they were (an exit
            # while the add was being sent) is planned now.
            self._note(session, delivered=self._delivered(session, unpack(env, ev.BatchDelivered)))
        elif is_a(env, ev.BatchFailed):
            failed = unpack(env, ev.BatchFailed)
            row = session.get(BatchRow, failed.batch_id)
            if row is not None:
                row.status, row.reason, row.permanent = "dead", failed.reason, failed.permanent
                row.attempts += failed.attempts
                row.retried += max(0, failed.attempts - 1)
                row.finished_at = from_timestamp(failed.at)
                session.add(row)
        elif is_a(env, ev.BatchRedriven):
            redriven = unpack(env, ev.BatchRedriven)
            row = session.get(BatchRow, redriven.batch_id)
            if row is not None and row.status == "dead" and not row.keys_destroyed:
                row.status, row.reason, row.permanent = "pending", "", False
                session.add(row)
        elif is_a(env, ev.ExclusionsChanged):
            changed = unpack(env, ev.ExclusionsChanged)
            if changed.cleared:
                session.exec(
                    delete(ExclusionRow).where(
                        col(ExclusionRow.plan_id) == changed.plan_id,
                        col(ExclusionRow.profile_id).in_(list(changed.cleared)),
                    )
                )
            for profile_id, reason in changed.excluded.items():
                session.merge(ExclusionRow(plan_id=changed.plan_id, profile_id=profile_id, reason=reason))
        elif is_a(env, ev.DeliveryCompleted):
            completed = unpack(env, ev.DeliveryCompleted)
            self._legacy_completed(session, completed)
            self._note(session, [*completed.added_profiles, *completed.removed_profiles])
        elif is_a(env, ev.RemovalKeysDestroyed):
            privacy.fold_keys_destroyed(session, unpack(env, ev.RemovalKeysDestroyed))
        elif is_a(env, ev.ProfilesErased):
            erased = unpack(env, ev.ProfilesErased)
            privacy.fold_erased(session, erased)
            self._note(session, erased.profile_ids)
        elif is_a(env, privacy_ev.PrivacyApplied):
            privacy.fold_applied(session, unpack(env, privacy_ev.PrivacyApplied))
        session.flush()

    def _destination(self, session: Session, dest: pb.Destination) -> None:
        """A destination as created; secrets a version before encryption wrote in plain text are
        sealed here, so the store never holds them (the log does until RotateSecrets)."""
        config = json_format.MessageToDict(dest.config)
        legacy = credentials.has_plain_secrets(config)
        if legacy:
            dest.config.Clear()
            dest.config.update(credentials.seal_config(config, self.keys.keyring, dest.id))
        session.merge(DestinationRow(id=dest.id, name=dest.name, body=_dict(dest), legacy_plain=legacy))

    @staticmethod
    def _rotated(session: Session, rotated: ev.DestinationSecretsRotated) -> None:
        row = session.get(DestinationRow, rotated.destination_id)
        if row is not None:
            dest = store.destination_of(row)
            dest.config.CopyFrom(rotated.config)
            row.body, row.legacy_plain = _dict(dest), False
            session.add(row)

    @staticmethod
    def _prepared(session: Session, batch: pb.Batch, keys: list[str]) -> None:
        session.merge(
            BatchRow(
                id=batch.id,
                plan_id=batch.plan_id,
                destination_id=batch.destination,
                action=batch.action,
                sequence=batch.sequence,
                status="pending",
                records=[record_dict(r) for r in batch.records],
                profiles=len(batch.records),
                prepared_at=from_timestamp(batch.prepared_at),
                removal_keys=keys if batch.action == privacy.ERASE else [],
            )
        )
        plan = session.get(PlanRow, batch.plan_id)
        if plan is not None:
            plan.batch_seq = max(plan.batch_seq, batch.sequence + 1)
            session.add(plan)
        if batch.action == privacy.ERASE:
            privacy.fold_prepared(session, batch)

    @staticmethod
    def _delivered(session: Session, done: ev.BatchDelivered) -> list[str]:
        """Fold a delivered batch; the profile ids it moved."""
        row = session.get(BatchRow, done.batch_id)
        if row is None or row.status == "delivered":
            return []
        row.status, row.reason = "delivered", ""
        row.attempts += done.attempts
        row.retried += max(0, done.attempts - 1)
        row.finished_at = from_timestamp(done.at)
        row.latency_ms, row.activated = done.latency_ms, done.activated
        row.rejected, row.warnings = dict(done.rejected), list(done.warnings)
        session.add(row)
        ids = [str(r["profile_id"]) for r in row.records]
        for start in range(0, len(ids), 500):  # bounded IN lists
            session.exec(
                delete(PlanMemberRow).where(
                    col(PlanMemberRow.plan_id) == row.plan_id,
                    col(PlanMemberRow.profile_id).in_(ids[start : start + 500]),
                )
            )
        if row.action == "add" and row.records:
            table = PlanMemberRow.__table__  # type: ignore[attr-defined]
            session.execute(
                table.insert(),
                [{"plan_id": row.plan_id, "profile_id": r["profile_id"], "record": r} for r in row.records],
            )
        if row.action == privacy.ERASE:
            # Delivered: the platform removed them; the store keeps no identifier of theirs.
            row.records = [{"profile_id": pid} for pid in ids]
            session.add(row)
        session.flush()
        members = session.exec(
            select(func.count()).select_from(PlanMemberRow).where(PlanMemberRow.plan_id == row.plan_id)
        ).one()
        reasons = {
            str(reason): int(n)
            for reason, n in session.exec(
                select(ExclusionRow.reason, func.count())
                .where(ExclusionRow.plan_id == row.plan_id)
                .group_by(col(ExclusionRow.reason))
            ).all()
        }
        delivery = pb.Delivery(
            id=row.id,
            plan_id=row.plan_id,
            destination=row.destination_id,
            members=int(members),
            added=len(ids) if row.action == "add" else 0,
            removed=len(ids) if row.action in ("remove", privacy.ERASE) else 0,
            location=done.location,
            through_sequence=row.sequence,
            excluded=reasons,
            action=row.action,
            activated=done.activated,
            attempts=done.attempts,
            latency_ms=done.latency_ms,
            rejected=dict(done.rejected),
        )
        delivery.at.CopyFrom(done.at)
        session.merge(
            DeliveryRow(
                id=row.id,
                plan_id=row.plan_id,
                destination_id=row.destination_id,
                body=_dict(delivery),
                at=row.finished_at,
            )
        )
        plan = session.get(PlanRow, row.plan_id)
        if plan is not None:
            plan.deliveries += 1
            session.add(plan)
        return ids

    @staticmethod
    def _legacy_completed(session: Session, completed: ev.DeliveryCompleted) -> None:
        """Snapshot deliveries recorded before micro-batches existed."""
        delivery = completed.delivery
        for profile_id in completed.added_profiles:
            session.merge(PlanMemberRow(plan_id=delivery.plan_id, profile_id=profile_id))
        if completed.removed_profiles:
            session.exec(
                delete(PlanMemberRow).where(
                    col(PlanMemberRow.plan_id) == delivery.plan_id,
                    col(PlanMemberRow.profile_id).in_(list(completed.removed_profiles)),
                )
            )
        session.merge(
            DeliveryRow(
                id=delivery.id,
                plan_id=delivery.plan_id,
                destination_id=delivery.destination,
                body=_dict(delivery),
                at=from_timestamp(delivery.at),
            )
        )
