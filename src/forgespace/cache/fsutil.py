"""Small filesystem facts shared by extraction and cloning."""

from __future__ import annotations


def current_umask() -> int:
    """The process umask, read from /proc without changing it.

    os.umask() can only be read by setting it, which races with other threads creating files.
    """
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022
