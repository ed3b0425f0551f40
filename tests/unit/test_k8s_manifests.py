"""Static checks of the Kubernetes deployment under deploy/k8s (DESIGN.md §5).

No cluster is needed: every manifest is parsed with PyYAML and checked against the
settings classes, the service Dockerfiles and each other. Each check is a function
returning the problems it finds, so a test shows them all at once, and so the checks
themselves can be shown to catch a broken manifest (the ``test_detects_*`` tests at
the end run them on mutated copies of the parsed documents).
"""

from __future__ import annotations

import copy
import json
import os
import posixpath
import re
import tomllib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple
from unittest import mock
from urllib.parse import urlsplit

import pytest
import yaml
from pydantic import ValidationError

from cdp_activation.settings import ActivationSettings
from cdp_identity.settings import IdentitySettings
from cdp_ingest.settings import IngestSettings
from cdp_kit.grpc_server import LIVENESS, READINESS
from cdp_kit.settings import ServiceSettings
from cdp_segmentation.settings import SegmentationSettings

ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = ROOT / "deploy" / "k8s"
KUSTOMIZATION = "kustomization.yaml"
SECRETS_EXAMPLE = "secrets.example.yaml"
NETWORK_POLICIES = "networkpolicies.yaml"
GRPC_TLS_SECRET = "cdp-grpc-tls"
GRPC_TOKENS_SECRET = "cdp-grpc-tokens"

SETTINGS: dict[str, type[ServiceSettings]] = {
    "ingest": IngestSettings,
    "identity": IdentitySettings,
    "segmentation": SegmentationSettings,
    "activation": ActivationSettings,
}
APP_UID = 10001  # the cdp user of services/*/Dockerfile
NATS = "nats"  # the NATS StatefulSet (and its client Service)
NATS_NODES = 3
NATS_CLIENT_PORT = 4222
NATS_MONITOR_PORT = 8222
STREAM_REPLICAS = 3
POSTGRES_SCHEMES = ("postgresql", "postgres", "postgresql+psycopg")

# The gRPC health service name each probe of a service asks (cdp_kit.grpc_server).
PROBE_SERVICES = {"startupProbe": LIVENESS, "readinessProbe": READINESS, "livenessProbe": LIVENESS}

Doc = dict[str, Any]
# File name (relative to deploy/k8s) -> the YAML documents in it.
Manifests = dict[str, list[Doc]]


# --- parsing -----------------------------------------------------------------------


def load_manifests(folder: Path = K8S_DIR) -> Manifests:
    """Every *.yaml file of the folder, each as its list of (non-empty) documents."""
    out: Manifests = {}
    for path in sorted(folder.glob("*.yaml")):
        docs = [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]
        for doc in docs:
            assert isinstance(doc, dict), f"{path.name}: a document is not a mapping: {doc!r}"
        out[path.name] = docs
    return out


def applied(manifests: Manifests) -> Iterator[tuple[str, Doc]]:
    """(file, document) of every Kubernetes object `kubectl apply -k` creates."""
    for name, docs in manifests.items():
        if name in (KUSTOMIZATION, SECRETS_EXAMPLE):
            continue
        for doc in docs:
            yield name, doc


def objects(manifests: Manifests, kind: str, file: str | None = None) -> list[Doc]:
    return [doc for name, doc in applied(manifests) if doc.get("kind") == kind and file in (None, name)]


def name_of(doc: Mapping[str, Any]) -> str:
    return str((doc.get("metadata") or {}).get("name", ""))


def find(manifests: Manifests, kind: str, name: str) -> Doc | None:
    found = [doc for doc in objects(manifests, kind) if name_of(doc) == name]
    return found[0] if len(found) == 1 else None


def kustomization(manifests: Manifests) -> Doc:
    docs = manifests.get(KUSTOMIZATION) or []
    assert len(docs) == 1, f"deploy/k8s/{KUSTOMIZATION} must hold exactly one document"
    return docs[0]


def deployment_of(manifests: Manifests, svc: str) -> Doc:
    found = objects(manifests, "Deployment", f"{svc}.yaml")
    assert len(found) == 1, f"deploy/k8s/{svc}.yaml must hold exactly one Deployment, has {len(found)}"
    return found[0]


def pod_spec(workload: Mapping[str, Any]) -> Doc:
    spec: Doc = workload["spec"]["template"]["spec"]
    return spec


