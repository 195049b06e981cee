# Over 500 lines on purpose, for now: the extractor and the tar walker share one member state; the
# detection and the safety policy functions are the natural first split.
"""Safe, fast extraction of tar (plain, gz, bz2, xz) and zip archives, detected by content.

Safety rules (every one is checked per member, cheaply, instead of tarfile's generic ``data``
filter which costs ~60 us per member):

- names: absolute paths, ``..`` components, empty names and NUL bytes are refused;
- links: symlinks whose target is absolute or resolves (from the link's directory) outside the
  destination are refused, hard links must point at an earlier regular file of the archive; after
  extraction every symlink is resolved once more through the archive's other links, by the
  kernel's rules, so chains of links that only escape together are refused too;
- no member is ever written *through* a symlink: created symlinks are tracked and a member whose
  parent path contains one is refused (the classic ``link -> /tmp`` then ``link/evil``); files are
  opened with ``O_EXCL | O_NOFOLLOW`` and a duplicate member unlinks the earlier one first;
- device, fifo, socket and unknown members are refused;
- the total size is counted as bytes are *written* (a member is also refused up front when its
  header already claims more than what is left); zip members are never inflated past their
  declared size;
- the number of members is bounded too (one per 4 KiB of the byte limit, at least 100,000):
  empty files pass any byte limit, yet exhaust inodes;
- setuid/setgid/sticky bits are dropped, permission bits and mtimes kept, ownership never
  restored; directory modes are applied at the end so read-only directories do not block
  extraction.

Any refusal raises :class:`UnsafeArchiveError`, a corrupt or truncated archive
:class:`IntegrityError`, a full disk :class:`CacheFullError`; in every case the destination
directory is removed before the error propagates.
"""

from __future__ import annotations

import bz2
import errno
import io
import logging
import lzma
import os
import stat
import struct
import time
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal, Protocol, cast

from isal import igzip, igzip_threaded, isal_zlib

from forgespace.cache import fsops
from forgespace.cache.fsutil import current_umask
from forgespace.errors import (
    CacheFullError,
    CorruptArchiveError,
    IntegrityError,
    UnsafeArchiveError,
    UnsafeMemberError,
    is_nospace,
)

__all__ = [
    "ArchiveKind",
    "ExtractStats",
    "PositionedSource",
    "artifact_kind",
    "detect_archive",
    "extract_archive",
    "extract_tar_stream",
]

log = logging.getLogger(__name__)

ArchiveKind = Literal["tar", "zip"]

_GZIP_MAGIC = b"\x1f\x8b"
_BZ2_MAGIC = b"BZh"
_XZ_MAGIC = b"\xfd7zXZ\x00"
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
_BLOCK = 512
_CHUNK = 1 << 20
# A tar made of zero blocks only (an empty archive) is recognised when it is this small at most.
_EMPTY_TAR_LIMIT = 64 * 1024
# After the tar end marker, drain at most this much of a compressed stream so its CRC is checked.
_DRAIN_LIMIT = 1 << 20
_MAX_ZIP_SYMLINK = 4096
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# Relative paths longer than this are reached in steps (_Extractor._at); PATH_MAX is 4096.
_STEP = 2048
_PATH_MAX = 4096
_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    EOFError,
    ValueError,
    zlib.error,
    lzma.LZMAError,
    # isal's stubs declare its error as an instance; it is the class.
    cast("type[BaseException]", isal_zlib.error),
)
# zipfile raises NotImplementedError for a "version needed to extract" it does not know.
_ZIP_OPEN_ERRORS: tuple[type[BaseException], ...] = (
    zipfile.BadZipFile,
    NotImplementedError,
    *_READ_ERRORS,
)
_MEMBER_ERRNOS = {
    errno.ENAMETOOLONG,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.EEXIST,
    errno.ELOOP,
    errno.EMLINK,
    errno.EINVAL,
}


@dataclass(frozen=True)
class ExtractStats:
    """What an extraction wrote.

    ``manifest`` holds ``(relative path, size, mtime_ns)`` of every regular file, collected while
    writing (hard links included, each under its own path).
    """

    files: int
    dirs: int
    bytes: int
    manifest: tuple[tuple[str, int, int], ...]
    #: A read-only tree built as a btrfs subvolume: its seal (cache/snapshot.SealRecord).
    seal: Any = None


# --------------------------------------------------------------------------------------------
# Detection


def _compression(head: bytes) -> str | None:
    if head.startswith(_GZIP_MAGIC):
        return "gz"
    if head.startswith(_BZ2_MAGIC) and head[3:4].isdigit():
        return "bz2"
    if head.startswith(_XZ_MAGIC):
        return "xz"
    return None


class PositionedSource(Protocol):
    """What ``extract_tar_stream`` reads: ``readinto`` from a position ``seek`` sets (a file
    opened unbuffered, or storage.retry.DownloadTap following a download)."""

    def readinto(self, buf: memoryview, /) -> int | None: ...

    def seek(self, offset: int, /) -> int: ...


class _RawView(io.RawIOBase):
    """A raw stream over a ``PositionedSource`` from where it stands; closing the view leaves
    the source alone (detection and extraction each read through a view of their own)."""

    def __init__(self, source: PositionedSource) -> None:
        self._source = source

    def readable(self) -> bool:
        return True

    def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
        return self._source.readinto(buf) or 0


