"""cdp_kit.access.require_role: an authenticated caller's role decides alone; with gRPC security
off (no authenticated caller) only the deployment's setting grants the role."""

from __future__ import annotations

import contextvars

import grpc
import pytest

from cdp_kit import grpc_auth
from cdp_kit.access import require_role
from cdp_kit.errors import PermissionDenied, to_grpc_status
from cdp_kit.roles import Role


def as_caller(role: Role, *, setting: bool) -> None:
    """require_role inside an RPC of a caller holding ``role`` (the interceptor sets the caller)."""

    def call() -> None:
        grpc_auth._CALLER.set(grpc_auth.Principal(f"a-{role}", role))
        require_role(None, "operator", allowed_by_setting=setting)

    contextvars.copy_context().run(call)


def test_without_an_authenticated_caller_only_the_setting_grants_the_role() -> None:
    with pytest.raises(PermissionDenied, match="operator role") as refused:
        require_role(None, "operator", allowed_by_setting=False)
    assert to_grpc_status(refused.value).code == grpc.StatusCode.PERMISSION_DENIED
    require_role(None, "operator", allowed_by_setting=True)


@pytest.mark.parametrize("setting", [False, True])
def test_an_authenticated_callers_role_decides_whatever_the_setting(setting: bool) -> None:
    as_caller("operator", setting=setting)
    as_caller("admin", setting=setting)
    refused: tuple[Role, ...] = ("reader", "publisher")
    for role in refused:
        with pytest.raises(PermissionDenied, match=f"the {role} role"):
            as_caller(role, setting=setting)
