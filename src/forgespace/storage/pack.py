"""Packing a directory into a deterministic tar.gz (what ``upload_target`` stores for a dir).

The same tree always gives the same tar stream, whoever packs it and whenever; compressed
with the same isal (ISA-L) version it gives the same tar.gz bytes (a different compressor
version may pick other matches: same content, other bytes):

- members are the directory's *contents* (``src/main.c``, not ``project/src/main.c``), in
  sorted order, directories before what they hold;
- owner ids are 0 and owner names empty; mtimes are 0 (so a fresh checkout of the same
  commit packs identically); modes are normalised to 0755/0644 by the executable bit
  (setuid/setgid/sticky and umask differences never reach the archive);
- symlinks stay symlinks, but only ones that resolve inside the tree (the extraction side
  would refuse the rest, so we refuse them at upload time with the path named);
- the gzip header carries no file name and mtime 0.

The archive is streamed to a file while hashed: memory use does not depend on the tree.

**Content ids.** While packing, the tree itself is hashed (``tree_digest``): one record per
member in the archive's order — its kind, relative path, and for a file its executable bit,
size and sha256, for a symlink its target — so the digest depends on exactly what extraction
reproduces and on nothing else (not mtimes, owners, the umask or the compressor's version).
``content_id`` turns it into the target id ``tree-<40 hex>``; a single file's id is
``file-<40 hex>`` of its bytes' sha256 (160 bits: collisions are not a practical concern).
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import stat
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from isal import igzip

from forgespace.errors import UnsafeArchiveError
from forgespace.mounts import mount_id

_COPY_BUFSIZE = 1 << 20
# isal level 1 packs source trees about as small as zlib level 6 at several times the speed.
_GZIP_LEVEL = 1
PACK_MTIME = 0


# Bump when the records hashed into a tree digest change (it changes every content id).
TREE_DIGEST_VERSION = b"forgespace-tree-v1\n"
CONTENT_ID_HEX = 40


@dataclass(frozen=True)
class PackStats:
    """What was packed: archive size and sha256, member counts, content bytes, and the
    digest of the tree itself (``tree_digest``, independent of how it was compressed)."""

    size: int
    sha256: str
    files: int
    dirs: int
    symlinks: int
    content_bytes: int
    tree_digest: str = ""


def content_id(kind: str, digest: str) -> str:
    """The target id of content: ``tree-…`` for a directory's tree digest, ``file-…`` for a
    single file's sha256."""
    if kind not in ("tree", "file"):
        raise ValueError(f"content id kind must be 'tree' or 'file', got {kind!r}")
    return f"{kind}-{digest[:CONTENT_ID_HEX]}"


class _HashingReader:
    """A read-only view of a file that hashes what tarfile copies out of it."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self.hasher = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        self.hasher.update(data)
        return data


class _HashingWriter:
    """A write-only file that hashes and counts what passes through it."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self.hasher = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self.hasher.update(data)
        self.size += len(data)
        return self._raw.write(data)

    def flush(self) -> None:
        self._raw.flush()


def _walk(root: Path) -> Iterator[tuple[str, os.DirEntry[str]]]:
    """(relative posix path, entry) of everything under root, depth-first, each
    directory's entries sorted by name (the order of GNU tar's --sort=name)."""

    def listing(rel_dir: str, abs_dir: str) -> Iterator[tuple[str, os.DirEntry[str]]]:
        with os.scandir(abs_dir) as it:
            entries = sorted(it, key=lambda e: e.name)
        return ((f"{rel_dir}/{e.name}" if rel_dir else e.name, e) for e in entries)

    stack = [listing("", str(root))]
    while stack:
        item = next(stack[-1], None)
        if item is None:
            stack.pop()
            continue
        rel, entry = item
        yield rel, entry
        if entry.is_dir(follow_symlinks=False):
            stack.append(listing(rel, entry.path))