def _open_stream(path: str | _RawView, compression: str | None, *, threaded: bool) -> IO[bytes]:
    if isinstance(path, _RawView):
        # Large reads of the source whatever the decompressor asks for (bz2/lzma: 8 KiB).
        buffered = io.BufferedReader(path, _CHUNK)
        if compression is None:
            return buffered
        path = cast("_RawView", buffered)
    if compression == "gz":
        if threaded:
            # Inflating in a worker thread (isal releases the GIL) overlaps with our writes.
            return igzip_threaded.open(path, "rb", threads=1)  # type: ignore[no-any-return]
        return igzip.open(path, "rb")  # type: ignore[no-any-return]
    if compression == "bz2":
        return bz2.open(path, "rb")
    if compression == "xz":
        return lzma.open(cast("str | IO[bytes]", path), "rb")
    return open(cast("str", path), "rb", buffering=_CHUNK)


def _is_tar_header(block: bytes) -> bool:
    """True when ``block`` is a tar header with a valid checksum (ustar, GNU, pax or v7)."""
    if len(block) < _BLOCK:
        return False
    field = block[148:156].split(b"\0", 1)[0].strip()
    try:
        recorded = int(field, 8)
    except ValueError:
        return False
    # The checksum field itself counts as eight spaces (8 * 32 = 256); old tars summed signed
    # bytes.
    unsigned = sum(block[:148]) + 256 + sum(block[156:_BLOCK])
    if recorded == unsigned:
        return True
    signed = sum(struct.unpack("148b", block[:148])) + 256
    signed += sum(struct.unpack("356b", block[156:_BLOCK]))
    return recorded == signed


def _starts_tar(stream: IO[bytes]) -> bool:
    """True when the (decompressed) ``stream`` starts a tar archive: a valid first header, or
    an empty archive (zero blocks only)."""
    block = stream.read(_BLOCK)
    if _is_tar_header(block):
        return True
    return len(block) == _BLOCK and not block.strip(b"\0") and _is_empty_tar(stream, block)


def _is_empty_tar(stream: IO[bytes], first: bytes) -> bool:
    """An archive of zero blocks only (``tar -cf x.tar -T /dev/null``), kept small on purpose so a
    zero-filled disk image is not mistaken for one."""
    rest = stream.read(_EMPTY_TAR_LIMIT + 1 - len(first))
    data = first + rest
    return (
        len(data) <= _EMPTY_TAR_LIMIT
        and len(data) >= 2 * _BLOCK
        and len(data) % _BLOCK == 0
        and not data.strip(b"\0")
    )


def detect_archive(path: str | os.PathLike[str], *, artifacts: bool = False) -> ArchiveKind | None:
    """Tell what ``path`` holds by its content, never its name.

    Returns ``"zip"`` for a zip archive, ``"tar"`` for a tar archive that is plain or compressed
    with gzip, bzip2 or xz, and ``None`` for anything else — including a gzip/bzip2/xz stream
    whose content is not a tar, which is then a single-file target — and, unless
    ``artifacts``, for a zip that is a packaged artifact (``artifact_kind``): an APK, JAR or
    wheel is analysed as the file it is, as FuzzForge hands it to its tools.
    """
    p = os.fspath(path)
    try:
        with open(p, "rb") as f:
            head = f.read(_BLOCK)
    except IsADirectoryError:
        return None
    if head.startswith(_ZIP_MAGICS):
        return "zip" if artifacts or artifact_kind(p) is None else None
    compression = _compression(head)
    try:
        with _open_stream(p, compression, threaded=False) as stream:
            if _starts_tar(stream):
                return "tar"
    except _READ_ERRORS:
        # A damaged compressed stream is not something we can extract: keep it as a file.
        return None
    return None


# Zip-family packages (by the entries their formats require, never by the file name): a target
# that is one of these stays a file unless it is uploaded with extraction asked for.
_ARTIFACT_RULES: tuple[tuple[str, tuple[tuple[str, ...], ...]], ...] = (
    # (kind, alternatives: every pattern of one alternative must match some entry)
    ("apk", (("AndroidManifest.xml", "classes*.dex"),)),
    ("aar", (("AndroidManifest.xml", "classes.jar"),)),
    ("jar", (("META-INF/MANIFEST.MF", "*.class"), ("META-INF/MANIFEST.MF", "WEB-INF/*"))),
    ("ipa", (("Payload/*.app/*",),)),
    ("wheel", (("*.dist-info/WHEEL", "*.dist-info/RECORD"),)),
)


def artifact_kind(path: str | os.PathLike[str]) -> str | None:
    """``"apk"``, ``"aar"``, ``"jar"`` (also war/ear), ``"ipa"`` or ``"wheel"`` when the zip at
    ``path`` is a packaged artifact, judged by the entries its format requires (a source
    archive of a project that builds one does not have them at its top level); else None.
    An unreadable zip is None: extraction reports what is wrong with it."""
    import fnmatch

    try:
        with zipfile.ZipFile(os.fspath(path)) as zf:
            names = [n for n in zf.namelist() if n][:100_000]
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError):
        return None
    for kind, alternatives in _ARTIFACT_RULES:
        for patterns in alternatives:
            if all(any(fnmatch.fnmatchcase(n, pat) for n in names) for pat in patterns):
                return kind
    return None


