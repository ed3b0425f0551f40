"""cdp_kit.access.require_role: until gRPC callers have roles, only the deployment's setting grants one."""

from __future__ import annotations

import grpc
import pytest

from cdp_kit.access import require_role
from cdp_kit.errors import PermissionDenied, to_grpc_status


def test_a_role_is_refused_unless_the_setting_grants_it() -> None:
    with pytest.raises(PermissionDenied, match="operator role") as refused:
        require_role(None, "operator", allowed_by_setting=False)
    assert to_grpc_status(refused.value).code == grpc.StatusCode.PERMISSION_DENIED
    require_role(None, "operator", allowed_by_setting=True)