def pod_labels(workload: Mapping[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"].get("metadata", {}).get("labels") or {}
    return labels


def container_of(workload: Mapping[str, Any]) -> Doc:
    containers: list[Doc] = pod_spec(workload).get("containers") or []
    assert len(containers) == 1, f"{name_of(workload)}: expected one container, has {len(containers)}"
    return containers[0]


def selects(service: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    selector: Mapping[str, str] = service.get("spec", {}).get("selector") or {}
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def resolve_port(container: Mapping[str, Any], port: Any) -> int | None:
    """A port number, or a named container port resolved to its number."""
    if isinstance(port, int):
        return port
    for item in container.get("ports") or []:
        if item.get("name") == port:
            return int(item["containerPort"])
    return None


class Env(NamedTuple):
    """The CDP_ environment of a container, as Kubernetes assembles it."""

    literal: dict[str, Any]  # name -> value written in a manifest (ConfigMap data or env value)
    from_secret: dict[str, tuple[str, str]]  # name -> (Secret name, key)
    problems: list[str]


def container_env(manifests: Manifests, container: Mapping[str, Any], where: str) -> Env:
    literal: dict[str, Any] = {}
    from_secret: dict[str, tuple[str, str]] = {}
    problems: list[str] = []
    for source in container.get("envFrom") or []:
        ref = source.get("configMapRef")
        if not isinstance(ref, Mapping) or set(source) != {"configMapRef"}:
            problems.append(f"{where}: envFrom {source!r} is not a plain configMapRef (its keys cannot be checked)")
            continue
        config_map = find(manifests, "ConfigMap", str(ref.get("name")))
        if config_map is None:
            problems.append(f"{where}: envFrom names ConfigMap {ref.get('name')!r}, which no manifest defines")
            continue
        literal.update(config_map.get("data") or {})
    seen: set[str] = set()
    for item in container.get("env") or []:
        name = str(item.get("name"))
        if name in seen:
            problems.append(f"{where}: env {name} is set twice")
        seen.add(name)
        if "value" in item:
            literal[name] = item["value"]
            continue
        ref = (item.get("valueFrom") or {}).get("secretKeyRef")
        if isinstance(ref, Mapping):
            literal.pop(name, None)
            from_secret[name] = (str(ref.get("name")), str(ref.get("key")))
        else:
            problems.append(f"{where}: env {name} has neither a value nor a secretKeyRef: {item!r}")
    return Env(literal, from_secret, problems)


def env_of(manifests: Manifests, svc: str) -> Env:
    return container_env(manifests, container_of(deployment_of(manifests, svc)), svc)


@contextmanager
def only_environment(env: Mapping[str, str]) -> Iterator[None]:
    """The process environment without any CDP_ variable but these."""
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("CDP_")}
    with mock.patch.dict(os.environ, {**clean, **env}, clear=True):
        yield


def settings_from(settings_cls: type[ServiceSettings], env: Mapping[str, str]) -> ServiceSettings:
    """The settings a service reads from this environment: the way `serve` reads them
    (so list fields such as CDP_IDENTITY_BLOCKLIST are parsed from JSON, as in the pod)."""
    with only_environment(env):
        return settings_cls()


# --- Dockerfiles ----------------------------------------------------------------------


class Instruction(NamedTuple):
    keyword: str
    args: str


def dockerfile_final_stage(text: str) -> list[Instruction]:
    """The instructions of the last stage of a Dockerfile (the image that runs)."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    if pending:
        logical.append(pending)
    instructions: list[Instruction] = []
    for line in logical:
        keyword, *args = line.split(None, 1)
        instructions.append(Instruction(keyword.upper(), args[0].strip() if args else ""))
    starts = [n for n, i in enumerate(instructions) if i.keyword == "FROM"]
    return instructions[starts[-1] :] if starts else instructions


def exec_form(stage: list[Instruction], keyword: str) -> list[str] | None:
    """The last ENTRYPOINT or CMD of a stage in exec (JSON) form; None if absent."""
    found = [i.args for i in stage if i.keyword == keyword]
    if not found:
        return None
    try:
        value = json.loads(found[-1])
    except json.JSONDecodeError:
        return [found[-1]]  # the shell form: compared as one string, it never matches an argv
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def dockerfile_stage(svc: str, root: Path = ROOT) -> list[Instruction]:
    path = root / "services" / svc / "Dockerfile"
    assert path.is_file(), f"services/{svc}/Dockerfile is missing"
    return dockerfile_final_stage(path.read_text(encoding="utf-8"))


def service_version(svc: str, root: Path = ROOT) -> str:
    project = tomllib.loads((root / "services" / svc / "pyproject.toml").read_text(encoding="utf-8"))
    return str(project["project"]["version"])


# --- checks: each returns a list of problems -------------------------------------------


def check_kustomization(manifests: Manifests) -> list[str]:
    resources = [str(r) for r in kustomization(manifests).get("resources") or []]
    files = set(manifests) - {KUSTOMIZATION, SECRETS_EXAMPLE}
    problems: list[str] = []
    if SECRETS_EXAMPLE in resources:
        problems.append(f"{KUSTOMIZATION}: lists {SECRETS_EXAMPLE}, whose placeholders must never be applied")
    if missing := sorted(files - set(resources)):
        problems.append(f"{KUSTOMIZATION}: does not list {missing}")
    if unknown := sorted(set(resources) - files - {SECRETS_EXAMPLE}):
        problems.append(f"{KUSTOMIZATION}: lists {unknown}, which are not manifests in deploy/k8s")
    if len(resources) != len(set(resources)):
        problems.append(f"{KUSTOMIZATION}: lists a file twice: {resources}")
    return problems


def check_namespace(manifests: Manifests) -> list[str]:
    namespace = kustomization(manifests).get("namespace")
    problems: list[str] = []
    if not namespace:
        problems.append(f"{KUSTOMIZATION}: no `namespace`")
    names = [name_of(doc) for doc in objects(manifests, "Namespace")]
    if names != [namespace]:
        problems.append(f"the Namespace objects are {names}, expected only the kustomization's {namespace!r}")
    for file, doc in applied(manifests):
        if doc.get("kind") == "Secret":
            problems.append(f"{file}: defines Secret {name_of(doc)!r}; credentials are never committed")
        other = (doc.get("metadata") or {}).get("namespace")
        if other not in (None, namespace):
            problems.append(f"{file}: {doc.get('kind')} {name_of(doc)} is in namespace {other!r}, not {namespace!r}")
    return problems


def check_single_writer(manifests: Manifests, svc: str) -> list[str]:
    """One pod at a time: the service is the single writer of its own subjects."""
    deployment = deployment_of(manifests, svc)
    spec = deployment.get("spec") or {}
    problems: list[str] = []
    if name_of(deployment) != f"cdp-{svc}":
        problems.append(f"{svc}: the Deployment is named {name_of(deployment)!r}, expected 'cdp-{svc}'")
    if spec.get("replicas") != 1:
        problems.append(f"{svc}: replicas is {spec.get('replicas')!r}, must be 1 (single writer of its subjects)")
    strategy = (spec.get("strategy") or {}).get("type")
    if strategy != "Recreate":
        problems.append(f"{svc}: strategy is {strategy!r}, must be Recreate (never two pods at once)")
    for hpa in objects(manifests, "HorizontalPodAutoscaler"):
        if (hpa.get("spec") or {}).get("scaleTargetRef", {}).get("name") == name_of(deployment):
            problems.append(f"{svc}: HorizontalPodAutoscaler {name_of(hpa)} scales a single-writer Deployment")
    return problems


def check_command(manifests: Manifests, svc: str, root: Path = ROOT) -> list[str]:
    """The container runs `python -m cdp_<svc> serve` from the image cdp-<svc>:<version>."""
    container = container_of(deployment_of(manifests, svc))
    problems: list[str] = []
    image = str(container.get("image", ""))
    name, _, tag = image.rpartition(":") if ":" in image.rsplit("/", 1)[-1] else (image, "", "")
    if name.rsplit("/", 1)[-1] != f"cdp-{svc}":
        problems.append(f"{svc}: image {image!r} is not cdp-{svc}")
    version = service_version(svc, root)
    if tag != version:
        problems.append(f"{svc}: image tag {tag!r} is not the service's version {version!r}")
    stage = dockerfile_stage(svc, root)
    command: list[str] | None = container.get("command")
    args: list[str] | None = container.get("args")
    # Kubernetes: `command` replaces ENTRYPOINT (and drops CMD); `args` replaces CMD.
    argv = [*(command if command is not None else exec_form(stage, "ENTRYPOINT") or [])]
    if args is not None:
        argv += args
    elif command is None:
        argv += exec_form(stage, "CMD") or []
    expected = ["python", "-m", f"cdp_{svc}", "serve"]
    if argv != expected:
        problems.append(f"{svc}: the container runs {argv}, expected {expected}")
    return problems


def check_environment(manifests: Manifests, svc: str) -> list[str]:
    """Every variable is a CDP_ field of the service's settings class with a valid value."""
    settings_cls = SETTINGS[svc]
    fields = settings_cls.model_fields
    env = env_of(manifests, svc)
    problems = list(env.problems)
    if not env.literal:
        problems.append(f"{svc}: no environment")
    values: dict[str, str] = {}
    for key in [*env.literal, *env.from_secret]:
        if not key.startswith("CDP_"):
            problems.append(f"{svc}: environment variable {key} does not start with CDP_")
            continue
        field = key.removeprefix("CDP_").lower()
        if field not in fields or key != "CDP_" + field.upper():
            known = ", ".join(sorted("CDP_" + f.upper() for f in fields))
            problems.append(f"{svc}: {key} is not a field of {settings_cls.__name__} (known: {known})")
            continue
        if key not in env.literal:
            continue
        value = env.literal[key]
        if not isinstance(value, str):
            problems.append(f"{svc}: {key}={value!r} is not a string (quote it: Kubernetes takes strings only)")
            continue
        try:
            settings_from(settings_cls, {key: value})
        except ValidationError as exc:
            problems.append(f"{svc}: {key}={value!r} is rejected by {settings_cls.__name__}: {exc}")
            continue
        values[key] = value
    if not problems:
        try:
            settings_from(settings_cls, values)
        except ValidationError as exc:
            problems.append(f"{svc}: the environment together is rejected by {settings_cls.__name__}: {exc}")
    return problems


def check_store_secret(manifests: Manifests, svc: str) -> list[str]:
    """CDP_STORE_URL comes from the Secret cdp-<svc>-store (key url), described in the example."""
    env = env_of(manifests, svc)
    expected = (f"cdp-{svc}-store", "url")
    if "CDP_STORE_URL" in env.literal:
        return [f"{svc}: CDP_STORE_URL is written in a manifest; it must come from Secret {expected[0]}"]
    ref = env.from_secret.get("CDP_STORE_URL")
    if ref != expected:
        return [f"{svc}: CDP_STORE_URL comes from {ref!r}, expected secretKeyRef {expected}"]
    examples = [doc for doc in manifests.get(SECRETS_EXAMPLE) or [] if doc.get("kind") == "Secret"]
    example = next((doc for doc in examples if name_of(doc) == expected[0]), None)
    if example is None:
        return [f"{svc}: {SECRETS_EXAMPLE} has no Secret {expected[0]}"]
    url = (example.get("stringData") or {}).get("url")
    if not isinstance(url, str):
        return [f"{svc}: {SECRETS_EXAMPLE}: Secret {expected[0]} has no stringData.url"]
    problems: list[str] = []
    parts = urlsplit(url)
    if parts.scheme not in POSTGRES_SCHEMES:
        problems.append(f"{svc}: {SECRETS_EXAMPLE}: {url!r} is not a PostgreSQL URL")
    if parts.password not in (None, "", "CHANGE_ME"):
        problems.append(f"{svc}: {SECRETS_EXAMPLE}: the password must be the placeholder CHANGE_ME")
    try:
        settings_from(SETTINGS[svc], {"CDP_STORE_URL": url})
    except ValidationError as exc:
        problems.append(f"{svc}: {SECRETS_EXAMPLE}: {url!r} is rejected as CDP_STORE_URL: {exc}")
    return problems


PII_KEY_SECRET = "cdp-pii-hash-key"


def check_pii_hash_key(manifests: Manifests, svc: str) -> list[str]:
    """CDP_PII_HASH_KEY_FILE names a file of the Secret cdp-pii-hash-key (the same for every
    service), mounted read-only and unreadable by others; the example shows the Secret's shape."""
    path = env_of(manifests, svc).literal.get("CDP_PII_HASH_KEY_FILE")
    if not isinstance(path, str) or not path:
        return [f"{svc}: no CDP_PII_HASH_KEY_FILE (a service without its key does not start)"]
    folder, key = posixpath.split(path)
    deployment = deployment_of(manifests, svc)
    mounts = [m for m in container_of(deployment).get("volumeMounts") or [] if m.get("mountPath") == folder]
    if not mounts:
        return [f"{svc}: nothing is mounted at {folder!r}, the folder of CDP_PII_HASH_KEY_FILE"]
    [mount] = mounts
    problems: list[str] = []
    if not mount.get("readOnly"):
        problems.append(f"{svc}: the PII hash key's folder {folder!r} is not mounted read-only")
    volume: Doc = next((v for v in pod_spec(deployment).get("volumes") or [] if v.get("name") == mount.get("name")), {})
    secret = volume.get("secret") or {}
    if secret.get("secretName") != PII_KEY_SECRET:
        problems.append(f"{svc}: {folder!r} holds volume {volume!r}, expected Secret {PII_KEY_SECRET}")
    items = secret.get("items")
    if items is not None and key not in [i.get("path") for i in items]:
        problems.append(f"{svc}: Secret {PII_KEY_SECRET}'s items put no file {key!r} in {folder!r}")
    mode = secret.get("defaultMode", 0o644)
    if mode & 0o007:
        problems.append(f"{svc}: the PII hash key's defaultMode {mode:o} lets others read it")
    examples = [doc for doc in manifests.get(SECRETS_EXAMPLE) or [] if doc.get("kind") == "Secret"]
    example = next((doc for doc in examples if name_of(doc) == PII_KEY_SECRET), None)
    if example is None or key not in (example.get("stringData") or {}):
        problems.append(f"{svc}: {SECRETS_EXAMPLE} shows no Secret {PII_KEY_SECRET} with key {key!r}")
    return problems


def check_probe_services(manifests: Manifests, svc: str) -> list[str]:
    """Each probe asks its own question by gRPC health service name: the liveness probe (and the
    startup probe that gates it) "is the process answering", the readiness probe "can it work"
    (recovered, NATS connected, no consumer stuck). A liveness probe that asked readiness would
    restart a pod for ever over a message it cannot apply."""
    container = container_of(deployment_of(manifests, svc))
    problems: list[str] = []
    for probe, wanted in PROBE_SERVICES.items():
        grpc = (container.get(probe) or {}).get("grpc") or {}
        asked = grpc.get("service", "") if isinstance(grpc, Mapping) else None
        if asked != wanted:
            problems.append(f"{svc}: {probe} asks health service {asked!r}, expected {wanted!r}")
    return problems


def check_ports(manifests: Manifests, svc: str, root: Path = ROOT) -> list[str]:
    """CDP_GRPC_PORT = default_port = containerPort = Service port = every probe's grpc.port."""
    settings_cls = SETTINGS[svc]
    default = settings_cls.default_port
    deployment = deployment_of(manifests, svc)
    container = container_of(deployment)
    raw = env_of(manifests, svc).literal.get("CDP_GRPC_PORT")
    if not isinstance(raw, str) or not raw.isdigit():
        return [f"{svc}: CDP_GRPC_PORT must be set to its port {default}, got {raw!r}"]
    port = int(raw)
    problems: list[str] = []
    if port != default:
        problems.append(f"{svc}: CDP_GRPC_PORT={port} but {settings_cls.__name__}.default_port is {default}")
    # The gRPC port serves TLS, which kubelet gRPC probes cannot speak: they ask the plaintext
    # health-only port (CDP_GRPC_HEALTH_PORT).
    raw_health = env_of(manifests, svc).literal.get("CDP_GRPC_HEALTH_PORT")
    health = int(raw_health) if isinstance(raw_health, str) and raw_health.isdigit() else 0
    if not health or health == port:
        problems.append(f"{svc}: CDP_GRPC_HEALTH_PORT is {raw_health!r}; probes need a plaintext health port")
    container_ports = {item.get("containerPort") for item in container.get("ports") or []}
    if container_ports != {port, health}:
        problems.append(f"{svc}: containerPorts are {sorted(container_ports)}, expected only {port} and {health}")
    for probe in PROBE_SERVICES:
        grpc = (container.get(probe) or {}).get("grpc")
        if not isinstance(grpc, Mapping):
            problems.append(f"{svc}: {probe} is not a native gRPC probe (`grpc: {{port: {health}}}`)")
        elif grpc.get("port") != health:
            problems.append(f"{svc}: {probe} checks grpc port {grpc.get('port')!r}, expected the health port {health}")
    services = [s for s in objects(manifests, "Service", f"{svc}.yaml") if selects(s, pod_labels(deployment))]
    if len(services) != 1:
        problems.append(f"{svc}: expected one Service selecting its pod in {svc}.yaml, found {len(services)}")
    for service in services:
        spec = service.get("spec") or {}
        if spec.get("type", "ClusterIP") != "ClusterIP" or spec.get("clusterIP") == "None":
            problems.append(f"{svc}: Service {name_of(service)} is not a plain ClusterIP Service")
        ports = spec.get("ports") or []
        exposed = [(p.get("port"), resolve_port(container, p.get("targetPort", p.get("port")))) for p in ports]
        if exposed != [(port, port)]:
            problems.append(f"{svc}: Service {name_of(service)} maps (port, container port) {exposed}, not {port}")
    exposed_by_image = {
        int(p.split("/")[0]) for i in dockerfile_stage(svc, root) if i.keyword == "EXPOSE" for p in i.args.split()
    }
    if exposed_by_image != {port}:
        problems.append(f"{svc}: services/{svc}/Dockerfile EXPOSEs {sorted(exposed_by_image)}, expected {port}")
    return problems


def check_shutdown(manifests: Manifests, svc: str) -> list[str]:
    """The kubelet waits longer than the service's own shutdown grace before SIGKILL."""
    settings_cls = SETTINGS[svc]
    default = settings_cls.model_fields["shutdown_grace_s"].default
    literal = {k: v for k, v in env_of(manifests, svc).literal.items() if isinstance(v, str)}
    try:
        grace = settings_from(settings_cls, literal).shutdown_grace_s
    except ValidationError:
        grace = default  # check_environment reports it
    period = pod_spec(deployment_of(manifests, svc)).get("terminationGracePeriodSeconds")
    if not isinstance(period, int):
        return [f"{svc}: terminationGracePeriodSeconds is not set (the default 30s is implicit)"]
    if period <= max(grace, default):
        return [f"{svc}: terminationGracePeriodSeconds={period} is not above CDP_SHUTDOWN_GRACE_S={grace}"]
    return []


def check_security(manifests: Manifests, svc: str, root: Path = ROOT) -> list[str]:
    """Non-root as the image's uid, read-only root filesystem, resources bounded."""
    deployment = deployment_of(manifests, svc)
    pod = pod_spec(deployment).get("securityContext") or {}
    container = container_of(deployment)
    own = container.get("securityContext") or {}

    def effective(key: str) -> Any:
        return own.get(key, pod.get(key))

    problems: list[str] = []
    if effective("runAsUser") != APP_UID:
        problems.append(f"{svc}: runAsUser is {effective('runAsUser')!r}, expected {APP_UID} (the image's user)")
    if effective("runAsNonRoot") is not True:
        problems.append(f"{svc}: runAsNonRoot is not true")
    if own.get("readOnlyRootFilesystem") is not True:
        problems.append(f"{svc}: readOnlyRootFilesystem is not true")
    if own.get("allowPrivilegeEscalation") is not False:
        problems.append(f"{svc}: allowPrivilegeEscalation is not false")
    users = [i.args for i in dockerfile_stage(svc, root) if i.keyword == "USER"]
    if not users or users[-1].split(":")[0] != str(APP_UID):
        problems.append(f"{svc}: services/{svc}/Dockerfile runs as {users[-1:]}, expected USER {APP_UID}")
    resources = container.get("resources") or {}
    for part in ("requests", "limits"):
        if not {"cpu", "memory"} <= set(resources.get(part) or {}):
            problems.append(f"{svc}: resources.{part} must set cpu and memory, got {resources.get(part)!r}")
    if pod_spec(deployment).get("enableServiceLinks") is not False:
        problems.append(f"{svc}: enableServiceLinks is not false (Service links add CDP_*-named variables)")
    return problems


def check_volumes(manifests: Manifests, svc: str) -> list[str]:
    """CDP_DATA_DIR is a writable emptyDir; activation's export dir is a PersistentVolumeClaim."""
    deployment = deployment_of(manifests, svc)
    container = container_of(deployment)
    literal = {k: v for k, v in env_of(manifests, svc).literal.items() if isinstance(v, str)}
    try:
        settings = settings_from(SETTINGS[svc], literal)
    except ValidationError:
        return [f"{svc}: the environment is rejected by its settings class (see the environment test)"]
    volumes = {str(v.get("name")): v for v in pod_spec(deployment).get("volumes") or []}
    mounts = {str(m.get("mountPath")): m for m in container.get("volumeMounts") or []}
    problems: list[str] = []

    def volume_at(path: Path, what: str) -> Doc | None:
        mount = mounts.get(str(path))
        if mount is None:
            problems.append(f"{svc}: nothing is mounted at {what} {str(path)!r} (the root filesystem is read-only)")
            return None
        if mount.get("readOnly"):
            problems.append(f"{svc}: {what} {str(path)!r} is mounted read-only")
        volume = volumes.get(str(mount.get("name")))
        if volume is None:
            problems.append(f"{svc}: the volume {mount.get('name')!r} mounted at {str(path)!r} is not defined")
        return volume

    data = volume_at(settings.data_dir, "CDP_DATA_DIR")
    if data is not None and "emptyDir" not in data and "persistentVolumeClaim" not in data:
        problems.append(f"{svc}: CDP_DATA_DIR is on volume {data!r}, expected an emptyDir")
    if isinstance(settings, ActivationSettings):
        if settings.export_dir is None:
            problems.append(f"{svc}: CDP_EXPORT_DIR is not set (exports would go to the scratch data dir)")
        else:
            exports = volume_at(settings.export_dir, "CDP_EXPORT_DIR")
            claim = ((exports or {}).get("persistentVolumeClaim") or {}).get("claimName")
            if exports is not None and claim is None:
                problems.append(f"{svc}: CDP_EXPORT_DIR is not on a PersistentVolumeClaim: {exports!r}")
            elif claim is not None and find(manifests, "PersistentVolumeClaim", str(claim)) is None:
                problems.append(f"{svc}: PersistentVolumeClaim {claim!r} is not defined in the manifests")
    return problems


def nats_config(manifests: Manifests, statefulset: Mapping[str, Any]) -> str:
    """The nats.conf the StatefulSet's container reads (from its ConfigMap volume)."""
    args = [str(a) for a in (container_of(statefulset).get("args") or [])]
    flag = next((f for f in ("--config", "-c") if f in args), None)
    assert flag is not None, f"nats: no --config in {args}"
    assert args.index(flag) + 1 < len(args), f"nats: --config without a file in {args}"
    path = Path(args[args.index(flag) + 1])
    mounts = container_of(statefulset).get("volumeMounts") or []
    mount = next((m for m in mounts if path.parent == Path(str(m.get("mountPath")))), None)
    assert mount is not None, f"nats: {path.parent} is not a volume mount"
    volume = next(v for v in pod_spec(statefulset).get("volumes") or [] if v.get("name") == mount.get("name"))
    config_map = find(manifests, "ConfigMap", str((volume.get("configMap") or {}).get("name")))
    assert config_map is not None, f"nats: the configuration volume {volume!r} is not a defined ConfigMap"
    return str((config_map.get("data") or {}).get(path.name, ""))


def check_nats(manifests: Manifests) -> list[str]:
    """A 3-node JetStream cluster: headless Service, routes to every node, file storage on PVCs."""
    statefulset = find(manifests, "StatefulSet", NATS)
    if statefulset is None:
        return [f"no StatefulSet {NATS!r} in {sorted(manifests)}"]
    spec = statefulset.get("spec") or {}
    problems: list[str] = []
    replicas = spec.get("replicas")
    if replicas != NATS_NODES:
        problems.append(f"nats: the StatefulSet has replicas {replicas!r}, expected {NATS_NODES}")
    headless = find(manifests, "Service", str(spec.get("serviceName")))
    if headless is None or (headless.get("spec") or {}).get("clusterIP") != "None":
        problems.append(f"nats: serviceName {spec.get('serviceName')!r} is not a headless Service")
    elif not selects(headless, pod_labels(statefulset)):
        problems.append(f"nats: the headless Service {name_of(headless)} does not select the NATS pods")
    config = nats_config(manifests, statefulset)
    jetstream = re.search(r"^\s*jetstream\s*[:=]?\s*\{(?P<body>[^}]*)\}", config, re.MULTILINE)
    if jetstream is None:
        problems.append("nats: nats.conf has no `jetstream { ... }` block")
    else:
        store = re.search(r"store_dir\s*[:=]?\s*\"?(?P<dir>[^\s\"]+)", jetstream["body"])
        claims = {name_of(c) for c in spec.get("volumeClaimTemplates") or []}
        mounts = {
            str(m.get("mountPath")): str(m.get("name")) for m in container_of(statefulset).get("volumeMounts") or []
        }
        store_dir = store["dir"] if store else None
        if store_dir is None or mounts.get(store_dir) not in claims:
            problems.append(f"nats: JetStream store_dir {store_dir!r} is not a volumeClaimTemplate mount {mounts}")
    if not re.search(r"^\s*cluster\s*[:=]?\s*\{", config, re.MULTILINE):
        problems.append("nats: nats.conf has no `cluster { ... }` block")
    routes = set(re.findall(r"nats://([\w.-]+):6222", config))
    service_name = spec.get("serviceName")
    expected = {f"{NATS}-{i}.{service_name}" for i in range(replicas if isinstance(replicas, int) else 0)}
    if routes != expected:
        problems.append(f"nats: the cluster routes are {sorted(routes)}, expected {sorted(expected)}")
    container = container_of(statefulset)
    ports = {p.get("containerPort") for p in container.get("ports") or []}
    if NATS_MONITOR_PORT not in ports or not re.search(rf"^\s*http\s*[:=]\s*\S*{NATS_MONITOR_PORT}", config, re.M):
        problems.append(f"nats: the monitoring port {NATS_MONITOR_PORT} is not enabled and exposed")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        http = (container.get(probe) or {}).get("httpGet") or {}
        if not str(http.get("path", "")).startswith("/healthz"):
            problems.append(f"nats: {probe} does not GET /healthz: {http!r}")
        elif resolve_port(container, http.get("port")) != NATS_MONITOR_PORT:
            problems.append(f"nats: {probe} does not use the monitoring port {NATS_MONITOR_PORT}: {http!r}")
    return problems


def shared_config(manifests: Manifests) -> dict[str, Any]:
    names = {
        str(ref["configMapRef"]["name"])
        for svc in SETTINGS
        for ref in container_of(deployment_of(manifests, svc)).get("envFrom") or []
        if isinstance(ref.get("configMapRef"), Mapping)
    }
    assert len(names) == 1, f"the services should share one ConfigMap, they use {sorted(names)}"
    config_map = find(manifests, "ConfigMap", names.pop())
    assert config_map is not None, "the shared ConfigMap is not defined"
    data: dict[str, Any] = config_map.get("data") or {}
    return data


def check_cluster_settings(manifests: Manifests) -> list[str]:
    """The services create R3 streams and connect to the NATS client Service."""
    data = shared_config(manifests)
    problems: list[str] = []
    if data.get("CDP_STREAM_REPLICAS") != str(STREAM_REPLICAS):
        problems.append(f"CDP_STREAM_REPLICAS is {data.get('CDP_STREAM_REPLICAS')!r}, expected '{STREAM_REPLICAS}'")
    if data.get("CDP_GRPC_HOST") != "0.0.0.0":
        problems.append(f"CDP_GRPC_HOST is {data.get('CDP_GRPC_HOST')!r}; probes and Services need '0.0.0.0'")
    if data.get("CDP_LOG_FORMAT") != "json":
        problems.append(f"CDP_LOG_FORMAT is {data.get('CDP_LOG_FORMAT')!r}, expected 'json' in production")
    url = str(data.get("CDP_NATS_URL", ""))
    parts = urlsplit(url)
    host = parts.hostname or ""
    namespace = kustomization(manifests).get("namespace")
    service_name, _, rest = host.partition(".")
    if rest and rest not in (namespace, f"{namespace}.svc", f"{namespace}.svc.cluster.local"):
        problems.append(f"CDP_NATS_URL {url!r} names a host outside namespace {namespace!r}")
    service = find(manifests, "Service", service_name)
    statefulset = find(manifests, "StatefulSet", NATS)
    if parts.scheme != "tls":
        problems.append(f"CDP_NATS_URL {url!r} is not tls:// (NATS clients must use TLS)")
    if parts.scheme not in ("nats", "tls") or service is None or statefulset is None:
        problems.append(f"CDP_NATS_URL {url!r} does not name a NATS Service")
        return problems
    if not selects(service, pod_labels(statefulset)):
        problems.append(f"CDP_NATS_URL: Service {service_name} does not select the NATS pods")
    port = parts.port or NATS_CLIENT_PORT
    targets = [
        resolve_port(container_of(statefulset), p.get("targetPort", p.get("port")))
        for p in (service.get("spec") or {}).get("ports") or []
        if p.get("port") == port
    ]
    if targets != [NATS_CLIENT_PORT]:
        problems.append(f"CDP_NATS_URL: Service {service_name} port {port} does not reach the client port")
    return problems


def check_grpc_security(manifests: Manifests, svc: str) -> list[str]:
    """gRPC serves TLS and checks tokens: the certificate, key and token table come from the
    Secrets cdp-grpc-tls (cert-manager layout) and cdp-grpc-tokens, mounted read-only."""
    literal = {k: v for k, v in env_of(manifests, svc).literal.items() if isinstance(v, str)}
    try:
        settings = settings_from(SETTINGS[svc], literal)
    except ValidationError:
        return [f"{svc}: the environment is rejected by its settings class (see the environment test)"]
    problems: list[str] = []
    if settings.grpc_insecure:
        problems.append(f"{svc}: CDP_GRPC_INSECURE is on: gRPC would serve plaintext without authentication")
    if (problem := settings.grpc_security_problem()) is not None:
        problems.append(f"{svc}: {problem}")
        return problems
    deployment = deployment_of(manifests, svc)
    volumes = {str(v.get("name")): v for v in pod_spec(deployment).get("volumes") or []}
    mounts = container_of(deployment).get("volumeMounts") or []
    wanted = {
        "CDP_GRPC_TLS_CERT_FILE": (settings.grpc_tls_cert_file, GRPC_TLS_SECRET, "tls.crt"),
        "CDP_GRPC_TLS_KEY_FILE": (settings.grpc_tls_key_file, GRPC_TLS_SECRET, "tls.key"),
        "CDP_GRPC_TOKENS_FILE": (settings.grpc_tokens_file, GRPC_TOKENS_SECRET, "tokens.json"),
    }
    for key, (path, secret, file) in wanted.items():
        assert path is not None
        mount = next((m for m in mounts if Path(str(m.get("mountPath"))) == path.parent), None)
        if mount is None:
            problems.append(f"{svc}: {key}={str(path)!r} is not in a mounted volume")
            continue
        volume = volumes.get(str(mount.get("name"))) or {}
        source = str((volume.get("secret") or {}).get("secretName"))
        if source != secret or path.name != file:
            problems.append(f"{svc}: {key} is {file!r} of Secret {source!r}, expected {file!r} of Secret {secret!r}")
        if mount.get("readOnly") is not True:
            problems.append(f"{svc}: the Secret {source} is not mounted read-only")
    examples = {name_of(d): d for d in manifests.get(SECRETS_EXAMPLE) or [] if d.get("kind") == "Secret"}
    for secret, keys in ((GRPC_TLS_SECRET, {"tls.crt", "tls.key", "ca.crt"}), (GRPC_TOKENS_SECRET, {"tokens.json"})):
        if not keys <= set((examples.get(secret) or {}).get("stringData") or {}):
            problems.append(f"{SECRETS_EXAMPLE}: no Secret {secret} with keys {sorted(keys)}")
    return problems


def policy_ports(rule: Mapping[str, Any], container: Mapping[str, Any] | None) -> set[int | str]:
    """The TCP ports a policy rule opens (named ports resolved against ``container``)."""
    out: set[int | str] = set()
    for item in rule.get("ports") or []:
        port = item.get("port")
        resolved = resolve_port(container, port) if container is not None and isinstance(port, str) else None
        out.add(resolved if resolved is not None else port)
    return out


def peer_selects(peers: list[Doc], labels: Mapping[str, str]) -> bool:
    """Whether a rule's peers include pods with ``labels`` in the same namespace."""
    for peer in peers:
        if "namespaceSelector" in peer or "ipBlock" in peer:
            continue
        selector = peer.get("podSelector") or {}
        if _matches(selector, labels):
            return True
    return False


def _matches(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        present = expr.get("key") in labels
        value = labels.get(str(expr.get("key")))
        operator = expr.get("operator")
        if (operator == "In" and value not in (expr.get("values") or [])) or (operator == "Exists" and not present):
            return False
    return True


def policies_for(manifests: Manifests, labels: Mapping[str, str], kind: str) -> list[Doc]:
    return [
        p
        for p in objects(manifests, "NetworkPolicy")
        if kind in ((p.get("spec") or {}).get("policyTypes") or [])
        and _matches((p.get("spec") or {}).get("podSelector") or {}, labels)
    ]


def check_network_policies(manifests: Manifests) -> list[str]:
    """Default deny, in and out, for every pod; then only the needed flows: clients to each
    service's gRPC port, probes to the health port, services to NATS, NATS to itself."""
    problems: list[str] = []
    deny = [
        p
        for p in objects(manifests, "NetworkPolicy")
        if (p.get("spec") or {}).get("podSelector") == {}
        and set((p.get("spec") or {}).get("policyTypes") or []) == {"Ingress", "Egress"}
        and not (p.get("spec") or {}).get("ingress")
        and not (p.get("spec") or {}).get("egress")
    ]
    if not deny:
        problems.append("no default-deny NetworkPolicy (podSelector {}, Ingress and Egress, no rules)")
    statefulset = find(manifests, "StatefulSet", NATS)
    nats_labels = pod_labels(statefulset) if statefulset else {}
    for svc in SETTINGS:
        deployment = deployment_of(manifests, svc)
        labels = pod_labels(deployment)
        container = container_of(deployment)
        port = SETTINGS[svc].default_port
        ingress = [r for p in policies_for(manifests, labels, "Ingress") for r in p["spec"].get("ingress") or []]
        if not any(port in policy_ports(r, container) and r.get("from") for r in ingress):
            problems.append(f"{svc}: no NetworkPolicy lets clients reach its gRPC port {port}")
        if any(port in policy_ports(r, container) and not r.get("from") for r in ingress):
            problems.append(f"{svc}: a NetworkPolicy opens its gRPC port {port} to everyone")
        if any(not r.get("ports") for r in ingress):
            problems.append(f"{svc}: a NetworkPolicy opens every port")
        egress = [r for p in policies_for(manifests, labels, "Egress") for r in p["spec"].get("egress") or []]
        if not any(
            NATS_CLIENT_PORT in policy_ports(r, None) and peer_selects(r.get("to") or [], nats_labels) for r in egress
        ):
            problems.append(f"{svc}: no NetworkPolicy lets it reach NATS on {NATS_CLIENT_PORT}")
        nats_in = [r for p in policies_for(manifests, nats_labels, "Ingress") for r in p["spec"].get("ingress") or []]
        if not any(
            NATS_CLIENT_PORT in policy_ports(r, None) and peer_selects(r.get("from") or [], labels) for r in nats_in
        ):
            problems.append(f"nats: no NetworkPolicy admits {svc} on {NATS_CLIENT_PORT}")
    return problems


# --- tests -----------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_cdp_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The settings classes also read the process environment; keep it out of the checks."""
    for key in list(os.environ):
        if key.upper().startswith("CDP_"):
            monkeypatch.delenv(key)


@pytest.fixture(scope="module")
def manifests() -> Manifests:
    return load_manifests()


def assert_no_problems(problems: list[str]) -> None:
    if problems:
        pytest.fail("deploy/k8s:\n  " + "\n  ".join(problems), pytrace=False)


def test_every_manifest_parses(manifests: Manifests) -> None:
    expected = {KUSTOMIZATION, SECRETS_EXAMPLE, "namespace.yaml", "configmap.yaml", "nats.yaml", NETWORK_POLICIES}
    expected |= {f"{svc}.yaml" for svc in SETTINGS}
    missing = sorted(expected - set(manifests))
    assert not missing, f"deploy/k8s: missing {missing}"
    for file, doc in applied(manifests):
        for part in ("apiVersion", "kind", "metadata"):
            assert doc.get(part), f"{file}: an object without {part}: {doc!r}"
        assert name_of(doc), f"{file}: a {doc['kind']} without a name"


def test_kustomization_lists_every_manifest(manifests: Manifests) -> None:
    assert_no_problems(check_kustomization(manifests))


def test_one_namespace_and_no_secrets(manifests: Manifests) -> None:
    assert_no_problems(check_namespace(manifests))


@pytest.mark.parametrize("svc", sorted(SETTINGS))
def test_single_writer(manifests: Manifests, svc: str) -> None:
    assert_no_problems(check_single_writer(manifests, svc))


@pytest.mark.parametrize("svc", sorted(SETTINGS))
def test_runs_serve_from_its_image(manifests: Manifests, svc: str) -> None:
    assert_no_problems(check_command(manifests, svc))


@pytest.mark.parametrize("svc", sorted(SETTINGS))
def test_environment_is_cdp_settings(manifests: Manifests, svc: str) -> None:
    assert_no_problems(check_environment(manifests, svc))


@pytest.mark.parametrize("svc", sorted(SETTINGS))
def test_store_url_from_secret(manifests: Manifests, svc: str) -> None:
    assert_no_problems(check_store_secret(manifests, svc))


@pytest.mark.parametrize("svc", sorted(SETTINGS))
def test_pii_hash_key_from_secret(manifests: Manifests, svc: str) -> None:
    assert_no_problems(check_pii_hash_key(manifests, svc))


@pytest.mark.parametrize("svc", sorted(SETTINGS))
def test_ports_agree(manifests: Manifests, svc: str) -> None:
    assert_no_problems(check_ports(manifests, svc))


@pytest.mark.parametrize("svc", sorted(SETTINGS))
def test_probes_ask_liveness_and_readiness(manifests: Manifests, svc: str) -> None:
    assert_no_problems(check_probe_services(manifests, svc))


@pytest.mark.parametrize("svc", sorted(SETTINGS))
def test_shutdown_grace_fits(manifests: Manifests, svc: str) -> None:
    assert_no_problems(check_shutdown(manifests, svc))


@pytest.mark.parametrize("svc", sorted(SETTINGS))
def test_security_context(manifests: Manifests, svc: str) -> None:
    assert_no_problems(check_security(manifests, svc))


@pytest.mark.parametrize("svc", sorted(SETTINGS))
def test_writable_paths_are_volumes(manifests: Manifests, svc: str) -> None:
    assert_no_problems(check_volumes(manifests, svc))


def test_one_database_per_service(manifests: Manifests) -> None:
    examples = {name_of(doc): doc for doc in manifests[SECRETS_EXAMPLE] if doc.get("kind") == "Secret"}
    databases = {
        svc: urlsplit(str(examples.get(f"cdp-{svc}-store", {}).get("stringData", {}).get("url", ""))).path
        for svc in SETTINGS
    }
    assert len(set(databases.values())) == len(SETTINGS), f"{SECRETS_EXAMPLE}: services share a database: {databases}"


def test_nats_cluster(manifests: Manifests) -> None:
    assert_no_problems(check_nats(manifests))


def test_services_use_the_cluster(manifests: Manifests) -> None:
    assert_no_problems(check_cluster_settings(manifests))


@pytest.mark.parametrize("svc", sorted(SETTINGS))
def test_grpc_serves_tls_with_tokens_from_secrets(manifests: Manifests, svc: str) -> None:
    assert_no_problems(check_grpc_security(manifests, svc))


def test_network_policies_deny_all_but_the_needed_flows(manifests: Manifests) -> None:
    assert_no_problems(check_network_policies(manifests))


# --- the checks catch broken manifests --------------------------------------------------------


Mutation = Callable[[Manifests], None]


def _container(manifests: Manifests, svc: str) -> Doc:
    return container_of(deployment_of(manifests, svc))


def _env_item(manifests: Manifests, svc: str, name: str) -> Doc:
    return next(item for item in _container(manifests, svc)["env"] if item["name"] == name)


def _rename_env(manifests: Manifests) -> None:
    _env_item(manifests, "identity", "CDP_GRPC_PORT")["name"] = "CDP_GRPC_PROT"


def _rename_config_key(manifests: Manifests) -> None:
    data = shared_config(manifests)
    data["CDP_NATS_SERVER"] = data.pop("CDP_NATS_URL")


def _foreign_env(manifests: Manifests) -> None:
    _container(manifests, "ingest")["env"].append({"name": "PYTHONUNBUFFERED", "value": "1"})


def _bad_value(manifests: Manifests) -> None:
    shared_config(manifests)["CDP_LOG_FORMAT"] = "pretty"


def _unquoted_value(manifests: Manifests) -> None:
    _env_item(manifests, "segmentation", "CDP_GRPC_PORT")["value"] = 50053


def _two_replicas(manifests: Manifests) -> None:
    deployment_of(manifests, "identity")["spec"]["replicas"] = 2


def _rolling_update(manifests: Manifests) -> None:
    deployment_of(manifests, "activation")["spec"]["strategy"] = {"type": "RollingUpdate"}


def _wrong_probe_port(manifests: Manifests) -> None:
    _container(manifests, "segmentation")["readinessProbe"]["grpc"]["port"] = 50051


def _liveness_asks_readiness(manifests: Manifests) -> None:
    _container(manifests, "identity")["livenessProbe"]["grpc"]["service"] = READINESS


def _readiness_asks_nothing(manifests: Manifests) -> None:
    _container(manifests, "ingest")["readinessProbe"]["grpc"].pop("service")


def _wrong_env_port(manifests: Manifests) -> None:
    _env_item(manifests, "activation", "CDP_GRPC_PORT")["value"] = "50059"


def _wrong_service_port(manifests: Manifests) -> None:
    objects(manifests, "Service", "ingest.yaml")[0]["spec"]["ports"][0]["port"] = 80


def _other_image(manifests: Manifests) -> None:
    _container(manifests, "identity")["image"] = "cdp-ingest:0.1.0"


def _other_command(manifests: Manifests) -> None:
    _container(manifests, "ingest")["args"] = ["rebuild"]


def _short_grace(manifests: Manifests) -> None:
    shared_config(manifests)["CDP_SHUTDOWN_GRACE_S"] = "60"


def _root_user(manifests: Manifests) -> None:
    _container(manifests, "activation")["securityContext"]["runAsUser"] = 0


def _literal_store_url(manifests: Manifests) -> None:
    item = _env_item(manifests, "ingest", "CDP_STORE_URL")
    item.pop("valueFrom")
    item["value"] = "postgresql://cdp:secret@db/cdp_ingest"


def _key_volume(manifests: Manifests, svc: str) -> Doc:
    spec = pod_spec(deployment_of(manifests, svc))
    return next(v for v in spec["volumes"] if v["name"] == "pii-hash-key")


def _key_not_mounted(manifests: Manifests) -> None:
    container = _container(manifests, "identity")
    container["volumeMounts"] = [m for m in container["volumeMounts"] if m["mountPath"] != "/etc/cdp/pii-hash"]


def _key_world_readable(manifests: Manifests) -> None:
    _key_volume(manifests, "segmentation")["secret"]["defaultMode"] = 0o444


def _key_from_another_secret(manifests: Manifests) -> None:
    _key_volume(manifests, "ingest")["secret"]["secretName"] = "cdp-ingest-store"


def _exports_on_scratch(manifests: Manifests) -> None:
    container = _container(manifests, "activation")
    container["volumeMounts"] = [m for m in container["volumeMounts"] if m["mountPath"] != "/data/exports"]


def _secrets_applied(manifests: Manifests) -> None:
    kustomization(manifests)["resources"].append(SECRETS_EXAMPLE)


def _manifest_not_listed(manifests: Manifests) -> None:
    kustomization(manifests)["resources"].remove("nats.yaml")


def _one_nats_node(manifests: Manifests) -> None:
    statefulset = find(manifests, "StatefulSet", NATS)
    assert statefulset is not None
    statefulset["spec"]["replicas"] = 1


def _no_jetstream(manifests: Manifests) -> None:
    config_map = find(manifests, "ConfigMap", "nats-config")
    assert config_map is not None
    config_map["data"]["nats.conf"] = re.sub(r"jetstream\s*\{[^}]*\}", "", config_map["data"]["nats.conf"])


def _single_stream_replica(manifests: Manifests) -> None:
    shared_config(manifests)["CDP_STREAM_REPLICAS"] = "1"


def _nats_elsewhere(manifests: Manifests) -> None:
    shared_config(manifests)["CDP_NATS_URL"] = "nats://127.0.0.1:4222"


def _insecure(manifests: Manifests) -> None:
    shared_config(manifests)["CDP_GRPC_INSECURE"] = "true"


def _key_from_elsewhere(manifests: Manifests) -> None:
    shared_config(manifests)["CDP_GRPC_TLS_KEY_FILE"] = "/data/tls.key"


def _no_default_deny(manifests: Manifests) -> None:
    manifests[NETWORK_POLICIES] = [d for d in manifests[NETWORK_POLICIES] if name_of(d) != "default-deny-all"]


def _grpc_open_to_all(manifests: Manifests) -> None:
    policy = find(manifests, "NetworkPolicy", "cdp-services-grpc")
    assert policy is not None
    policy["spec"]["ingress"][0].pop("from")


def _no_nats_egress(manifests: Manifests) -> None:
    manifests[NETWORK_POLICIES] = [d for d in manifests[NETWORK_POLICIES] if name_of(d) != "cdp-services-egress"]


@pytest.mark.parametrize(
    ("mutate", "check", "svc", "message"),
    [
        pytest.param(_rename_env, check_environment, "identity", "CDP_GRPC_PROT is not a field", id="env-name"),
        pytest.param(
            _rename_config_key, check_environment, "ingest", "CDP_NATS_SERVER is not a field", id="configmap-key"
        ),
        pytest.param(_foreign_env, check_environment, "ingest", "PYTHONUNBUFFERED does not start", id="no-prefix"),
        pytest.param(_bad_value, check_environment, "segmentation", "CDP_LOG_FORMAT='pretty'", id="bad-value"),
        pytest.param(_unquoted_value, check_environment, "segmentation", "is not a string", id="unquoted"),
        pytest.param(_two_replicas, check_single_writer, "identity", "replicas is 2", id="replicas-2"),
        pytest.param(_rolling_update, check_single_writer, "activation", "must be Recreate", id="rolling-update"),
        pytest.param(_wrong_probe_port, check_ports, "segmentation", "readinessProbe checks grpc port", id="probe"),
        pytest.param(
            _liveness_asks_readiness, check_probe_services, "identity", "livenessProbe asks", id="liveness-probe"
        ),
        pytest.param(
            _readiness_asks_nothing, check_probe_services, "ingest", "readinessProbe asks health service ''", id="ready"
        ),
        pytest.param(_wrong_env_port, check_ports, "activation", "default_port is 50054", id="env-port"),
        pytest.param(_wrong_service_port, check_ports, "ingest", "Service cdp-ingest maps", id="service-port"),
        pytest.param(_other_image, check_command, "identity", "is not cdp-identity", id="image"),
        pytest.param(_other_command, check_command, "ingest", "'rebuild'", id="command"),
        pytest.param(_short_grace, check_shutdown, "identity", "is not above CDP_SHUTDOWN_GRACE_S", id="grace"),
        pytest.param(_root_user, check_security, "activation", "runAsUser is 0", id="root"),
        pytest.param(_literal_store_url, check_store_secret, "ingest", "written in a manifest", id="literal-secret"),
        pytest.param(_exports_on_scratch, check_volumes, "activation", "CDP_EXPORT_DIR", id="exports-volume"),
        pytest.param(_key_not_mounted, check_pii_hash_key, "identity", "nothing is mounted", id="key-unmounted"),
        pytest.param(_key_world_readable, check_pii_hash_key, "segmentation", "lets others", id="key-readable"),
        pytest.param(_key_from_another_secret, check_pii_hash_key, "ingest", "expected Secret", id="key-secret"),
        pytest.param(_insecure, check_grpc_security, "ingest", "CDP_GRPC_INSECURE is on", id="grpc-insecure"),
        pytest.param(_key_from_elsewhere, check_grpc_security, "identity", "of Secret 'cdp-grpc-tls'", id="grpc-key"),
    ],
)
def test_detects_broken_service(
    manifests: Manifests, mutate: Mutation, check: Callable[[Manifests, str], list[str]], svc: str, message: str
) -> None:
    if unbroken := check(manifests, svc):
        pytest.fail(f"the unbroken manifests should pass this check: {unbroken}", pytrace=False)
    broken = copy.deepcopy(manifests)
    mutate(broken)
    problems = check(broken, svc)
    assert any(message in p for p in problems), f"expected a problem mentioning {message!r}, got {problems}"


@pytest.mark.parametrize(
    ("mutate", "check", "message"),
    [
        pytest.param(_secrets_applied, check_kustomization, "must never be applied", id="secrets-applied"),
        pytest.param(_manifest_not_listed, check_kustomization, "does not list ['nats.yaml']", id="not-listed"),
        pytest.param(_one_nats_node, check_nats, "replicas 1", id="nats-replicas"),
        pytest.param(_no_jetstream, check_nats, "no `jetstream", id="no-jetstream"),
        pytest.param(_single_stream_replica, check_cluster_settings, "CDP_STREAM_REPLICAS", id="stream-replicas"),
        pytest.param(_nats_elsewhere, check_cluster_settings, "does not name a NATS Service", id="nats-url"),
        pytest.param(_no_default_deny, check_network_policies, "no default-deny", id="no-default-deny"),
        pytest.param(_grpc_open_to_all, check_network_policies, "to everyone", id="grpc-open"),
        pytest.param(_no_nats_egress, check_network_policies, "reach NATS", id="no-nats-egress"),
    ],
)
def test_detects_broken_cluster(
    manifests: Manifests, mutate: Mutation, check: Callable[[Manifests], list[str]], message: str
) -> None:
    if unbroken := check(manifests):
        pytest.fail(f"the unbroken manifests should pass this check: {unbroken}", pytrace=False)
    broken = copy.deepcopy(manifests)
    mutate(broken)
    problems = check(broken)
    assert any(message in p for p in problems), f"expected a problem mentioning {message!r}, got {problems}"
