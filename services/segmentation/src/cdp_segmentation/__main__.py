"""`python -m cdp_segmentation serve|rebuild`."""

from __future__ import annotations

import sys

from cdp_kit.runtime import main as run
from cdp_segmentation.main import build
from cdp_segmentation.settings import SegmentationSettings


def main() -> None:
    sys.exit(run(SegmentationSettings, build))


if __name__ == "__main__":
    main()
