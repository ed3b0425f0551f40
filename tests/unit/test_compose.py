"""Static checks of the single-host deployment (compose.yaml, the service Dockerfiles
and the PostgreSQL init script). Docker is not needed: the files are parsed.

Each check is a function returning the problems it finds, so the tests can show them
all at once, and so the checks themselves can be shown to catch a broken compose file
(the ``test_detects_*`` tests at the end run them on mutated copies).
"""

from __future__ import annotations

import copy
import json
import os
import posixpath
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import pytest
import yaml
from pydantic import ValidationError

from cdp_activation.settings import ActivationSettings
from cdp_identity.settings import IdentitySettings
from cdp_ingest.settings import IngestSettings
from cdp_kit.grpc_server import READINESS
from cdp_kit.settings import ServiceSettings
from cdp_segmentation.settings import SegmentationSettings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "compose.yaml"
INIT_SQL = ROOT / "deploy" / "compose" / "init-databases.sql"
INITDB_DIR = "/docker-entrypoint-initdb.d"

SETTINGS: dict[str, type[ServiceSettings]] = {
    "ingest": IngestSettings,
    "identity": IdentitySettings,
    "segmentation": SegmentationSettings,
    "activation": ActivationSettings,
}
INFRA = ("nats", "postgres")
LOOPBACK = "127.0.0.1"

Compose = dict[str, Any]


# --- parsing -------------------------------------------------------------------


def load_compose(path: Path = COMPOSE_FILE) -> Compose:
    loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict), f"{path.name}: the top level is not a mapping"
    assert isinstance(loaded.get("services"), dict), f"{path.name}: no `services` mapping"
    return loaded


def service_of(compose: Compose, name: str) -> dict[str, Any]:
    services: dict[str, Any] = compose["services"]
    service = services.get(name)
    assert isinstance(service, dict), f"compose.yaml: no service {name!r} (have {sorted(services)})"
    return service


def env_value(value: Any) -> str | None:
    """A value as compose passes it to the container (None = taken from the host)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def environment(service: Mapping[str, Any]) -> dict[str, str | None]:
    """The ``environment`` of a service, in either the mapping or the list form."""
    env = service.get("environment") or {}
    if isinstance(env, Mapping):
        return {str(k): env_value(v) for k, v in env.items()}
    out: dict[str, str | None] = {}
    for item in env:
        key, sep, value = str(item).partition("=")
        out[key] = value if sep else None
    return out


class PortMapping(NamedTuple):
    host_ip: str | None
    published: str | None
    target: int


def port_mappings(service: Mapping[str, Any]) -> list[PortMapping]:
    """The ``ports`` of a service, in the short ("ip:published:target") or long form."""
    out: list[PortMapping] = []
    for item in service.get("ports") or []:
        if isinstance(item, Mapping):
            published = item.get("published")
            out.append(
                PortMapping(
                    item.get("host_ip"),
                    None if published is None else str(published),
                    int(item["target"]),
                )
            )
            continue
        spec = str(item).split("/", 1)[0]
        parts = spec.rsplit(":", 2)
        target = int(parts[-1])
        published_part = parts[-2] if len(parts) >= 2 else None
        host_ip = parts[0].strip("[]") if len(parts) == 3 else None
        out.append(PortMapping(host_ip, published_part, target))
    return out


class Instruction(NamedTuple):
    keyword: str
    args: str


def dockerfile_final_stage(text: str) -> list[Instruction]:
    """The instructions of the last stage of a Dockerfile (the image that runs)."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):  # a comment inside a continued instruction
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


def dockerfile_exposed(stage: list[Instruction]) -> set[int]:
    ports: set[int] = set()
    for ins in stage:
        if ins.keyword == "EXPOSE":
            ports.update(int(p.split("/", 1)[0]) for p in ins.args.split())
    return ports


def dockerfile_exec_form(stage: list[Instruction], keyword: str) -> list[str] | None:
    """The last ENTRYPOINT or CMD of a stage, if it is in the exec (JSON) form."""
    found = [ins for ins in stage if ins.keyword == keyword]
    if not found:
        return None
    try:
        value = json.loads(found[-1].args)
    except json.JSONDecodeError:
        return None
    return [str(v) for v in value] if isinstance(value, list) else None


def created_databases(sql: str) -> set[str]:
    without_comments = re.sub(r"--[^\n]*", "", sql)
    return set(re.findall(r'CREATE\s+DATABASE\s+"?(\w+)"?', without_comments, flags=re.IGNORECASE))


