"""file_export: a full CSV snapshot of a plan's audience, written atomically."""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path
from typing import Any

from cdp_activation.connectors.base import Audience, DeliveryResult
from cdp_kit.errors import Violation

SAFE = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")


class FileExport:
    name = "file_export"

    def __init__(self, root: Path) -> None:
        self.root = root

    def validate(self, config: dict[str, Any]) -> list[Violation]:
        problems: list[Violation] = []
        folder = str(config.get("folder", "") or "")
        if folder and not SAFE.match(folder):
            problems.append(Violation("config.folder", "pattern", "letters, digits, '_', '-', '.' only"))
        if str(config.get("format", "csv")) != "csv":
            problems.append(Violation("config.format", "supported", "csv"))
        return problems

    async def deliver(self, config: dict[str, Any], audience: Audience) -> DeliveryResult:
        folder = self.root / str(config.get("folder") or audience.destination)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{audience.segment}.csv"
        excluded: dict[str, int] = {}
        rows: list[list[str]] = []
        for member in audience.members:
            missing = [ns for ns in audience.identities if not member.identities.get(ns)]
            if missing:
                reason = f"missing identity {missing[0]}"
                excluded[reason] = excluded.get(reason, 0) + 1
                continue
            values = [member.identities[ns][0] for ns in audience.identities]
            attrs = [_cell(member.attributes.get(a)) for a in audience.attributes]
            rows.append([member.profile_id, *values, *attrs])
        tmp = target.with_suffix(".csv.tmp")
        with tmp.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["profile_id", *audience.identities, *audience.attributes])
            writer.writerows(rows)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        return DeliveryResult(location=str(target), delivered=len(rows), excluded=excluded)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
