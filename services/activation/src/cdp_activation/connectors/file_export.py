"""file_export: CSV, JSON Lines or Parquet, optional gzip, full snapshot or incremental
(only the changes of each batch), split at N rows, with a manifest; to a local folder,
an SFTP server or any fsspec filesystem (S3-compatible object stores through s3fs).

Files are named after the batch (incremental) or the segment (full) and written
atomically, so sending a batch again rewrites the same files: idempotent."""

from __future__ import annotations

import asyncio
import csv
import gzip
import hashlib
import io
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]
from pydantic import Field, field_validator, model_validator

from cdp_activation import identifiers as ids
from cdp_activation.connectors.base import (
    Batch,
    Connector,
    ConnectorConfig,
    DeliveryError,
    Record,
    SendContext,
    SendResult,
)

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
    # Where files go: the local export folder, an SFTP server, or any fsspec URL (s3://bucket/prefix).
    target: Literal["local", "sftp", "fsspec"] = "local"
    sftp_host: str = ""
    sftp_port: int = Field(default=22, ge=1, le=65535)
    sftp_username: str = ""
    sftp_password: str = ""
    sftp_path: str = ""
    # known_hosts lines for the server's key; empty = the host key is not checked.
    sftp_known_hosts: str = ""
    fsspec_url: str = ""
    fsspec_options: dict[str, Any] = Field(default_factory=dict)
    # S3-compatible stores (s3:// URLs): endpoint (empty = AWS), credentials (empty = the
    # environment's AWS chain) and region. Key and secret are masked in every answer.
    s3_endpoint_url: str = ""
    s3_access_key_id: str = ""
    s3_secret_access_key: str = ""
    s3_region: str = ""

    @model_validator(mode="after")
    def _target(self) -> FileExportConfig:
        if self.target == "sftp" and not (self.sftp_host and self.sftp_username):
            raise ValueError("target sftp needs sftp_host and sftp_username")
        if self.target == "fsspec" and "://" not in self.fsspec_url:
            raise ValueError("target fsspec needs fsspec_url (e.g. s3://bucket/prefix)")
        uses_s3 = self.s3_endpoint_url or self.s3_access_key_id or self.s3_secret_access_key or self.s3_region
        if uses_s3 and not (self.target == "fsspec" and is_s3(self.fsspec_url)):
            raise ValueError("s3_* settings need target fsspec with an s3:// fsspec_url")
        if bool(self.s3_access_key_id) != bool(self.s3_secret_access_key):
            raise ValueError("s3_access_key_id and s3_secret_access_key go together")
        if self.s3_endpoint_url and not re.match(r"^https?://[^/\s]+", self.s3_endpoint_url):
            raise ValueError("s3_endpoint_url must be an http(s) URL such as http://127.0.0.1:9000")
        return self

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

    # A full export is a snapshot file: an erasure writes it again without the person. An
    # incremental export's files already written keep them (no removal: "not supported").
    erasure = "write the snapshot again without them"

    def wants_snapshot(self, config: ConnectorConfig) -> bool:
        assert isinstance(config, FileExportConfig)
        return config.mode == "full"

    def erases(self, config: ConnectorConfig) -> bool:
        return self.wants_snapshot(config)

    def erase_identifiers(self, config: ConnectorConfig, rec: Record) -> dict[str, list[str]]:
        """The profile id only: the new snapshot is the plan's members, which no longer hold them."""
        return {"profile_id": [rec.profile_id]}

    async def erase(self, ctx: SendContext, config: ConnectorConfig, batch: Batch) -> SendResult:
        return await self.send(ctx, config, batch)

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
        if config.mode == "full":
            records = batch.snapshot if batch.snapshot is not None else batch.records
            stem = batch.segment
        else:
            records = batch.records
            stem = f"{batch.segment}-{batch.sequence:08d}-{batch.action}"
        header, rows = self.rows(config, batch, records)
        files = render_files(stem, config, header, rows)
        listing = [{"name": n, "rows": r, "sha256": hashlib.sha256(d).hexdigest()} for n, r, d in files]
        outputs = [(n, d) for n, _, d in files]
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
                "files": listing,
            }
            outputs.append((f"{stem}.manifest.json", json.dumps(manifest, indent=2).encode()))
        folder = config.folder or batch.destination
        stale = re.compile(re.escape(stem) + r"-[0-9]{5}\." + re.escape(extension(config)) + "$")
        if config.target == "sftp":
            location = await sftp_write(config, folder, outputs, stale)
        elif config.target == "fsspec":
            location = await asyncio.to_thread(fsspec_write, config, folder, outputs, stale)
        else:
            location = await asyncio.to_thread(local_write, ctx.export_root / folder, outputs, stale)
        activated = sum(1 for rec in batch.records for ns in batch.identities if rec.first(ns))
        return SendResult(activated=activated, location=f"{location}/{files[0][0]}")