# --------------------------------------------------------------------------------------------
# Extraction


def _norm(name: str, what: str) -> str:
    """Normalise an archive member name to a relative path ("" is the root) or refuse it.

    The refusal's ``reason`` is said of the member being extracted: ``what`` is "member" (the
    name is its own) or another name it carries ("hard link target")."""

    if not name:
        raise _refuse_name(name, what, "has an empty name")
    if "\0" in name:
        raise _refuse_name(name, what, "contains a NUL byte")
    if name[0] == "/":
        raise _refuse_name(name, what, "is an absolute path; only relative paths are accepted")
    parts = name.split("/")
    if ".." in parts:
        raise _refuse_name(name, what, "contains a '..' component")
    if "" in parts or "." in parts:
        return "/".join([p for p in parts if p and p != "."])
    return name  # already normal (most names): no copy


def _refuse_name(name: str, what: str, why: str) -> UnsafeArchiveError:
    said = why if what == "member" else f"has the {what} {name!r}, which {why}"
    return UnsafeArchiveError(reason=said)


# The kernel gives up (ELOOP) after following this many symlinks in one lookup.
_MAX_SYMLINK_HOPS = 40


def _link_escape(symlinks: dict[str, str], rel: str) -> str | None:
    """Follow the symlink ``rel`` through the archive's own links, as the kernel would, and
    return the link through which it leaves the destination (``rel`` itself or one it chains
    through), or None when it stays inside.

    ``symlinks`` (relative path -> target) is every link extracted: the destination was created
    empty, so these records are the whole truth and no path is ever handed to the kernel. That
    is why this replaced ``os.path.realpath``, which treats every component of an absolute path
    longer than PATH_MAX as a plain directory, so a chain through a deep ``s -> ..`` slipped by.
    Components that do not exist are taken lexically (a dangling link is judged by what it would
    reach once created); a loop the kernel would refuse (ELOOP) reaches nothing.
    """
    path = rel.split("/")[:-1]  # the link's directory: never through a link (see _parent)
    todo = symlinks[rel].split("/")[::-1]
    via = rel
    hops = 0
    while todo:
        part = todo.pop()
        if part in ("", "."):
            continue
        if part == "..":
            if not path:
                return via
            path.pop()
            continue
        path.append(part)
        target = symlinks.get("/".join(path))
        if target is None:
            continue
        hops += 1
        if hops >= _MAX_SYMLINK_HOPS:  # with ``rel`` itself, one past what the kernel follows
            return None
        if target.startswith("/"):
            return "/".join(path)
        via = "/".join(path)
        path.pop()
        todo.extend(target.split("/")[::-1])
    return None


def _mtime_ns(mtime: float) -> int | None:
    ns = mtime * 1_000_000_000 if isinstance(mtime, int) else round(mtime * 1e9)
    # Out-of-range header values are ignored rather than refused: they cannot escape anything.
    return int(ns) if -(2**62) < ns < 2**62 else None


class _Reader:
    """A decompressed stream whose read errors (corrupt or truncated data) become IntegrityError."""

    __slots__ = ("_f", "_member", "_src", "pos")

    def __init__(self, f: IO[bytes], src: str, member: str | None = None) -> None:
        self._f = f
        self._src = src
        self._member = member
        self.pos = 0

    def _fail(self, exc: BaseException) -> IntegrityError:
        return CorruptArchiveError(
            archive=self._src,
            member=self._member,
            reason=f"is corrupt or truncated near byte {self.pos}: {exc}",
        )

    def read(self, n: int = -1) -> bytes:
        try:
            b = self._f.read(n)
        except _READ_ERRORS as e:
            raise self._fail(e) from e
        self.pos += len(b)
        return b

    def readinto(self, buf: memoryview) -> int:
        try:
            n = int(self._f.readinto(buf))  # type: ignore[attr-defined]
        except _READ_ERRORS as e:
            raise self._fail(e) from e
        self.pos += n
        return n