def healthcheck_text(service: Mapping[str, Any]) -> str | None:
    """The healthcheck command as one string, or None if there is none or it is disabled."""
    check = service.get("healthcheck")
    if not isinstance(check, Mapping) or check.get("disable"):
        return None
    test = check.get("test")
    if isinstance(test, str):
        return test or None
    if isinstance(test, list) and test and test[0] in ("CMD", "CMD-SHELL"):
        return " ".join(str(part) for part in test[1:])
    return None


def volume_mounts(service: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of each volume of a service, in the short or long form."""
    out: list[tuple[str, str]] = []
    for item in service.get("volumes") or []:
        if isinstance(item, Mapping):
            out.append((str(item.get("source", "")), str(item.get("target", ""))))
        else:
            source, _, rest = str(item).partition(":")
            out.append((source, rest.split(":", 1)[0]))
    return out


def database_of(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


# --- checks: each returns a list of problems ----------------------------------


def check_build(compose: Compose, svc: str, root: Path = ROOT) -> list[str]:
    problems: list[str] = []
    build = service_of(compose, svc).get("build")
    expected = f"services/{svc}/Dockerfile"
    if not isinstance(build, Mapping):
        return [f"{svc}: `build` must be a mapping with context `.` and dockerfile {expected!r}, got {build!r}"]
    context = (root / str(build.get("context", "."))).resolve()
    if context != root.resolve():
        problems.append(f"{svc}: build context is {build.get('context')!r}, expected the repository root `.`")
    dockerfile = str(build.get("dockerfile", "Dockerfile"))
    if Path(dockerfile) != Path(expected):
        problems.append(f"{svc}: builds from {dockerfile!r}, expected its own {expected!r}")
    path = context / dockerfile
    if not path.is_file():
        problems.append(f"{svc}: Dockerfile {path.relative_to(root) if path.is_relative_to(root) else path} is missing")
        return problems
    stage = dockerfile_final_stage(path.read_text(encoding="utf-8"))
    entrypoint = dockerfile_exec_form(stage, "ENTRYPOINT")
    if entrypoint is None or f"cdp_{svc}" not in entrypoint:
        problems.append(f"{svc}: {dockerfile} ENTRYPOINT should run `python -m cdp_{svc}`, got {entrypoint!r}")
    return problems


def check_environment(compose: Compose, svc: str) -> list[str]:
    settings_cls = SETTINGS[svc]
    fields = settings_cls.model_fields
    env = environment(service_of(compose, svc))
    problems: list[str] = []
    if not env:
        problems.append(f"{svc}: no environment")
    values: dict[str, Any] = {}
    for key, value in env.items():
        if not key.startswith("CDP_"):
            problems.append(f"{svc}: environment variable {key} does not start with CDP_")
            continue
        field = key.removeprefix("CDP_").lower()
        if field not in fields or key != "CDP_" + field.upper():
            known = ", ".join(sorted("CDP_" + f.upper() for f in fields))
            problems.append(f"{svc}: {key} is not a field of {settings_cls.__name__} (known: {known})")
            continue
        if value is None:
            problems.append(f"{svc}: {key} has no value (it would be taken from the host's environment)")
            continue
        try:
            one: dict[str, Any] = {field: value}
            settings_cls(**one)
        except ValidationError as exc:
            problems.append(f"{svc}: {key}={value!r} is rejected by {settings_cls.__name__}: {exc}")
            continue
        values[field] = value
    if not problems:
        try:
            settings_cls(**values)
        except ValidationError as exc:
            problems.append(f"{svc}: the environment together is rejected by {settings_cls.__name__}: {exc}")
    return problems


def check_ports(compose: Compose, svc: str, root: Path = ROOT) -> list[str]:
    settings_cls = SETTINGS[svc]
    service = service_of(compose, svc)
    default = settings_cls.default_port
    raw = environment(service).get("CDP_GRPC_PORT")
    if raw is None or not raw.isdigit():
        return [f"{svc}: CDP_GRPC_PORT must be set to its port {default}, got {raw!r}"]
    port = int(raw)
    problems: list[str] = []
    if port != default:
        problems.append(f"{svc}: CDP_GRPC_PORT={port} but {settings_cls.__name__}.default_port is {default}")
    mappings = port_mappings(service)
    targets = {m.target for m in mappings}
    if targets != {port}:
        problems.append(f"{svc}: `ports` publish container ports {sorted(targets)}, expected only {port}")
    for m in mappings:
        if m.host_ip != LOOPBACK:
            problems.append(f"{svc}: port {m.target} is published on {m.host_ip or 'all interfaces'}, not {LOOPBACK}")
    dockerfile = root / f"services/{svc}/Dockerfile"
    if dockerfile.is_file():
        exposed = dockerfile_exposed(dockerfile_final_stage(dockerfile.read_text(encoding="utf-8")))
        if exposed != {port}:
            problems.append(f"{svc}: services/{svc}/Dockerfile EXPOSEs {sorted(exposed)}, expected {port}")
    else:
        problems.append(f"{svc}: services/{svc}/Dockerfile is missing")
    return problems


def check_healthcheck(compose: Compose, svc: str) -> list[str]:
    service = service_of(compose, svc)
    text = healthcheck_text(service)
    port = SETTINGS[svc].default_port
    raw = environment(service).get("CDP_GRPC_PORT")
    if raw is not None and raw.isdigit():
        port = int(raw)
    if text is None:
        return [f"{svc}: no healthcheck (or it is disabled)"]
    if not re.search(rf"(?<!\d){port}(?!\d)", text):
        return [f"{svc}: the healthcheck does not mention its port {port}: {text!r}"]
    # depends_on waits for "healthy": that must mean ready (recovered, no consumer stuck), not only alive.
    if f"service='{READINESS}'" not in text:
        return [f"{svc}: the healthcheck does not ask the {READINESS!r} health service: {text!r}"]
    return []


def check_depends_on(compose: Compose, svc: str) -> list[str]:
    depends = service_of(compose, svc).get("depends_on")
    if not isinstance(depends, Mapping):
        return [f"{svc}: depends_on must map {', '.join(INFRA)} to condition service_healthy, got {depends!r}"]
    problems: list[str] = []
    for infra in INFRA:
        entry = depends.get(infra)
        condition = entry.get("condition") if isinstance(entry, Mapping) else None
        if condition != "service_healthy":
            problems.append(f"{svc}: depends_on.{infra}.condition is {condition!r}, expected 'service_healthy'")
    return problems


def check_store_url(compose: Compose, svc: str, sql: str) -> list[str]:
    url = environment(service_of(compose, svc)).get("CDP_STORE_URL")
    if not url:
        return [f"{svc}: CDP_STORE_URL is not set (it would fall back to SQLite in the container)"]
    problems: list[str] = []
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres", "postgresql+psycopg"):
        problems.append(f"{svc}: CDP_STORE_URL {url!r} is not a PostgreSQL URL")
    if parts.hostname not in compose["services"]:
        problems.append(f"{svc}: CDP_STORE_URL host {parts.hostname!r} is not a compose service")
    database = database_of(url)
    created = created_databases(sql)
    if database not in created:
        problems.append(
            f"{svc}: CDP_STORE_URL names database {database!r}, which {INIT_SQL.name} does not create "
            f"(it creates {sorted(created)})"
        )
    return problems


def check_nats_url(compose: Compose, svc: str) -> list[str]:
    url = environment(service_of(compose, svc)).get("CDP_NATS_URL")
    host = urlsplit(url).hostname if url else None
    if host != "nats":
        return [f"{svc}: CDP_NATS_URL should point at the `nats` service, got {url!r}"]
    return []


# --- tests ------------------------------------------------------------------------


def check_pii_hash_key(compose: Compose, svc: str) -> list[str]:
    """The service reads its PII hash key from a secret it mounts where CDP_PII_HASH_KEY_FILE says,
    owned by the image's user and readable by it only; the secret comes from Compose's environment
    (never a file of the repository), and is the same secret for every service."""
    path = environment(service_of(compose, svc)).get("CDP_PII_HASH_KEY_FILE")
    if not path:
        return [f"{svc}: no CDP_PII_HASH_KEY_FILE (a service without its key does not start)"]
    mounts = [m for m in service_of(compose, svc).get("secrets", []) if isinstance(m, dict)]
    found = [m for m in mounts if posixpath.join("/run/secrets", str(m.get("target", m.get("source")))) == path]
    if not found:
        return [f"{svc}: mounts no secret at {path}"]
    [mount] = found
    problems = []
    if mount.get("source") != "pii_hash_key":
        problems.append(f"{svc}: the key is secret {mount.get('source')!r}, not the deployment's pii_hash_key")
    if str(mount.get("uid")) != "10001" or str(mount.get("gid")) != "10001":
        problems.append(f"{svc}: the key file is not owned by the image's user 10001")
    if mount.get("mode") != 0o400:
        problems.append(f"{svc}: the key file's mode is {mount.get('mode')!r}, expected 0400 (owner only)")
    source = compose.get("secrets", {}).get(mount.get("source"), {})
    if "environment" not in source:
        problems.append(f"{svc}: secret {mount.get('source')!r} is not read from Compose's environment")
    return problems


@pytest.fixture(autouse=True)
def _no_cdp_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The settings classes also read the process environment; keep it out of the checks."""
    for key in list(os.environ):
        if key.upper().startswith("CDP_"):
            monkeypatch.delenv(key)


@pytest.fixture(scope="module")
def compose() -> Compose:
    return load_compose()


@pytest.fixture(scope="module")
def init_sql() -> str:
    assert INIT_SQL.is_file(), f"{INIT_SQL.relative_to(ROOT)} is missing"
    return INIT_SQL.read_text(encoding="utf-8")


def assert_no_problems(problems: list[str]) -> None:
    if problems:
        pytest.fail("compose.yaml:\n  " + "\n  ".join(problems), pytrace=False)


def test_services_exist(compose: Compose) -> None:
    expected = {*SETTINGS, *INFRA}
    missing = sorted(expected - set(compose["services"]))
    assert not missing, f"compose.yaml: missing services {missing} (have {sorted(compose['services'])})"


@pytest.mark.parametrize("svc", sorted(SETTINGS))
def test_builds_from_its_own_dockerfile(compose: Compose, svc: str) -> None:
    assert_no_problems(check_build(compose, svc))


@pytest.mark.parametrize("svc", sorted(SETTINGS))
def test_environment_is_cdp_settings(compose: Compose, svc: str) -> None:
    assert_no_problems(check_environment(compose, svc))


@pytest.mark.parametrize("svc", sorted(SETTINGS))
def test_ports_agree(compose: Compose, svc: str) -> None:
    assert_no_problems(check_ports(compose, svc))


@pytest.mark.parametrize("svc", sorted(SETTINGS))
def test_healthcheck_uses_its_port(compose: Compose, svc: str) -> None:
    assert_no_problems(check_healthcheck(compose, svc))


@pytest.mark.parametrize("svc", sorted(SETTINGS))
def test_waits_for_healthy_infrastructure(compose: Compose, svc: str) -> None:
    assert_no_problems(check_depends_on(compose, svc))


@pytest.mark.parametrize("svc", sorted(SETTINGS))
def test_store_is_a_created_database(compose: Compose, init_sql: str, svc: str) -> None:
    assert_no_problems(check_store_url(compose, svc, init_sql))


@pytest.mark.parametrize("svc", sorted(SETTINGS))
def test_pii_hash_key_is_a_private_secret_shared_by_every_service(compose: Compose, svc: str) -> None:
    assert_no_problems(check_pii_hash_key(compose, svc))


@pytest.mark.parametrize("svc", sorted(SETTINGS))
def test_nats_url_points_at_nats(compose: Compose, svc: str) -> None:
    assert_no_problems(check_nats_url(compose, svc))


def test_one_database_per_service(compose: Compose) -> None:
    databases = {svc: database_of(environment(service_of(compose, svc)).get("CDP_STORE_URL") or "") for svc in SETTINGS}
    shared = {db for db in databases.values() if list(databases.values()).count(db) > 1}
    assert not shared, f"compose.yaml: services share a database: {databases}"


def test_init_sql_is_mounted_into_postgres(compose: Compose) -> None:
    mounts = volume_mounts(service_of(compose, "postgres"))
    targets = [target for source, target in mounts if (ROOT / source).resolve() == INIT_SQL.resolve()]
    where = INIT_SQL.relative_to(ROOT)
    assert targets, f"postgres: {where} is not mounted (volumes: {mounts})"
    assert all(t.startswith(INITDB_DIR + "/") for t in targets), (
        f"postgres: {where} must be mounted under {INITDB_DIR}/ to run on first start, is at {targets}"
    )


@pytest.mark.parametrize(("infra", "port"), [("nats", 8222), ("postgres", None)])
def test_infrastructure_has_healthchecks(compose: Compose, infra: str, port: int | None) -> None:
    text = healthcheck_text(service_of(compose, infra))
    assert text is not None, f"{infra}: no healthcheck, so `condition: service_healthy` can never be met"
    if port is not None:
        assert str(port) in text, f"{infra}: the healthcheck does not use the monitoring port {port}: {text!r}"


def test_nats_runs_jetstream_with_monitoring(compose: Compose) -> None:
    command = service_of(compose, "nats").get("command")
    args = command.split() if isinstance(command, str) else [str(a) for a in command or []]
    assert "-js" in args or "--jetstream" in args, f"nats: JetStream is not enabled: {args}"
    assert "-m" in args, f"nats: the monitoring port is not enabled (-m 8222): {args}"
    assert args[args.index("-m") + 1 :][:1] == ["8222"], f"nats: the monitoring port is not 8222: {args}"


# --- the checks catch a broken compose file -------------------------------------------


Mutation = Callable[[Compose], None]


ENV_EXAMPLE = ROOT / ".env.example"
REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?[-?][^}]*)?\}")
# A secret-named variable, unless it names a file (*_FILE: a path to a mounted compose secret).
SECRET_NAME = re.compile(r"^(?!.*_FILE$).*(PASSWORD|SECRET|TOKEN|_KEY$)", re.IGNORECASE)


