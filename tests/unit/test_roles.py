"""The role table is complete (default deny: every method of every service descriptor in protos/
has a role), names nothing that does not exist, matches docs/security.md, and the token files
the stack writes are private."""

from __future__ import annotations

import importlib
import json
import pkgutil
import re
import stat
from pathlib import Path

import cdp
from cdp_kit.grpc_auth import TokenTable, ensure_local_secrets, token_hash
from cdp_kit.roles import GRANTS, METHOD_ROLES, ROLES, grants

ROOT = Path(__file__).resolve().parents[2]


def every_method() -> set[str]:
    """``/package.Service/Method`` of every service in every generated *_pb2 module."""
    methods: set[str] = set()
    for info in pkgutil.walk_packages(cdp.__path__, "cdp."):
        if not info.name.endswith("_pb2"):
            continue
        module = importlib.import_module(info.name)
        for service in module.DESCRIPTOR.services_by_name.values():
            methods.update(f"/{service.full_name}/{m.name}" for m in service.methods)
    return methods


def test_the_descriptors_are_found() -> None:
    services = {m.split("/")[1] for m in every_method()}
    assert {
        "cdp.ingest.v1.IngestService",
        "cdp.identity.v1.IdentityService",
        "cdp.segmentation.v1.SegmentationService",
        "cdp.activation.v1.ActivationService",
        "cdp.common.v1.AdminService",
        "cdp.common.v1.DeadLetterService",
    } <= services


def test_every_rpc_has_a_role() -> None:
    missing = every_method() - METHOD_ROLES.keys()
    assert not missing, f"add these to cdp_kit.roles.METHOD_ROLES and docs/security.md: {sorted(missing)}"


def test_the_table_names_only_rpcs_that_exist() -> None:
    assert METHOD_ROLES.keys() <= every_method(), sorted(METHOD_ROLES.keys() - every_method())


def test_roles_are_hierarchical_with_publisher_apart() -> None:
    assert grants("admin", "operator")
    assert grants("operator", "reader")
    assert grants("admin", "reader")
    assert grants("operator", "publisher")
    assert not grants("reader", "publisher")
    assert not grants("publisher", "reader")
    assert not grants("reader", "operator")
    assert not grants("operator", "admin")
    assert not grants("nobody", "reader")
    assert set(GRANTS) == set(ROLES)


def test_a_publisher_may_only_publish_events() -> None:
    assert [m for m, role in METHOD_ROLES.items() if grants("publisher", role)] == [
        "/cdp.ingest.v1.IngestService/PublishEvents"
    ]


def test_the_documented_table_is_the_code_table() -> None:
    doc = (ROOT / "docs" / "security.md").read_text()
    rows = dict(re.findall(r"^\| `(/[\w.]+/\w+)` \| (\w+) \|", doc, flags=re.MULTILINE))
    assert rows == METHOD_ROLES


def test_stack_secrets_are_private_and_kept(tmp_path: Path) -> None:
    local = ensure_local_secrets(tmp_path)
    for directory in [local.root, local.pki.dir, local.tokens_dir]:
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory
    files = [p for p in local.root.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"ca.crt", "ca.key", "grpc.crt", "grpc.key", "tokens.json", "admin.token"}
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    tokens = {role: local.token(role) for role in ROLES}
    assert len(set(tokens.values())) == len(ROLES)
    # the table holds hashes only, never a token
    text = local.tokens_file.read_text()
    assert not any(token in text for token in tokens.values())
    table = TokenTable.load(local.tokens_file)
    for role, token in tokens.items():
        found = table.verify(token)
        assert found is not None
        assert found.role == role
        assert token_hash(token) in json.loads(text)
    # a second run (a restarted stack) keeps every token
    again = ensure_local_secrets(tmp_path)
    assert {role: again.token(role) for role in ROLES} == tokens


def test_a_bad_tokens_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    for content in [
        "[]",
        "{",
        json.dumps({"ab": {"principal": "x", "role": "admin"}}),
        json.dumps({"a" * 64: {"principal": "x", "role": "root"}}),
    ]:
        path.write_text(content)
        try:
            TokenTable.load(path)
        except ValueError:
            continue
        raise AssertionError(f"accepted {content!r}")
