"""Read-only workspaces of manifest targets as btrfs subvolumes, and new versions made from a
snapshot of an earlier one (only the differences written).

Where the cache is on btrfs (``fstatfs``), the pristine read-only tree of a manifest target
(shared mode's ``{tid}/workspace``, copy-on-write's ``{tid}/shared/workspace``) is built in a
new subvolume instead of a plain directory (no per-file cost), and a *seal* is recorded next
to its manifest record (``.forgespace/manifests/{tid}.{kind}.seal``): the subvolume's uuid and,
per entry, what it holds (sha256 and executable bit of a file, a link's target) and what
only the kernel sets (inode number, ``ctime`` in ns, size, mode). ``ctime`` cannot be set from
user space: any write, chmod, rename, link or replacement moves it. The build waits for the
filesystem clock to pass the newest sealed ``ctime`` before it returns (``_settle``), so even
a change within the same clock tick after publication shows.

A later get of another manifest target whose content mostly matches a sealed tree (a bottom-k
sketch of file digests in the seal's first line estimates the overlap without reading the
rest) snapshots that tree into its staging directory (``BTRFS_IOC_SNAP_CREATE_V2`` on the
tree's fd, opened through ``fsops`` without following anything, under the source's target
lock taken shared and non-blocking, so gc cannot remove it meanwhile), then checks it
(``_check``): the snapshot's parent uuid must be the sealed subvolume's, the snapshot's top
level exactly the sealed one, and a walk of the source through that same fd, *after* the
snapshot, must find exactly the sealed entries with the sealed inode, ctime, size and mode.
Since a change can never move a ctime back, an intact source after the snapshot proves an
intact snapshot (and the source's inodes are in memory: ~3x faster than walking the new
snapshot). Anything else (a run modified the tree, a planted symlink, a swapped directory, a
different subvolume or a symlink put in its place, a forged seal naming another subvolume)
removes the snapshot and builds the workspace from blobs as usual, with a warning. Only then
are the differences applied by the archive extractor's rules (``blobstore._build``): entries
that are gone or changed are removed, new and changed ones written from verified local blobs,
and links checked through the kept ones too.

Trust: a sandboxed run sees the read-only tree through a read-only bind and cannot change it
at all; an unsandboxed run acts as the worker's user and could rewrite the seal as it could
rewrite the local blob packs the full build copies from: the seal is exactly as trusted as the
blob store beside it. Isolated run workspaces are writable by runs and are never built as
subvolumes nor used as a source.

Removal: an empty subvolume is removed by ``rmdir`` (Linux >= 4.18, by its owner too), and
``fsops`` tells a subvolume (its own ``st_dev``, the same mount: ``forgespace.mounts``) from a
mount point and descends into it as into any directory, so gc, cleanup and staging sweeps
remove these trees unchanged. Sizes: the index counts a snapshot-built workspace's logical
bytes like any other (extents it shares with its source and the blob packs are counted again:
eviction errs early).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import heapq
import json
import logging
import os
import stat
import struct
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from forgespace.atomicfile import write_atomic_at
from forgespace.cache import fsops
from forgespace.cache import manifest as mf
from forgespace.cache.archive import _norm
from forgespace.errors import ForgespaceError, LockTimeoutError, is_nospace
from forgespace.storage.manifest import FileEntry, Manifest

if TYPE_CHECKING:
    from forgespace.cache.archive import _Extractor
    from forgespace.cache.engine import Engine

log = logging.getLogger(__name__)

__all__ = [
    "Base",
    "SealRecord",
    "SealedTree",
    "Sealer",
    "find_base",
    "manifest_sketch",
    "not_the_sealed_subvolume",
    "on_btrfs",
    "read_seal",
    "save_seal",
    "seal_sketch",
    "sealed_trees",
]

BTRFS_SUPER_MAGIC = 0x9123683E
SUBVOL_ROOT_INO = 256  # BTRFS_FIRST_FREE_OBJECTID: every subvolume's root directory
_VOL_ARGS = 4096  # struct btrfs_ioctl_vol_args and _v2 are both 4096 bytes
_SUBVOL_INFO_SIZE = 504  # struct btrfs_ioctl_get_subvol_info_args


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (0x94 << 8) | nr


_SUBVOL_CREATE = _ioc(1, 14, _VOL_ARGS)  # _IOW(BTRFS_IOCTL_MAGIC, 14, vol_args)
_SNAP_CREATE_V2 = _ioc(1, 23, _VOL_ARGS)  # _IOW(BTRFS_IOCTL_MAGIC, 23, vol_args_v2)
_GET_SUBVOL_INFO = _ioc(2, 60, _SUBVOL_INFO_SIZE)  # _IOR(..., 60, get_subvol_info_args)
_UUID_AT, _PARENT_UUID_AT = 296, 312  # offsets in get_subvol_info_args

SEAL_VERSION = 1
SKETCH_SIZE = 128
#: A sealed tree is snapshotted when at least this share of the entries (estimated) match.
MIN_SIMILARITY = 0.5
#: At most this many sealed trees (most recently used first) are considered per get.
MAX_CANDIDATES = 8
_SEAL_DIR = (fsops.META, "manifests")
_KINDS = {"shared": ("workspace",), "cow-shared": ("shared", "workspace")}
_RECORD_KIND = {"shared": "shared", "cow-shared": "cow"}


class SnapshotRefused(ForgespaceError):
    """A sealed tree cannot serve as the base of a snapshot (the reason says why)."""


# --- btrfs ---------------------------------------------------------------------------------
@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _fstatfs_type(fd: int) -> int | None:
    try:
        buf = ctypes.create_string_buffer(256)  # struct statfs (120 bytes on 64-bit Linux)
        if _libc().fstatfs(fd, buf) != 0:
            return None
        return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF  # f_type comes first
    except (OSError, AttributeError):
        return None


def on_btrfs(fd: int) -> bool:
    """Whether the open file ``fd`` is on btrfs (``fstatfs``'s f_type)."""
    return _fstatfs_type(fd) == BTRFS_SUPER_MAGIC


def _name_arg(name: str, head: bytes) -> bytearray:
    raw = os.fsencode(name)
    if b"/" in raw or len(head) + len(raw) >= _VOL_ARGS:
        raise ValueError(f"not a subvolume name: {name!r}")
    return bytearray((head + raw).ljust(_VOL_ARGS, b"\0"))


def create_subvolume(parent_fd: int, name: str) -> None:
    """A new empty subvolume ``name`` in the directory ``parent_fd`` (like mkdir, mode 0755)."""
    fcntl.ioctl(parent_fd, _SUBVOL_CREATE, _name_arg(name, struct.pack("q", 0)))


def snapshot_into(src_fd: int, parent_fd: int, name: str) -> None:
    """A writable snapshot of the subvolume ``src_fd`` as ``name`` in ``parent_fd``."""
    head = struct.pack("qQQ", src_fd, 0, 0) + bytes(32)  # fd, transid, flags, size/qgroup
    fcntl.ioctl(parent_fd, _SNAP_CREATE_V2, _name_arg(name, head))


def subvolume_uuids(fd: int) -> tuple[str, str]:
    """(uuid, parent uuid) of the subvolume ``fd`` is in, as hex (the parent uuid of a
    snapshot is its source's)."""
    buf = bytearray(_SUBVOL_INFO_SIZE)
    fcntl.ioctl(fd, _GET_SUBVOL_INFO, buf)
    return buf[_UUID_AT : _UUID_AT + 16].hex(), buf[_PARENT_UUID_AT : _PARENT_UUID_AT + 16].hex()


def _is_subvolume_root(fd: int) -> bool:
    st = os.fstat(fd)
    return stat.S_ISDIR(st.st_mode) and st.st_ino == SUBVOL_ROOT_INO and on_btrfs(fd)


# --- seals ---------------------------------------------------------------------------------
# An entry: ("d", ino, ctime_ns, mode) | ("l", ino, ctime_ns, target)
#           | ("f", ino, ctime_ns, mtime_ns, size, mode, sha256, executable)
SealEntry = tuple[Any, ...]


def _sketch(digests: Iterable[str]) -> list[int]:
    """Bottom-k of the files' sha256s (their first 32 bits: already uniform): two sketches
    estimate how much content two trees share without reading either."""
    return sorted(heapq.nsmallest(SKETCH_SIZE, {int(d[:8], 16) for d in digests}))


def _similarity(a: list[int], b: list[int]) -> float:
    union = heapq.nsmallest(SKETCH_SIZE, set(a) | set(b))
    if not union:
        return 0.0
    both = set(a) & set(b)
    return sum(1 for h in union if h in both) / len(union)


@dataclass(frozen=True)
class SealRecord:
    """What a sealed tree holds (see the module docstring)."""

    uuid: str
    entries: dict[str, SealEntry]
    sketch: list[int] | None = None  # of its files' digests, when already known

    def encode(self) -> bytes:
        sketch = self.sketch
        if sketch is None:
            sketch = _sketch(e[6] for e in self.entries.values() if e[0] == "f")
        head = {"version": SEAL_VERSION, "uuid": self.uuid, "count": len(self.entries),
                "sketch": sketch}  # fmt: skip
        body = [[r, *e] for r, e in self.entries.items()]
        return (
            json.dumps(head).encode()
            + b"\n"
            + json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode(
                "utf-8", "surrogateescape"
            )
        )

    @classmethod
    def decode(cls, data: bytes) -> SealRecord:
        head_raw, _, body_raw = data.partition(b"\n")
        head = json.loads(head_raw)
        if head.get("version") != SEAL_VERSION:
            raise ValueError("not a seal of this version")
        body = json.loads(body_raw.decode("utf-8", "surrogateescape"))
        entries = {str(row[0]): tuple(row[1:]) for row in body}
        if len(entries) != head.get("count"):
            raise ValueError("a seal whose body does not match its header")
        return cls(str(head["uuid"]), entries)


def seal_name(tid: str, kind: str) -> str:
    """The seal file's name in ``.forgespace/manifests`` (kind ``shared`` or ``cow``)."""
    return mf.seal_path(Path("."), tid, kind).name


def save_seal(root: Path, tid: str, kind: str, seal: SealRecord | None) -> None:
    """Record (``seal``) or forget (None) the seal of ``tid``'s read-only tree of ``kind``."""
    name = seal_name(tid, kind)
    if seal is None:
        with contextlib.suppress(FileNotFoundError), fsops.dir_fd(root, _SEAL_DIR) as d:
            os.unlink(name, dir_fd=d)
        return
    tmp = f".{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    with fsops.dir_fd(root, _SEAL_DIR, create=True) as d:
        write_atomic_at(d, name, seal.encode(), tmp=tmp, mode=0o644)
        with contextlib.suppress(OSError):  # only a cache: the next get reads the file
            _remember_seal(os.stat(name, dir_fd=d, follow_symlinks=False), seal)


# Seals this worker process wrote or read, by the identity of their file (device, inode, size,
# ctime: a seal rewritten in place moves its ctime, which no one can set back), so a worker
# getting version after version of a target does not decode the 20,000-row seal it wrote a
# moment ago (~50 ms). A few only: each holds a row per entry of its tree.
_SealIdent = tuple[int, int, int, int]
_seals: dict[_SealIdent, SealRecord] = {}
_seals_lock = threading.Lock()
_SEALS_KEPT = 4


def _seal_ident(st: os.stat_result) -> _SealIdent:
    return (st.st_dev, st.st_ino, st.st_size, st.st_ctime_ns)


def _remember_seal(st: os.stat_result, seal: SealRecord) -> None:
    with _seals_lock:
        _seals.pop(_seal_ident(st), None)
        _seals[_seal_ident(st)] = seal
        while len(_seals) > _SEALS_KEPT:
            del _seals[next(iter(_seals))]  # the oldest


def _read_seal(f: Any) -> SealRecord:
    """The seal in the open file ``f``: remembered when this process knows that very file."""
    st = os.fstat(f.fileno())
    with _seals_lock:
        seal = _seals.get(_seal_ident(st))
    if seal is None:
        seal = SealRecord.decode(f.read())
        _remember_seal(st, seal)
    return seal


def _open_seal(root: Path, name: str) -> Any:
    with fsops.dir_fd(root, _SEAL_DIR) as d:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=d)
    return open(fd, "rb")


