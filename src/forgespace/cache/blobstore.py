"""The worker's local blob store, and materialising manifest targets from it.

A target stored as a manifest (``forgespace.storage.manifest``) is downloaded as that small
object (the engine's usual ``target`` file, under the target lock and in staging like any
download); then only the blobs this host lacks are fetched (``store.fetch_blobs``: coalesced
ranged reads, each blob's size and sha256 verified before it is kept) into
``{CACHE_DIR}/.forgespace/blobs/``: one local *pack* per fetch (``{name}.pack``, the blobs'
bytes back to back, written as a temp file and renamed once complete) and its index
(``{name}.idx``: digest, offset, size; written after the pack, so an index never names bytes
that are not there). One file per fetch, not one per blob: creating files is what a cold get
spends most of its time on, and a workspace already needs one per file.

The workspace is then built in staging by the archive extractor (the same path, link and size
rules as an archive: a manifest is untrusted input) with each file's data *copied* from its
pack (copy_file_range, which shares blocks where the filesystem can; a plain copy otherwise):
a run can never write through to a blob, and a pack can go without touching any workspace.
On btrfs a read-only tree (shared, copy-on-write's pristine copy) is built as a subvolume and
sealed, and a later version is a verified snapshot of such a tree with only the differences
written (cache/snapshot.py); isolated workspaces are always built in full. A sealed tree is
the worker's only copy of the blobs it fetched (no local pack: the blobs go from the fetch to
the tree through memory, ``_Sink``), and later builds copy them from the tree, checked against
its seal (cache/treesource.py); what the packs and the sealed trees lack is fetched.

Blobs are a cache of the store. Materialisers hold the blob store's lock shared; ``sweep``
(gc) takes it exclusive and non-blocking (skipping the sweep when busy), so a pack is never
removed while a get is about to copy from it. A pack holding a blob that the manifest of an
entry the index holds references is never removed; the others go by CACHE_TTL (a pack's mtime
is touched on each use) and, least recently used first, while the index's entries plus the
blob store's bytes exceed CACHE_MAX_SIZE. (A pack only partly referenced stays whole.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import stat
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from forgespace.atomicfile import write_atomic_at
from forgespace.cache import fsops, snapshot, treesource
from forgespace.cache.archive import ExtractStats, _Extractor, _norm
from forgespace.cache.locks import flock
from forgespace.errors import (
    CacheFullError,
    IntegrityError,
    LockTimeoutError,
    StorageError,
    UnsafeArchiveError,
    UnsafeMemberError,
    is_nospace,
)
from forgespace.storage.manifest import Entry, FileEntry, Manifest, is_manifest, parse_manifest

if TYPE_CHECKING:
    from forgespace.cache.engine import Engine

log = logging.getLogger(__name__)

BLOBS = (fsops.META, "blobs")
LOCK_NAME = "_blobs.lock"  # never a target id's lock file (ids start with a letter or digit)
_TMP_SUFFIX = ".tmp"
_PACK, _IDX = ".pack", ".idx"
_TMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_SRC_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_IOV_MAX = 1024  # buffers one pwritev takes (Linux's IOV_MAX)
_FLUSH_AT = 16 << 20  # a fetch's queued bytes written to its temp pack at once (see _Sink)
_KEEP = 64 << 20  # verified blobs a fetch keeps in memory once written, for the builder (_Sink)
_NO_CFR = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF, errno.EPERM}

__all__ = ["blob_usage", "held_digests", "is_manifest", "materialise", "store_usage", "sweep"]

Held = dict[str, tuple[str, int, int]]  # digest -> (pack name, offset, size)


class _Cancelled(Exception):
    """Stops a fetch whose workspace build already failed."""


class _NoBase(Exception):
    """The snapshot base was refused (``snapshot.clone`` logged why): build in full."""


class _FetchFailed(Exception):
    """The builder's signal that the fetch it follows failed (``materialise`` then raises
    the fetch's own error)."""


