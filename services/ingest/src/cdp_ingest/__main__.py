"""`python -m cdp_ingest serve|rebuild`."""

from __future__ import annotations

import sys

from cdp_ingest.main import build
from cdp_ingest.settings import IngestSettings
from cdp_kit.runtime import main as run


def main() -> None:
    sys.exit(run(IngestSettings, build))


if __name__ == "__main__":
    main()
