"""Data-usage labels and policies: which plans would use labelled data for a denied action."""

from __future__ import annotations

from collections.abc import Iterable

from sqlmodel import Session, col, select

from cdp_activation.store import AttributeSourceRow, LabelRow, PolicyRow


def violations(session: Session, action: str, fields: Iterable[str]) -> list[str]:
    """Each violating chain, e.g.
    "field email <- dataset crm (label C2) -> policy no_ads denies C2 for ad_targeting"."""
    policies = list(session.exec(select(PolicyRow).where(PolicyRow.action == action)))
    if not policies:
        return []
    denied = {p.label: p for p in policies}
    out: list[str] = []
    for name in sorted(set(fields)):
        chains: list[tuple[str, str]] = [
            (f"field {name} (label {row.label})", row.label)
            for row in session.exec(select(LabelRow).where(LabelRow.kind == "field", LabelRow.name == name))
        ]
        datasets = [r.dataset for r in session.exec(select(AttributeSourceRow).where(AttributeSourceRow.name == name))]
        if datasets:
            for row in session.exec(
                select(LabelRow).where(LabelRow.kind == "dataset", col(LabelRow.name).in_(datasets))
            ):
                chains.append((f"field {name} <- dataset {row.name} (label {row.label})", row.label))
        for chain, label in sorted(chains):
            if label in denied:
                policy = denied[label]
                out.append(f"{chain} -> policy {policy.name} denies {label} for {action}")
    return out
