"""Tree helpers for tests."""

from __future__ import annotations

import os
import stat


def make_read_only(path: str | os.PathLike[str]) -> None:
    """Make a tree read-only on disk: files 0444 (0555 when executable), directories 0555.

    Symlinks are left alone (their mode is meaningless and chmod would follow them).
    Modes already right are not rewritten.
    """
    root = os.fspath(path)
    stack = [root]
    dirs: list[tuple[str, int]] = []
    while stack:
        d = stack.pop()
        dirs.append((d, stat.S_IMODE(os.lstat(d).st_mode)))
        with os.scandir(d) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    mode = stat.S_IMODE(entry.stat(follow_symlinks=False).st_mode)
                    want = 0o555 if mode & 0o111 else 0o444
                    if mode != want:
                        os.chmod(entry.path, want)
    # Children before parents: a read-only parent would stop a non-root caller otherwise.
    for d, mode in reversed(dirs):
        if mode != 0o555:
            os.chmod(d, 0o555)
