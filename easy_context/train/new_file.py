"""A file published whole under a name nobody holds: never over a file that exists, never half-written there."""

from __future__ import annotations

import os
from typing import BinaryIO, Callable


def create_new(path: str, write: Callable[[BinaryIO], None]) -> bool:
    """``write(file)`` published at ``path``: written to a temporary file, synced, then hard-linked into place (a
    link, unlike a rename, fails when the name is taken, on NFS too). False, with nothing written at ``path``, when
    it exists. On a filesystem without hard links ``path`` is created exclusively and written in place."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links here
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                write(f)
            return True
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
