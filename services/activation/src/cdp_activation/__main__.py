"""`python -m cdp_activation serve|rebuild`."""

from __future__ import annotations

import sys

from cdp_activation.main import build
from cdp_activation.settings import ActivationSettings
from cdp_kit.runtime import main as run


def main() -> None:
    sys.exit(run(ActivationSettings, build))


if __name__ == "__main__":
    main()
