"""`python -m cdp_identity serve|rebuild`."""

from __future__ import annotations

import sys

from cdp_kit.runtime import main as run
from cdp_identity.main import build
from cdp_identity.settings import IdentitySettings


def main() -> None:
    sys.exit(run(IdentitySettings, build))


if __name__ == "__main__":
    main()
