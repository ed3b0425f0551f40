"""The Kubernetes manifests' NATS security: TLS, users and permissions from cdp_kit.natsauth,
each pod with its own credentials, streams provisioned by a Job as admin, NetworkPolicies."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from cdp_kit.natsauth import ADMIN, USERS, password_env, server_config
from tests.unit.test_k8s_manifests import (
    SETTINGS,
    Manifests,
    container_of,
    deployment_of,
    env_of,
    find,
    load_manifests,
    objects,
    pod_spec,
)


def nats_config_map(manifests: Manifests) -> dict[str, str]:
    config_map = find(manifests, "ConfigMap", "nats-config")
    assert config_map is not None
    return dict(config_map.get("data") or {})


def secret_volume_items(workload: Mapping[str, Any], mount_path: str) -> tuple[str, list[str]]:
    """(Secret name, keys) of the secret volume mounted at ``mount_path``."""
    mount = next(m for m in container_of(workload).get("volumeMounts") or [] if m.get("mountPath") == mount_path)
    volume = next(v for v in pod_spec(workload).get("volumes") or [] if v.get("name") == mount.get("name"))
    secret = volume.get("secret") or {}
    return str(secret.get("secretName")), [str(i.get("key")) for i in secret.get("items") or []]


def check_security(manifests: Manifests) -> list[str]:
    problems: list[str] = []
    data = nats_config_map(manifests)
    if server_config() not in data.get("auth.conf", ""):
        problems.append("nats-config auth.conf is not cdp_kit.natsauth's (regenerate it: `cdp admin nats-config`)")
    conf = data.get("nats.conf", "")
    if 'include "auth.conf"' not in conf:
        problems.append("nats.conf does not include auth.conf")
    if "tls {" not in conf.split("cluster {")[0]:
        problems.append("nats.conf has no client tls block")
    if "verify: true" not in conf.split("cluster {")[-1]:
        problems.append("nats.conf's cluster routes do not verify each other's certificates")
    statefulset = find(manifests, "StatefulSet", "nats")
    assert statefulset is not None
    env = {str(e.get("name")): e for e in container_of(statefulset).get("env") or []}
    for user in USERS:
        ref = ((env.get(password_env(user)) or {}).get("valueFrom") or {}).get("secretKeyRef") or {}
        if ref != {"name": "cdp-nats-users", "key": user}:
            problems.append(f"nats: {password_env(user)} is not from Secret cdp-nats-users key {user}: {ref}")
    for svc in SETTINGS:
        deployment = deployment_of(manifests, svc)
        literal = env_of(manifests, svc).literal
        if literal.get("CDP_NATS_USER") != svc:
            problems.append(f"{svc}: CDP_NATS_USER is {literal.get('CDP_NATS_USER')!r}")
        if not str(literal.get("CDP_NATS_URL", "")).startswith("tls://"):
            problems.append(f"{svc}: CDP_NATS_URL is not tls://")
        password = str(literal.get("CDP_NATS_PASSWORD_FILE", ""))
        folder, _, name = password.rpartition("/")
        try:
            secret, keys = secret_volume_items(deployment, folder)
        except StopIteration:
            problems.append(f"{svc}: nothing mounted at {folder}")
            continue
        if (secret, keys) != ("cdp-nats-users", [svc]) or name != "password":
            problems.append(f"{svc}: mounts {secret} keys {keys}, expected its own password only")
    jobs = objects(manifests, "Job")
    provision = [j for j in jobs if "cdp_kit.provision" in " ".join(container_of(j).get("command") or [])]
    if len(provision) != 1:
        problems.append(f"no single Job runs python -m cdp_kit.provision: {[j.get('metadata') for j in jobs]}")
    else:
        job = provision[0]
        job_env = {str(e.get("name")): e.get("value") for e in container_of(job).get("env") or []}
        mounted = secret_volume_items(job, "/etc/cdp-nats-user")
        if job_env.get("CDP_NATS_USER") != ADMIN or mounted != ("cdp-nats-users", [ADMIN]):
            problems.append("the provisioning Job does not connect as admin with admin's password alone")
    policies = objects(manifests, "NetworkPolicy")
    deny = [
        p
        for p in policies
        if (p.get("spec") or {}).get("podSelector") == {}
        and set((p.get("spec") or {}).get("policyTypes") or []) == {"Ingress", "Egress"}
        and not (p.get("spec") or {}).get("ingress")
        and not (p.get("spec") or {}).get("egress")
    ]
    if not deny:
        problems.append("no default-deny NetworkPolicy (all pods, Ingress and Egress, no rule)")
    nats_policy = [
        p
        for p in policies
        if ((p.get("spec") or {}).get("podSelector") or {}).get("matchLabels") == {"app.kubernetes.io/name": "nats"}
    ]
    allowed_4222 = [
        rule
        for p in nats_policy
        for rule in (p.get("spec") or {}).get("ingress") or []
        if any(port.get("port") == 4222 for port in rule.get("ports") or [])
    ]
    if not allowed_4222 or any(not rule.get("from") for rule in allowed_4222):
        problems.append("NATS' client port is not limited to the CDP's own pods")
    return problems


def test_nats_security_in_the_manifests() -> None:
    assert check_security(load_manifests()) == []


def test_the_checks_catch_a_stale_permission_table_and_a_shared_password() -> None:
    manifests = load_manifests()
    stale = copy.deepcopy(manifests)
    config_map = find(stale, "ConfigMap", "nats-config")
    assert config_map is not None
    config_map["data"]["auth.conf"] = config_map["data"]["auth.conf"].replace("cdp.config.segmentation", "cdp.x")
    assert any("auth.conf" in p for p in check_security(stale))
    shared = copy.deepcopy(manifests)
    for volume in pod_spec(deployment_of(shared, "segmentation")).get("volumes") or []:
        for item in (volume.get("secret") or {}).get("items") or []:
            if item.get("key") == "segmentation":
                item["key"] = ADMIN
    assert any("segmentation: mounts" in p for p in check_security(shared))
    open_policy = copy.deepcopy(manifests)
    for docs in open_policy.values():
        docs[:] = [
            d
            for d in docs
            if not (
                d
                and d.get("kind") == "NetworkPolicy"
                and str((d.get("metadata") or {}).get("name")).startswith("default-deny")
            )
        ]
    assert any("default-deny" in p for p in check_security(open_policy))
