"""A known token and a known email through the whole flow of the real stack (nats-server and the
four services as subprocesses, the CLI as a subprocess): the token goes in through the CLI from
stdin and a file, signs deliveries, survives a master key rotation, and is then searched for in
the bytes of the JetStream store, every SQLite file, every log and every export. It is never
there; the email is in the exports (and sealed on the log), which shows the search reads real data."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import pytest

from cdp.activation.v1 import activation_pb2 as act
from cdp_cli.client import Client
from cdp_cli.platforms import local_platforms
from cdp_cli.skeleton import ACTIVATED_SEGMENT, DemoData, run_flow, wait_settled
from cdp_cli.stack import Stack
from cdp_kit.keyring import load_keyring

pytestmark = pytest.mark.e2e

TOKEN = "tok-KNOWN-e2e-5f0c9a7d31"
CDP = str(Path(sys.executable).with_name("cdp"))


def cdp(data_dir: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CDP, "--data-dir", str(data_dir), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "COLUMNS": "200"},
    )


def holding(files: list[Path], needle: bytes) -> list[str]:
    return [str(p) for p in files if needle in p.read_bytes()]


def delivered(client: Client, members: Mapping[str, set[str]], held: dict[str, str]) -> bool:
    """Every destination holds what activation says it holds, and that is someone."""
    reply = client.activation.ListDeliveries(act.ListDeliveriesRequest())
    totals = {s.destination_name: s for s in reply.stats if not s.plan_id}
    return all(
        name in totals
        and totals[name].members > 0
        and totals[name].batches_pending == 0
        and len(members[key]) == totals[name].members
        for name, key in held.items()
    )


def test_a_known_token_is_nowhere_at_rest_after_the_whole_flow(tmp_path: Path, demo_data: DemoData) -> None:
    data_dir = tmp_path / "cdp"
    secret_file = tmp_path / "input" / "token.txt"
    secret_file.parent.mkdir()
    secret_file.write_text(TOKEN + "\n")
    with local_platforms() as platforms, Stack(data_dir) as stack, Client(data_dir, stack.addresses) as client:
        platforms.webhook_secret = platforms.meta_token = TOKEN
        quick = ["--config", "batch_age_s:=0.2"]
        hook = [*quick, "hook", "--connector", "webhook", "--action", "email_marketing"]
        hook += ["--config", f"base_url={platforms.url}/webhook"]
        refused = cdp(data_dir, "destination", "create", *hook, "--config", f"secret={TOKEN}")
        assert refused.returncode != 0
        assert "--secret" in refused.stderr + refused.stdout
        made = cdp(data_dir, "destination", "create", *hook, "--secret", "secret=-", stdin=TOKEN + "\n")
        assert made.returncode == 0, made.stderr
        meta = [*quick, "meta", "--connector", "meta_custom_audience", "--action", "ad_targeting"]
        meta += ["--config", f"base_url={platforms.url}", "--config", "audience_id=42"]
        made = cdp(data_dir, "destination", "create", *meta, "--secret", f"access_token=@{secret_file}")
        assert made.returncode == 0, made.stderr
        listed = cdp(data_dir, "destination", "list", "--json")
        assert TOKEN not in listed.stdout
        assert "****" in listed.stdout

        run_flow(client, demo_data)
        for name in ("hook", "meta"):
            request = act.ActivateRequest(destination=name, segment=ACTIVATED_SEGMENT, identities=["email"])
            client.activation.Activate(request)
        outcome = wait_settled(client, data_dir / "exports", demo_data)
        email = outcome.file_rows[1][1].encode()  # a known email of a gold member, sent everywhere
        held = {"hook": f"webhook:{ACTIVATED_SEGMENT}", "meta": "meta:42"}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not delivered(client, platforms.members, held):
            time.sleep(0.3)
        assert delivered(client, platforms.members, held)  # signed with the token, and its bearer
        assert not platforms.rejected

        rotated = cdp(data_dir, "admin", "rotate-master-key", "--retire")
        assert rotated.returncode == 0, rotated.stderr
        assert "2 destination(s) re-encrypted" in rotated.stdout + rotated.stderr
        assert len(load_keyring(stack.master_key_file).key_ids) == 1
        stack.restart("activation")
        assert "****" in cdp(data_dir, "destination", "list", "--json").stdout

    files = [p for p in data_dir.rglob("*") if p.is_file()]
    groups = {
        "jetstream": [p for p in files if "nats" in p.relative_to(data_dir).parts[:1] and p.suffix == ".blk"],
        "sqlite": [p for p in files if ".db" in p.name],
        "logs": [p for p in files if p.suffix == ".log"],
        "exports": [p for p in files if "exports" in p.relative_to(data_dir).parts[:1]],
    }
    for group, members in groups.items():
        assert members, f"no {group} files found to search"
    assert holding(groups["exports"], email)
    assert holding(groups["jetstream"], ACTIVATED_SEGMENT.encode())  # the search reads the log's bytes
    assert holding(groups["jetstream"], email) == []  # sealed on the log (crypto-shredding, docs/privacy.md)
    assert holding(groups["logs"], email) == []  # logs mask emails (cdp_kit.telemetry)
    assert holding(files, TOKEN.encode()) == []
