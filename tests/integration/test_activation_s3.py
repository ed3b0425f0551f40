"""file_export to a real S3-compatible server on loopback: moto's standalone server run as a
subprocess with IAM authentication enforced, written through s3fs, read back with boto3."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pyarrow.parquet as pq  # type: ignore[import-untyped]
import pytest
from google.protobuf import json_format

from cdp.activation.v1 import activation_pb2 as pb
from cdp_activation.connectors import Batch, DeliveryError, Record, SendContext, SendResult, connector_for
from cdp_activation.handlers import MASK, masked

boto3 = pytest.importorskip("boto3")

REGION = "eu-west-1"
BUCKET = "cdp-drop"

RECORDS = [
    Record("p1", {"email": ["Jo.Ann+x@gmail.com"], "phone": ["(650) 555-0101"]}, {"first_name": "Jo"}),
    Record("p2", {"email": ["  Bob@Example.com "]}, {"first_name": "Bob"}),
    Record("p3", {"phone": ["+1 650 555 0103"]}, {"first_name": None}),
]


@dataclass
class S3:
    endpoint: str
    key: str
    secret: str

    def client(self) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.key,
            aws_secret_access_key=self.secret,
            region_name=REGION,
        )

    def objects(self, prefix: str) -> dict[str, bytes]:
        s3 = self.client()
        listed = s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
        return {o["Key"]: s3.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read() for o in listed}

    def config(self, **extra: Any) -> dict[str, Any]:
        return {
            "target": "fsspec",
            "fsspec_url": f"s3://{BUCKET}/exports",
            "s3_endpoint_url": self.endpoint,
            "s3_access_key_id": self.key,
            "s3_secret_access_key": self.secret,
            "s3_region": REGION,
            "max_attempts": 1,
            **extra,
        }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
    if exe is None:
        pytest.skip("moto[server] is not installed (requirements-dev.txt)")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = {**os.environ, "AWS_DEFAULT_REGION": REGION}
    proc = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{endpoint}/moto-api/data.json", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.1)
        # While authentication is still off: a user with an access key allowed to use S3, and the bucket.
        admin = {
            "endpoint_url": endpoint,
            "region_name": REGION,
            "aws_access_key_id": "x",
            "aws_secret_access_key": "x",
        }
        iam = boto3.client("iam", **admin)
        iam.create_user(UserName="exporter")
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
        iam.put_user_policy(UserName="exporter", PolicyName="s3", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="exporter")["AccessKey"]
        boto3.client("s3", **admin).create_bucket(
            Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION}
        )
        # From now on every request must be signed with a known key and its secret.
        request = urllib.request.Request(
            f"{endpoint}/moto-api/reset-auth", data=b"0", method="POST", headers={"Content-Type": "text/plain"}
        )
        with urllib.request.urlopen(request, timeout=10):
            pass
        yield S3(endpoint, key["AccessKeyId"], key["SecretAccessKey"])
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def send(
    config: dict[str, Any], tmp: Path, *, records: list[Record], action: str = "add", sequence: int = 1
) -> SendResult:
    connector = connector_for("file_export")
    cfg = connector.parse(config)
    batch = Batch(
        id=f"b-{sequence}",
        plan_id="plan",
        destination="lake",
        segment="gold",
        action=action,  # type: ignore[arg-type]
        sequence=sequence,
        records=records,
        identities=["email", "phone"],
        attributes=["first_name"],
        snapshot=records,
    )
    async with aiohttp.ClientSession() as http:
        return await connector.send(SendContext(http=http, export_root=tmp, members_after=len(records)), cfg, batch)


def gunzip_csv(data: bytes) -> list[list[str]]:
    return list(csv.reader(io.StringIO(gzip.decompress(data).decode())))


def test_activation_s3_server_refuses_unsigned_and_wrongly_signed_requests(s3: S3) -> None:
    """The server really checks credentials, so the refusal tests below mean something."""
    wrong = S3(s3.endpoint, s3.key, "not-the-secret").client()
    with pytest.raises(Exception, match="SignatureDoesNotMatch"):
        wrong.list_objects_v2(Bucket=BUCKET)
    assert s3.client().list_objects_v2(Bucket=BUCKET)["KeyCount"] >= 0


async def test_activation_s3_full_export_gzip_split_manifest(s3: S3, tmp_path: Path) -> None:
    cfg = s3.config(format="csv", gzip=True, split_rows=2, mode="full", fsspec_url=f"s3://{BUCKET}/full")
    result = await send(cfg, tmp_path, records=RECORDS)
    assert result.location == f"s3://{BUCKET}/full/lake/gold-00001.csv.gz"
    assert result.activated == 4  # identities present: p1 email and phone, p2 email, p3 phone
    objects = s3.objects("full/")
    assert sorted(objects) == [
        "full/lake/gold-00001.csv.gz",
        "full/lake/gold-00002.csv.gz",
        "full/lake/gold.manifest.json",
    ]
    header = ["profile_id", "email", "phone", "first_name"]
    assert gunzip_csv(objects["full/lake/gold-00001.csv.gz"]) == [
        header,
        ["p1", "jo.ann+x@gmail.com", "+16505550101", "Jo"],
        ["p2", "bob@example.com", "", "Bob"],
    ]
    assert gunzip_csv(objects["full/lake/gold-00002.csv.gz"]) == [header, ["p3", "", "+16505550103", ""]]
    manifest = json.loads(objects["full/lake/gold.manifest.json"])
    assert manifest == {
        "batch_id": "b-1",
        "segment": "gold",
        "mode": "full",
        "format": "csv",
        "gzip": True,
        "action": "snapshot",
        "columns": header,
        "rows": 3,
        "files": [
            {
                "name": name,
                "rows": rows,
                "sha256": hashlib.sha256(objects[f"full/lake/{name}"]).hexdigest(),
            }
            for name, rows in [("gold-00001.csv.gz", 2), ("gold-00002.csv.gz", 1)]
        ],
    }
    # The audience shrinks below one split: one file replaces the parts, no stale part is left.
    await send(cfg, tmp_path, records=RECORDS[:2], sequence=2)
    objects = s3.objects("full/")
    assert sorted(objects) == ["full/lake/gold.csv.gz", "full/lake/gold.manifest.json"]
    assert gunzip_csv(objects["full/lake/gold.csv.gz"])[1:] == [
        ["p1", "jo.ann+x@gmail.com", "+16505550101", "Jo"],
        ["p2", "bob@example.com", "", "Bob"],
    ]
    # Sending the same batch again rewrites the same objects with the same bytes.
    await send(cfg, tmp_path, records=RECORDS[:2], sequence=2)
    assert s3.objects("full/") == objects


async def test_activation_s3_incremental_jsonl_and_parquet(s3: S3, tmp_path: Path) -> None:
    cfg = s3.config(format="jsonl", mode="incremental", fsspec_url=f"s3://{BUCKET}/inc", hash_identities=True)
    await send(cfg, tmp_path, records=RECORDS[:2], action="add", sequence=7)
    await send(cfg, tmp_path, records=RECORDS[1:2], action="remove", sequence=8)
    objects = s3.objects("inc/")
    assert sorted(objects) == [
        "inc/lake/gold-00000007-add.jsonl",
        "inc/lake/gold-00000007-add.manifest.json",
        "inc/lake/gold-00000008-remove.jsonl",
        "inc/lake/gold-00000008-remove.manifest.json",
    ]

    def sha(value: str) -> str:
        return hashlib.sha256(value.encode()).hexdigest()

    added = [json.loads(line) for line in objects["inc/lake/gold-00000007-add.jsonl"].splitlines()]
    assert added == [
        {
            "profile_id": "p1",
            "email": sha("jo.ann+x@gmail.com"),
            "phone": sha("+16505550101"),
            "first_name": "Jo",
            "change": "add",
        },
        {"profile_id": "p2", "email": sha("bob@example.com"), "phone": "", "first_name": "Bob", "change": "add"},
    ]
    removed = [json.loads(line) for line in objects["inc/lake/gold-00000008-remove.jsonl"].splitlines()]
    assert removed == [{**added[1], "change": "remove"}]
    manifest = json.loads(objects["inc/lake/gold-00000008-remove.manifest.json"])
    assert (manifest["mode"], manifest["action"], manifest["rows"]) == ("incremental", "remove", 1)

    pcfg = s3.config(format="parquet", mode="incremental", fsspec_url=f"s3://{BUCKET}/pq", manifest=False)
    await send(pcfg, tmp_path, records=RECORDS, sequence=1)
    objects = s3.objects("pq/")
    assert sorted(objects) == ["pq/lake/gold-00000001-add.parquet"]
    table = pq.read_table(io.BytesIO(objects["pq/lake/gold-00000001-add.parquet"]))
    assert table.column_names == ["profile_id", "email", "phone", "first_name", "change"]
    assert table.to_pylist()[2] == {
        "profile_id": "p3",
        "email": "",
        "phone": "+16505550103",
        "first_name": "",
        "change": "add",
    }


async def test_activation_s3_wrong_secret_is_a_permanent_error_without_the_secret(s3: S3, tmp_path: Path) -> None:
    wrong = "Wr0ng-Secret-Value-1234"
    with pytest.raises(DeliveryError) as err:
        await send(s3.config(s3_secret_access_key=wrong), tmp_path, records=RECORDS)
    assert err.value.permanent
    assert "access refused" in err.value.reason, err.value.reason
    assert "SignatureDoesNotMatch" in err.value.reason, err.value.reason
    assert wrong not in str(err.value)
    assert s3.key not in str(err.value)
    assert err.value.__cause__ is None
    assert err.value.__suppress_context__
    assert s3.objects("exports/") == {}


async def test_activation_s3_sends_log_no_credential_or_identity(
    s3: S3, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await send(s3.config(fsspec_url=f"s3://{BUCKET}/logged"), tmp_path, records=RECORDS)
    with pytest.raises(DeliveryError):
        await send(s3.config(s3_secret_access_key="Wr0ng-Secret-Value-1234"), tmp_path, records=RECORDS)
    logged = caplog.text + "".join(str(r.args) for r in caplog.records)
    for secret in (s3.key, s3.secret, "Wr0ng-Secret-Value-1234", "jo.ann+x@gmail.com", "bob@example.com"):
        assert secret not in logged


async def test_activation_s3_missing_bucket_is_a_permanent_error_and_is_not_created(s3: S3, tmp_path: Path) -> None:
    with pytest.raises(DeliveryError) as err:
        await send(s3.config(fsspec_url="s3://no-such-bucket/exports"), tmp_path, records=RECORDS)
    assert err.value.permanent
    assert "not found: no-such-bucket" in err.value.reason, err.value.reason
    assert "NoSuchBucket" in err.value.reason, err.value.reason
    names = [b["Name"] for b in s3.client().list_buckets()["Buckets"]]
    assert "no-such-bucket" not in names


async def test_activation_s3_unreachable_endpoint_is_retryable(s3: S3, tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(DeliveryError) as err:
        await send(
            s3.config(s3_endpoint_url=closed, fsspec_options={"config_kwargs": {"retries": {"max_attempts": 1}}}),
            tmp_path,
            records=RECORDS,
        )
    assert not err.value.permanent, err.value.reason


def test_activation_s3_settings_are_validated_and_credentials_masked(s3: S3) -> None:
    connector = connector_for("file_export")
    assert connector.validate(s3.config()) == []
    problems = connector.validate({**s3.config(), "s3_secret_access_key": ""})
    assert any("go together" in v.message for v in problems), problems
    problems = connector.validate({"target": "local", "s3_endpoint_url": s3.endpoint})
    assert any("s3://" in v.message for v in problems), problems
    problems = connector.validate({**s3.config(), "s3_endpoint_url": "127.0.0.1:9000"})
    assert any("http(s) URL" in v.message for v in problems), problems
    # Every answer about the destination masks the key and the secret (also inside fsspec_options).
    dest = pb.Destination()
    json_format.ParseDict({**s3.config(), "fsspec_options": {"secret": s3.secret, "key": s3.key}}, dest.config)
    shown = json_format.MessageToDict(masked(dest).config)
    assert shown["s3_access_key_id"] == shown["s3_secret_access_key"] == MASK
    assert shown["fsspec_options"] == {"secret": MASK, "key": MASK}
    assert shown["s3_endpoint_url"] == s3.endpoint
    assert shown["s3_region"] == REGION
    assert s3.secret not in json.dumps(shown)
    assert s3.key not in json.dumps(shown)