class Sealer:
    """Collects a tree's seal while ``blobstore._build`` writes it (one ``fstat`` per file,
    taken once the file is final) or while it applies a diff to a verified snapshot."""

    def __init__(
        self, kept: dict[str, SealEntry] | None = None, sketch: list[int] | None = None
    ) -> None:
        self.kept = kept or {}
        self.sketch = sketch  # the finished tree's, when the caller knows it (a snapshot's)
        self.new: dict[str, SealEntry] = {}

    def file(self, rel: str, fd: int, f: FileEntry) -> None:
        st = os.fstat(fd)
        self.new[rel] = (
            "f",
            st.st_ino,
            st.st_ctime_ns,
            st.st_mtime_ns,
            st.st_size,
            stat.S_IMODE(st.st_mode),
            f.sha256,
            bool(f.executable),
        )

    def link(self, x: _Extractor, rel: str) -> None:
        at, n = x._at(rel)
        st = os.stat(n, dir_fd=at, follow_symlinks=False)
        self.new[rel] = ("l", st.st_ino, st.st_ctime_ns, x.symlinks[rel])

    def seal(self, x: _Extractor) -> SealRecord:
        """The seal of the finished tree ``x`` built (its directories read-only: 0555)."""
        entries: dict[str, SealEntry] = {}
        for d in sorted(x.known_dirs):
            if d in x.settled:  # untouched since the verified snapshot
                entries[d] = self.kept[d]
                continue
            at, n = x._at(d or ".")  # finish() just changed its ctime
            st = os.stat(n, dir_fd=at, follow_symlinks=False)
            entries[d] = ("d", st.st_ino, st.st_ctime_ns, stat.S_IMODE(st.st_mode))
        for rel in [*x.files, *x.symlinks]:
            entries[rel] = self.new.get(rel) or self.kept[rel]
        _settle(x.dfd, max(e[2] for e in entries.values()))
        return SealRecord(subvolume_uuids(x.dfd)[0], entries, self.sketch)


