"""The worker's local blob store, and materialising manifest targets from it.

A target stored as a manifest (``forgespace.storage.manifest``) is downloaded as that small
object (the engine's usual ``target`` file, under the target lock and in staging like any
download); then only the blobs this host lacks are fetched (``store.fetch_blobs``: coalesced
ranged reads, each blob's size and sha256 verified) into ``{CACHE_DIR}/.forgespace/blobs/``,
one read-only file per sha256, written as a temp file and renamed into place once verified.
The workspace is then built in staging by the archive extractor (the same path, link and size
rules as an archive: a manifest is untrusted input) with each file's data *copied* from its
blob by the clone helper (reflink where the filesystem can, else copy_file_range): a run can
never write through to a blob, and a blob can go without touching any workspace.

Blobs are a cache of the store. Materialisers hold the blob store's lock shared; ``sweep``
(gc) takes it exclusive and non-blocking (skipping the sweep when busy), so a blob is never
removed while a get is about to copy it. A blob referenced by the manifest of an entry the
index holds is never removed; unreferenced blobs go by CACHE_TTL (their mtime is touched on
each use) and, least recently used first, while the index's entries plus the blob store's
bytes exceed CACHE_MAX_SIZE.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from forgespace.cache import fsops
from forgespace.cache.archive import ExtractStats, _Extractor, _norm
from forgespace.cache.clone import _Copier
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
from forgespace.storage.manifest import FileEntry, Manifest, is_manifest, parse_manifest

if TYPE_CHECKING:
    from forgespace.cache.engine import Engine

log = logging.getLogger(__name__)

BLOBS = (fsops.META, "blobs")
LOCK_NAME = "_blobs.lock"  # never a target id's lock file (ids start with a letter or digit)
_TMP_SUFFIX = ".tmp"
_SRC_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_TMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

__all__ = ["blob_usage", "is_manifest", "materialise", "sweep"]


class _Sink:
    """A ``BlobSink`` writing verified blobs into the blob store's directory fd."""

    def __init__(self, bfd: int) -> None:
        self.bfd = bfd
        self.fd = -1
        self.tmp = ""
        self.digest = ""

    def begin(self, digest: str) -> None:
        self.digest = digest
        self.tmp = f".{digest}.{uuid.uuid4().hex[:8]}{_TMP_SUFFIX}"
        self.fd = os.open(self.tmp, _TMP_FLAGS, 0o444, dir_fd=self.bfd)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]

    def commit(self) -> None:
        os.close(self.fd)
        self.fd = -1
        os.rename(self.tmp, self.digest, src_dir_fd=self.bfd, dst_dir_fd=self.bfd)

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp, dir_fd=self.bfd)


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
    for e in m.entries:  # refuse bad names before fetching anything
        _checked_name(e.path if isinstance(e, FileEntry) else e[1], str(manifest_file))
    need = sum({f.sha256: f.size for f in m.files}.values())
    if need > limit:
        raise UnsafeMemberError(
            archive=str(manifest_file), member="",
            reason=f"would take the extracted size to {need} bytes, above the limit of "
            f"{limit} bytes (CACHE_MAX_SIZE)",
        )  # fmt: skip
    root = engine.layout.root
    sweep(engine, incoming=need)  # unreferenced blobs make room first (skipped when busy)
    with (
        flock(_lock_path(engine), exclusive=False, root=root, what="the blob store",
              timeout=engine.settings.cache_lock_timeout, purpose=f"materialise {tid}"),
        fsops.dir_fd(root, BLOBS, create=True) as bfd,
    ):  # fmt: skip
        present = set(os.listdir(bfd))
        missing = [f for f in m.files if f.size and f.sha256 not in present]
        fetch = sum({f.sha256: f.size for f in missing}.values())
        engine._make_room(fetch + blob_usage(engine)[0], tid)
        if missing:
            store = engine.store
            if not hasattr(store, "fetch_blobs"):
                raise StorageError(f"{what} is a manifest but {store!r} cannot fetch blobs")
            try:
                got = store.fetch_blobs(missing, _Sink(bfd))
            except OSError as exc:
                engine._raise_if_full(exc, dest.parent, fetch)
                raise
            engine.index.count("bytes_downloaded", got)
            log.info("%s: fetched %d blob(s), %d bytes", what, len(missing), got)
        return _build(m, bfd, str(manifest_file), dest, limit, read_only)


