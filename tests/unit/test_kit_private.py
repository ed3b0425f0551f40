"""Owner-only files: 0600 from creation whatever lies around, replaced whole, folders 0700."""

from __future__ import annotations

import stat
from pathlib import Path

from cdp_kit.private import private_dir, write_private


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_private_file_is_0600_even_over_a_leftover_temporary_or_a_wider_file(tmp_path: Path) -> None:
    folder = private_dir(tmp_path / "secrets")
    (folder / "k.tmp").write_text("left by a crash")
    (folder / "k.tmp").chmod(0o644)
    (folder / "k").write_text("old")
    (folder / "k").chmod(0o644)
    write_private(folder / "k", "new key")
    assert (folder / "k").read_text() == "new key"
    assert mode(folder / "k") == 0o600
    assert mode(folder) == 0o700
    assert sorted(p.name for p in folder.iterdir()) == ["k", "k.tmp"]  # no temporary of its own left


def test_bytes_are_written_as_they_are(tmp_path: Path) -> None:
    path = write_private(tmp_path / "key.pem", b"\x00\xff")
    assert path.read_bytes() == b"\x00\xff"
    assert mode(path) == 0o600
