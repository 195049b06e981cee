# Over 500 lines on purpose: the one place for every fd-based primitive under CACHE_DIR (walks,
# lock files, removal, pinned staging, audit); split, the O_NOFOLLOW discipline would be spread
# over several modules that each must get it right.
"""The one filesystem layer for cache internals: nothing a run can write is ever followed.

Runs execute untrusted code as the worker's user, with write access to CACHE_DIR. Whatever a
run plants there, forgespace must never act outside CACHE_DIR. The rules (docs/operations.md,
"What forgespace never follows"):

* Every path below CACHE_DIR is reached from a directory fd, one component at a time, with
  ``O_NOFOLLOW | O_DIRECTORY`` (``open_dir``). A symlink, a non-directory or a mount point
  (on another mount than its parent: ``forgespace.mounts``; a btrfs subvolume, which has its own
  ``st_dev``, is not one) where an internal directory is expected is refused with
  :class:`UnsafeCacheEntryError` naming it. CACHE_DIR itself is the operator's choice
  and is opened as configured (it may be a symlink the operator made).
* Lock files are opened ``O_RDWR | O_CREAT | O_NOFOLLOW`` relative to their directory's fd
  and must be a regular file with a single link (``fstat``); only then are they truncated or
  written, through that fd (``open_lock``). A planted symlink or hard link is refused (never
  replaced: a lock holder may hold the real file open), a vanished lock file is re-created.
* Trees are removed by one iterative walk (``remove_at``): an explicit stack, one directory fd
  open at a time (the way back up is ``..``, checked against the recorded device and inode),
  symlinks unlinked (never followed), mount points never crossed, directories made ``u+rwx``
  first with ``fchmodat(AT_SYMLINK_NOFOLLOW)`` so mode-000 trees go too. Depth is bounded by
  nothing but inodes.
* Deleting is rename-into-trash first (``discard``), via directory fds, then removal.
* Overlay mounts forgespace makes are unmounted deliberately (``unmount_under``); other mounts
  are never unmounted and never descended into.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import threading
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from forgespace.atomicfile import write_atomic_at
from forgespace.errors import UnsafeCacheEntryError
from forgespace.mounts import same_mount

__all__ = [
    "INTERNAL_DIRS",
    "audit",
    "dir_fd",
    "discard",
    "listdir",
    "open_child_dir",
    "open_dir",
    "open_lock",
    "parts_under",
    "remove",
    "remove_at",
    "rename_into",
    "unmount_under",
]

log = logging.getLogger(__name__)

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
LOCK_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
META = ".forgespace"
TRASH = (META, "trash")
# Directories under .forgespace that forgespace itself reads and writes.
INTERNAL_DIRS = ("trash", "tmp", "locks", "owners", "manifests", "overlay", "blobs")
# Lock files live in these; anything there that is not a plain single-link file is planted.
LOCK_DIRS = ("locks", "owners")


def kind_of(mode: int) -> str:
    """A file type in words, for error messages."""
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISFIFO(mode):
        return "a fifo"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a device node"


def _refused(shown: str, found: str, expected: str) -> UnsafeCacheEntryError:
    return UnsafeCacheEntryError(
        f"{shown} is {found} where forgespace expects {expected}; refusing to use it (never "
        "followed). It was probably planted by a run: remove it (forgespace re-creates what it "
        "needs) and check what wrote it",
        path=shown,
        found=found,
    )


def _found(dfd: int, name: str) -> str:
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except OSError:
        return "not a directory"
    if stat.S_ISLNK(st.st_mode):
        with contextlib.suppress(OSError):
            return f"a symbolic link (to {os.readlink(name, dir_fd=dfd)!r})"
    return kind_of(st.st_mode)


def parts_under(root: Path, path: str | os.PathLike[str]) -> tuple[str, ...]:
    """The components of ``path`` below ``root`` (lexically; ValueError when outside)."""
    rel = Path(path).relative_to(root).parts
    if any(p in ("..", "") for p in rel):
        raise ValueError(f"{path} is not a plain path below {root}")
    return rel


def open_child_dir(
    dfd: int,
    name: str,
    *,
    shown: str,
    create: bool = False,
    mode: int = 0o777,
    same_dev: bool = True,
) -> int:
    """Open directory ``name`` of the directory ``dfd`` without following a symlink; refuse a
    non-directory and (``same_dev``) a mount point. ``create`` makes it when missing."""
    try:
        fd = os.open(name, DIR_FLAGS, dir_fd=dfd)
    except FileNotFoundError:
        if not create:
            raise
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, mode, dir_fd=dfd)
        return open_child_dir(dfd, name, shown=shown, create=False, same_dev=same_dev)
    except OSError as exc:
        if exc.errno in (errno.ENOTDIR, errno.ELOOP):
            raise _refused(shown, _found(dfd, name), "a directory") from None
        raise
    if same_dev and not same_mount(fd, dfd):
        os.close(fd)
        raise _refused(shown, "a mount point", "a directory of the cache's filesystem")
    return fd


def open_dir(root: Path, parts: Iterable[str], *, create: bool = False) -> int:
    """A directory fd for ``root/parts...``, every component below ``root`` opened with
    ``O_NOFOLLOW`` from its parent's fd (see ``open_child_dir``)."""
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        if not create:
            raise
        os.makedirs(root, exist_ok=True)  # CACHE_DIR and its parents: the operator's path
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    shown = str(root)
    try:
        for part in parts:
            shown = f"{shown}/{part}"
            child = open_child_dir(fd, part, shown=shown, create=create)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def dir_fd(root: Path, parts: Iterable[str], *, create: bool = False) -> Iterator[int]:
    """``open_dir`` for a ``with`` block."""
    fd = open_dir(root, parts, create=create)
    try:
        yield fd
    finally:
        os.close(fd)