def extension(cfg: FileExportConfig) -> str:
    return cfg.format + (".gz" if cfg.gzip else "")


def render_files(
    stem: str, cfg: FileExportConfig, header: list[str], rows: list[list[Any]]
) -> list[tuple[str, int, bytes]]:
    """(name, rows, bytes) of each file, split at ``split_rows``."""
    size = cfg.split_rows or max(len(rows), 1)
    chunks = [rows[i : i + size] for i in range(0, len(rows), size)] or [[]]
    ext = extension(cfg)
    out = []
    for n, chunk in enumerate(chunks, start=1):
        name = f"{stem}.{ext}" if len(chunks) == 1 else f"{stem}-{n:05d}.{ext}"
        data = encode(cfg.format, header, chunk)
        if cfg.gzip:
            data = gzip.compress(data, compresslevel=6, mtime=0)
        out.append((name, len(chunk), data))
    return out


def local_write(folder: Path, outputs: list[tuple[str, bytes]], stale: re.Pattern[str]) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in outputs:
        atomic_write(folder / name, data)
    keep = {name for name, _ in outputs}
    for old in folder.iterdir():
        if stale.match(old.name) and old.name not in keep:
            old.unlink()  # a full export that shrank below its earlier split count
    return str(folder)


async def sftp_write(
    cfg: FileExportConfig, folder: str, outputs: list[tuple[str, bytes]], stale: re.Pattern[str]
) -> str:
    """Upload each file as <name>.tmp, then rename it over the target (atomic on the server)."""
    import asyncssh

    known_hosts = asyncssh.import_known_hosts(cfg.sftp_known_hosts) if cfg.sftp_known_hosts else None
    try:
        async with (
            asyncssh.connect(
                cfg.sftp_host,
                port=cfg.sftp_port,
                username=cfg.sftp_username,
                password=cfg.sftp_password or None,
                known_hosts=known_hosts,
                connect_timeout=cfg.timeout_s,
            ) as conn,
            conn.start_sftp_client() as sftp,
        ):
            remote = f"{cfg.sftp_path.rstrip('/')}/{folder}" if cfg.sftp_path else folder
            await sftp.makedirs(remote, exist_ok=True)
            for name, data in outputs:
                async with sftp.open(f"{remote}/{name}.tmp", "wb") as fh:
                    await fh.write(data)
                await sftp.posix_rename(f"{remote}/{name}.tmp", f"{remote}/{name}")
            keep = {name for name, _ in outputs}
            for old in await sftp.listdir(remote):
                if stale.match(old) and old not in keep:
                    await sftp.remove(f"{remote}/{old}")
            return f"sftp://{cfg.sftp_host}:{cfg.sftp_port}/{remote.lstrip('/')}"
    except asyncssh.PermissionDenied:
        raise DeliveryError("SFTP authentication refused", permanent=True) from None
    except (asyncssh.Error, OSError) as exc:
        raise DeliveryError(f"SFTP {type(exc).__name__}", permanent=False) from None


OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "abfs", "az"}
# At DEBUG these log request headers (the access key id) and bodies (the exported identities).
CHATTY_LOGGERS = ("botocore", "aiobotocore", "s3fs", "urllib3")


def is_s3(url: str) -> bool:
    return url.startswith(("s3://", "s3a://"))


def fsspec_options(cfg: FileExportConfig) -> dict[str, Any]:
    """``fsspec_options`` plus the explicit s3_* settings (which win) and the send timeout."""
    options = dict(cfg.fsspec_options)
    if not is_s3(cfg.fsspec_url):
        return options
    if cfg.s3_endpoint_url:
        options["endpoint_url"] = cfg.s3_endpoint_url
    if cfg.s3_access_key_id:
        options["key"] = cfg.s3_access_key_id
        options["secret"] = cfg.s3_secret_access_key
    if cfg.s3_region:
        options["client_kwargs"] = {**options.get("client_kwargs", {}), "region_name": cfg.s3_region}
    timeouts = {"connect_timeout": cfg.timeout_s, "read_timeout": cfg.timeout_s}
    options["config_kwargs"] = {**timeouts, **options.get("config_kwargs", {})}
    return options


def fsspec_write(cfg: FileExportConfig, folder: str, outputs: list[tuple[str, bytes]], stale: re.Pattern[str]) -> str:
    """Any fsspec filesystem (s3:// with s3fs, memory://, file://): files are written whole
    (one PUT per object on S3, so a reader never sees half a file). Failures become a
    DeliveryError naming the store's error code, never the credentials."""
    import fsspec  # type: ignore[import-untyped]

    scheme, _, path = cfg.fsspec_url.partition("://")
    for name in CHATTY_LOGGERS:
        chatty = logging.getLogger(name)
        chatty.setLevel(max(chatty.level, logging.INFO))
    bucket = path.split("/", 1)[0]
    try:
        fs, root = fsspec.core.url_to_fs(cfg.fsspec_url, **fsspec_options(cfg))
        remote = f"{root.rstrip('/')}/{folder}"
        if not OBJECT_STORES & set(fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
            fs.makedirs(remote, exist_ok=True)  # an object store has no folders (and s3fs would create the bucket)
        for name, data in outputs:
            with fs.open(f"{remote}/{name}", "wb") as fh:
                fh.write(data)
        fs.invalidate_cache(remote)
        keep = {name for name, _ in outputs}
        for old in fs.ls(remote, detail=False):
            base = str(old).rsplit("/", 1)[-1]
            if stale.match(base) and base not in keep:
                fs.rm(str(old))
    except PermissionError as exc:
        raise DeliveryError(
            f"{scheme} access refused ({store_code(exc)}): check the key and secret", permanent=True
        ) from None
    except FileNotFoundError as exc:
        raise DeliveryError(
            f"{scheme} bucket or path not found: {bucket} ({store_code(exc)})", permanent=True
        ) from None
    except (ImportError, ValueError, TypeError) as exc:
        # no fsspec implementation for the scheme, or options it does not accept
        raise DeliveryError(f"{scheme} filesystem unusable: {type(exc).__name__}", permanent=True) from None
    except Exception as exc:  # connection refused, timeouts, 5xx: the deliverer retries
        raise DeliveryError(f"{scheme} {type(exc).__name__} ({store_code(exc)})", permanent=False) from None
    return f"{cfg.fsspec_url.rstrip('/')}/{folder}"


def store_code(exc: BaseException) -> str:
    """The object store's error code (e.g. SignatureDoesNotMatch, NoSuchBucket) if it sent one."""
    cause = exc.__cause__ or exc.__context__
    response = getattr(cause, "response", None) or getattr(exc, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        if code:
            return str(code)
    return type(exc).__name__


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
