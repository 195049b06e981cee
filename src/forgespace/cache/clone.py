"""Copy a workspace tree as cheaply as the filesystem allows.

Per file: ``ioctl(FICLONE)`` (a reflink: btrfs/XFS share the data blocks until written), then
``os.copy_file_range`` (in-kernel copy; reflinks too on some filesystems), then a plain
read/write loop. Symlinks stay symlinks, hard links inside the tree stay hard links, permission
bits and mtimes are kept (plus u+w when the copy is to be writable, since the source is a
read-only shared copy). Ownership is never changed.

The walk uses ``os.scandir`` and one ``fstat`` per opened file (no separate ``stat`` calls);
once FICLONE is refused on a filesystem it is not tried again for the rest of the copy.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import stat
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

from forgespace.cache.fsutil import current_umask
from forgespace.errors import CacheFullError

__all__ = ["CloneMethod", "CloneStats", "make_read_only", "materialize_copy"]

log = logging.getLogger(__name__)

CloneMethod = Literal["reflink", "copy_file_range", "copy"]

# _IOW(0x94, 9, int): clone a whole file's extents (the reflink ioctl of btrfs, XFS, bcachefs).
FICLONE = 0x40049409
_METHODS: tuple[CloneMethod, ...] = ("copy", "copy_file_range", "reflink")  # worst to best
_RANK = {m: i for i, m in enumerate(_METHODS)}
_NO_REFLINK = {errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EPERM}
_NO_CFR = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF, errno.EPERM}
_DST_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
_SRC_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW
_COPY_CHUNK = 1 << 20
# Threads did not pay off reliably on the 2-core reference machine (see docs/benchmarks.md).
_DEFAULT_WORKERS = 1
_CFR_CHUNK = 1 << 30


@dataclass(frozen=True)
class CloneStats:
    """What a copy did: regular files and their bytes, and the best copy method it used."""

    files: int
    bytes: int
    method: CloneMethod


class _Copier:
    def __init__(self, writable: bool, workers: int) -> None:
        self.writable = writable
        self.workers = workers
        self.umask = current_umask()
        self.try_reflink = True
        self.try_cfr = True
        self.lock = threading.Lock()
        self.best = -1
        self.files = 0
        self.bytes = 0
        self.links: dict[tuple[int, int], str] = {}
        self.dirs: list[tuple[str, int, int, int]] = []  # (dst, mode, atime_ns, mtime_ns)

    def _data(self, sfd: int, dfd: int, size: int) -> int:
        """Copy a file's data; returns the rank of the method that did it."""
        if self.try_reflink:
            try:
                fcntl.ioctl(dfd, FICLONE, sfd)
            except OSError as e:
                if e.errno not in _NO_REFLINK:
                    raise
                # Same filesystem for the whole copy: one refusal means all would be refused.
                self.try_reflink = False
            else:
                return _RANK["reflink"]
        done = 0
        if self.try_cfr:
            try:
                while done < size:
                    n = os.copy_file_range(sfd, dfd, min(size - done, _CFR_CHUNK))
                    if n == 0:
                        break
                    done += n
            except OSError as e:
                if e.errno not in _NO_CFR or done:
                    raise
                self.try_cfr = False
            else:
                if done >= size:
                    return _RANK["copy_file_range"]
        # Plain copy of whatever is left (also catches files that grew since fstat).
        while True:
            chunk = os.read(sfd, _COPY_CHUNK)
            if not chunk:
                break
            view = memoryview(chunk)
            while view:
                view = view[os.write(dfd, view) :]
        return _RANK["copy"]

    def _file(self, src: str, dst: str) -> tuple[int, int]:
        """Copy one regular file; returns (bytes copied, method rank or -1)."""
        sfd = os.open(src, _SRC_FLAGS)
        try:
            st = os.fstat(sfd)
            if st.st_nlink > 1:
                key = (st.st_dev, st.st_ino)
                with self.lock:
                    peer = self.links.get(key)
                    if peer is None:
                        self.links[key] = dst
                if peer is not None:
                    os.link(peer, dst)
                    return 0, -1
            mode = stat.S_IMODE(st.st_mode) & 0o777
            if self.writable:
                mode |= 0o200
            dfd = os.open(dst, _DST_FLAGS, mode)
            try:
                rank = self._data(sfd, dfd, st.st_size) if st.st_size else -1
                if mode & self.umask:
                    os.fchmod(dfd, mode)
                os.utime(dfd, ns=(st.st_atime_ns, st.st_mtime_ns))
            finally:
                os.close(dfd)
            return st.st_size, rank
        finally:
            os.close(sfd)

    def _batch(self, pairs: list[tuple[str, str]]) -> None:
        nbytes = 0
        best = -1
        for sp, dp in pairs:
            n, rank = self._file(sp, dp)
            nbytes += n
            if rank > best:
                best = rank
        with self.lock:
            self.files += len(pairs)
            self.bytes += nbytes
            if best > self.best:
                self.best = best

    def tree(self, src: str, dst: str) -> None:
        pool = ThreadPoolExecutor(self.workers) if self.workers > 1 else None
        futures: list[Future[None]] = []
        try:
            self._walk(src, dst, pool, futures)
            for f in futures:
                f.result()
        finally:
            if pool is not None:
                for f in futures:
                    f.cancel()
                pool.shutdown(wait=True)
        # Directory modes and mtimes last (creating entries changes them), deepest first.
        for d, mode, atime, mtime in reversed(self.dirs):
            if (mode | 0o700) & ~self.umask != mode:
                os.chmod(d, mode)
            os.utime(d, ns=(atime, mtime))

    def _walk(
        self, src: str, dst: str, pool: ThreadPoolExecutor | None, futures: list[Future[None]]
    ) -> None:
        self._mkdir(dst, os.stat(src))
        stack = [(src, dst)]
        while stack:
            s, d = stack.pop()
            files: list[tuple[str, str]] = []
            with os.scandir(s) as it:
                for entry in it:
                    dp = f"{d}/{entry.name}"
                    if entry.is_dir(follow_symlinks=False):
                        self._mkdir(dp, entry.stat(follow_symlinks=False))
                        stack.append((entry.path, dp))
                    elif entry.is_file(follow_symlinks=False):
                        files.append((entry.path, dp))
                    elif entry.is_symlink():
                        os.symlink(os.readlink(entry.path), dp)
                        est = entry.stat(follow_symlinks=False)
                        os.utime(dp, ns=(est.st_atime_ns, est.st_mtime_ns), follow_symlinks=False)
                    else:
                        log.warning("not copying %s: not a file, directory or symlink", entry.path)
            if not files:
                continue
            if pool is None:
                self._batch(files)
            else:
                # One task per directory: big enough to amortise the pool, small enough to spread.
                futures.append(pool.submit(self._batch, files))
                if futures[-1].done() and futures[-1].exception() is not None:
                    return

    def _mkdir(self, dst: str, st: os.stat_result) -> None:
        mode = stat.S_IMODE(st.st_mode) & 0o777
        if self.writable:
            mode |= 0o700
        # Created writable for us; the final mode is applied after the contents.
        os.mkdir(dst, mode | 0o700)
        self.dirs.append((dst, mode, st.st_atime_ns, st.st_mtime_ns))

    def method(self) -> CloneMethod:
        if self.best < 0:
            return "copy"
        return _METHODS[self.best]


