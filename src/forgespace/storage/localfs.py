"""The filesystem primitives of the local store (objects, sidecars, results and blobs alike):
an atomic, durable write of bytes, a directory fsync, a sorted listing of what may not exist."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from forgespace.atomicfile import write_atomic_at

ATOMIC_TMP_MARK = ".tmp-"  # atomic_write_bytes' temp files: ".{name}.tmp-{hex}"


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` durable (a rename into it, say)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: temp file, fsync, rename (nobody sees half of it)."""
    tmp = f".{path.name}{ATOMIC_TMP_MARK}{uuid.uuid4().hex[:12]}"
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        write_atomic_at(dfd, path.name, data, tmp=tmp, fsync=True)
    except OSError as exc:
        # The names are relative to the directory fd: say where, for the user's error line.
        if isinstance(exc.filename, str) and not os.path.isabs(exc.filename):
            exc.filename = str(path.parent / exc.filename)
        raise
    finally:
        os.close(dfd)


def listdir_sorted(path: Path) -> list[str]:
    """Names in directory ``path``, sorted; none when it is missing or not a directory."""
    try:
        return sorted(os.listdir(path))
    except (FileNotFoundError, NotADirectoryError):
        return []


def is_atomic_tmp(name: str) -> bool:
    """Whether ``name`` is the temp file of an atomic write."""
    return name.startswith(".") and ATOMIC_TMP_MARK in name


__all__ = ["ATOMIC_TMP_MARK", "atomic_write_bytes", "fsync_dir", "is_atomic_tmp", "listdir_sorted"]