class _Sink:
    """A ``BlobSink`` appending verified blobs to one new local pack (see the module).

    Bytes are queued and written to the temp pack a few MiB at a time (one small write per
    blob made the fetch, not the wire, the slow side of a cold get). A verified blob is
    handed to the builder from memory while it is queued and, once written, while the blobs
    kept so far and not yet taken are within ``_KEEP`` (the fetch runs ahead of the build:
    without them three in four blobs of a 300 MB cold get were read back from the pack);
    the others are read back from the pack. Memory: at most ``_FLUSH_AT`` plus ``_KEEP``
    plus one read chunk.

    *Memory first* (``uses``: how many files of the build take each blob), for a sealed tree,
    which holds the blobs afterwards (cache/treesource.py): a verified blob stays in memory
    until the builder took it for its last use, and the fetch pauses while more than
    ``_KEEP`` wait (until half is taken). A blob reaches the pack only when it is too big to
    hold (``_FLUSH_AT``: written as it comes) or spilled: when the builder waits for a blob
    the fetch has not reached (the orders diverge) while ``_KEEP`` wait, the newest go to
    the pack. The pack and its index hold only those (no pack when there are none).
    Memory: at most ``_KEEP`` plus one blob below ``_FLUSH_AT``."""

    def __init__(self, bfd: int, uses: dict[str, int] | None = None) -> None:
        self.bfd = bfd
        self.memory_first = uses is not None
        self._uses = dict(uses or {})
        self._mem = 0  # memory first: bytes of the blobs held for the builder
        self._sizes: dict[str, int] = {}
        self._streaming = not self.memory_first  # the current blob goes to the pack
        self.name = uuid.uuid4().hex
        self.tmp = f".{self.name}{_PACK}{_TMP_SUFFIX}"
        self.fd = os.open(self.tmp, _TMP_FLAGS, 0o444, dir_fd=bfd)
        self.size = 0  # the pack's bytes: written, queued and the current blob's so far
        self.start = 0
        self.digest = ""
        self.rows: list[tuple[str, int, int]] = []
        self._disk = 0  # bytes written to the temp pack (the queue follows them)
        self._queue: list[bytes] = []
        self._queued = 0
        self._cur: list[bytes] = []  # the current blob's chunks (the queue's tail)
        # The builder follows the fetch (see ``wait_for``): verified blobs by digest, those
        # still only in the queue, and how the fetch ended.
        self._cond = threading.Condition()
        self._placed: dict[str, tuple[int, int]] = {}
        self._memory: dict[str, list[bytes]] = {}  # verified blobs in memory, oldest first
        self._taken: set[str] = set()  # blobs the builder took while they were queued
        self.ended = False
        self.error: BaseException | None = None
        self.cancelled = False
        self._awaited: str | None = None  # memory first: the blob the builder waits for
        self._built = False  # memory first: the builder needs nothing more
        self._paused = False  # memory first: the fetch waits for the builder to take some

    def begin(self, digest: str) -> None:
        if self.cancelled:
            raise _Cancelled()
        self.digest, self.start, self._cur = digest, self.size, []
        self._streaming = not self.memory_first

    def write(self, data: bytes) -> None:
        if self.cancelled:
            raise _Cancelled()
        if not data:
            return
        self._cur.append(data)
        self.size += len(data)
        if self._streaming:
            self._queue.append(data)
            self._queued += len(data)
            if self._queued >= _FLUSH_AT:
                self._flush()
        elif self.size - self.start >= _FLUSH_AT:  # memory first, but too big to hold
            self._streaming = True
            self._queue.extend(self._cur)
            self._queued += self.size - self.start
            self._flush()

    def _flush(self, keep: int | None = None) -> None:
        """Write the queue to the temp pack; then keep in memory the blobs not yet taken, the
        oldest first (the builder's order), up to ``keep`` bytes (``_KEEP``). The others are
        read back from the pack: only once written, so a blob is never in neither place."""
        keep = _KEEP if keep is None else keep
        if self._queue:
            self._disk = _pwrite_all(self.fd, self._queue, self._disk)
            self._queue, self._queued = [], 0
        if self.memory_first:  # its memory holds blobs that are in no pack
            return
        with self._cond:
            kept = 0
            for digest in list(self._memory):  # the builder pops taken ones meanwhile
                size = self._placed[digest][1]
                if digest in self._taken or kept + size > keep:
                    self._memory.pop(digest, None)
                else:
                    kept += size
            self._taken.clear()

    def commit(self) -> None:
        """The blob just written verified (size and sha256): hand it to the builder."""
        if not self._streaming:
            self._hold()
            return
        if self.start < self._disk:
            self._flush()  # partly written already: the builder reads all of it from there
        with self._cond:
            self.rows.append((self.digest, self.start, self.size - self.start))
            if self.digest not in self._placed:
                # memory first: wait_for reads _placed without the lock, then _memory
                if self.start >= self._disk:
                    self._memory[self.digest] = self._cur
                self._placed[self.digest] = (self.start, self.size - self.start)
            self._cond.notify_all()

    def _hold(self) -> None:
        """Memory first: hand the verified blob to the builder from memory only (it takes no
        room in the pack). While more than _KEEP wait, the fetch waits for the builder to
        take some; if the builder waits too (it needs a blob the fetch has not reached: the
        orders diverged), the newest blobs are spilled to the pack instead."""
        size = self.size - self.start
        self.size = self.start
        with self._cond:
            if self.digest not in self._memory and self.digest not in self._placed:
                self._memory[self.digest] = self._cur
                self._sizes[self.digest] = size
                self._mem += size
                if self._awaited == self.digest:
                    self._cond.notify_all()
            if self._mem > _KEEP:  # paused until half is taken (few wake-ups, not one a blob)
                self._paused = True
                try:
                    while self._mem > _KEEP // 2 and not self._built and not self._starved():
                        if self.cancelled:
                            raise _Cancelled()
                        self._cond.wait()
                finally:
                    self._paused = False
            if self._mem <= _KEEP:
                return
            spill: list[tuple[str, list[bytes]]] = []
            left = self._mem
            for digest in reversed(self._memory):  # the builder takes the oldest first
                if left <= _KEEP // 2:
                    break
                spill.append((digest, self._memory[digest]))
                left -= self._sizes[digest]
        spill.reverse()
        placed = []
        for digest, _chunks in spill:
            placed.append((digest, self.size, self._sizes[digest]))
            self.size += self._sizes[digest]
        self._disk = _pwrite_all(self.fd, [c for _d, chunks in spill for c in chunks], self._disk)
        with self._cond:  # in the pack now: read back from there (unless taken meanwhile)
            for digest, offset, n in placed:
                self.rows.append((digest, offset, n))
                self._placed[digest] = (offset, n)
                if self._memory.pop(digest, None) is not None:
                    self._mem -= n
            self._cond.notify_all()

    def _starved(self) -> bool:
        """The builder waits for a blob that is not here yet (under the lock)."""
        awaited = self._awaited
        return awaited is not None and awaited not in self._memory and awaited not in self._placed

    def cancel(self) -> None:
        """Stop the fetch (the build failed)."""
        with self._cond:
            self.cancelled = True
            self._cond.notify_all()

    def built(self) -> None:
        """The build took what it needed: a fetch still running holds nothing back for it."""
        with self._cond:
            self._built = True
            self._cond.notify_all()

    def end(self, error: BaseException | None) -> None:
        """The fetch returned (``error`` None) or raised ``error``."""
        with self._cond:
            self.ended, self.error = True, error
            self._cond.notify_all()

    def wait_for(self, digest: str) -> tuple[int, int, list[bytes] | None]:
        """(offset, size, its bytes if still in memory) in the temp pack of ``digest`` once
        fetched and verified; the fetch's own error if it failed first."""
        if self.memory_first:
            return self._take(digest)
        placed = self._placed.get(digest)  # most blobs: already here, no lock to take
        if placed is None:
            with self._cond:
                while digest not in self._placed:
                    if self.error is not None:
                        raise _FetchFailed()
                    if self.ended:
                        raise IntegrityError(f"the store sent no blob {digest}")
                    self._cond.wait()
                placed = self._placed[digest]
        offset, size = placed
        memory = self._memory.get(digest)  # (a blob leaves memory only once written)
        if memory is not None:  # taken: a second use (the same content twice) reads the pack
            if offset + size <= self._disk:
                self._memory.pop(digest, None)
            else:
                self._taken.add(digest)
        return offset, size, memory

    def _take(self, digest: str) -> tuple[int, int, list[bytes] | None]:
        """``wait_for``, memory first: a blob leaves memory with its last use."""
        with self._cond:
            while True:
                memory = self._memory.get(digest)
                if memory is not None:
                    size = self._sizes[digest]
                    left = self._uses.get(digest, 1) - 1
                    self._uses[digest] = left
                    if left <= 0:
                        del self._memory[digest]
                        self._mem -= size
                        if self._paused and self._mem <= _KEEP // 2:
                            self._cond.notify_all()  # room: the paused fetch goes on
                    return -1, size, memory
                placed = self._placed.get(digest)
                if placed is not None:
                    return placed[0], placed[1], None
                if self.error is not None:
                    raise _FetchFailed()
                if self.ended:
                    raise IntegrityError(f"the store sent no blob {digest}")
                self._awaited = digest
                if self._paused:  # it cannot wait for a builder that waits for it
                    self._cond.notify_all()
                try:
                    self._cond.wait()
                finally:
                    self._awaited = None

    def abort(self) -> None:
        """Drop the current blob (it did not verify)."""
        if self.start < self._disk:  # partly written: cut it off the temp pack
            os.ftruncate(self.fd, self.start)
            self._disk, self._queue, self._queued = self.start, [], 0
        elif self._cur and self._streaming:
            del self._queue[len(self._queue) - len(self._cur) :]
            self._queued -= self.size - self.start
        self.size, self._cur = self.start, []

    def finish(self) -> None:
        """Publish the pack, then its index."""
        self._flush(keep=0)
        if not self.rows:  # memory first, nothing spilled: the sealed tree holds the blobs
            self.discard()
            return
        os.close(self.fd)
        self.fd = -1
        os.rename(self.tmp, self.name + _PACK, src_dir_fd=self.bfd, dst_dir_fd=self.bfd)
        tmp = f".{self.name}{_IDX}{_TMP_SUFFIX}"
        idx = self.name + _IDX
        write_atomic_at(self.bfd, idx, json.dumps(self.rows).encode(), tmp=tmp)
        with contextlib.suppress(OSError):  # only a cache: the next get reads it back then
            _remember_index(self.bfd, idx, self.rows)

    def discard(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp, dir_fd=self.bfd)


