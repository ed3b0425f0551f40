"""Rejected rows on the log (``BatchRowsRejected`` on ``cdp.deadletter.ingest``), with no raw
personal value readable once the person is erased.

* A rejected row with at least one **valid identity** (its schema's identity fields, normalised as
  identity does) keeps its values and error messages as read, **sealed** (``cdp_kit.sealing``, a
  part per row, ``rows.<i>``) under the vault keys of those identities, as ``RecordAccepted`` is.
  The row names, in clear, the key ref of each identity by the identity's keyed hash
  (``BatchError.key_refs``): a privacy delete of one of them erases the row from the store, and
  ingest hands those refs to identity (``PrivacyApplied.key_refs``), which destroys them with the
  person's. From then on the row folds as erased on every replay.
* A row with **no valid identity** names no one whose key could erase it: its values reach the log
  already masked (an identity field as its keyed hash, any other value as its shape) and its
  messages scrubbed (emails and phones masked), ``BatchError.masked`` set. Field, rule and row
  number stay as they were, so the reject still says what was wrong where.
* Sealing off (``CDP_SEAL_PERSONAL_DATA=false``, benches): rows go as read, as before.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from cdp.common.v1.envelope_pb2 import Sealed
from cdp.ingest.v1 import events_pb2 as ev
from cdp.ingest.v1 import ingest_pb2 as pb
from cdp_ingest.batches import StagedReject
from cdp_ingest.domain import MASKED_CHARS, Validator
from cdp_ingest.records import KeyMaker
from cdp_kit.identities import Normaliser
from cdp_kit.privacy import identity_hash
from cdp_kit.sealing import split_fields
from cdp_kit.telemetry import scrub, value_shape

REJECTED_TYPE = ev.BatchRowsRejected.DESCRIPTOR.full_name
PERSONAL = ("values", "errors")


def batch_error(staged: StagedReject) -> pb.BatchError:
    row, values, errors = staged
    item = pb.BatchError(row=row, errors=[pb.FieldError(field=f, rule=r, message=m) for f, r, m in errors])
    item.values.update(values)
    return item


def valid_identities(
    values: Mapping[str, object], identity_fields: Mapping[str, str], norm: Normaliser
) -> list[tuple[str, str]]:
    """The row's identities that normalise (namespace, canonical value), by field name, once each."""
    found: dict[tuple[str, str], None] = {}
    for name, namespace in sorted(identity_fields.items()):
        value = values.get(name)
        if isinstance(value, str) and value:
            canonical, _rule, _detail = norm.normalise(namespace, value)
            if canonical is not None:
                found[(namespace, canonical)] = None
    return list(found)


def rejected_rows(
    rows: list[StagedReject],
    *,
    batch_id: str,
    chunk: int,
    event_id: str,
    validator: Validator | None,
    norm: Normaliser,
    keys: KeyMaker | None,
) -> tuple[ev.BatchRowsRejected, list[Sealed]]:
    """The chunk's BatchRowsRejected as it goes on the log, and its sealed parts."""
    payload = ev.BatchRowsRejected(batch_id=batch_id, chunk=chunk)
    if keys is None:
        payload.rows.extend(batch_error(r) for r in rows)
        return payload, []
    identity_fields = (
        {f.name: f.identity_namespace for f in validator.schema.fields if f.identity_namespace} if validator else {}
    )
    parts: list[Sealed] = []
    for i, staged in enumerate(rows):
        item = batch_error(staged)
        identities = valid_identities(staged[1], identity_fields, norm)
        if identities:
            refs = keys.refs_for(identities)
            bare, personal = split_fields(item, PERSONAL)
            for (namespace, value), ref in zip(identities, refs, strict=True):
                bare.key_refs[identity_hash(namespace, value)] = ref
            parts.append(
                keys.seal(
                    sorted(set(refs)),
                    personal,
                    event_id=event_id,
                    event_type=REJECTED_TYPE,
                    path=f"rows.{i}",
                    whole=False,
                )
            )
            item = bare
        else:
            masked = {name: mask(validator, name, value) for name, value in staged[1].items()}
            item.values.Clear()
            item.values.update(masked)
            for error in item.errors:
                error.message = scrub(error.message)
            item.masked = True
        payload.rows.append(item)
    return payload, parts


def mask(validator: Validator | None, name: str, value: object) -> str:
    """A kept value as reports show it: an identity field as its keyed hash, any other as its shape;
    a dataset no longer known masks every value by its shape."""
    if validator is not None:
        return validator.mask(name, value)
    return value_shape(value if isinstance(value, str) else json.dumps(value, default=str), MASKED_CHARS)


def erased(item: pb.BatchError) -> bool:
    """A sealed row whose part did not open (its person erased): nothing of it is left to keep."""
    return bool(item.key_refs) and not item.values.fields and not item.errors