def _remove(path: str) -> None:
    def onerror(func: object, p: str, exc: object) -> None:
        try:
            os.chmod(os.path.dirname(p), 0o700)
            if callable(func):
                func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=onerror)


def materialize_copy(
    src_dir: str | os.PathLike[str],
    dst_dir: str | os.PathLike[str],
    *,
    writable: bool = True,
    workers: int = 0,
) -> CloneStats:
    """Copy the tree ``src_dir`` to the new directory ``dst_dir`` (which must not exist).

    Returns the number of regular files and bytes copied and the best method used:
    ``"reflink"`` (data shared with the source until written), ``"copy_file_range"`` or
    ``"copy"``. With ``writable=True`` the owner gets write permission on everything copied.
    On any failure ``dst_dir`` is removed; a full disk raises :class:`CacheFullError`.

    ``workers`` > 1 copies the files of different directories in that many threads (the copy
    syscalls release the GIL); 0 means the default (1).
    """
    s, d = os.fspath(src_dir), os.fspath(dst_dir)
    if not os.path.isdir(s) or os.path.islink(s):
        raise NotADirectoryError(errno.ENOTDIR, f"copy source is not a directory: {s}")
    if os.path.lexists(d):
        raise FileExistsError(errno.EEXIST, f"copy destination already exists: {d}")
    c = _Copier(writable, workers or _DEFAULT_WORKERS)
    try:
        c.tree(s, d)
    except BaseException as e:
        if os.path.lexists(d):
            _remove(d)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CacheFullError(e.errno, f"no space left copying {s} to {d}") from e
        raise
    return CloneStats(files=c.files, bytes=c.bytes, method=c.method())


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
