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
import stat
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from forgespace.cache import fsops
from forgespace.cache.fsutil import current_umask
from forgespace.errors import CacheFullError, is_nospace

__all__ = ["CloneMethod", "CloneStats", "materialize_copy"]

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
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
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


def _ident(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


@dataclass
class _Frame:
    """One directory on the walk's path: its name in its parent, its path in the tree, the
    (dev, ino) of the source and of the copy (checked when coming back up through ``..``),
    its source stat and the subdirectories still to visit."""

    name: str
    rel: str
    sid: tuple[int, int]
    did: tuple[int, int]
    st: os.stat_result
    pending: list[tuple[str, os.stat_result]]
    batch: Future[None] | None = None  # its files, when copied in a worker thread


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
        self.links: dict[tuple[int, int], str] = {}  # inode -> path of its copy in the tree
        self.root_fd = -1  # the copy's root (hard links are made relative to it)

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

    def _file(self, sdir: int, ddir: int, name: str, rel: str) -> tuple[int, int]:
        """Copy regular file ``name`` of directory fd ``sdir`` into ``ddir``; ``rel`` is its
        path in the tree (for hard links). Returns (bytes copied, method rank or -1)."""
        sfd = os.open(name, _SRC_FLAGS, dir_fd=sdir)
        try:
            st = os.fstat(sfd)
            if st.st_nlink > 1 and self._link(st, ddir, name, rel):
                return 0, -1
            mode = stat.S_IMODE(st.st_mode) & 0o777
            if self.writable:
                mode |= 0o200
            dfd = os.open(name, _DST_FLAGS, mode, dir_fd=ddir)
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

    def _link(self, st: os.stat_result, ddir: int, name: str, rel: str) -> bool:
        """Hard-link to the earlier copy of the same inode; False when this is the first (or
        the peer's path is beyond PATH_MAX: then this one gets its own copy)."""
        key = (st.st_dev, st.st_ino)
        with self.lock:
            peer = self.links.get(key)
            if peer is None:
                self.links[key] = rel
                return False
        try:
            os.link(peer, name, src_dir_fd=self.root_fd, dst_dir_fd=ddir, follow_symlinks=False)
        except OSError as e:
            if e.errno != errno.ENAMETOOLONG:
                raise
            return False
        return True

    def _batch(self, sdir: int, ddir: int, files: list[tuple[str, str]], own: bool) -> None:
        nbytes = 0
        best = -1
        try:
            for name, rel in files:
                n, rank = self._file(sdir, ddir, name, rel)
                nbytes += n
                if rank > best:
                    best = rank
        finally:
            if own:  # dup'd for a worker thread
                os.close(sdir)
                os.close(ddir)
        with self.lock:
            self.files += len(files)
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
            if self.root_fd >= 0:
                os.close(self.root_fd)
                self.root_fd = -1

    def _walk(
        self, src: str, dst: str, pool: ThreadPoolExecutor | None, futures: list[Future[None]]
    ) -> None:
        """Depth-first with an explicit stack and two directory fds open at a time (source and
        copy): each directory is entered by name from its parent's fd (``O_NOFOLLOW``) and left
        through ``..``, checked against the device and inode it was entered from. No path is
        ever longer than one name, so depth is bounded by nothing but inodes."""
        sfd = os.open(src, _DIR_FLAGS)
        try:
            sst = os.fstat(sfd)
            mode = self._dir_mode(sst)
            os.mkdir(dst, mode | 0o700)
            dfd = os.open(dst, _DIR_FLAGS)
        except BaseException:
            os.close(sfd)
            raise
        self.root_fd = os.dup(dfd)
        frames = [_Frame("", "", _ident(sst), _ident(os.fstat(dfd)), sst, [])]
        try:
            self._scan(sfd, dfd, frames[-1], pool, futures)
            while True:
                top = frames[-1]
                if top.pending:
                    name, st = top.pending.pop()
                    nsfd, ndfd = _enter(sfd, dfd, name, st, f"{src}/{top.rel}/{name}")
                    os.close(sfd)
                    os.close(dfd)
                    sfd, dfd = nsfd, ndfd
                    rel = f"{top.rel}/{name}" if top.rel else name
                    frames.append(_Frame(name, rel, _ident(st), _ident(os.fstat(dfd)), st, []))
                    self._scan(sfd, dfd, frames[-1], pool, futures)
                    continue
                if top.batch is not None:
                    top.batch.result()  # its files first: creating them changes its mtime
                if len(frames) == 1:
                    self._dir_meta(dfd, None, top.st)
                    return
                up_s, up_d = _leave(sfd, dfd, frames[-2], f"{src}/{top.rel}")
                os.close(sfd)
                os.close(dfd)
                sfd, dfd = up_s, up_d
                frames.pop()
                # Mode and times last (creating entries changes them), from the parent: a
                # mode-000 copy could not be left through its own '..'.
                self._dir_meta(dfd, top.name, top.st)
        finally:
            os.close(sfd)
            os.close(dfd)

    def _scan(
        self,
        sfd: int,
        dfd: int,
        frame: _Frame,
        pool: ThreadPoolExecutor | None,
        futures: list[Future[None]],
    ) -> None:
        files: list[tuple[str, str]] = []
        prefix = f"{frame.rel}/" if frame.rel else ""
        with os.scandir(sfd) as it:
            for entry in it:
                name = entry.name
                if entry.is_dir(follow_symlinks=False):
                    st = entry.stat(follow_symlinks=False)
                    # Created writable for us; the final mode is applied after the contents.
                    os.mkdir(name, self._dir_mode(st) | 0o700, dir_fd=dfd)
                    frame.pending.append((name, st))
                elif entry.is_file(follow_symlinks=False):
                    files.append((name, prefix + name))
                elif entry.is_symlink():
                    os.symlink(os.readlink(name, dir_fd=sfd), name, dir_fd=dfd)
                    est = entry.stat(follow_symlinks=False)
                    os.utime(
                        name,
                        ns=(est.st_atime_ns, est.st_mtime_ns),
                        dir_fd=dfd,
                        follow_symlinks=False,
                    )
                else:
                    log.warning("not copying %s%s: not a file, directory or symlink", prefix, name)
        frame.pending.reverse()  # visit in listing order (pop takes from the end)
        if not files:
            return
        if pool is None:
            self._batch(sfd, dfd, files, False)
        else:
            # One task per directory: big enough to amortise the pool, small enough to spread.
            frame.batch = pool.submit(self._batch, os.dup(sfd), os.dup(dfd), files, True)
            futures.append(frame.batch)

    def _dir_mode(self, st: os.stat_result) -> int:
        mode = stat.S_IMODE(st.st_mode) & 0o777
        return mode | 0o700 if self.writable else mode

    def _dir_meta(self, dfd: int, name: str | None, st: os.stat_result) -> None:
        mode = self._dir_mode(st)
        ns = (st.st_atime_ns, st.st_mtime_ns)
        if name is None:  # the copy's root, through its own fd
            if (mode | 0o700) & ~self.umask != mode:
                os.fchmod(dfd, mode)
            os.utime(dfd, ns=ns)
            return
        if (mode | 0o700) & ~self.umask != mode:
            os.chmod(name, mode, dir_fd=dfd, follow_symlinks=False)
        os.utime(name, ns=ns, dir_fd=dfd, follow_symlinks=False)

    def method(self) -> CloneMethod:
        if self.best < 0:
            return "copy"
        return _METHODS[self.best]


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
            fsops.remove(Path(d).parent, d)
        if isinstance(e, OSError) and is_nospace(e):
            raise CacheFullError(e.errno, f"no space left copying {s} to {d}") from e
        raise
    return CloneStats(files=c.files, bytes=c.bytes, method=c.method())


def _enter(sfd: int, dfd: int, name: str, st: os.stat_result, shown: str) -> tuple[int, int]:
    """Open subdirectory ``name`` of the source and of the copy; the source must still be
    the directory scanned as ``st`` (``O_NOFOLLOW``: a swapped-in link is refused)."""
    nsfd = os.open(name, _DIR_FLAGS, dir_fd=sfd)
    if _ident(os.fstat(nsfd)) != _ident(st):
        os.close(nsfd)
        raise OSError(errno.ESTALE, f"{shown} changed while copied")
    try:
        return nsfd, os.open(name, _DIR_FLAGS, dir_fd=dfd)
    except BaseException:
        os.close(nsfd)
        raise


def _leave(sfd: int, dfd: int, parent: _Frame, shown: str) -> tuple[int, int]:
    """Open ``..`` of the source and the copy, checked against ``parent``'s identities."""
    up_s = os.open("..", _DIR_FLAGS, dir_fd=sfd)
    up_d = os.open("..", _DIR_FLAGS, dir_fd=dfd)
    if (_ident(os.fstat(up_s)), _ident(os.fstat(up_d))) != (parent.sid, parent.did):
        os.close(up_s)
        os.close(up_d)
        raise OSError(errno.ESTALE, f"{shown} moved while copied")
    return up_s, up_d