def literal_secrets(compose: Compose) -> list[str]:
    """Passwords written into the file: a secret-named variable, or the password of a URL,
    whose value is not taken from the environment (``${VAR}``, read from ``.env``)."""
    problems: list[str] = []
    for name, service in compose["services"].items():
        for key, value in environment(service).items():
            if value is None:
                continue
            if SECRET_NAME.search(key) and not REFERENCE.fullmatch(value.strip('"')):
                problems.append(f"{name}: {key} is written in compose.yaml, not read from .env")
            for password in re.findall(r"://[^:/@\s]+:([^@\s]*)@", value):
                if not REFERENCE.fullmatch(password):
                    problems.append(f"{name}: {key} carries a literal password in its URL")
    return problems


def test_compose_holds_no_literal_password(compose: Compose) -> None:
    assert_no_problems(literal_secrets(compose))


def test_every_variable_compose_reads_is_in_env_example_and_env_is_not_committed() -> None:
    referenced = set(REFERENCE.findall(COMPOSE_FILE.read_text(encoding="utf-8")))
    example = {
        line.split("=", 1)[0].strip()
        for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines()
        if "=" in line and not line.lstrip().startswith("#")
    }
    assert referenced <= example, f".env.example lacks {sorted(referenced - example)}"
    ignored = (ROOT / ".gitignore").read_text(encoding="utf-8").splitlines()
    assert ".env" in ignored
    assert "/secrets/" in ignored


