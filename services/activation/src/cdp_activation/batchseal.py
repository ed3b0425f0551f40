"""Prepared batches carry personal data on CDP_DELIVERY: each record's identities and attributes
are sealed (``cdp_kit.sealing``) under the keys of that record's identities, a part per record
(``batch.records.<i>``), so erasing one person blanks their record alone.

Removal batches of a privacy request (ids starting ``privacy:``) carry only what a platform needs
to remove the person, and must stay readable after the person's keys are destroyed: their records
are sealed under a key of the removal batch itself (``sealed_removal``), made by activation in the
vault and destroyed by activation once the batch is delivered (or not delivered within the removal
key horizon, ``cdp_activation.privacy.RemovalKeys``). Klaviyo's plain email and phone or
Mailchimp's MD5 of the email thus stay on CDP_DELIVERY only while the removal needs them.
A record whose identities have no known key ref (written while sealing was off) stays as it is; a
record whose keys are revoked goes out without its identities and attributes."""

from __future__ import annotations

from collections.abc import Sequence

from sqlmodel import col, select

from cdp.activation.v1 import activation_pb2 as pb
from cdp.activation.v1 import events_pb2 as ev
from cdp.common.v1.envelope_pb2 import Sealed
from cdp_activation.store import KeyRefRow
from cdp_kit.processor import Processor
from cdp_kit.sealing import Erased, split_fields
from cdp_kit.vault import PersonVault

PRIVACY_BATCH_PREFIX = "privacy:"
PREPARED_TYPE = ev.BatchPrepared.DESCRIPTOR.full_name
PERSONAL = ("identities", "attributes")
CHUNK = 500
REMOVAL_KEY = "privacy-removal"  # the vault "namespace" of a removal batch's key (its value: the batch id)


def identity_keys(record: pb.Record) -> list[str]:
    return [f"{ns}:{value}" for ns, values in record.identities.items() for value in values.values]


async def batch_refs(processor: Processor, batch: pb.Batch) -> dict[str, list[str]] | None:
    """The key refs of the batch's identities, their keys fetched; None: the batch is not sealed."""
    vault = processor.vault
    if vault is None or not vault.sealing or batch.id.startswith(PRIVACY_BATCH_PREFIX):
        return None
    keys = sorted({key for record in batch.records for key in identity_keys(record)})
    refs: dict[str, list[str]] = {}
    with processor.read() as session:
        for start in range(0, len(keys), CHUNK):
            query = select(KeyRefRow).where(col(KeyRefRow.key).in_(keys[start : start + CHUNK]))
            for row in session.exec(query):
                refs.setdefault(row.key, []).append(row.key_ref)
    await vault.prefetch(ref for found in refs.values() for ref in found)
    return refs


def sealed_prepared(
    vault: PersonVault, batch: pb.Batch, refs: dict[str, list[str]], event_id: str
) -> tuple[ev.BatchPrepared, Sequence[Sealed]]:
    """The BatchPrepared to append (records without their personal fields) and its sealed parts."""
    prepared = ev.BatchPrepared(batch=batch)
    parts: list[Sealed] = []
    for i, record in enumerate(prepared.batch.records):
        record_refs = sorted({ref for key in identity_keys(record) for ref in refs.get(key, ())})
        if not record_refs:
            continue
        bare, personal = split_fields(record, PERSONAL)
        try:
            path = f"batch.records.{i}"
            parts.append(
                vault.seal(record_refs, personal, event_id=event_id, event_type=PREPARED_TYPE, path=path, whole=False)
            )
        except Erased:
            pass  # the person is being erased: the record goes out without them
        record.CopyFrom(bare)
    return prepared, parts


def sealed_removal(vault: PersonVault, batch: pb.Batch, event_id: str) -> tuple[ev.BatchPrepared, list[Sealed]]:
    """A removal batch's BatchPrepared with each record's personal fields sealed (a part per
    record, ``batch.records.<i>``) under one new key of the batch: not a key of the person, so
    identity's destroy at the request's completion leaves the removal deliverable."""
    prepared = ev.BatchPrepared(batch=batch)
    (ref,) = vault.refs_for([(REMOVAL_KEY, batch.id)])  # the same ref if the decision is retried here
    parts: list[Sealed] = []
    for i, record in enumerate(prepared.batch.records):
        bare, personal = split_fields(record, PERSONAL)
        path = f"batch.records.{i}"
        parts.append(vault.seal([ref], personal, event_id=event_id, event_type=PREPARED_TYPE, path=path, whole=False))
        record.CopyFrom(bare)
    return prepared, parts


def removal_keys(env_sealed: Sequence[Sealed]) -> list[str]:
    """The key refs a removal batch's records are sealed under (named in clear on each part)."""
    return sorted({ref for part in env_sealed for ref in part.key_refs})