def _pwrite_all(fd: int, chunks: list[bytes], offset: int) -> int:
    """Write ``chunks`` back to back at ``offset`` (pwritev: no joined copy); returns the
    offset after them."""
    views: list[bytes | memoryview] = list(chunks)
    i = 0
    while i < len(views):
        n = os.pwritev(fd, views[i : i + _IOV_MAX], offset)
        offset += n
        while i < len(views) and n >= len(views[i]):
            n -= len(views[i])
            i += 1
        if n:  # a short write: the rest of this buffer next time (a view: no copy)
            views[i] = memoryview(views[i])[n:]
    return offset


# Parsed pack indexes, per blob store (st_dev, st_ino of its directory) and index file: an
# index is written once (atomically, under a new name) and never changed, so a long-lived
# worker reads each one once, not on every get (20,000 rows: tens of ms).
_IndexKey = tuple[str, int, int, int]  # index name, inode, size, mtime_ns
_index_rows: dict[tuple[int, int], dict[_IndexKey, list[tuple[str, int, int]]]] = {}
_index_lock = threading.Lock()


def _held(bfd: int) -> Held:
    """Every blob of the local packs whose pack and index are both there."""
    names = set(os.listdir(bfd))
    dst = os.fstat(bfd)
    with _index_lock:
        cached = _index_rows.get((dst.st_dev, dst.st_ino), {})
    fresh: dict[_IndexKey, list[tuple[str, int, int]]] = {}
    out: Held = {}
    for idx in sorted(names):
        name = idx[: -len(_IDX)]
        if not idx.endswith(_IDX) or idx.startswith(".") or name + _PACK not in names:
            continue
        try:
            st = os.stat(idx, dir_fd=bfd, follow_symlinks=False)
            key = (idx, st.st_ino, st.st_size, st.st_mtime_ns)
            rows = cached.get(key)
            if rows is None:
                rows = _read_index(bfd, idx)
            fresh[key] = rows
        except (OSError, ValueError, TypeError, RecursionError) as exc:
            log.warning("blob store: ignoring the unreadable index %s: %s", idx, exc)
            continue
        pack = name + _PACK
        for digest, offset, size in rows:
            out.setdefault(digest, (pack, offset, size))
    with _index_lock:  # only the indexes there now: a removed pack's rows go
        _index_rows[(dst.st_dev, dst.st_ino)] = fresh
    return out