def test_activation_reads_its_master_key_from_a_compose_secret(compose: Compose) -> None:
    activation = service_of(compose, "activation")
    path = environment(activation).get("CDP_MASTER_KEY_FILE")
    mounted = [s if isinstance(s, str) else s.get("source") for s in activation.get("secrets") or []]
    assert mounted, "activation: no compose secret mounted"
    assert path in {f"/run/secrets/{name}" for name in mounted}, f"activation: CDP_MASTER_KEY_FILE={path!r}"
    assert all(name in compose.get("secrets", {}) for name in mounted)


def _literal_password(compose: Compose) -> None:
    compose["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"] = "cdp"


def _password_in_url(compose: Compose) -> None:
    compose["services"]["identity"]["environment"]["CDP_STORE_URL"] = "postgresql://cdp:cdp@postgres:5432/cdp_identity"


@pytest.mark.parametrize("mutate", [_literal_password, _password_in_url])
def test_detects_a_literal_password(compose: Compose, mutate: Mutation) -> None:
    broken = copy.deepcopy(compose)
    mutate(broken)
    assert literal_secrets(broken)


def _rename_env(compose: Compose) -> None:
    env = compose["services"]["identity"]["environment"]
    env["CDP_NATS_SERVER"] = env.pop("CDP_NATS_URL")


