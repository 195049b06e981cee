"""Per-target OS file locks (fcntl.flock) with bounded waits and holder information.

Why our own helper rather than ``filelock``: the engine needs *shared* (reader) and
*exclusive* (writer) modes on the same file, and the error on timeout must name the
holder. ``flock`` locks belong to an open file description, so two threads of one
process that each open the file exclude each other exactly like two processes do,
and the kernel drops the lock when its holder dies: a leftover lock file means
nothing and lock files are never deleted.

An exclusive holder writes ``pid host mode since purpose`` into the lock file so
that a waiter that times out can say who it waited for.

Owner tokens (the liveness of staging directories) are in staging.py.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from forgespace.cache import fsops
from forgespace.errors import LockTimeoutError

_HOST = socket.gethostname()
log = logging.getLogger(__name__)


def _open_lock_file(path: Path, root: Path | None) -> int:
    # O_NOFOLLOW from the lock directory's fd, regular single-link file checked (fsops).
    return fsops.open_lock(path.parent if root is None else root, path)


def _holder_text(fd: int) -> str:
    try:
        return os.pread(fd, 512, 0).decode("utf-8", "replace").strip()
    except OSError:
        return ""


def _describe_holder(fd: int) -> str:
    text = _holder_text(fd)
    if not text:
        return "shared holders (cache hits or copy-on-write copies in progress)"
    head, _, purpose = text.partition(" purpose=")
    fields = dict(kv.split("=", 1) for kv in head.split() if "=" in kv)
    fields["purpose"] = purpose.strip() or "?"
    pid, host = fields.get("pid", "?"), fields.get("host", "?")
    alive = ""
    if host == _HOST and pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            alive = " (that process is gone; the lock is now held by shared holders)"
        except PermissionError:
            pass
    since = fields.get("since")
    age = f", for {time.time() - float(since):.1f}s" if since else ""
    return (
        f"pid {pid} on {host} ({fields.get('mode', '?')}, {fields.get('purpose', '?')}{age}){alive}"
    )


@contextlib.contextmanager
def flock(
    path: Path,
    *,
    exclusive: bool = True,
    timeout: float | None = None,
    blocking: bool = True,
    what: str = "",
    purpose: str = "",
    root: Path | None = None,
) -> Iterator[int]:
    """Hold an flock on ``path`` (created if missing) for the ``with`` body.

    ``blocking=False`` raises LockTimeoutError at once when the lock is busy;
    otherwise the wait is bounded by ``timeout`` seconds (None = wait forever, only
    for internal use) and the error names ``what`` and the holder.

    ``root`` (CACHE_DIR) is where the walk to the lock file starts: every directory below it
    is opened without following symlinks, and a lock file that is a symlink, not a regular
    file or hard-linked is refused with UnsafeCacheEntryError (never truncated or written).
    Without ``root`` only the lock file itself is checked. A lock file deleted meanwhile is
    re-created.
    """
    fd = _open_lock_file(path, root)
    op = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    try:
        try:
            fcntl.flock(fd, op | fcntl.LOCK_NB)
        except BlockingIOError:
            if not blocking:
                raise LockTimeoutError(
                    f"{what or path} is locked by {_describe_holder(fd)}",
                    lock_path=str(path),
                    holder=_holder_text(fd),
                ) from None
            _wait(fd, op, path, timeout, what)
        if exclusive:
            info = (
                f"pid={os.getpid()} host={_HOST} mode=exclusive since={time.time():.3f} "
                f"purpose={purpose or 'write'}\n"
            )
            os.ftruncate(fd, 0)
            # Who holds it is only for others' error messages: a full disk must not stop the
            # holder (gc and evict are how an operator frees one).
            with contextlib.suppress(OSError):
                os.pwrite(fd, info.encode(), 0)
        try:
            yield fd
        finally:
            if exclusive:
                # Cleared so a later waiter never blames a holder that already left.
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _wait(fd: int, op: int, path: Path, timeout: float | None, what: str) -> None:
    # A helper thread blocks in flock on a duplicate of ``fd`` (same open file description,
    # so the same lock) while this thread waits on an event, bounded, without signals (which
    # only work in the main thread). The kernel grants the lock the moment it is free: the
    # waiters of a download are admitted together when it publishes, not at their next poll
    # (polling with a growing sleep let them trickle out up to 50 ms late).
    grant = _Grant(os.dup(fd), op)
    threading.Thread(target=grant.run, name=f"flock {path.name}", daemon=True).start()
    if grant.wait(timeout):
        return
    mode = "exclusive" if op == fcntl.LOCK_EX else "shared"
    raise LockTimeoutError(
        f"timed out after {timeout:.3g}s waiting for the {mode} lock on {what or path}; "
        f"held by {_describe_holder(fd)}; lock file {path}",
        lock_path=str(path),
        holder=_holder_text(fd),
    )


class _Grant:
    """One blocking flock on its own descriptor, handed over unless the waiter gave up."""

    def __init__(self, fd: int, op: int) -> None:
        self.fd, self.op = fd, op
        self._mutex = threading.Lock()
        self._done = threading.Event()
        self._granted = self._abandoned = False
        self._error: OSError | None = None

    def run(self) -> None:
        try:
            fcntl.flock(self.fd, self.op)
        except OSError as exc:
            self._error = exc
        with self._mutex:
            self._granted = self._error is None
            if self._granted and self._abandoned:
                # The waiter timed out meanwhile: the lock is nobody's, give it back.
                fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)  # the caller's descriptor keeps the open file description
        self._done.set()

    def wait(self, timeout: float | None) -> bool:
        """True once the lock is held; False (the grant abandoned) after ``timeout``."""
        self._done.wait(timeout)
        with self._mutex:
            if self._error is not None:
                raise self._error
            if not self._granted:
                self._abandoned = True
            return self._granted
