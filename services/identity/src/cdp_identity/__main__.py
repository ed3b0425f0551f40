"""`python -m cdp_identity serve|rebuild`."""

from __future__ import annotations

import sys

from cdp_identity.main import build
from cdp_identity.settings import IdentitySettings
from cdp_kit.runtime import main as run


def main() -> None:
    sys.exit(run(IdentitySettings, build))


if __name__ == "__main__":
    main()