def _check_link(rel: str, target: str) -> None:
    if target.startswith("/"):
        raise UnsafeArchiveError(
            f"symlink {rel!r} points to the absolute path {target!r}; only relative links "
            "that stay inside the uploaded directory can be packed"
        )
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(rel), target))
    if resolved == ".." or resolved.startswith("../"):
        raise UnsafeArchiveError(
            f"symlink {rel!r} -> {target!r} points outside the uploaded directory; only "
            "links that stay inside it can be packed"
        )


def _tarinfo(rel: str, st: os.stat_result, *, link: str | None = None) -> tarfile.TarInfo:
    info = tarfile.TarInfo(rel)
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = PACK_MTIME
    if link is not None:
        info.type = tarfile.SYMTYPE
        info.linkname = link
        info.mode = 0o777
    elif stat.S_ISDIR(st.st_mode):
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
    else:
        info.type = tarfile.REGTYPE
        info.size = st.st_size
        info.mode = 0o755 if st.st_mode & 0o111 else 0o644
    return info


def pack_directory(
    src: str | Path,
    out: BinaryIO,
    *,
    progress: Callable[[int], None] | None = None,
) -> PackStats:
    """Write the deterministic tar.gz of directory ``src`` to the binary file ``out``.

    ``progress(content_bytes_so_far)`` is called after each file. Raises NotADirectoryError
    when ``src`` is not a directory and UnsafeArchiveError for links leaving the tree,
    devices, fifos and sockets (they could not be extracted safely anyway).
    """
    root = Path(src)
    if not root.is_dir():
        raise NotADirectoryError(f"not a directory: {root}")
    sink = _HashingWriter(out)
    tree = hashlib.sha256(TREE_DIGEST_VERSION)
    counts = {"f": 0, "d": 0, "l": 0}
    content = 0
    # filename="" keeps the temp file's name out of the gzip header
    gz = igzip.GzipFile(
        filename="",
        mode="wb",
        fileobj=sink,  # type: ignore[arg-type]
        mtime=PACK_MTIME,
        compresslevel=_GZIP_LEVEL,
    )
    with (
        gz,
        tarfile.TarFile(
            fileobj=gz, mode="w", format=tarfile.PAX_FORMAT, copybufsize=_COPY_BUFSIZE
        ) as tar,
    ):
        for rel, entry in _walk(root):
            kind, size = _add_member(tar, tree, rel, entry)
            counts[kind] += 1
            if kind == "f":
                content += size
                if progress is not None:
                    progress(content)
    sink.flush()
    return PackStats(
        size=sink.size,
        sha256=sink.hasher.hexdigest(),
        files=counts["f"],
        dirs=counts["d"],
        symlinks=counts["l"],
        content_bytes=content,
        tree_digest=tree.hexdigest(),
    )


def _add_member(
    tar: tarfile.TarFile, tree: hashlib._Hash, rel: str, entry: os.DirEntry[str]
) -> tuple[str, int]:
    """Add one walked entry to ``tar`` and its record to the ``tree`` digest: ("f", size) for
    a file, ("d", 0) or ("l", 0); UnsafeArchiveError for what cannot be extracted safely."""
    st = entry.stat(follow_symlinks=False)
    if stat.S_ISLNK(st.st_mode):
        target = os.readlink(entry.path)
        _check_link(rel, target)
        tar.addfile(_tarinfo(rel, st, link=target))
        tree.update(_record("l", rel, target))
        return "l", 0
    if stat.S_ISDIR(st.st_mode):
        tar.addfile(_tarinfo(rel, st))
        tree.update(_record("d", rel))
        return "d", 0
    if stat.S_ISREG(st.st_mode):
        with open(entry.path, "rb") as f:
            # size from the open file: a file growing meanwhile must not corrupt the tar
            info = _tarinfo(rel, os.fstat(f.fileno()))
            reader = _HashingReader(f)
            tar.addfile(info, reader)  # type: ignore[arg-type]
        kind = "x" if info.mode & 0o111 else "f"
        tree.update(_record(kind, rel, f"{info.size}:{reader.hasher.hexdigest()}"))
        return "f", info.size
    raise UnsafeArchiveError(
        f"{rel!r} is a device, fifo or socket; only regular files, directories "
        "and symlinks can be uploaded"
    )


