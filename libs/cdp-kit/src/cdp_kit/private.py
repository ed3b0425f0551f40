"""Files only their owner may read: keys, certificates' private keys, passwords, tokens. One
way to write them for the whole kit: created 0600 (never readable by others, not even for a
moment), written to a temporary name and renamed (a reader never sees half a file)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_private(path: Path, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` (0600), atomically; the folder must exist."""
    path = Path(path)
    # A fresh temporary file (mkstemp: created 0600, O_EXCL), never a fixed name whose leftover
    # from an earlier run would keep its own, wider mode through O_CREAT.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data.encode() if isinstance(data, str) else data)
            out.flush()
            os.fsync(out.fileno())  # a key lost to a power cut would lose what it encrypted
        os.replace(tmp, path)
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)  # the rename itself
        finally:
            os.close(folder)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def private_dir(path: Path) -> Path:
    """``path`` as a folder only its owner may enter (0700), created with its parents if missing."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path