def _checked_name(name: str, src: str) -> str:
    try:
        return _norm(name, "member")
    except UnsafeArchiveError as exc:
        raise UnsafeMemberError(archive=src, member=name, reason=exc.reason) from exc


def _build(
    m: Manifest, bfd: int, src: str, dest: Path, limit: int, read_only: bool
) -> ExtractStats:
    """The extractor's rules, with file data copied from blobs (see the module docstring)."""
    os.mkdir(dest, 0o755)
    x = _Extractor(src, str(dest), limit, read_only)
    copier = _Copier(writable=False, workers=1)
    now = time.time()
    try:
        for e in m.entries:
            name = e.path if isinstance(e, FileEntry) else e[1]
            x.enter(name)
            rel = _checked_name(name, src)
            if isinstance(e, FileEntry):
                _copy_file(x, copier, bfd, rel, e, now)
            elif e[0] == "d":
                x.directory(rel, 0o755, 0)
            else:
                x.symlink(rel, e[2], 0)  # type: ignore[misc]
        stats = x.finish()
    except BaseException as exc:
        x.close()
        fsops.remove(dest.parent, dest)
        if isinstance(exc, OSError) and is_nospace(exc):
            raise CacheFullError(exc.errno, f"no space left materialising {dest}") from exc
        raise
    x.close()
    return stats


def _copy_file(
    x: _Extractor, copier: _Copier, bfd: int, rel: str, f: FileEntry, now: float
) -> None:
    x._budget(f.size)
    perm = 0o755 if f.executable else 0o644
    if x.read_only:
        perm = 0o555 if f.executable else 0o444
    fd = x._create(rel, perm)
    try:
        if f.size:
            sfd = os.open(f.sha256, _SRC_FLAGS, dir_fd=bfd)
            try:
                st = os.fstat(sfd)
                if not stat.S_ISREG(st.st_mode) or st.st_size != f.size:
                    raise IntegrityError(
                        f"the cached blob {f.sha256} of {rel!r} has {st.st_size} bytes, "
                        f"expected {f.size}; `forgespace cache gc` removes damaged blobs"
                    )
                copier._data(sfd, fd, f.size)
                os.utime(sfd, (now, now))  # its last use, for TTL/LRU
            finally:
                os.close(sfd)
        x._count(f.size)
        x._finish_file(fd, rel, perm, 0, f.size)
    finally:
        os.close(fd)


def blob_usage(engine: Any) -> tuple[int, list[tuple[float, str, int]]]:
    """(bytes, [(last use, digest, bytes)]) of the blob store (temp files included)."""
    out: list[tuple[float, str, int]] = []
    try:
        bfd = fsops.open_dir(engine.layout.root, BLOBS)
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


def sweep(engine: Any, *, incoming: int = 0) -> tuple[int, int]:
    """Remove unreferenced blobs: unused for CACHE_TTL, then least recently used while the
    cache (entries + blobs + ``incoming``) exceeds CACHE_MAX_SIZE. Skipped (0, 0) when a
    materialisation holds the blob store. Returns (blobs removed, bytes freed)."""
    settings = engine.settings
    total, blobs = blob_usage(engine)
    if not blobs:
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
        with lock:
            try:
                live = _live_digests(engine)
            except IntegrityError as exc:
                log.warning("blob sweep skipped: %s", exc)
                return 0, 0
            now = time.time()
            over = engine.index.total_bytes() + total + incoming - settings.cache_max_size
            removed = freed = 0
            with fsops.dir_fd(engine.layout.root, BLOBS) as bfd:
                for used, digest, size in sorted(blobs):
                    dead = digest.endswith(_TMP_SUFFIX)  # a writer killed mid-blob
                    if digest in live or not (dead or used < now - settings.cache_ttl or over > 0):
                        continue
                    try:
                        os.unlink(digest, dir_fd=bfd)
                    except FileNotFoundError:
                        continue
                    removed, freed, over = removed + 1, freed + size, over - size
    except LockTimeoutError:
        return 0, 0
    except OSError as exc:
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            return 0, 0
        raise
    if removed:
        log.info("blob store: removed %d unreferenced blob(s), %d bytes", removed, freed)
    return removed, freed