def _record(kind: str, rel: str, extra: str = "") -> bytes:
    # NUL cannot occur in a path or a link target: records cannot be confused with each other.
    return f"{kind}\0{rel}\0{extra}\n".encode("utf-8", "surrogateescape")


def pack_to_file(
    src: str | Path, dest: str | Path, *, progress: Callable[[int], None] | None = None
) -> PackStats:
    """Pack ``src`` into the new file ``dest`` (fsynced); removes ``dest`` on failure."""
    dest = Path(dest)
    try:
        with open(dest, "xb") as f:
            stats = pack_directory(src, f, progress=progress)
            f.flush()
            os.fsync(f.fileno())
        return stats
    except BaseException:
        dest.unlink(missing_ok=True)
        raise


def _mount_of(path: str | Path) -> int | None:
    """The mount id of ``path`` (not followed if a symlink); None when unknown."""
    try:
        fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return mount_id(fd)
    finally:
        os.close(fd)


def _same_mount(de: os.DirEntry[str], dev: int, top: str | Path) -> bool:
    """Whether the directory ``de`` is on the mount of ``top`` (whose st_dev is ``dev``)."""
    if de.stat(follow_symlinks=False).st_dev == dev:
        return True
    mine = _mount_of(de.path)  # a btrfs subvolume: its own st_dev, the same mount
    return mine is not None and mine == _mount_of(top)


def tree_usage(path: str | Path, *, one_filesystem: bool = False) -> tuple[int, int]:
    """(bytes, files) of the regular files under ``path`` (or of ``path`` itself, a regular
    file); no symlinks followed, ``path`` included. ``one_filesystem`` enters no mount point (a
    btrfs subvolume, which has its own ``st_dev`` on the same mount, is entered):
    the cache sizes its workspaces so (an overlay run's mount shows the shared copy beneath;
    its own bytes are its upper layer). A missing ``path`` is (0, 0)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return 0, 0
    dev = st.st_dev
    if stat.S_ISREG(st.st_mode):
        return st.st_size, 1
    if not stat.S_ISDIR(st.st_mode):
        return 0, 0
    total = files = 0
    stack = [os.fspath(path)]
    while stack:
        d = stack.pop()
        try:
            it = os.scandir(d)
        except OSError:
            continue
        with it:
            for de in it:
                try:
                    if de.is_dir(follow_symlinks=False):
                        if not one_filesystem or _same_mount(de, dev, path):
                            stack.append(de.path)
                    elif de.is_file(follow_symlinks=False):
                        total += de.stat(follow_symlinks=False).st_size
                        files += 1
                except OSError:
                    continue
    return total, files


def tree_size(root: str | Path) -> int:
    """Bytes of the regular files under the directory ``root`` (symlinks inside not
    followed, a symlinked ``root`` is): progress totals for packing."""
    return tree_usage(os.path.realpath(root))[0]


def copy_hashing(
    src: str | Path, out: BinaryIO | None, progress: Callable[[int, int], None] | None = None
) -> tuple[int, str]:
    """Stream file ``src`` into ``out`` (or nowhere) while hashing: (size, sha256 hex).

    ``progress(done, total)`` after each chunk."""
    hasher = hashlib.sha256()
    size = 0
    with open(src, "rb") as f:
        total = os.fstat(f.fileno()).st_size
        while chunk := f.read(_COPY_BUFSIZE):
            hasher.update(chunk)
            if out is not None:
                out.write(chunk)
            size += len(chunk)
            if progress is not None:
                progress(size, total)
    return size, hasher.hexdigest()