def write_atomic(
    root: Path,
    parts: Iterable[str],
    name: str,
    data: bytes,
    *,
    tmp: str,
    fsync: bool = False,
    mode: int = 0o666,
) -> None:
    """Replace ``name`` in the internal directory ``root/parts`` (created if missing, reached
    like ``open_dir``) with ``data`` atomically; see ``atomicfile.write_atomic_at``."""
    with dir_fd(root, parts, create=True) as d:
        write_atomic_at(d, name, data, tmp=tmp, fsync=fsync, mode=mode)


def listdir(root: Path, parts: Iterable[str]) -> list[str]:
    """Names in the internal directory ``root/parts`` ([] when it does not exist)."""
    try:
        with dir_fd(root, parts) as fd:
            return os.listdir(fd)
    except FileNotFoundError:
        return []


def open_lock(root: Path, path: Path, *, create: bool = True) -> int:
    """Open the lock file ``path`` (below ``root``) for flock: ``O_NOFOLLOW`` from its
    directory's fd (created when missing), then ``fstat``: a regular file with one link, else
    UnsafeCacheEntryError. ``create=False`` raises FileNotFoundError for a missing file."""
    parts = parts_under(root, path)
    flags = LOCK_FLAGS if create else LOCK_FLAGS & ~os.O_CREAT
    with dir_fd(root, parts[:-1], create=create) as dfd:
        try:
            fd = os.open(parts[-1], flags, 0o644, dir_fd=dfd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.EOPNOTSUPP):
                raise _refused(str(path), _found(dfd, parts[-1]), "a lock file") from None
            exc.filename = str(path)  # opened relative to its directory: name the whole path
            raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _refused(str(path), kind_of(st.st_mode), "a lock file")
        if st.st_nlink != 1:
            # A hard link to a file elsewhere would get truncated and written by a holder.
            raise _refused(str(path), f"a file with {st.st_nlink} hard links", "a lock file")
    except BaseException:
        os.close(fd)
        raise
    return fd


# --- removal -------------------------------------------------------------------------------
def _make_owner_rwx(dfd: int, name: str, st: os.stat_result) -> None:
    """u+rwx on directory ``name`` (to list and empty it) without following a symlink."""
    if st.st_mode & 0o700 == 0o700:
        return
    with contextlib.suppress(OSError, ValueError, NotImplementedError):
        # fchmodat(AT_SYMLINK_NOFOLLOW): refused for a symlink (ValueError), never follows.
        os.chmod(name, stat.S_IMODE(st.st_mode) | 0o700, dir_fd=dfd, follow_symlinks=False)