def _settle(root_fd: int, newest: int) -> None:
    """Return once the filesystem's clock is past ``newest`` (a ctime in ns): a change made
    after this can never carry a sealed ctime (ctime ticks can be coarser than a build's last
    writes). Probed by touching the tree's root directory, whose own times are not sealed (a
    new file would cost more: the first write after a snapshot waits for btrfs); bounded
    (about a clock tick, 1 s at most)."""
    deadline = time.monotonic() + 1.0
    os.utime(root_fd)
    while os.fstat(root_fd).st_ctime_ns <= newest and time.monotonic() < deadline:
        time.sleep(0.001)
        os.utime(root_fd)


# --- choosing and using a base -------------------------------------------------------------
@dataclass
class Base:
    """A sealed tree to snapshot for a new version, and what to change in the snapshot."""

    tid: str
    parts: tuple[str, ...]  # the tree, below CACHE_DIR
    seal: SealRecord
    keep: set[str]  # entries the new version has exactly as the sealed tree
    remove: list[str]  # topmost entries of the sealed tree to remove
    create: list[Any]  # manifest entries to write, in manifest order
    named_root: bool = False  # the manifest lists the root directory itself
    sketch: list[int] | None = None  # the new version's (its seal's, once built)
    shown: str = ""
    seconds: dict[str, float] = field(default_factory=dict)