def _write_all(fd: int, data: memoryview | bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


# Each member costs at least an inode and usually a block whatever its size: count one block
# of the byte budget per member, with a floor so small caches still take ordinary projects.
BYTES_PER_MEMBER = 4096
MIN_MEMBER_LIMIT = 100_000


def member_limit(max_bytes: int) -> int:
    """How many members an archive may have when at most ``max_bytes`` may be extracted."""
    return max(MIN_MEMBER_LIMIT, max_bytes // BYTES_PER_MEMBER)


class _Extractor:
    """Writes members into a fresh directory, tracking what it created so that nothing is ever
    written through a symlink and duplicates replace earlier entries without following links."""

    def __init__(
        self,
        src: str,
        dest: str,
        max_bytes: int,
        read_only: bool = False,
        max_members: int | None = None,
    ) -> None:
        self.src = src
        self.dest = dest
        self.max_bytes = max_bytes
        self.max_members = member_limit(max_bytes) if max_members is None else max_members
        self.members = 0
        self.written = 0
        self.umask = current_umask()
        self.read_only = read_only
        self.dfd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.known_dirs: set[str] = {""}
        self.symlinks: dict[str, str] = {}
        self.files: dict[str, tuple[int, int]] = {}
        self.dir_meta: dict[str, tuple[int, int | None]] = {}
        #: Directories already final (a verified snapshot's untouched ones): finish skips them.
        self.settled: set[str] = set()
        self.ndirs = 0
        self.member = ""
        self._anchor: tuple[str, int] | None = None  # (directory rel path, its fd): see _at

    def close(self) -> None:
        self._drop_anchor()
        if self.dfd >= 0:
            os.close(self.dfd)
            self.dfd = -1

    def _drop_anchor(self) -> None:
        if self._anchor is not None:
            os.close(self._anchor[1])
            self._anchor = None

    def _at(self, rel: str) -> tuple[int, str]:
        """(directory fd, name) to reach ``rel`` with: the destination's fd and ``rel`` itself
        while ``rel`` is short, else an fd of its parent directory opened in steps of at most
        _STEP bytes (each a path of directories this extraction created, never through a
        symlink), so member depth is bounded by nothing but inodes. One parent is cached:
        members of a directory usually follow each other."""
        if len(rel) < _STEP // 4 or len(os.fsencode(rel)) < _STEP or "/" not in rel:
            return self.dfd, rel
        head, _, name = rel.rpartition("/")
        if self._anchor is not None and self._anchor[0] == head:
            return self._anchor[1], name
        self._drop_anchor()
        fd = os.dup(self.dfd)
        try:
            chunk: list[str] = []
            size = 0
            for part in [*head.split("/"), ""]:
                n = len(os.fsencode(part)) + 1
                if part == "" or (chunk and size + n > _STEP):
                    nfd = os.open("/".join(chunk), _DIR_FLAGS, dir_fd=fd)
                    os.close(fd)
                    fd = nfd
                    chunk, size = [], 0
                chunk.append(part)
                size += n
        except BaseException:
            os.close(fd)
            raise
        self._anchor = (head, fd)
        return fd, name

    # -- helpers -------------------------------------------------------------------------------

    def enter(self, name: str) -> None:
        """Start a member: name it for errors and count it against the member limit (a
        million empty files pass any byte limit, yet exhaust inodes)."""
        self.member = name
        self.members += 1
        if self.members > self.max_members:
            raise self._unsafe(
                f"is member number {self.members}, above the limit of {self.max_members} "
                f"members (one per {BYTES_PER_MEMBER} bytes of CACHE_MAX_SIZE, at least "
                f"{MIN_MEMBER_LIMIT})"
            )

    def _unsafe(self, why: str) -> UnsafeArchiveError:
        return UnsafeMemberError(archive=self.src, member=self.member, reason=why)

    def _truncated(self) -> CorruptArchiveError:
        return CorruptArchiveError(
            archive=self.src, member=self.member, reason="is truncated in this member"
        )

    def _parent(self, rel: str) -> None:
        """Make sure every parent of ``rel`` is a real directory we created; refuse symlinks."""
        i = rel.rfind("/")
        if i < 0 or rel[:i] in self.known_dirs:
            return
        cur = ""
        for part in rel[:i].split("/"):
            cur = f"{cur}/{part}" if cur else part
            if cur in self.known_dirs:
                continue
            if cur in self.symlinks:
                raise self._unsafe(f"would be written through the symlink {cur!r}")
            if cur in self.files:
                raise self._unsafe(f"needs a directory where the archive put a file ({cur!r})")
            at, n = self._at(cur)
            os.mkdir(n, 0o755, dir_fd=at)
            self.known_dirs.add(cur)
            self.ndirs += 1

    def _clear(self, rel: str) -> None:
        """Remove an earlier non-directory entry at ``rel`` (never following a link)."""
        if rel in self.known_dirs:
            raise self._unsafe("would replace a directory")
        if self.symlinks.pop(rel, None) is None and self.files.pop(rel, None) is None:
            at, n = self._at(rel)
            st = os.lstat(n, dir_fd=at)
            if stat.S_ISDIR(st.st_mode):
                raise self._unsafe("would replace a directory")
        at, n = self._at(rel)
        os.unlink(n, dir_fd=at)

    def _budget(self, size: int) -> None:
        if size > self.max_bytes - self.written:
            raise self._unsafe(
                f"would take the extracted size to {self.written + size} bytes, above the limit "
                f"of {self.max_bytes} bytes (CACHE_MAX_SIZE)"
            )

    def _count(self, n: int) -> None:
        self.written += n
        if self.written > self.max_bytes:
            raise self._unsafe(
                f"took the extracted size above the limit of {self.max_bytes} bytes"
                " (CACHE_MAX_SIZE)"
            )

    def _create(self, rel: str, perm: int) -> int:
        if not rel:
            raise self._unsafe("is a file where the archive root belongs")
        self._parent(rel)
        at, n = self._at(rel)
        try:
            return os.open(n, _OPEN_FLAGS, perm, dir_fd=at)
        except FileExistsError:
            self._clear(rel)
            at, n = self._at(rel)
            return os.open(n, _OPEN_FLAGS, perm, dir_fd=at)

    def _finish_file(self, fd: int, rel: str, perm: int, mtime: int | None, size: int) -> None:
        if perm & self.umask:
            os.fchmod(fd, perm)
        if mtime is not None:
            os.utime(fd, ns=(mtime, mtime))
        else:
            mtime = os.fstat(fd).st_mtime_ns
        self.files[rel] = (size, mtime)

    # -- member kinds --------------------------------------------------------------------------

    def directory(self, rel: str, perm: int, mtime: int | None) -> None:
        if rel not in self.known_dirs:
            if rel in self.symlinks:
                raise self._unsafe("is a directory where the archive put a symlink")
            if rel in self.files:
                raise self._unsafe("is a directory where the archive put a file")
            self._parent(rel)
            at, n = self._at(rel)
            os.mkdir(n, 0o755, dir_fd=at)
            self.known_dirs.add(rel)
            self.ndirs += 1
        self.dir_meta[rel] = (perm, mtime)

    def file_from(
        self, rel: str, perm: int, mtime: int | None, size: int, reader: IO[bytes]
    ) -> None:
        """A regular file whose data is read from ``reader`` until it ends (counted as written)."""
        self._budget(size)
        if self.read_only:
            perm = 0o555 if perm & 0o111 else 0o444
        fd = self._create(rel, perm)
        try:
            total = 0
            while True:
                chunk = reader.read(_CHUNK)
                if not chunk:
                    break
                self._count(len(chunk))
                _write_all(fd, chunk)
                total += len(chunk)
            self._finish_file(fd, rel, perm, mtime, total)
        finally:
            os.close(fd)

    def tar_file(self, rel: str, perm: int, mtime: int | None, size: int, r: _Reader) -> None:
        """A regular tar member whose data (plus block padding) follows at the reader's position."""
        self._budget(size)
        if self.read_only:
            perm = 0o555 if perm & 0o111 else 0o444
        fd = self._create(rel, perm)
        try:
            padded = (size + _BLOCK - 1) & ~(_BLOCK - 1)
            if padded <= _CHUNK:
                if padded:
                    buf = r.read(padded)
                    if len(buf) < padded:
                        raise self._truncated()
                    self._count(size)
                    _write_all(fd, memoryview(buf)[:size])
            else:
                view = memoryview(bytearray(_CHUNK))
                left = size
                while left:
                    n = r.readinto(view[: min(_CHUNK, left)])
                    if not n:
                        raise self._truncated()
                    self._count(n)
                    _write_all(fd, view[:n])
                    left -= n
                pad = padded - size
                if pad and len(r.read(pad)) < pad:
                    raise self._truncated()
            self._finish_file(fd, rel, perm, mtime, size)
        finally:
            os.close(fd)

    def symlink(self, rel: str, target: str, mtime: int | None) -> None:
        if not rel:
            raise self._unsafe("is a symlink where the archive root belongs")
        if not target:
            raise self._unsafe("is a symlink with an empty target")
        if "\0" in target:
            raise self._unsafe("is a symlink whose target contains a NUL byte")
        if target[0] == "/":
            raise self._unsafe(f"is a symlink to the absolute path {target!r}")
        depth = rel.count("/")
        for part in target.split("/"):
            if part == "..":
                depth -= 1
                if depth < 0:
                    raise self._unsafe(f"is a symlink to {target!r}, outside the destination")
            elif part and part != ".":
                depth += 1
        self._parent(rel)
        if len(os.fsencode(self.dest)) + len(os.fsencode(rel)) + 1 >= _PATH_MAX:
            # finish() checks where chains of links lead with realpath(), which cannot look
            # beyond PATH_MAX: such a link could escape unseen.
            raise self._unsafe(f"is a symlink deeper than PATH_MAX ({_PATH_MAX} bytes)")
        try:
            os.symlink(target, rel, dir_fd=self.dfd)
        except FileExistsError:
            self._clear(rel)
            os.symlink(target, rel, dir_fd=self.dfd)
        self.symlinks[rel] = target
        if mtime is not None:
            os.utime(rel, ns=(mtime, mtime), dir_fd=self.dfd, follow_symlinks=False)

    def hardlink(self, rel: str, target_name: str) -> None:
        target = _norm(target_name, "hard link target")
        if target not in self.files:
            raise self._unsafe(
                f"is a hard link to {target_name!r}, which is not an earlier regular file"
                " of the archive"
            )
        if not rel:
            raise self._unsafe("is a hard link where the archive root belongs")
        if target == rel:
            return
        self._parent(rel)
        try:
            os.link(target, rel, src_dir_fd=self.dfd, dst_dir_fd=self.dfd, follow_symlinks=False)
        except FileExistsError:
            self._clear(rel)
            os.link(target, rel, src_dir_fd=self.dfd, dst_dir_fd=self.dfd, follow_symlinks=False)
        except OSError as e:
            if e.errno != errno.ENAMETOOLONG:
                raise
            self._deep_link(target, rel)
        self.files[rel] = self.files[target]

    def _deep_link(self, target: str, rel: str) -> None:
        """A hard link whose paths do not fit in PATH_MAX: both ends reached through _at."""
        at, n = self._at(target)
        src_fd = os.dup(at)  # _at's cache holds one parent at a time
        try:
            dst_fd, m = self._at(rel)
            os.link(n, m, src_dir_fd=src_fd, dst_dir_fd=dst_fd, follow_symlinks=False)
        finally:
            os.close(src_fd)

    # -- end -----------------------------------------------------------------------------------

    def finish(self) -> ExtractStats:
        self.member = ""
        # Chains of links can escape together even when each target looks inside on its own
        # (a -> b/c/.., b -> .): resolve every link through the others, by the kernel's rules.
        for rel in self.symlinks:
            via = _link_escape(self.symlinks, rel)
            if via is not None:
                self.member = rel
                through = "" if via == rel else f" through the symlink {via!r}"
                raise self._unsafe(
                    f"is a symlink that resolves outside the destination{through}"
                    f" (target {self.symlinks[rel]!r})"
                )
        # Deepest first, so making a directory read-only never blocks its children.
        dirs = self.known_dirs if self.read_only else self.dir_meta
        for rel in sorted((d for d in dirs if d not in self.settled), key=len, reverse=True):
            perm, mtime = self.dir_meta.get(rel, (0o555, None))
            at, n = self._at(rel or ".")
            # Times first: once "." is mode 000, a non-root owner can no longer look it up.
            if mtime is not None:
                os.utime(n, ns=(mtime, mtime), dir_fd=at)
            os.chmod(n, 0o555 if self.read_only else perm, dir_fd=at)
        manifest = tuple((rel, size, mt) for rel, (size, mt) in self.files.items())
        return ExtractStats(
            files=len(self.files), dirs=self.ndirs, bytes=self.written, manifest=manifest
        )


def _extract_tar(x: _Extractor, src: str) -> None:
    with open(src, "rb") as f:
        compression = _compression(f.read(8))
    with _open_stream(src, compression, threaded=True) as stream:
        _walk_tar(x, stream, src, compression)


def _walk_tar(x: _Extractor, stream: IO[bytes], src: str, compression: str | None) -> None:
    r = _Reader(stream, src)
    _TarWalker(x, r, src).run()
    if compression is not None:
        # Let the decompressor reach its trailer so the stream checksum is verified.
        for _ in range(_DRAIN_LIMIT // _CHUNK):
            if not r.read(_CHUNK):
                break


_ZERO_BLOCK = bytes(_BLOCK)
_REGULAR = (b"0", b"\0", b"7")  # "7" is contiguous: a regular file everywhere but a few Unixes
_DECODE = "surrogateescape"


def _nts(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", _DECODE)


class _TarWalker:
    """Reads tar headers itself (ustar, GNU long names, pax), which is ~5x cheaper per member
    than tarfile's generic parser, and hands each member to the extractor."""

    def __init__(self, x: _Extractor, r: _Reader, src: str) -> None:
        self.x = x
        self.r = r
        self.src = src
        self.global_pax: dict[str, str] = {}
        # What GNU long-name/long-link and pax headers said about the next member.
        self.long_name: str | None = None
        self.long_link: str | None = None
        self.pax: dict[str, str] = {}

    def _corrupt(self, why: str) -> IntegrityError:
        after = f" after member {self.x.member!r}" if self.x.member else ""
        return CorruptArchiveError(archive=self.src, reason=f"is corrupt{after}: {why}")

    def _num(self, field: bytes, what: str) -> int:
        if field and field[0] & 0x80:
            # GNU base-256 for values that do not fit in octal (sizes >= 8 GiB, old mtimes).
            n = int.from_bytes(field[1:], "big")
            return n - (1 << (8 * (len(field) - 1))) if field[0] == 0xFF else n
        s = field.split(b"\0", 1)[0].strip()
        try:
            return int(s, 8) if s else 0
        except ValueError:
            raise self._corrupt(f"invalid {what} field {field!r}") from None

    def _data(self, size: int, what: str) -> bytes:
        """Read a metadata member's data (long name or pax records) plus its padding."""
        if size > _CHUNK:
            raise self.x._unsafe(f"has {size} bytes of {what}; at most {_CHUNK} are accepted")
        padded = (size + _BLOCK - 1) & ~(_BLOCK - 1)
        buf = self.r.read(padded)
        if len(buf) < padded:
            raise self._corrupt(f"truncated in its {what}")
        return buf[:size]

    def _pax(self, data: bytes) -> dict[str, str]:
        out: dict[str, str] = {}
        pos = 0
        while pos < len(data):
            sp = data.find(b" ", pos)
            try:
                length = int(data[pos:sp])
            except ValueError:
                raise self._corrupt("invalid pax record") from None
            end = pos + length
            if sp < 0 or length <= 0 or end > len(data) or data[end - 1 : end] != b"\n":
                raise self._corrupt("invalid pax record")
            key, eq, value = data[sp + 1 : end - 1].partition(b"=")
            if not eq:
                raise self._corrupt("invalid pax record")
            out[key.decode("utf-8", _DECODE)] = value.decode("utf-8", _DECODE)
            pos = end
        return out

    def run(self) -> None:
        while True:
            hdr = self._header()
            if hdr is None:
                return
            kind = hdr[156:157]
            size = self._num(hdr[124:136], "size")
            if size < 0:
                raise self._corrupt(f"negative size {size}")
            if self._metadata(kind, size):
                continue
            kind, name, linkname, size, mtime_raw = self._member(hdr, kind, size)
            self.x.enter(name)
            self._extract(hdr, kind, name, linkname, size, mtime_raw)

    def _header(self) -> bytes | None:
        """The next member's header block; None at the end of the archive."""
        hdr = self.r.read(_BLOCK)
        if not hdr:
            return None  # no end-of-archive blocks: tolerated, like GNU tar
        if len(hdr) < _BLOCK:
            raise self._corrupt("truncated in a header")
        if hdr == _ZERO_BLOCK:
            return None
        if not _is_tar_header(hdr):  # the one checksum test (detection uses it too)
            raise self._corrupt("a header has a bad checksum")
        return hdr

    def _metadata(self, kind: bytes, size: int) -> bool:
        """Read a GNU long name/link or pax header for the next member; False for a member."""
        if kind == b"L":
            self.long_name = _nts(self._data(size, "long name"))
        elif kind == b"K":
            self.long_link = _nts(self._data(size, "long link name"))
        elif kind == b"x":
            self.pax.update(self._pax(self._data(size, "pax header")))
        elif kind == b"g":
            self.global_pax.update(self._pax(self._data(size, "pax global header")))
        else:
            return False
        return True

    def _member(self, hdr: bytes, kind: bytes, size: int) -> tuple[bytes, str, str, int, float]:
        """(kind, name, link name, size, mtime) of a member: its header with the pending long
        names and pax records applied (and then forgotten)."""
        if self.long_name is not None:
            name = self.long_name
        else:
            name = _nts(hdr[:100])
            if hdr[257:263] == b"ustar\x00" and hdr[345] != 0:
                name = _nts(hdr[345:500]) + "/" + name
        linkname = self.long_link if self.long_link is not None else _nts(hdr[157:257])
        mtime_raw: float = self._num(hdr[136:148], "mtime")
        meta = {**self.global_pax, **self.pax} if self.global_pax else self.pax
        if meta:
            name = meta.get("path", name)
            linkname = meta.get("linkpath", linkname)
            try:
                size = int(meta.get("size", size))
                mtime_raw = float(meta["mtime"]) if "mtime" in meta else mtime_raw
            except ValueError:
                raise self._corrupt("invalid pax size or mtime") from None
            if size < 0:
                raise self._corrupt(f"negative size {size}")
            if any(k.startswith("GNU.sparse.") for k in meta):
                kind = b"S"
        self.long_name = self.long_link = None
        self.pax = {}
        return kind, name, linkname, size, mtime_raw

    def _extract(
        self, hdr: bytes, kind: bytes, name: str, linkname: str, size: int, mtime_raw: float
    ) -> None:
        """Hand one member to the extractor by kind; refuse the kinds never accepted."""
        x = self.x
        rel = _norm(name, "member")
        perm = self._num(hdr[100:108], "mode") & 0o777
        mtime = _mtime_ns(mtime_raw)
        if kind in _REGULAR:
            if kind != b"7" and name.endswith("/"):
                x.directory(rel, perm, mtime)  # pre-POSIX archives mark dirs by a slash
            else:
                x.tar_file(rel, perm, mtime, size, self.r)
        elif kind == b"5":
            x.directory(rel, perm, mtime)
        elif kind == b"2":
            x.symlink(rel, linkname, mtime)
        elif kind == b"1":
            x.hardlink(rel, linkname)
        elif kind in (b"3", b"4"):
            raise x._unsafe("is a device node; device members are not accepted")
        elif kind == b"6":
            raise x._unsafe("is a fifo; fifo members are not accepted")
        elif kind == b"S":
            raise x._unsafe("is a sparse file; sparse members are not supported")
        else:
            raise x._unsafe(f"has the unsupported type {kind!r}")


def _zip_mtime(zi: zipfile.ZipInfo) -> int | None:
    extra = zi.extra
    i = 0
    # The extended-timestamp field (0x5455) carries a UTC mtime; DOS times are local, 2 s steps.
    while i + 4 <= len(extra):
        tag, size = struct.unpack_from("<HH", extra, i)
        body = extra[i + 4 : i + 4 + size]
        if tag == 0x5455 and len(body) >= 5 and body[0] & 1:
            return int(struct.unpack_from("<i", body, 1)[0]) * 1_000_000_000
        i += 4 + size
    try:
        return int(time.mktime((*zi.date_time, 0, 0, -1))) * 1_000_000_000
    except (OverflowError, ValueError):
        return None


def _extract_zip(x: _Extractor, src: str) -> None:
    try:
        zf = zipfile.ZipFile(src)
    except _ZIP_OPEN_ERRORS as e:
        raise CorruptArchiveError(archive=src, reason=f"is not a readable zip archive: {e}") from e
    with zf:
        for zi in zf.infolist():
            x.enter(zi.filename)
            rel = _norm(zi.filename, "member")
            unix = zi.create_system == 3
            mode = zi.external_attr >> 16 if unix else 0
            kind = stat.S_IFMT(mode)
            mtime = _zip_mtime(zi)
            if zi.flag_bits & 0x1:
                raise x._unsafe("is encrypted; encrypted zip members are not supported")
            try:
                if kind == stat.S_IFDIR or (kind == 0 and zi.is_dir()):
                    x.directory(rel, (mode & 0o777) or 0o755, mtime)
                elif kind == stat.S_IFLNK:
                    if zi.file_size > _MAX_ZIP_SYMLINK:
                        raise x._unsafe(f"is a symlink with a {zi.file_size}-byte target")
                    with zf.open(zi) as data:
                        target = _Reader(data, src, zi.filename).read(_MAX_ZIP_SYMLINK + 1)
                    x.symlink(rel, os.fsdecode(target), mtime)
                elif kind in (0, stat.S_IFREG):
                    with zf.open(zi) as data:
                        # _Reader: a damaged stream is an IntegrityError (bz2 raises a bare
                        # OSError), while write errors (ENOSPC) keep their own meaning.
                        reader = cast("IO[bytes]", _Reader(data, src, zi.filename))
                        x.file_from(rel, (mode & 0o777) or 0o644, mtime, zi.file_size, reader)
                else:
                    raise x._unsafe("is a device, fifo or socket; special members are not accepted")
            except (
                zipfile.BadZipFile,
                EOFError,
                zlib.error,
                lzma.LZMAError,
                NotImplementedError,
                # The local header's copy of a name flagged UTF-8 is decoded when opened.
                UnicodeDecodeError,
            ) as e:
                raise CorruptArchiveError(
                    archive=src, member=zi.filename, reason=f"is corrupt: {e}"
                ) from e


def extract_archive(
    src: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    max_bytes: int,
    read_only: bool = False,
    max_members: int | None = None,
) -> ExtractStats:
    """Extract the tar or zip archive ``src`` into the new directory ``dest``, safely.

    ``dest`` must not exist (its parent must). At most ``max_bytes`` bytes of file data are
    written. Raises :class:`UnsafeArchiveError` for a member that breaks a safety rule (see the
    module docstring) or when ``src`` is not a tar/zip archive, :class:`IntegrityError` for a
    corrupt or truncated archive and :class:`CacheFullError` when the disk is full; in every
    failure case ``dest`` is removed.

    At most ``max_members`` members (default :func:`member_limit` of ``max_bytes``) are
    accepted.

    ``read_only=True`` creates the tree read-only as it goes (files 0444, 0555 when executable,
    directories 0555 at the end), without a second walk.
    """
    s, d = os.fspath(src), os.fspath(dest)
    kind = detect_archive(s, artifacts=True)  # asked to extract: an artifact is extracted too
    if kind is None:
        raise UnsafeArchiveError(
            archive=s,
            reason="is not an archive this can extract "
            "(accepted: tar, tar.gz, tar.bz2, tar.xz, zip)",
        )

    def fill(x: _Extractor) -> None:
        if kind == "tar":
            _extract_tar(x, s)
        else:
            _extract_zip(x, s)

    return _run_extraction(s, d, fill, max_bytes, read_only, max_members)


def _stream_tar_compression(source: PositionedSource) -> tuple[bool, str | None]:
    """(whether ``source`` holds a tar, its compression), judged as ``detect_archive`` judges
    a file: the same magic numbers and the same first-header test."""
    source.seek(0)
    head = io.BufferedReader(_RawView(source), _BLOCK).read(_BLOCK)
    if head.startswith(_ZIP_MAGICS):
        return False, None
    compression = _compression(head)
    source.seek(0)
    try:
        with _open_stream(_RawView(source), compression, threaded=False) as stream:
            return _starts_tar(stream), compression
    except _READ_ERRORS:
        return False, compression


def extract_tar_stream(
    source: PositionedSource,
    dest: str | os.PathLike[str],
    *,
    archive: str,
    max_bytes: int,
    read_only: bool = False,
    max_members: int | None = None,
) -> ExtractStats | None:
    """Extract a tar (plain, gz, bz2, xz) read from ``source`` while its bytes arrive, with
    exactly ``extract_archive``'s rules, errors and clean-up; ``archive`` names it in errors.

    Returns None, creating nothing, when ``source`` holds no tar (a zip needs its central
    directory at the end, anything else is not extracted): the caller deals with the complete
    file. Exceptions of ``source`` itself propagate unchanged (after ``dest`` is removed)."""
    is_tar, compression = _stream_tar_compression(source)
    if not is_tar:
        return None

    def fill(x: _Extractor) -> None:
        source.seek(0)
        # Not the threaded inflater: its worker would block in ``source`` after a refusal.
        with _open_stream(_RawView(source), compression, threaded=False) as stream:
            _walk_tar(x, stream, archive, compression)

    d = os.fspath(dest)
    return _run_extraction(archive, d, fill, max_bytes, read_only, max_members)


def _run_extraction(
    s: str,
    d: str,
    fill: Callable[[_Extractor], None],
    max_bytes: int,
    read_only: bool,
    max_members: int | None,
) -> ExtractStats:
    """Create ``d``, let ``fill`` write the members, finish; on any failure remove ``d`` and
    raise the error the module documents (``s`` names the archive)."""
    try:
        os.mkdir(d, 0o755)
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, f"extraction destination already exists: {d}") from None
    x: _Extractor | None = None
    try:
        x = _Extractor(s, d, max_bytes, read_only, max_members)
        fill(x)
        stats = x.finish()
    except BaseException as e:
        member = x.member if x is not None else ""
        if x is not None:
            x.close()
        fsops.remove(Path(d).parent, d)
        if isinstance(e, UnsafeArchiveError) and not e.archive:
            # a name refused before the member was known to the extractor (_norm)
            raise UnsafeMemberError(archive=s, member=member, reason=e.reason) from e
        if isinstance(e, OSError) and not isinstance(e, CacheFullError):
            if is_nospace(e):
                raise CacheFullError(
                    e.errno, f"no space left extracting {s} into {d} (member {member!r})"
                ) from e
            if e.errno in _MEMBER_ERRNOS:
                raise UnsafeMemberError(
                    archive=s, member=member, reason=f"cannot be created: {e}"
                ) from e
        raise
    x.close()
    return stats
