"""docs/quickstart.md, run as written: every ```sh block not marked "not run", in order, in one
bash session per block (errexit, pipefail), against a real stack started the way `cdp up` starts
it, from a scratch folder holding the repository's examples/. A block that fails, or an answer
that is not what the page says, fails the test: the walkthrough cannot rot."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cdp_cli.stack import Stack

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "quickstart.md"
BLOCK = re.compile(r"(?P<marker><!-- not run[^>]*-->\n)?```sh\n(?P<body>.*?)```", re.S)


def blocks(text: str) -> list[tuple[bool, str]]:
    """(run it, its text) for each sh block of the page, in order."""
    return [(m.group("marker") is None, m.group("body")) for m in BLOCK.finditer(text)]


def test_the_page_has_the_steps_it_promises() -> None:
    found = blocks(PAGE.read_text())
    run = [body for keep, body in found if keep]
    skipped = [body for keep, body in found if not keep]
    assert any("cdp up" in body for body in skipped)  # the test starts the stack itself
    for step in ("cdp apply -f examples/", "cdp ingest", "cdp events publish", "cdp profile get", "cdp deliveries"):
        assert any(step in body for body in run), step


def test_the_quickstart_runs_as_written(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "examples").symlink_to(ROOT / "examples")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "CDP_DATA_DIR": str(tmp_path / "cdp"),
        "COLUMNS": "200",
    }
    outputs: list[str] = []
    with Stack(tmp_path / "cdp"):
        for keep, body in blocks(PAGE.read_text()):
            if not keep:
                continue
            done = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", body],
                cwd=work,
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
            assert done.returncode == 0, f"{body}\n--- exit {done.returncode}\n{done.stdout}\n{done.stderr}"
            outputs.append(done.stdout + done.stderr)
    said = "\n".join(outputs)
    # what the page says the reader will see
    assert re.search(r"│ crm\W+completed\W+3\W+2\W+1\W", said), said  # 3 rows read, 2 accepted, 1 rejected
    assert "loyalty_tier" in said
    assert "enum" in said
    assert "Ada" in said  # her profile, found by email and by the cookie of her login
    profile_blocks = [o for o in outputs if "first_name" in o or "Ada" in o]
    assert profile_blocks
    assert "gold_members" in said
    assert "crm_file_drop" in said
    exports = list((tmp_path / "cdp" / "exports" / "crm_file_drop").rglob("*.csv"))
    assert exports, "the file drop wrote no file"