def _wanted(m: Manifest, names: list[str]) -> dict[str, Any] | None:
    """rel -> entry of a manifest (``names``: its entries' normalised paths, in order) with
    unique paths whose parents are directories of it; None otherwise (the full build applies
    the archive rules to anything else)."""
    want = dict(zip(names, m.entries, strict=True))
    if len(want) != len(names):
        return None
    for rel in want:
        parent = rel.rpartition("/")[0]
        if parent and not (parent in want and _is_dir(want[parent])):
            return None
    if "" in want and not _is_dir(want[""]):
        return None
    return want


def _is_dir(e: Any) -> bool:
    return not isinstance(e, FileEntry) and e[0] == "d"


def _same(old: SealEntry | None, e: Any) -> bool:
    if old is None:
        return False
    if isinstance(e, FileEntry):
        return old[0] == "f" and (old[4], old[6], bool(old[7])) == (
            e.size,
            e.sha256,
            bool(e.executable),
        )
    if e[0] == "l":
        return old[0] == "l" and old[3] == e[2]
    return old[0] == "d"


def plan(tid: str, parts: tuple[str, ...], seal: SealRecord, want: dict[str, Any]) -> Base:
    """What turns the sealed tree into the tree ``want`` (``_wanted``) describes."""
    sealed = seal.entries
    keep = {""}
    for rel, e in want.items():
        old = sealed.get(rel)
        if old is None:
            continue
        if type(e) is FileEntry:  # most entries: _same's file case, inline
            if old[0] == "f" and (old[4], old[6], bool(old[7])) == (
                e.size,
                e.sha256,
                bool(e.executable),
            ):
                keep.add(rel)
        elif _same(old, e):
            keep.add(rel)
    gone = sorted(set(seal.entries) - keep)
    remove: list[str] = []
    for rel in gone:  # sorted: a directory comes before everything below it
        if remove and rel.startswith(remove[-1] + "/"):
            continue
        remove.append(rel)
    create = [e for rel, e in want.items() if rel not in keep]
    return Base(tid, parts, seal, keep, remove, create, named_root="" in want)


