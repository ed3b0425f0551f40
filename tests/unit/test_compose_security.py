"""compose.yaml's NATS security, and both deployments' nats-server configurations checked by
nats-server itself (``-t``) with a generated CA and passwords in the environment."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import yaml

from cdp_kit.certs import Pki
from cdp_kit.natsauth import USERS, password_env, server_config
from cdp_kit.natsserver import find_binary

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
COMPOSE_DIR = ROOT / "deploy" / "compose"
SERVICES = ("ingest", "identity", "segmentation", "activation")


def compose() -> dict:  # type: ignore[type-arg]
    loaded: dict = yaml.safe_load(COMPOSE.read_text())  # type: ignore[type-arg]
    return loaded


def test_compose_auth_conf_is_the_permission_table() -> None:
    assert server_config() in (COMPOSE_DIR / "auth.conf").read_text(), "regenerate: cdp admin nats-config"


def test_compose_services_connect_as_themselves_over_tls_without_literal_passwords() -> None:
    doc = compose()
    text = COMPOSE.read_text()
    assert "CDP_NATS_PASSWORD:" not in text
    assert not any(f"{password_env(u)}:" in text for u in USERS)
    assert "deploy/compose/secrets/" in (ROOT / ".gitignore").read_text()
    for svc in SERVICES:
        service = doc["services"][svc]
        env = {**doc["x-cdp-env"], **{k: v for k, v in service["environment"].items() if k != "<<"}}
        assert env["CDP_NATS_URL"].startswith("tls://")
        assert env["CDP_NATS_USER"] == svc
        targets = {s["target"]: s["source"] for s in service["secrets"] if isinstance(s, dict) and "target" in s}
        assert targets["nats-ca.crt"] == "nats-ca"
        assert targets["nats-password"] == f"nats-{svc}-password"
        others = {name for s in service["secrets"] for name in [s if isinstance(s, str) else s["source"]]}
        assert not {f"nats-{u}-password" for u in USERS if u != svc} & others  # no other user's password
        assert doc["secrets"][f"nats-{svc}-password"]["file"].startswith("./deploy/compose/secrets/")
        assert service["depends_on"]["provision"]["condition"] == "service_completed_successfully"
    assert doc["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")
    for svc in SERVICES:
        url = doc["services"][svc]["environment"]["CDP_STORE_URL"]
        assert url.startswith("postgresql://cdp:${POSTGRES_PASSWORD}@"), url  # interpolated from .env
    provision = doc["services"]["provision"]

    assert provision["entrypoint"][-1] == "cdp_kit.provision"
    assert provision["environment"]["CDP_NATS_USER"] == "admin"
    assert doc["services"]["nats"]["env_file"] == "./deploy/compose/secrets/nats.env"


def check_config(
    config_dir: Path, tls_dir: Path, conf: str, auth: str, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    text = conf.replace("/etc/nats-tls/", f"{tls_dir}/").replace("/data", str(config_dir / "data"))
    text = text.replace("/var/run/nats/nats.pid", str(config_dir / "nats.pid"))
    (config_dir / "nats.conf").write_text(text)
    (config_dir / "auth.conf").write_text(auth)
    return subprocess.run(
        [find_binary(), "-t", "-c", str(config_dir / "nats.conf")],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


def tls_files(tmp_path: Path) -> Path:
    pki = Pki(tmp_path / "pki")
    leaf = pki.ensure("nats", ("nats", "localhost"))
    tls = tmp_path / "tls"
    tls.mkdir()
    (tls / "tls.crt").write_bytes(leaf.cert.read_bytes())
    (tls / "tls.key").write_bytes(leaf.key.read_bytes())
    (tls / "ca.crt").write_bytes(leaf.ca.read_bytes())
    return tls


def test_nats_server_accepts_both_configurations_and_needs_every_password(tmp_path: Path) -> None:
    tls = tls_files(tmp_path)
    passwords = {password_env(u): f"pw-{u}" for u in USERS}
    docs = yaml.safe_load_all((ROOT / "deploy" / "k8s" / "nats.yaml").read_text())
    k8s = next(d for d in docs if d and d["kind"] == "ConfigMap")["data"]
    configs = {
        "compose": ((COMPOSE_DIR / "nats.conf").read_text(), (COMPOSE_DIR / "auth.conf").read_text(), {}),
        "k8s": (k8s["nats.conf"], k8s["auth.conf"], {"SERVER_NAME": "nats-0"}),
    }
    for name, (conf, auth, extra) in configs.items():
        folder = tmp_path / name
        folder.mkdir()
        ok = check_config(folder, tls, conf, auth, {**passwords, **extra})
        assert ok.returncode == 0, (name, ok.stdout, ok.stderr)
        missing = {k: v for k, v in passwords.items() if k != password_env("segmentation")}
        refused = check_config(folder, tls, conf, auth, {**missing, **extra})
        assert refused.returncode != 0, name
        assert password_env("segmentation") in refused.stdout + refused.stderr, name