def _remember_index(bfd: int, idx: str, rows: list[tuple[str, int, int]]) -> None:
    """Keep the rows of the index ``idx`` just written, under the identity it has now."""
    dst, st = os.fstat(bfd), os.stat(idx, dir_fd=bfd, follow_symlinks=False)
    with _index_lock:
        known = _index_rows.setdefault((dst.st_dev, dst.st_ino), {})
        known[(idx, st.st_ino, st.st_size, st.st_mtime_ns)] = list(rows)


def _read_index(bfd: int, idx: str) -> list[tuple[str, int, int]]:
    fd = os.open(idx, _SRC_FLAGS, dir_fd=bfd)
    with os.fdopen(fd, "rb") as f:
        rows = json.loads(f.read())
    return [(str(digest), int(offset), int(size)) for digest, offset, size in rows]


def held_digests(root: Path) -> set[str]:
    """sha256s of the blobs the blob store under CACHE_DIR ``root`` holds."""
    try:
        with fsops.dir_fd(root, BLOBS) as bfd:
            return set(_held(bfd))
    except FileNotFoundError:
        return set()


def _lock_path(engine: Any) -> Path:
    return Path(engine.layout.locks_dir) / LOCK_NAME


def materialise(
    engine: Engine, tid: str, manifest_file: Path, dest: Path, *, read_only: bool
) -> ExtractStats:
    """Build the workspace of the manifest target ``tid`` at the new directory ``dest``.

    IntegrityError for a manifest that is not valid or a blob that does not match its digest,
    TargetNotFoundError for a blob the store lacks, UnsafeArchiveError for a path or link the
    archive rules refuse (``dest`` is removed and nothing is published in every case)."""
    what = f"target {tid}"
    m = parse_manifest(manifest_file.read_bytes(), what)
    limit = engine.settings.cache_max_size
    # refuse bad names before fetching anything
    names = [_checked_name(_name(e), str(manifest_file)) for e in m.entries]
    need = sum({f.sha256: f.size for f in m.files}.values())
    if need > limit:
        raise UnsafeArchiveError(
            archive=str(manifest_file),
            reason=f"would take the extracted size to {need} bytes, above the limit of "
            f"{limit} bytes (CACHE_MAX_SIZE)",
        )  # fmt: skip
    root = engine.layout.root
    sweep(engine, incoming=need, only_for_room=True)  # unreferenced blobs make room first
    with (
        flock(_lock_path(engine), exclusive=False, root=root, what="the blob store",
              timeout=engine.settings.cache_lock_timeout, purpose=f"materialise {tid}"),
        fsops.dir_fd(root, BLOBS, create=True) as bfd,
    ):  # fmt: skip
        held = _held(bfd)
        # A read-only tree on btrfs: from a snapshot of a sealed earlier version when one
        # shares most entries (cache/snapshot.py), else a new subvolume built in full.
        base = snapshot.find_base(engine, tid, m, names, dest.parent) if read_only else None
        refused: list[tuple[str, tuple[str, ...]]] = []
        while True:  # each round drops a refused base or sealed tree: at most a few
            job = _Job(engine, tid, m, tuple(names), manifest_file, dest, read_only, base)
            try:
                return _materialise(job, bfd, held, refused)
            except _NoBase:
                if base is not None:  # refused (logged): built in full, and not asked again
                    refused.append((base.tid, base.parts))
                base = None
            except treesource.HolderFailed as exc:
                log.warning("%s", exc)
                refused.append((exc.holder.tid, exc.holder.parts))