def _foreign_env(compose: Compose) -> None:
    compose["services"]["ingest"]["environment"]["PYTHONUNBUFFERED"] = "1"


def _bad_value(compose: Compose) -> None:
    compose["services"]["segmentation"]["environment"]["CDP_LOG_FORMAT"] = "pretty"


def _wrong_port(compose: Compose) -> None:
    compose["services"]["activation"]["environment"]["CDP_GRPC_PORT"] = "50059"


def _public_port(compose: Compose) -> None:
    compose["services"]["ingest"]["ports"] = ["50051:50051"]


def _started_only(compose: Compose) -> None:
    compose["services"]["identity"]["depends_on"] = ["nats", "postgres"]


def _unknown_database(compose: Compose) -> None:
    compose["services"]["activation"]["environment"]["CDP_STORE_URL"] = "postgresql://cdp:cdp@postgres:5432/cdp"


def _no_healthcheck(compose: Compose) -> None:
    del compose["services"]["segmentation"]["healthcheck"]


def _other_dockerfile(compose: Compose) -> None:
    compose["services"]["identity"]["build"]["dockerfile"] = "services/ingest/Dockerfile"


def _no_key_secret(compose: Compose) -> None:
    compose["services"]["identity"]["secrets"] = []


def _readable_key(compose: Compose) -> None:
    compose["services"]["ingest"]["secrets"] = [{**compose["services"]["ingest"]["secrets"][0], "mode": 0o444}]


