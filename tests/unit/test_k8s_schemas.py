"""Every Kubernetes manifest under deploy/k8s validates against the Kubernetes API's own OpenAPI
schemas, offline (kubernetes-validate ships them; nothing is fetched), strictly: an unknown
field is an error, as `kubectl apply --validate=strict` would make it. Custom resources
(cert-manager's) have no schema there and are named, not skipped silently."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

K8S_DIR = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
# The oldest Kubernetes minor the manifests promise to work on (deploy/k8s/README.md).
KUBERNETES_VERSION = "1.30.0"
# apiVersion groups of custom resources: validated by their operators' webhooks, not here.
CUSTOM_GROUPS = ("cert-manager.io/",)


def documents() -> list[tuple[str, dict[str, Any]]]:
    found: list[tuple[str, dict[str, Any]]] = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        if path.name == "kustomization.yaml":  # kustomize's own file, not an API object
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                found.append((f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc))
    return found


DOCUMENTS = documents()


def problems(doc: dict[str, Any]) -> str:
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return f"{'.'.join(map(str, exc.path))}: {exc.message}"
    return ""


def test_there_are_manifests_and_custom_resources_are_named() -> None:
    kinds = {doc["kind"] for _, doc in DOCUMENTS}
    assert {"Deployment", "Service", "StatefulSet", "NetworkPolicy", "Job", "ConfigMap"} <= kinds, kinds
    custom = sorted(name for name, doc in DOCUMENTS if doc["apiVersion"].startswith(CUSTOM_GROUPS))
    assert custom == ["secrets.example.yaml:Certificate/nats-tls"], custom


@pytest.mark.parametrize(
    ("name", "doc"), [d for d in DOCUMENTS if not d[1]["apiVersion"].startswith(CUSTOM_GROUPS)], ids=lambda v: v
)
def test_manifest_is_valid_for_the_kubernetes_api(name: str, doc: dict[str, Any]) -> None:
    assert problems(doc) == "", name


def _first(kind: str) -> dict[str, Any]:
    return copy.deepcopy(next(doc for _, doc in DOCUMENTS if doc["kind"] == kind))


def test_detects_an_unknown_field() -> None:
    doc = _first("Deployment")
    doc["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    assert "imagePullPolicyy" in problems(doc)


def test_detects_a_wrong_type() -> None:
    doc = _first("StatefulSet")
    doc["spec"]["replicas"] = "three"
    assert "replicas" in problems(doc)


def test_detects_a_missing_required_field() -> None:
    doc = _first("Deployment")
    del doc["spec"]["template"]["spec"]["containers"][0]["name"]
    assert "name" in problems(doc)