def _materialise(
    job: _Job, bfd: int, held: Held, refused: list[tuple[str, tuple[str, ...]]]
) -> ExtractStats:
    """Build ``job`` with the blobs from the local packs (``held``), the sealed trees that
    hold others (cache/treesource.py; not those ``refused``), and the store for the rest."""
    m = job.manifest
    files = m.files if job.base is None else [e for e in job.base.create if type(e) is FileEntry]
    need = [f for f in files if f.size and f.sha256 not in held]
    wanted = {f.sha256 for f in need}

    def sketch() -> list[int]:  # the base's when there is one: find_base computed it
        if job.base is not None and job.base.sketch is not None:
            return job.base.sketch
        return snapshot.manifest_sketch(m)

    with treesource.Sources.find(
        job.engine, job.tid, job.read_only, wanted, sketch, refused
    ) as trees:
        missing = [f for f in need if f.sha256 not in trees.digests]
        fetch = sum({f.sha256: f.size for f in missing}.values())
        job.engine._make_room(fetch + blob_usage(job.engine)[0], job.tid)
        blobs = _Blobs(bfd, held, None, trees)
        if not missing:
            return _build(job, blobs)
        uses: dict[str, int] | None = None
        if job.read_only and snapshot.subvolume_possible(job.dest.parent):
            uses = Counter(f.sha256 for f in missing)
        return _fetch_and_build(job, blobs, missing, uses)


@dataclass(frozen=True)
class _Job:
    """One workspace to materialise: for whom, from which manifest, where."""

    engine: Engine
    tid: str
    manifest: Manifest
    names: tuple[str, ...]  # the entries' checked, normalised paths (in order)
    manifest_file: Path
    dest: Path
    read_only: bool
    base: snapshot.Base | None = None  # a sealed tree to start from (cache/snapshot.py)


