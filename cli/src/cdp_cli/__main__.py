"""`python -m cdp_cli` = `cdp`."""

from __future__ import annotations

from cdp_cli.app import main

if __name__ == "__main__":
    main()
