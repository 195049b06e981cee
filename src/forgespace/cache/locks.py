"""Per-target OS file locks (fcntl.flock) with bounded waits and holder information.

Why our own helper rather than ``filelock``: the engine needs *shared* (reader) and
*exclusive* (writer) modes on the same file, and the error on timeout must name the
holder. ``flock`` locks belong to an open file description, so two threads of one
process that each open the file exclude each other exactly like two processes do,
and the kernel drops the lock when its holder dies: a leftover lock file means
nothing and lock files are never deleted.

An exclusive holder writes ``pid host mode since purpose`` into the lock file so
that a waiter that times out can say who it waited for.

Staging directories (see workspace.py) are owned by a *process token*: each process
that stages holds an exclusive flock on ``.forgespace/owners/{token}.lock`` for its
whole life. A staging directory whose owner lock can be taken belongs to a dead
process and may be removed, whatever its age.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from forgespace.cache import fsops
from forgespace.errors import LockTimeoutError, UnsafeCacheEntryError

_HOST = socket.gethostname()
log = logging.getLogger(__name__)


def _open_lock_file(path: Path, root: Path | None) -> int:
    # O_NOFOLLOW from the lock directory's fd, regular single-link file checked (fsops).
    return fsops.open_lock(path.parent if root is None else root, path)


def read_holder(path: Path) -> str:
    """What the last exclusive holder wrote into the lock file ('' when nothing).

    Never follows a symlink: a planted link must not make us quote another file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return ""
    try:
        return _holder_text(fd)
    finally:
        os.close(fd)


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
    # Polling with a growing sleep keeps the wait bounded without signals (which only
    # work in the main thread); 1 ms first so short critical sections cost little.
    deadline = None if timeout is None else time.monotonic() + timeout
    delay = 0.001
    while True:
        if deadline is not None and time.monotonic() >= deadline:
            mode = "exclusive" if op == fcntl.LOCK_EX else "shared"
            raise LockTimeoutError(
                f"timed out after {timeout:.3g}s waiting for the {mode} lock on {what or path}; "
                f"held by {_describe_holder(fd)}; lock file {path}",
                lock_path=str(path),
                holder=_holder_text(fd),
            )
        sleep = delay if deadline is None else min(delay, max(0.0, deadline - time.monotonic()))
        time.sleep(sleep)
        delay = min(delay * 1.5, 0.05)
        try:
            fcntl.flock(fd, op | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            continue


class OwnerToken:
    """This process's owner lock: proves that staging directories tagged with
    ``token`` belong to a live process.

    One per (process, owners dir); forked children re-create their own on first use.
    ``root`` (CACHE_DIR) is where the walk to ``owners_dir`` starts (never following a
    symlink below it); without it ``owners_dir`` is trusted as given.
    """

    _lock = threading.Lock()
    _by_dir: dict[tuple[int, str], OwnerToken] = {}

    def __init__(self, owners_dir: Path, *, root: Path | None = None) -> None:
        dfd = _owners_fd(owners_dir, root, create=True)
        try:
            for _ in range(10):
                self.token = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
                self.path = owners_dir / f"{self.token}.lock"
                # Locked under a temporary name, then renamed: the final name never exists
                # unlocked, so no cleaner can mistake a just-created owner for a dead one.
                # O_EXCL never follows a planted link.
                tmp = f".{self.token}.new"
                fd = os.open(
                    tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644, dir_fd=dfd
                )
                fcntl.flock(fd, fcntl.LOCK_EX)
                info = f"pid={os.getpid()} host={_HOST} since={time.time():.3f}\n"
                os.pwrite(fd, info.encode(), 0)
                try:
                    os.rename(tmp, self.path.name, src_dir_fd=dfd, dst_dir_fd=dfd)
                except FileNotFoundError:
                    # a cleaner took the temporary file in the instant before our flock
                    os.close(fd)
                    continue
                self._fd = fd
                return
        finally:
            os.close(dfd)
        raise OSError(f"could not create an owner lock in {owners_dir}")

    def alive(self) -> bool:
        """Whether our lock file is still the one we hold (a run may have deleted it)."""
        try:
            st = os.stat(self.path, follow_symlinks=False)
        except OSError:
            return False
        own = os.fstat(self._fd)
        return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)

    @classmethod
    def for_dir(cls, owners_dir: Path, *, root: Path | None = None) -> OwnerToken:
        key = (os.getpid(), str(owners_dir))
        with cls._lock:
            tok = cls._by_dir.get(key)
            if tok is None or not tok.alive():
                tok = cls(owners_dir, root=root)
                cls._by_dir[key] = tok
            return tok