def _key_in_a_file(compose: Compose) -> None:
    compose["secrets"]["pii_hash_key"] = {"file": "./pii-hash.key"}


def _check_store_url(compose: Compose, svc: str) -> list[str]:
    return check_store_url(compose, svc, INIT_SQL.read_text(encoding="utf-8"))


@pytest.mark.parametrize(
    ("mutate", "check", "svc", "message"),
    [
        pytest.param(
            _rename_env, check_environment, "identity", "CDP_NATS_SERVER is not a field", id="unknown-variable"
        ),
        pytest.param(
            _foreign_env, check_environment, "ingest", "PYTHONUNBUFFERED does not start with CDP_", id="no-prefix"
        ),
        pytest.param(
            _bad_value, check_environment, "segmentation", "CDP_LOG_FORMAT='pretty' is rejected", id="bad-value"
        ),
        pytest.param(_wrong_port, check_ports, "activation", "default_port is 50054", id="wrong-port"),
        pytest.param(_public_port, check_ports, "ingest", "published on all interfaces", id="public-port"),
        pytest.param(_started_only, check_depends_on, "identity", "depends_on must map", id="not-healthy"),
        pytest.param(_unknown_database, _check_store_url, "activation", "'cdp'", id="unknown-database"),
        pytest.param(_no_healthcheck, check_healthcheck, "segmentation", "no healthcheck", id="no-healthcheck"),
        pytest.param(_other_dockerfile, check_build, "identity", "expected its own", id="other-dockerfile"),
        pytest.param(_no_key_secret, check_pii_hash_key, "identity", "mounts no secret", id="no-key-secret"),
        pytest.param(_readable_key, check_pii_hash_key, "ingest", "expected 0400", id="readable-key"),
        pytest.param(_key_in_a_file, check_pii_hash_key, "segmentation", "Compose's environment", id="key-file"),
    ],
)
def test_detects_broken_compose(
    compose: Compose, mutate: Mutation, check: Callable[[Compose, str], list[str]], svc: str, message: str
) -> None:
    if unbroken := check(compose, svc):
        pytest.fail(f"the unbroken compose.yaml should pass this check: {unbroken}", pytrace=False)
    broken = copy.deepcopy(compose)
    mutate(broken)
    problems = check(broken, svc)
    assert any(message in p for p in problems), f"expected a problem mentioning {message!r}, got {problems}"


@pytest.mark.parametrize("svc", sorted(SETTINGS))
def test_grpc_serves_tls_with_tokens_from_compose_secrets(compose: Compose, svc: str, tmp_path: Path) -> None:
    """Each service reads its certificate, key and token table from compose secrets whose files
    are where `cdp up --data-dir .` writes them (cdp_kit.grpc_auth.ensure_local_secrets)."""
    from cdp_kit.grpc_auth import GRPC_LEAF, ensure_local_secrets

    service = service_of(compose, svc)
    env = environment(service)
    values: dict[str, Any] = {k.removeprefix("CDP_").lower(): v for k, v in env.items()}
    settings = SETTINGS[svc](**values)
    assert settings.grpc_security_problem() is None
    assert not settings.grpc_insecure
    mounted = {f"/run/secrets/{name}": name for name in service.get("secrets") or []}
    local = ensure_local_secrets(tmp_path)
    leaf = local.pki.leaf(GRPC_LEAF)
    written = {
        settings.grpc_tls_cert_file: leaf.cert,
        settings.grpc_tls_key_file: leaf.key,
        settings.grpc_tokens_file: local.tokens_file,
    }
    for path, made in written.items():
        name = mounted.get(str(path))
        assert name is not None, f"{svc}: {path} is not a compose secret of the service"
        source = Path(compose["secrets"][name]["file"])
        assert source == Path(".") / made.relative_to(tmp_path), (
            f"{svc}: secret {name} is {source}, cdp up writes {made}"
        )
    assert "grpc_ca_crt" in mounted.values()
