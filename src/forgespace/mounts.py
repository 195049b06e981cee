"""Which mount an open file belongs to: the test for "a mount point" that btrfs subvolumes pass.

A btrfs subvolume reports its own ``st_dev``, so "``st_dev`` differs from the parent's" (the
classic mount-point test) calls every subvolume a mount point. What must never be crossed is
another *mount* (a bind mount could lead anywhere); a subvolume is part of the same mount and
its contents really are below its parent. The kernel says which mount an fd is on in
``/proc/self/fdinfo/N`` (``mnt_id``); where that cannot be read, a different ``st_dev`` is
treated as a mount point, as before.
"""

from __future__ import annotations

import os

__all__ = ["mount_id", "same_mount"]


def mount_id(fd: int) -> int | None:
    """The mount id of the open file ``fd`` (None when /proc does not say)."""
    try:
        with open(f"/proc/self/fdinfo/{fd}", "rb") as f:
            for line in f:
                if line.startswith(b"mnt_id:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def same_mount(fd: int, other_fd: int) -> bool:
    """Whether two open files are on the same mount (same ``st_dev``, or the same mount id:
    a btrfs subvolume and its parent directory). False when that cannot be told."""
    if os.fstat(fd).st_dev == os.fstat(other_fd).st_dev:
        return True
    mine = mount_id(fd)
    return mine is not None and mine == mount_id(other_fd)
