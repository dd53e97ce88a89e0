"""Files that survive a power loss: a rename is durable only once its directory is fsynced."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a directory's entries, to the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def replace_durably(tmp: Path, path: Path) -> None:
    """Rename a fully written, fsynced file over ``path`` and make the rename survive a power loss."""
    os.replace(tmp, path)
    fsync_path(path.parent)


def write_atomically(path: Path, data: bytes) -> None:
    """Readers see the old content or the new, never a part, even after a power loss."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    replace_durably(tmp, path)