def _fetch_and_build(
    job: _Job, blobs: _Blobs, missing: list[FileEntry], uses: dict[str, int] | None
) -> ExtractStats:
    """Fetch ``missing`` blobs into one new local pack on a helper thread while the workspace
    is built from the blobs as they arrive (each only once verified): the wire and the file
    creation overlap, as the streamed archive path does. The pack is published only when
    both succeeded; on any failure it is discarded and the fetch stopped. ``uses``: the
    build is a sealed tree, memory first (``_Sink``)."""
    engine, what = job.engine, f"target {job.tid}"
    store = engine.store
    if not hasattr(store, "fetch_blobs"):
        raise StorageError(f"{what} is a manifest but {store!r} cannot fetch blobs")
    sink = blobs.pending = _Sink(blobs.bfd, uses)
    got: list[int] = []

    def fetch() -> None:
        try:
            got.append(store.fetch_blobs(missing, sink))
        except BaseException as exc:  # handed to the builder and re-raised below
            sink.end(exc)
        else:
            sink.end(None)

    fetcher = threading.Thread(target=fetch, name=f"fetch blobs of {job.tid}", daemon=True)
    fetcher.start()
    try:
        stats = _build(job, blobs)
        sink.built()
        fetcher.join()
        if sink.error is not None:
            raise _FetchFailed()
        sink.finish()
    except BaseException as exc:
        sink.cancel()
        fetcher.join()
        sink.discard()
        if os.path.lexists(job.dest):  # built before the fetch failed: refused all the same
            fsops.remove(job.dest.parent, job.dest)
        if not isinstance(exc, _FetchFailed) or sink.error is None:
            raise
    else:
        engine.index.count("bytes_downloaded", got[0])
        log.info(
            "%s: fetched %d blob(s), %d bytes (%d kept in the local pack)",
            what,
            len({f.sha256 for f in missing}),
            got[0],
            len(sink.rows),
        )
        return stats
    # The fetch failed: its own error, raised here (outside the handler: no chained context).
    failed = sink.error
    if isinstance(failed, OSError):
        engine._raise_if_full(failed, job.dest.parent, sum(f.size for f in missing))
    raise failed


def _name(e: Entry) -> str:
    return e.path if isinstance(e, FileEntry) else e[1]


def _checked_name(name: str, src: str) -> str:
    try:
        return _norm(name, "member")
    except UnsafeArchiveError as exc:
        raise UnsafeMemberError(archive=src, member=name, reason=exc.reason) from exc