def other_mount(dfd: int, name: str, st: os.stat_result) -> bool:
    """Whether directory ``name`` of ``dfd`` (``st``: its lstat) is on another mount than
    ``dfd``: a mount point, never crossed. A btrfs subvolume has its own ``st_dev`` but the
    same mount (not one); an entry that is no longer ``st`` counts as a mount point."""
    if st.st_dev == os.fstat(dfd).st_dev:
        return False
    try:  # O_PATH: no permission needed on the directory itself (mode 000 trees)
        fd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    except OSError:
        return True
    try:
        got = os.fstat(fd)
        return (got.st_dev, got.st_ino) != (st.st_dev, st.st_ino) or not same_mount(fd, dfd)
    finally:
        os.close(fd)


def _open_for_removal(dfd: int, name: str, st: os.stat_result, shown: str) -> int:
    _make_owner_rwx(dfd, name, st)
    fd = os.open(name, DIR_FLAGS, dir_fd=dfd)
    got = os.fstat(fd)
    if (got.st_dev, got.st_ino) != (st.st_dev, st.st_ino):
        os.close(fd)
        raise _refused(shown, "an entry replaced while being removed", "the directory it was")
    return fd


_Frame = tuple[str, int, int, list[str]]


def remove_at(dfd: int, name: str, *, shown: str = "") -> None:
    """Remove ``name`` of directory ``dfd`` and everything below it, iteratively.

    A symlink is unlinked itself; a mount point is never crossed (UnsafeCacheEntryError);
    read-only and mode-000 directories are made ``u+rwx`` first. Only one directory fd is
    open at a time; going back up opens ``..`` and checks it is the directory we came from.
    Entries that vanish meanwhile (another gc removing the same trash) are fine.
    """
    shown = shown or name
    opened = _open_top(dfd, name, shown)
    if opened is None:
        return
    cur, st = opened
    # One frame per level: (name in parent, dev, ino, subdirectories still to visit).
    frames: list[_Frame] = [(name, st.st_dev, st.st_ino, [])]
    scan = True
    try:
        while True:
            pending = frames[-1][3]
            if scan:
                pending.extend(_empty_files(cur))
                scan = False
            child = _next_subdir(cur, pending, frames[-1][1], shown)
            if child is not None:
                n, cst = child
                try:
                    nfd = _open_for_removal(cur, n, cst, f"{shown}/.../{n}")
                except FileNotFoundError:
                    continue
                os.close(cur)
                cur = nfd
                frames.append((n, cst.st_dev, cst.st_ino, []))
                scan = True
                continue
            # Nothing pending: a last look catches entries created meanwhile.
            again = _empty_files(cur)
            if again:
                pending.extend(again)
                continue
            done_name = frames.pop()[0]
            if not frames:
                os.close(cur)
                cur = -1
                with contextlib.suppress(FileNotFoundError):
                    os.rmdir(done_name, dir_fd=dfd)
                return
            cur = _ascend(cur, frames[-1], shown)
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(done_name, dir_fd=cur)
    finally:
        if cur >= 0:
            os.close(cur)


def _open_top(dfd: int, name: str, shown: str) -> tuple[int, os.stat_result] | None:
    """Open directory ``name`` for removal; unlink it instead if it is no directory, and
    return None when that (or its vanishing) already finished the job."""
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(st.st_mode):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dfd)
        return None
    if other_mount(dfd, name, st):
        raise _refused(shown, "a mount point", "a directory to delete (never crossed)")
    try:
        return _open_for_removal(dfd, name, st, shown), st
    except FileNotFoundError:
        return None


def _next_subdir(
    cur: int, pending: list[str], dev: int, shown: str
) -> tuple[str, os.stat_result] | None:
    """Pop ``pending`` until a subdirectory to descend into turns up (others are unlinked).

    A subdirectory on another device is a mount point: refused, never crossed.
    """
    while pending:
        n = pending.pop()
        try:
            cst = os.stat(n, dir_fd=cur, follow_symlinks=False)
        except FileNotFoundError:
            continue
        if not stat.S_ISDIR(cst.st_mode):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(n, dir_fd=cur)
            continue
        if cst.st_dev != dev and other_mount(cur, n, cst):
            raise _refused(
                f"{shown}/.../{n}", "a mount point", "a directory to delete (never crossed)"
            )
        return n, cst
    return None


