"""Atomic file replacement, the one implementation below both the store and the cache.

A file is written under a temporary name in the same directory and renamed over its final
name, so a reader (or a crash) never sees it half-written. Everything goes through a
directory fd: the cache reaches its directories that way (``cache.fsops``, nothing a run
plants is followed) and the local store opens its own directory for it.
"""

from __future__ import annotations

import contextlib
import os

_NEW_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def write_atomic_at(
    dfd: int, name: str, data: bytes, *, tmp: str, fsync: bool = False, mode: int = 0o666
) -> None:
    """Replace ``name`` in the directory ``dfd`` with ``data``, atomically.

    ``tmp`` is the temporary name (callers choose it so their sweepers recognise leftovers);
    it is created ``O_EXCL | O_NOFOLLOW`` with ``mode`` (less the umask) and removed if
    anything fails. ``fsync`` makes it durable: the file before the rename, the directory
    after it (the store's objects must survive a power loss; the cache's manifests can be
    rebuilt, so they skip the cost).
    """
    fd = os.open(tmp, _NEW_FLAGS, mode, dir_fd=dfd)
    try:
        try:
            with open(fd, "wb", closefd=False) as f:
                f.write(data)
                f.flush()
                if fsync:
                    os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dfd)
        raise
    if fsync:
        os.fsync(dfd)