class SealedTree(NamedTuple):
    """A sealed read-only tree the index holds."""

    tid: str
    parts: tuple[str, ...]  # the tree, below CACHE_DIR
    seal: str  # its seal file's name (``seal_name``)


def sealed_trees(engine: Engine, *, exclude: str | None = None) -> list[SealedTree]:
    """The MAX_CANDIDATES most recently used sealed trees of the index (not ``exclude``'s),
    the most recent first: the trees a get considers as a base or a blob source."""
    entries = [e for e in engine.index.entries() if e.kind in _KINDS and e.target_id != exclude]
    return [
        SealedTree(
            e.target_id,
            (e.target_id, *_KINDS[e.kind]),
            seal_name(e.target_id, _RECORD_KIND[e.kind]),
        )
        for e in reversed(entries[-MAX_CANDIDATES:])
    ]


def manifest_sketch(m: Manifest) -> list[int]:
    """The sketch of a manifest's file digests (compared with a seal's: ``seal_sketch``)."""
    return _sketch(f.sha256 for f in m.files)


def seal_sketch(root: Path, name: str) -> list[int]:
    """The sketch in the first line of the seal file ``name`` (the rest is not read)."""
    with _open_seal(root, name) as f:
        head = json.loads(f.readline())
    return [int(h) for h in head["sketch"]]


def read_seal(root: Path, name: str) -> SealRecord:
    """The seal file ``name`` (remembered by this process: ``_read_seal``)."""
    with _open_seal(root, name) as f:
        return _read_seal(f)


def not_the_sealed_subvolume(fd: int, seal: SealRecord) -> str | None:
    """Why the directory ``fd`` is not the subvolume ``seal`` was taken of, or None."""
    if not _is_subvolume_root(fd):
        return "it is not a btrfs subvolume any more"
    if subvolume_uuids(fd)[0] != seal.uuid:
        return "it is another subvolume than the one sealed"
    return None


def find_base(
    engine: Engine, tid: str, m: Manifest, names: list[str], dest_parent: Path
) -> Base | None:
    """The sealed tree this host holds that shares most content with ``m`` (whose entries'
    normalised paths are ``names``): at least MIN_SIMILARITY, estimated from the seals'
    sketches, with its plan; None when there is none, or the cache is not on btrfs."""
    if not subvolume_possible(dest_parent):
        return None
    want = _wanted(m, names)
    if want is None:
        return None
    root = engine.layout.root
    best: tuple[float, SealedTree] | None = None
    trees = sealed_trees(engine, exclude=tid)
    if not trees:
        return None
    mine = manifest_sketch(m)
    for tree in trees:
        try:
            score = _similarity(mine, seal_sketch(root, tree.seal))
        except (OSError, ValueError, KeyError, TypeError, ForgespaceError):
            continue
        if score >= MIN_SIMILARITY and (best is None or score > best[0]):
            best = (score, tree)
    if best is None:
        return None
    score, (btid, parts, name) = best
    try:
        seal = read_seal(root, name)
    except (OSError, ValueError, KeyError, TypeError, IndexError, ForgespaceError) as exc:
        log.warning("snapshot base %s: unreadable seal (%s); building from blobs", btid, exc)
        return None
    base = plan(btid, parts, seal, want)
    base.sketch = mine  # the new tree's files are the manifest's (_wanted: unique paths)
    base.shown = f"{root}/{'/'.join(parts)}"
    log.info(
        "target %s: snapshot base %s (~%.0f%% shared): %d to remove, %d to write",
        tid,
        base.shown,
        score * 100,
        len(base.remove),
        len(base.create),
    )
    return base


