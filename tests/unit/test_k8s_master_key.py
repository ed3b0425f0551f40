"""Kubernetes: activation reads its master key file from a Secret, never from a manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"


def docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def test_activation_mounts_the_master_key_secret_where_cdp_master_key_file_points() -> None:
    [deployment] = [d for d in docs("activation.yaml") if d["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    secret_volumes = [n for n, v in volumes.items() if (v.get("secret") or {}).get("secretName") == "cdp-master-key"]
    assert secret_volumes, "no volume from Secret cdp-master-key"
    mount = mounts[secret_volumes[0]]
    assert mount.get("readOnly") is True
    assert "subPath" not in mount  # a subPath mount never sees an updated Secret (rotation)
    assert env["CDP_MASTER_KEY_FILE"] == mount["mountPath"] + "/master.key"
    assert volumes[secret_volumes[0]]["secret"]["defaultMode"] & 0o007 == 0  # not world-readable


def test_the_master_key_secret_is_described_in_the_example_only() -> None:
    examples = {d["metadata"]["name"]: d for d in docs("secrets.example.yaml") if d["kind"] == "Secret"}
    assert "master.key" in examples["cdp-master-key"]["stringData"]
    applied = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert "secrets.example.yaml" not in applied