class _Blobs:
    """Where a build reads blob bytes: the local packs (``held``), the sealed trees holding
    others (``trees``), and, for the blobs being fetched, memory or the new pack as the fetch
    verifies them (``pending``). Pack fds stay open for the build and are touched at its end
    (their last use, for TTL/LRU)."""

    def __init__(
        self, bfd: int, held: Held, pending: _Sink | None, trees: treesource.Sources
    ) -> None:
        self.bfd, self.held, self.pending, self.trees = bfd, held, pending, trees
        self._fds: dict[str, int] = {}

    def locate(self, digest: str) -> tuple[int, int, int, list[bytes] | None]:
        """(pack fd, offset, size, its bytes when in memory) of a blob, waiting for it when
        it is being fetched (a blob of this fetch still queued is in memory)."""
        if digest in self.held or self.pending is None:
            pack, offset, size = self.held[digest]
            memory = None
        else:
            offset, size, memory = self.pending.wait_for(digest)
            pack = self.pending.tmp
            if memory is not None:
                return -1, offset, size, memory
        fd = self._fds.get(pack)
        if fd is None:
            fd = self._fds[pack] = os.open(pack, _SRC_FLAGS, dir_fd=self.bfd)
        return fd, offset, size, memory

    def copy_to(self, digest: str, dfd: int, size: int, rel: str) -> None:
        """Copy the blob ``digest`` (``size`` bytes) to the new file ``dfd``: from memory, or
        from a pack. A blob of the pack being fetched is copied through user space: its
        pages may still be dirty, and on btrfs copy_file_range from dirty pages costs twice a
        plain copy (it waits for their writeback); a held pack's blob goes through
        copy_file_range (block sharing)."""
        holder = self.trees.digests.get(digest)
        if holder is not None:
            sfd, want = holder.open_file(digest)
            try:
                if want[4] != size:  # a seal that does not match the manifest
                    shown = holder.files[digest]
                    raise treesource.HolderFailed(holder, f"its {shown!r} has {want[4]} bytes")
                _copy_range(sfd, dfd, 0, size)
                holder.still(sfd, digest, want)
            finally:
                os.close(sfd)
            return
        sfd, offset, have, memory = self.locate(digest)
        if have != size:
            raise IntegrityError(f"the cached blob {digest} of {rel!r} has {have} bytes")
        if memory is not None:
            for chunk in memory:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(dfd, view) :]
        elif digest not in self.held:
            _pread_copy(sfd, dfd, offset, size, 0)
        else:
            _copy_range(sfd, dfd, offset, size)

    def touch(self) -> None:
        now = time.time()
        for fd in self._fds.values():
            os.utime(fd, (now, now))

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _build(job: _Job, blobs: _Blobs) -> ExtractStats:
    """The extractor's rules, with file data copied from the local packs: into a new
    directory, a new btrfs subvolume (a read-only tree on btrfs, sealed), or a verified
    snapshot of ``job.base`` where only the differences are written."""
    m, dest, src = job.manifest, job.dest, str(job.manifest_file)
    sealer: snapshot.Sealer | None = None
    pfd = os.open(dest.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        entries: Iterable[tuple[Entry, str]] = zip(m.entries, job.names, strict=True)
        snapped = False
        if job.read_only and snapshot.on_btrfs(pfd):
            sealer = snapshot.Sealer()
            base = job.base
            snapped = base is not None and snapshot.clone(job.engine, base, pfd, dest.name)
            if base is not None and not snapped:
                raise _NoBase()  # its blobs were not fetched: materialise starts over
            if not snapped and not snapshot.new_subvolume(pfd, dest.name):
                sealer = None  # a plain directory after all (logged)
        else:
            os.mkdir(dest, 0o755)
        x = _Extractor(src, str(dest), job.engine.settings.cache_max_size, job.read_only)
        try:
            if snapped and job.base is not None:
                snapshot.apply_removals(x, job.base)
                sealer = snapshot.Sealer(job.base.seal.entries, job.base.sketch)
                entries = ((e, _checked_name(_name(e), src)) for e in job.base.create)
                log.info(
                    "target %s: built from a snapshot of %s (snapshot %.0f ms, checked in %.0f ms)",
                    job.tid,
                    job.base.shown,
                    job.base.seconds.get("snapshot", 0) * 1000,
                    job.base.seconds.get("verify", 0) * 1000,
                )
            for e, rel in entries:
                x.enter(_name(e))
                if isinstance(e, FileEntry):
                    _copy_file(x, blobs, rel, e, sealer)
                elif e[0] == "d":
                    x.directory(rel, 0o755, 0)
                else:
                    x.symlink(rel, e[2], 0)  # type: ignore[misc]
                    if sealer is not None:
                        sealer.link(x, rel)
            stats = x.finish()
            if sealer is not None:
                stats = dataclasses.replace(stats, seal=sealer.seal(x))
            blobs.touch()
        except BaseException as exc:
            x.close()
            fsops.remove(dest.parent, dest)
            if isinstance(exc, OSError) and is_nospace(exc):
                raise CacheFullError(exc.errno, f"no space left materialising {dest}") from exc
            raise
        x.close()
        return stats
    finally:
        os.close(pfd)
        blobs.close()


def _copy_file(
    x: _Extractor, blobs: _Blobs, rel: str, f: FileEntry, sealer: snapshot.Sealer | None = None
) -> None:
    x._budget(f.size)
    perm = 0o755 if f.executable else 0o644
    if x.read_only:
        perm = 0o555 if f.executable else 0o444
    fd = x._create(rel, perm)
    try:
        if f.size:
            blobs.copy_to(f.sha256, fd, f.size, rel)
        x._count(f.size)
        x._finish_file(fd, rel, perm, 0, f.size)
        if sealer is not None:
            sealer.file(rel, fd, f)
    finally:
        os.close(fd)


def _copy_range(sfd: int, dfd: int, offset: int, size: int) -> None:
    """``size`` bytes at ``offset`` of ``sfd`` to ``dfd``: copy_file_range (in-kernel, block
    sharing where the filesystem can), else pread/write. The clone helper copies whole
    files; a blob is a range of a pack."""
    done = 0
    try:
        while done < size:
            n = os.copy_file_range(sfd, dfd, size - done, offset_src=offset + done)
            if n == 0:
                raise IntegrityError(f"a local pack ended {size - done} bytes early")
            done += n
        return
    except OSError as exc:
        if exc.errno not in _NO_CFR or done:
            raise
    _pread_copy(sfd, dfd, offset, size, done)


def _pread_copy(sfd: int, dfd: int, offset: int, size: int, done: int) -> None:
    """Bytes ``[offset + done, offset + size)`` of ``sfd`` appended to ``dfd`` with
    pread/write."""
    while done < size:
        chunk = os.pread(sfd, min(size - done, 1 << 20), offset + done)
        if not chunk:
            raise IntegrityError(f"a local pack ended {size - done} bytes early")
        view = memoryview(chunk)
        while view:
            view = view[os.write(dfd, view) :]
        done += len(chunk)


def blob_usage(engine: Any) -> tuple[int, list[tuple[float, str, int]]]:
    """(bytes, [(last use, file name, bytes)]) of the engine's blob store."""
    return store_usage(engine.layout.root)


def store_usage(root: Path) -> tuple[int, list[tuple[float, str, int]]]:
    """(bytes, [(last use, file name, bytes)]) of the blob store under the cache ``root``
    (packs, indexes and temp files; none when there is no blob store)."""
    out: list[tuple[float, str, int]] = []
    try:
        bfd = fsops.open_dir(root, BLOBS)
    except FileNotFoundError:
        return 0, []
    try:
        for e in os.scandir(bfd):
            try:
                st = e.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                out.append((st.st_mtime, e.name, st.st_size))
    finally:
        os.close(bfd)
    return sum(n for _t, _d, n in out), out


def _live_digests(engine: Any) -> set[str]:
    """sha256s the manifests of the index's entries reference (their blobs are kept)."""
    from forgespace.cache.eviction import entry_paths

    live: set[str] = set()
    for e in engine.index.entries():
        for p in entry_paths(engine.layout, e):
            manifest = p / "target" if p.name != "target" else p
            if is_manifest(manifest):
                try:
                    m = parse_manifest(manifest.read_bytes(), f"{manifest}")
                except (OSError, IntegrityError):
                    raise IntegrityError(f"cannot read the manifest {manifest}") from None
                live.update(f.sha256 for f in m.files)
    return live


def sweep(engine: Any, *, incoming: int = 0, only_for_room: bool = False) -> tuple[int, int]:
    """Remove local packs holding no referenced blob (and dead temp files): unused for
    CACHE_TTL, then least recently used while the cache (entries + blobs + ``incoming``)
    exceeds CACHE_MAX_SIZE. Skipped (0, 0) when a materialisation holds the blob store, and
    with ``only_for_room`` (a get's call) when the cache is within its limit: reading every
    entry's manifest costs a get more than it saves then, and gc's periodic sweep does TTL.
    Returns (files removed, bytes freed)."""
    total, files = blob_usage(engine)
    if not files:
        return 0, 0
    limit = engine.settings.cache_max_size
    if only_for_room and engine.index.total_bytes() + total + incoming <= limit:
        return 0, 0
    lock = flock(
        _lock_path(engine),
        exclusive=True,
        blocking=False,
        root=engine.layout.root,
        what="the blob store",
        purpose="sweep blobs",
    )
    try:
        with lock, fsops.dir_fd(engine.layout.root, BLOBS) as bfd:
            try:
                live = _live_digests(engine)
            except IntegrityError as exc:
                log.warning("blob sweep skipped: %s", exc)
                return 0, 0
            keep = {pack for d, (pack, _o, _s) in _held(bfd).items() if d in live}
            over = engine.index.total_bytes() + total + incoming - engine.settings.cache_max_size
            removed, freed = _remove_packs(bfd, files, keep, over, engine.settings.cache_ttl)
    except LockTimeoutError:
        return 0, 0
    except OSError as exc:
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            return 0, 0
        raise
    if removed:
        log.info("blob store: removed %d unreferenced file(s), %d bytes", removed, freed)
    return removed, freed


def _remove_packs(
    bfd: int, files: list[tuple[float, str, int]], keep: set[str], over: int, ttl: float
) -> tuple[int, int]:
    """Under the exclusive lock: temp files (their writers are gone), packs without an index,
    and unreferenced packs by TTL then LRU (oldest first); a pack's index goes first."""
    names = {n for _t, n, _s in files}
    now = time.time()
    removed = freed = 0
    for used, name, size in sorted(files):
        if name.endswith(_IDX) or name in keep:
            continue
        orphan = name.endswith(_PACK) and name[: -len(_PACK)] + _IDX not in names
        dead = name.endswith(_TMP_SUFFIX) or orphan
        if not (dead or used < now - ttl or over > 0):
            continue
        if name.endswith(_PACK):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name[: -len(_PACK)] + _IDX, dir_fd=bfd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=bfd)
        removed, freed, over = removed + 1, freed + size, over - size
    for _t, name, _s in files:  # indexes whose pack is gone
        if name.endswith(_IDX) and name[: -len(_IDX)] + _PACK not in names:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=bfd)
    return removed, freed