def clone(engine: Engine, base: Base, parent_fd: int, name: str) -> bool:
    """Snapshot ``base``'s tree as ``name`` in ``parent_fd`` and verify it against the seal
    (``_check``). False (logged, nothing left behind) when the tree cannot be used."""
    t0 = time.perf_counter()
    try:
        with (
            engine.target_lock(
                base.tid, exclusive=False, blocking=False, purpose="snapshot as a base"
            ),
            fsops.dir_fd(engine.layout.root, base.parts) as src,
        ):
            why = not_the_sealed_subvolume(src, base.seal)
            if why is not None:
                raise SnapshotRefused(why)
            snapshot_into(src, parent_fd, name)
            base.seconds["snapshot"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            _check(src, parent_fd, name, base)
    except LockTimeoutError:
        log.info("snapshot base %s is busy (gc or a rebuild): building from blobs", base.shown)
        return False
    except (OSError, ForgespaceError) as exc:
        log.warning("snapshot base %s not used (%s): building from blobs", base.shown, exc)
        with contextlib.suppress(FileNotFoundError):
            fsops.remove_at(parent_fd, name, shown=f"snapshot of {base.shown}")
        return False
    base.seconds["verify"] = time.perf_counter() - t1
    return True


def _check(src: int, parent_fd: int, name: str, base: Base) -> None:
    """SnapshotRefused unless the snapshot ``name`` just taken of ``src`` is the sealed tree.

    The snapshot's parent uuid must be the sealed subvolume's and its top level exactly the
    sealed one; then the *source* is walked (its inodes are in memory, a new snapshot's are
    not: ~3x faster) through the same fd the snapshot was taken from. Sound because a
    change cannot be undone: every write, chmod, link, rename and every entry added to or
    removed from a directory moves ctime forward past the sealed value (``_settle``), for
    good. So if every entry below the top level still has its sealed inode and ctime *after*
    the snapshot, none changed between sealing and the snapshot, which therefore holds the
    sealed tree; the top level (whose directory's ctime the publishing rename moves) is
    checked in the snapshot itself."""
    fd = fsops.open_child_dir(parent_fd, name, shown=f"snapshot of {base.shown}")
    try:
        if subvolume_uuids(fd)[1] != base.seal.uuid:
            raise SnapshotRefused("the snapshot's source is not the sealed subvolume")
        why = verify(fd, base.seal, top_only=True)
    finally:
        os.close(fd)
    why = why or verify(src, base.seal)
    if why is not None:
        raise SnapshotRefused(f"it was modified since it was sealed: {why}")


_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def verify(root_fd: int, seal: SealRecord, *, top_only: bool = False) -> str | None:
    """None when the tree at ``root_fd`` holds exactly the sealed entries with the sealed
    kernel-set attributes (``top_only``: its top level does); else the first difference
    found, in words. The root directory's own inode and ctime are not compared (a subvolume
    root is always inode 256, and publishing renames it)."""
    entries = seal.entries
    rst = os.fstat(root_fd)
    root = entries.get("")
    if root is None or root[0] != "d" or root[3] != stat.S_IMODE(rst.st_mode):
        return "its root directory's mode changed"
    seen = 1
    stack: list[tuple[str, tuple[int, int]]] = [("", (rst.st_dev, rst.st_ino))]
    if top_only:
        want_top = sum(1 for r in entries if r and "/" not in r)
        why, _n = _walk_dir(root_fd, "", entries, [])
        return why or (None if want_top == _count_top(root_fd) else "top-level entries differ")
    while stack:
        rel, ident = stack.pop()
        fd = root_fd if not rel else os.open(rel, _OPEN_DIR, dir_fd=root_fd)
        try:
            dst = os.fstat(fd)
            if (dst.st_dev, dst.st_ino) != ident:
                return f"{rel!r} was replaced while being checked"
            why, n = _walk_dir(fd, rel, entries, stack)
            if why is not None:
                return why
            seen += n
        finally:
            if fd != root_fd:
                os.close(fd)
    if seen != len(entries):
        return f"{len(entries) - seen} sealed entries are missing"
    return None


def _walk_dir(
    fd: int, rel: str, entries: dict[str, SealEntry], dirs: list[tuple[str, tuple[int, int]]]
) -> tuple[str | None, int]:
    """Compare the entries of directory ``fd`` (``rel`` in the tree) with the seal: (the
    first difference or None, how many entries were compared). Its subdirectories are
    appended to ``dirs`` with their (dev, ino). A sealed file is compared inline (most
    entries are files: ~20,000 of them on every snapshot build of a large tree)."""
    prefix = f"{rel}/" if rel else ""
    n = 0
    with os.scandir(fd) as it:
        for de in it:
            r = prefix + de.name
            want = entries.get(r)
            if want is None:
                return f"{r!r} was added", n
            st = de.stat(follow_symlinks=False)
            n += 1
            if want[0] == "f":  # as _differs, inline
                if (st.st_ino, st.st_ctime_ns, st.st_size, st.st_mode & 0o7777) != (
                    want[1], want[2], want[4], want[5]
                ) or not stat.S_ISREG(st.st_mode):  # fmt: skip
                    return f"{r!r} was modified or replaced", n
                continue
            why = _differs(r, want, st)
            if why is not None:
                return why, n
            if want[0] == "d":
                dirs.append((r, (st.st_dev, st.st_ino)))
    return None, n


def _count_top(fd: int) -> int:
    with os.scandir(fd) as it:
        return sum(1 for _ in it)


def _differs(rel: str, want: SealEntry, st: os.stat_result) -> str | None:
    mode = stat.S_IMODE(st.st_mode)
    if want[0] == "d":
        ok = stat.S_ISDIR(st.st_mode) and (st.st_ino, st.st_ctime_ns, mode) == want[1:4]
        return None if ok else f"{rel!r} (a directory) was modified or replaced"
    if want[0] == "f":
        ok = stat.S_ISREG(st.st_mode) and (st.st_ino, st.st_ctime_ns, st.st_size, mode) == (
            want[1],
            want[2],
            want[4],
            want[5],
        )
        return None if ok else f"{rel!r} was modified or replaced"
    ok = stat.S_ISLNK(st.st_mode) and (st.st_ino, st.st_ctime_ns) == (want[1], want[2])
    return None if ok else f"{rel!r} (a symlink) was modified or replaced"


def apply_removals(x: _Extractor, base: Base) -> None:
    """On a verified snapshot: make the directories about to change writable, remove what
    the new version no longer has (or has differently), and tell the extractor what the
    snapshot already holds (its rules then apply to what is written, as in a full build)."""
    seal = base.seal.entries
    parents = {r.rpartition("/")[0] for r in base.remove}
    for e in base.create:
        rel = _norm(e.path if isinstance(e, FileEntry) else e[1], "member")
        parents.add(rel.rpartition("/")[0])
    for p in sorted(parents):  # the others keep their final mode and times: finish skips them
        if p in base.keep and seal.get(p, ("",))[0] == "d":
            at, n = x._at(p or ".")
            fd = os.open(n, _OPEN_DIR, dir_fd=at)
            try:
                os.fchmod(fd, 0o755)
            finally:
                os.close(fd)
    for rel in base.remove:
        at, n = x._at(rel)
        if seal[rel][0] == "d":
            fsops.remove_at(at, n, shown=f"{x.dest}/{rel}")
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(n, dir_fd=at)
    x.settled = {r for r in base.keep if seal[r][0] == "d"} - parents
    for rel in base.keep:
        e = seal[rel]
        if e[0] == "d":
            x.known_dirs.add(rel)
            x.ndirs += 1 if rel else 0
            if rel or base.named_root:
                x.dir_meta[rel] = (0o755, 0)  # as the full build's ("d", path) entries
        elif e[0] == "f":
            x.files[rel] = (e[4], e[3])
            x.written += e[4]
        else:
            x.symlinks[rel] = e[3]
        x.members += 1


def new_subvolume(parent_fd: int, name: str) -> bool:
    """Create ``name`` in ``parent_fd`` as a new subvolume; where btrfs refuses (a kernel or
    policy without it), as a plain directory instead (False, logged). A full disk raises."""
    try:
        create_subvolume(parent_fd, name)
        return True
    except OSError as exc:
        if is_nospace(exc) or exc.errno == errno.EEXIST:
            raise
        log.warning("cannot create a btrfs subvolume (%s): a plain directory instead", exc)
    os.mkdir(name, 0o755, dir_fd=parent_fd)
    return False


def subvolume_possible(path: Path) -> bool:
    """Whether a subvolume can be made in the directory ``path`` (it is on btrfs). ``path``
    is ours (a pinned staging directory is reached through ``/proc/self/fd``: followed)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return on_btrfs(fd)
    finally:
        os.close(fd)
