"""file_export: CSV, JSON Lines or Parquet, optional gzip, full snapshot or incremental
(only the changes of each batch), split at N rows, with a manifest; to a local folder.

Files are named after the batch (incremental) or the segment (full) and written
atomically, so sending a batch again rewrites the same files: idempotent."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]
from pydantic import Field, field_validator

from cdp_activation import identifiers as ids
from cdp_activation.connectors.base import Batch, Connector, ConnectorConfig, Record, SendContext, SendResult

SAFE = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")


class FileExportConfig(ConnectorConfig):
    folder: str = ""
    format: Literal["csv", "jsonl", "parquet"] = "csv"
    gzip: bool = False
    mode: Literal["full", "incremental"] = "full"
    split_rows: int = Field(default=0, ge=0, description="Rows per file; 0 = one file")
    manifest: bool = True
    # Identities written as SHA-256 of their normalised form (email trimmed+lowercased, phone E.164).
    hash_identities: bool = False
    phone_region: str = "US"

    @field_validator("folder")
    @classmethod
    def _safe(cls, value: str) -> str:
        if value and not SAFE.match(value):
            raise ValueError("letters, digits, '_', '-', '.' only")
        return value


def normalised(namespace: str, value: str, region: str) -> str | None:
    if namespace == "email":
        return ids.email_basic(value)
    if namespace == "phone":
        return ids.canonical_phone(value, region)
    return value.strip() or None


def cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True)
    return value


class FileExport(Connector):
    name = "file_export"
    config_model: ClassVar[type[ConnectorConfig]] = FileExportConfig
    idempotent = True

    def wants_snapshot(self, config: ConnectorConfig) -> bool:
        assert isinstance(config, FileExportConfig)
        return config.mode == "full"

    def rows(self, cfg: FileExportConfig, batch: Batch, records: list[Record]) -> tuple[list[str], list[list[Any]]]:
        incremental = cfg.mode == "incremental"
        header = ["profile_id", *batch.identities, *batch.attributes] + (["change"] if incremental else [])
        out: list[list[Any]] = []
        for rec in records:
            values: list[Any] = []
            for ns in batch.identities:
                value = normalised(ns, rec.first(ns), cfg.phone_region) or ""
                values.append(ids.sha256_hex(value) if cfg.hash_identities and value else value)
            attrs = [cell(rec.attributes.get(a)) for a in batch.attributes]
            out.append([rec.profile_id, *values, *attrs] + ([batch.action] if incremental else []))
        return header, out

    async def send(self, ctx: SendContext, config: ConnectorConfig, batch: Batch) -> SendResult:
        assert isinstance(config, FileExportConfig)
        folder = ctx.export_root / (config.folder or batch.destination)
        folder.mkdir(parents=True, exist_ok=True)
        if config.mode == "full":
            records = batch.snapshot if batch.snapshot is not None else batch.records
            stem = batch.segment
        else:
            records = batch.records
            stem = f"{batch.segment}-{batch.sequence:08d}-{batch.action}"
        header, rows = self.rows(config, batch, records)
        files = write_files(folder, stem, config, header, rows)
        if config.manifest:
            manifest = {
                "batch_id": batch.id,
                "segment": batch.segment,
                "mode": config.mode,
                "format": config.format,
                "gzip": config.gzip,
                "action": batch.action if config.mode == "incremental" else "snapshot",
                "columns": header,
                "rows": len(rows),
                "files": files,
            }
            atomic_write(folder / f"{stem}.manifest.json", json.dumps(manifest, indent=2).encode())
        activated = sum(1 for rec in batch.records for ns in batch.identities if rec.first(ns))
        location = str(folder / files[0]["name"]) if files else str(folder)
        return SendResult(activated=activated, location=location)


def write_files(
    folder: Path, stem: str, cfg: FileExportConfig, header: list[str], rows: list[list[Any]]
) -> list[dict[str, Any]]:
    size = cfg.split_rows or max(len(rows), 1)
    chunks = [rows[i : i + size] for i in range(0, len(rows), size)] or [[]]
    ext = {"csv": "csv", "jsonl": "jsonl", "parquet": "parquet"}[cfg.format] + (".gz" if cfg.gzip else "")
    files = []
    for n, chunk in enumerate(chunks, start=1):
        name = f"{stem}.{ext}" if len(chunks) == 1 else f"{stem}-{n:05d}.{ext}"
        data = encode(cfg.format, header, chunk)
        if cfg.gzip:
            data = gzip.compress(data, compresslevel=6, mtime=0)
        atomic_write(folder / name, data)
        files.append({"name": name, "rows": len(chunk), "sha256": hashlib.sha256(data).hexdigest()})
    # A full export that shrank below its earlier split count leaves no stale parts behind.
    keep = {f["name"] for f in files}
    for old in folder.glob(f"{stem}-[0-9][0-9][0-9][0-9][0-9].{ext}"):
        if old.name not in keep:
            old.unlink()
    return files


def encode(fmt: str, header: list[str], rows: list[list[Any]]) -> bytes:
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
        return buf.getvalue().encode()
    if fmt == "jsonl":
        return b"".join(json.dumps(dict(zip(header, row, strict=True))).encode() + b"\n" for row in rows)
    columns = {h: [str(row[i]) for row in rows] for i, h in enumerate(header)}
    table = pa.table({h: pa.array(v, type=pa.string()) for h, v in columns.items()})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return bytes(sink.getvalue().to_pybytes())


def atomic_write(target: Path, data: bytes) -> None:
    tmp = target.with_name(target.name + ".tmp")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, target)