def _owners_fd(owners_dir: Path, root: Path | None, *, create: bool = False) -> int:
    if root is None:
        if create:
            owners_dir.mkdir(parents=True, exist_ok=True)
        return os.open(owners_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    return fsops.open_dir(root, fsops.parts_under(root, owners_dir), create=create)


def _open_owner(owners_dir: Path, name: str, root: Path | None) -> int | None:
    """The owner lock file ``name`` opened without following links; None when it is missing.
    A planted entry (symlink, non-regular, hard-linked) raises UnsafeCacheEntryError."""
    try:
        return fsops.open_lock(
            owners_dir if root is None else root, owners_dir / name, create=False
        )
    except FileNotFoundError:
        return None


def owner_is_dead(owners_dir: Path, token: str, *, root: Path | None = None) -> bool:
    """True when no live process holds the owner lock named ``token``.

    Takes the lock non-blocking: success means its holder died (the kernel released
    it). A planted entry in place of the lock file (a symlink...) is never followed: the
    owner then counts as alive (its staging directory is kept) and a warning names it.
    """
    try:
        fd = _open_owner(owners_dir, f"{token}.lock", root)
    except UnsafeCacheEntryError as exc:
        log.warning("%s", exc)
        return False
    if fd is None:
        return True
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError as exc:  # pragma: no cover - e.g. ENOLCK on odd filesystems
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise
        return True
    finally:
        os.close(fd)


def remove_dead_owner(owners_dir: Path, token: str, *, root: Path | None = None) -> None:
    """Delete a dead owner's lock file (call only after its staging dirs are gone).

    ``token`` may also be a file name ``.{token}.new`` (an owner killed while creating
    its lock file). A planted entry under that name is left alone (``cache verify``
    reports it)."""
    name = token if token.endswith(".new") else f"{token}.lock"
    try:
        fd = _open_owner(owners_dir, name, root)
    except UnsafeCacheEntryError as exc:
        log.warning("%s", exc)
        return
    if fd is None:
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return
        with contextlib.suppress(FileNotFoundError):
            dfd = _owners_fd(owners_dir, root)
            try:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                own = os.fstat(fd)
                if (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino):
                    os.unlink(name, dir_fd=dfd)
            finally:
                os.close(dfd)
    finally:
        os.close(fd)


STAGING_SEP = "~"  # never in an id, so a staging name parses without ambiguity


# A file name may have 255 bytes (NAME_MAX); a 128-character target id plus a 128-character
# run id does not fit, and a staging dir's trash name adds a suffix. Longer purposes are cut
# and end in "#" + a digest ("#" is never in an id); see purpose_matches.
STAGING_NAME_MAX = 200
_PURPOSE_DIGEST = 16


def _purpose_digest(purpose: str) -> str:
    return hashlib.sha256(purpose.encode()).hexdigest()[:_PURPOSE_DIGEST]


def staging_name(target_id: str, purpose: str, token: str, suffix: str) -> str:
    """``{target_id}~{purpose}~{owner token}~{suffix}``: the name of a staging directory in
    ``.forgespace/tmp``. Its owner holds ``.forgespace/owners/{token}.lock`` while alive.
    At most STAGING_NAME_MAX characters: a long purpose is shortened (purpose_matches)."""
    name = STAGING_SEP.join((target_id, purpose, token, suffix))
    excess = len(name) - STAGING_NAME_MAX
    if excess > 0:
        keep = max(0, len(purpose) - excess - _PURPOSE_DIGEST - 1)
        short = f"{purpose[:keep]}#{_purpose_digest(purpose)}"
        name = STAGING_SEP.join((target_id, short, token, suffix))
    return name


def purpose_matches(shown: str, purpose: str) -> bool:
    """Whether ``shown`` (the purpose part of a staging name) stands for ``purpose``."""
    if shown == purpose:
        return True
    head, sep, digest = shown.rpartition("#")
    return bool(sep) and purpose.startswith(head) and digest == _purpose_digest(purpose)


def parse_staging_name(name: str) -> tuple[str, str, str] | None:
    """(target_id, purpose, owner token) of a staging directory name, or None if the name
    is not one of ours. A staging dir is garbage iff ``owner_is_dead(owners_dir, token)``."""
    parts = name.split(STAGING_SEP)
    if len(parts) != 4 or not all(parts):
        return None
    return parts[0], parts[1], parts[2]