def _ascend(cur: int, parent: _Frame, shown: str) -> int:
    """Open ``..`` of ``cur`` and check it is ``parent`` (not a tree moved meanwhile)."""
    up = os.open("..", DIR_FLAGS, dir_fd=cur)
    ust = os.fstat(up)
    if (ust.st_dev, ust.st_ino) != parent[1:3]:
        os.close(up)
        raise _refused(shown, "a tree moved while being removed", "a tree to delete")
    os.close(cur)
    return up


def _empty_files(fd: int) -> list[str]:
    """Unlink every non-directory of directory ``fd``; return its subdirectory names."""
    subdirs: list[str] = []
    with os.scandir(fd) as it:
        for e in it:
            try:
                is_dir = e.is_dir(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if is_dir:
                subdirs.append(e.name)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(e.name, dir_fd=fd)
    return subdirs


def remove(root: Path, path: str | os.PathLike[str]) -> None:
    """Remove ``path`` (below ``root``) in place, reaching it through directory fds."""
    parts = parts_under(root, path)
    try:
        with dir_fd(root, parts[:-1]) as pfd:
            remove_at(pfd, parts[-1], shown=str(path))
    except FileNotFoundError:
        return


def discard(root: Path, path: str | os.PathLike[str]) -> None:
    """Rename ``path`` into ``.forgespace/trash`` (nobody sees half of it), then remove it.

    Everything is reached through directory fds. When the trash itself is unusable (a planted
    symlink: refused and logged) or the rename crosses a mount, ``path`` is removed in place.
    """
    parts = parts_under(root, path)
    name = parts[-1]
    try:
        pfd = open_dir(root, parts[:-1])
    except FileNotFoundError:
        return
    try:
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return
        try:
            tfd = open_dir(root, TRASH, create=True)
        except UnsafeCacheEntryError as exc:
            log.warning("%s; removing %s in place", exc, path)
            remove_at(pfd, name, shown=str(path))
            return
        try:
            # cut: a staging dir's name may be near NAME_MAX (trash names are never parsed)
            dest = f"{'.'.join(parts[-2:])[:200]}~{os.getpid()}-{uuid.uuid4().hex[:12]}"
            if stat.S_ISDIR(st.st_mode):
                # moving a directory to another parent updates its '..': needs u+w (non-root)
                _make_owner_rwx(pfd, name, st)
            try:
                os.rename(name, dest, src_dir_fd=pfd, dst_dir_fd=tfd)
            except FileNotFoundError:
                return
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EBUSY):
                    raise
                remove_at(pfd, name, shown=str(path))  # crossing a mount: delete in place
                return
            remove_at(tfd, dest, shown=f"{root}/{META}/trash/{dest}")
        finally:
            os.close(tfd)
    finally:
        os.close(pfd)


# Pinned directories (staging): made once through directory fds, then written through
# ``/proc/self/fd/N/...``, which the kernel resolves to exactly that directory whatever happens
# to the names above it. A run that swaps ``.forgespace/tmp`` for a symlink (or another
# directory) while a download or an extraction is under way cannot redirect the writes.
_PROC_FD = Path("/proc/self/fd")


@dataclass(frozen=True)
class _Pin:
    fd: int  # the directory itself
    parent_fd: int  # the directory it was made in
    name: str
    real: Path


_PINNED: dict[Path, _Pin] = {}
_PINNED_LOCK = threading.Lock()


def make_pinned_dir(root: Path, path: Path) -> Path:
    """Create the directory ``path`` (below ``root``, reached through directory fds) and return
    the path to write in it from now on: ``/proc/self/fd/N`` for this very directory (``path``
    itself where ``/proc`` is not mounted). Release it with ``unpin``."""
    parts = parts_under(root, path)
    parent = open_dir(root, parts[:-1], create=True)
    try:
        os.mkdir(parts[-1], 0o777, dir_fd=parent)
        fd = open_child_dir(parent, parts[-1], shown=str(path))
    except BaseException:
        os.close(parent)
        raise
    pinned = _PROC_FD / str(fd)
    if not os.path.isdir(pinned):
        pinned = path
    with _PINNED_LOCK:
        _PINNED[pinned] = _Pin(fd, parent, parts[-1], path)
    return pinned


def pinned_still_in_place(pinned: Path) -> bool:
    """Whether the pinned directory still sits under the name it was made with (it has not
    been renamed away, i.e. published)."""
    pin = _PINNED[pinned]
    try:
        st = os.stat(pin.name, dir_fd=pin.parent_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    own = os.fstat(pin.fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def unpin(pinned: Path) -> Path:
    """Forget a pinned directory (closing its fds); returns its real path."""
    with _PINNED_LOCK:
        pin = _PINNED.pop(pinned)
    os.close(pin.fd)
    os.close(pin.parent_fd)
    return pin.real


def shown(path: Path) -> Path:
    """``path`` for messages: a path inside a pinned directory with its real location."""
    for pinned, pin in list(_PINNED.items()):
        if path == pinned or pinned in path.parents:
            return pin.real / path.relative_to(pinned)
    return path


def _source_fd(root: Path, src: Path) -> tuple[int, str, bool]:
    """(fd of ``src``'s directory, ``src``'s name in it, whether the caller must close it):
    a pinned directory or an entry of one is renamed from the fds taken when it was made."""
    pin = _PINNED.get(src)
    if pin is not None:
        return pin.parent_fd, pin.name, False
    pin = _PINNED.get(src.parent)
    if pin is not None:
        return pin.fd, src.name, False
    sp = parts_under(root, src)
    return open_dir(root, sp[:-1]), sp[-1], True


def rename_into(root: Path, src: Path, dst: Path, *, keep_mode: bool = True) -> None:
    """rename(2) ``src`` to ``dst`` (both below ``root``, or ``src`` a pinned directory or an
    entry of one), each reached through directory fds (``dst``'s parent is created when
    missing). Publishing never writes through a planted link: a symlinked target directory is
    refused, not followed outside CACHE_DIR.

    A read-only directory moved to another parent needs u+w for its '..' (non-root): it
    gets it for the rename and its mode back after (``keep_mode``)."""
    sfd, name, close = _source_fd(root, src)
    try:
        _rename_from(sfd, name, root, dst, keep_mode=keep_mode)
    finally:
        if close:
            os.close(sfd)


def _rename_from(sfd: int, name: str, root: Path, dst: Path, *, keep_mode: bool) -> None:
    dp = parts_under(root, dst)
    with dir_fd(root, dp[:-1], create=True) as dfd:
        try:
            os.rename(name, dp[-1], src_dir_fd=sfd, dst_dir_fd=dfd)
            return
        except PermissionError:
            st = os.stat(name, dir_fd=sfd, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                raise
        _make_owner_rwx(sfd, name, st)
        os.rename(name, dp[-1], src_dir_fd=sfd, dst_dir_fd=dfd)
        if keep_mode:
            os.chmod(dp[-1], stat.S_IMODE(st.st_mode), dir_fd=dfd, follow_symlinks=False)


def clear_dir(root: Path, parts: tuple[str, ...]) -> list[str]:
    """Remove every entry of the internal directory ``root/parts`` (the trash); returns the
    names removed. Refuses (UnsafeCacheEntryError) when that directory is planted."""
    removed: list[str] = []
    try:
        fd = open_dir(root, parts)
    except FileNotFoundError:
        return removed
    try:
        for name in os.listdir(fd):
            remove_at(fd, name, shown=f"{root}/{'/'.join(parts)}/{name}")
            removed.append(name)
    finally:
        os.close(fd)
    return removed


# --- mounts --------------------------------------------------------------------------------
def unmount_under(paths: Iterable[Path], *, root: Path) -> None:
    """Unmount the overlay mounts forgespace made at or below any of ``paths`` (deepest
    first). Other mounts are left alone: removal refuses to cross them."""
    from forgespace.cache import overlay

    wanted = [Path(os.path.realpath(p)) for p in paths]
    for mp in overlay.mounts_under(root, fstype="overlay"):
        if any(mp == p or p in mp.parents for p in wanted):
            overlay.unmount(mp)


# --- audit ---------------------------------------------------------------------------------
def audit(root: Path) -> list[str]:
    """One line per planted entry where forgespace expects its own: internal directories and
    lock files that are symlinks, non-directories or mount points; target and run
    directories that are symlinks or mount points (the overlay mounts forgespace makes on run
    workspaces are expected). Reads only."""
    problems: list[str] = []
    try:
        rfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return problems
    try:
        _audit_meta(root, rfd, problems)
        _audit_targets(root, rfd, problems)
    finally:
        os.close(rfd)
    return problems


def _try_child(dfd: int, name: str, shown: str, problems: list[str]) -> int | None:
    try:
        return open_child_dir(dfd, name, shown=shown)
    except FileNotFoundError:
        return None
    except UnsafeCacheEntryError as exc:
        problems.append(f"{shown}: {exc.found} (refused, never followed)")
        return None


def _audit_meta(root: Path, rfd: int, problems: list[str]) -> None:
    mfd = _try_child(rfd, META, f"{root}/{META}", problems)
    if mfd is None:
        return
    try:
        for sub in INTERNAL_DIRS:
            shown = f"{root}/{META}/{sub}"
            fd = _try_child(mfd, sub, shown, problems)
            if fd is None:
                continue
            try:
                if sub in LOCK_DIRS:
                    for e in os.scandir(fd):
                        st = e.stat(follow_symlinks=False)
                        if not stat.S_ISREG(st.st_mode):
                            problems.append(
                                f"{shown}/{e.name}: {_found(fd, e.name)} where a lock file "
                                "belongs (refused, never followed)"
                            )
                        elif st.st_nlink != 1:
                            problems.append(
                                f"{shown}/{e.name}: a lock file with {st.st_nlink} hard links "
                                "(refused, never written)"
                            )
            finally:
                os.close(fd)
    finally:
        os.close(mfd)


def _audit_targets(root: Path, rfd: int, problems: list[str]) -> None:
    from forgespace.layout import ID_PATTERN, RESERVED_IDS

    ours = _our_mounts(root)
    dev = os.fstat(rfd).st_dev
    for e in os.scandir(rfd):
        if e.name == META or not ID_PATTERN.match(e.name) or e.name in RESERVED_IDS:
            continue
        shown = f"{root}/{e.name}"
        tfd = _try_child(rfd, e.name, shown, problems)
        if tfd is None:
            continue
        try:
            for c in os.scandir(tfd):
                cst = c.stat(follow_symlinks=False)
                cshown = f"{shown}/{c.name}"
                if stat.S_ISLNK(cst.st_mode):
                    problems.append(f"{cshown}: {_found(tfd, c.name)} (refused, never followed)")
                elif stat.S_ISDIR(cst.st_mode) and other_mount(tfd, c.name, cst):
                    problems.append(f"{cshown}: a mount point (never crossed)")
                elif stat.S_ISDIR(cst.st_mode) and c.name not in ("workspace", "shared"):
                    _audit_run_workspace(tfd, c.name, cshown, dev, ours, problems)
        finally:
            os.close(tfd)


def _audit_run_workspace(
    tfd: int, run: str, shown: str, dev: int, ours: set[str], problems: list[str]
) -> None:
    try:
        st = os.stat(f"{run}/workspace", dir_fd=tfd, follow_symlinks=False)
    except OSError:
        return
    wshown = f"{shown}/workspace"
    if stat.S_ISLNK(st.st_mode):
        problems.append(f"{wshown}: a symbolic link (refused, never followed)")
    elif other_mount(tfd, f"{run}/workspace", st) and os.path.realpath(wshown) not in ours:
        problems.append(f"{wshown}: a mount point forgespace did not make (never crossed)")


def _our_mounts(root: Path) -> set[str]:
    try:
        from forgespace.cache import overlay

        return {str(p) for p in overlay.mounts_under(root, fstype="overlay")}
    except OSError:
        return set()
