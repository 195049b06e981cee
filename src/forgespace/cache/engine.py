# Just over 500 lines: the streamed download-and-extract path joined the staging, fetch and
# publish helpers every mode shares; streamed.py already holds its thread.
"""The engine's shared machinery: what every isolation mode uses to stage, download, extract
and publish an entry (one object per cache, holding its collaborators).

Correctness by construction, not by timing:

* **One download per target** (shared and copy-on-write): a per-target ``flock`` in
  ``.forgespace/locks/{tid}.lock`` (``target_lock``). A hit holds it *shared* for a few
  microseconds (check published + record lease), a miss holds it *exclusive*, re-checks,
  downloads and publishes. gc takes it exclusive and non-blocking, so it can never evict
  between a hit's check and its lease. No global lock is held while downloading; waiters wait
  on the shared lock (``Waiter``), bounded by CACHE_LOCK_TIMEOUT.
* **Atomic publish**: everything is built in a staging directory (staging.py) and renamed
  into place. The completeness markers: shared -> ``{tid}/workspace`` exists (the ``target``
  is renamed first; a non-archive target is complete when ``{tid}/target`` exists and is not
  an archive); copy-on-write -> ``{tid}/shared`` exists (renamed at once); run directories
  -> ``{tid}/{rid}`` exists (renamed at once).
* **Leases** outlive the process (index rows); cleanup_cache ends them.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from forgespace.cache import fsops, staging
from forgespace.cache.hooks import NO_HOOKS, CacheHooks, Phase
from forgespace.cache.index import (
    CacheIndex,
    EntryRecord,
    LeaseOwner,
    LeaseRecord,
    read_run_mode,
)
from forgespace.cache.locks import flock
from forgespace.config import Settings
from forgespace.errors import (
    CacheAccessError,
    CacheFullError,
    CorruptArchiveError,
    ForgespaceError,
    LockTimeoutError,
    UnsafeArchiveError,
    is_nospace,
)
from forgespace.layout import RUN_MODE_FILE, CacheLayout

if TYPE_CHECKING:
    from collections.abc import Callable

    from forgespace.cache.archive import ExtractStats
    from forgespace.storage.base import ProgressFn, Store
    from forgespace.storage.retry import DownloadTap

log = logging.getLogger("forgespace.cache")

# The last part of an entry's index key, by kind (a run's is its run id).
_ENTRY_NAME = {"shared": "workspace", "cow-shared": "shared"}


@dataclass(frozen=True)
class GetResult:
    """What one get_target did: the path it returns and whether it downloaded."""

    path: str
    downloaded: bool
    mode: str
    target_id: str
    run_id: str | None
    #: Served from what was already cached: the same value the index counted (hits or
    #: misses) and Prometheus observes. A get that published copied or re-extracted what the
    #: cache held is a miss without a download.
    hit: bool = True


@dataclass
class Transfer:
    """One get_target's download, passed explicitly down the call: the caller's ``progress``
    callback and the bytes this call downloaded (for metrics)."""

    progress: ProgressFn | None = None
    downloaded_bytes: int = 0


def _dir_free(path: Path) -> int:
    try:
        st = os.statvfs(path)
    except OSError:
        return -1
    return st.f_bavail * st.f_frsize


class Engine:
    """Collaborators and primitives of one cache (keyword-only; see the module docstring)."""

    def __init__(
        self,
        *,
        settings: Settings,
        layout: CacheLayout,
        index: CacheIndex,
        store: Store | None = None,
        hooks: CacheHooks = NO_HOOKS,
    ) -> None:
        self.settings = settings
        self.layout = layout
        self.index = index
        self._store = store
        #: The test seam (forgespace.cache.hooks); gc and make_room report to it too.
        self.hooks = hooks
        self._root = layout.root
        self.cow_backend = settings.cow_backend
        # shared mode's hit path: ids whose object is not an archive (immutable), and the path
        # strings of each target computed once (pathlib was a quarter of a hit's cost)
        self._file_targets: set[str] = set()
        # How many entries this cache published (the facade refreshes gauges when it moved).
        self.publications = 0
        from forgespace.cache import metrics

        self._metrics = metrics
        self._hit_path_cache: dict[str, tuple[str, str]] = {}

    @property
    def store(self) -> Store:
        """The store (the one ``settings`` configures unless given: opened on first use, so
        cleanup and gc never need it)."""
        if self._store is None:
            from forgespace.storage import open_store

            self._store = open_store(self.settings)
        return self._store

    @store.setter
    def store(self, value: Store) -> None:
        self._store = value

    @contextlib.contextmanager
    def target_lock(
        self,
        target_id: str,
        *,
        exclusive: bool = True,
        timeout: float | None = None,
        blocking: bool = True,
        purpose: str = "",
    ) -> Iterator[None]:
        """Hold the per-target lock. Waits at most ``timeout`` (default
        CACHE_LOCK_TIMEOUT); ``blocking=False`` raises LockTimeoutError at once. A lock file
        that cannot be opened (read-only cache, permission denied) raises CacheAccessError; a
        planted one (symlink, hard link) UnsafeCacheEntryError."""
        held = contextlib.ExitStack()
        try:
            held.enter_context(
                flock(
                    self.layout.lock_path(target_id),
                    exclusive=exclusive,
                    timeout=self.settings.cache_lock_timeout if timeout is None else timeout,
                    blocking=blocking,
                    what=f"target {target_id}",
                    purpose=purpose,
                    root=self._root,
                )
            )
        except OSError as exc:
            if isinstance(exc, ForgespaceError):
                raise
            # fsops opens relative to a directory fd: name the whole path, not just the file
            exc.filename = str(self.layout.lock_path(target_id))
            raise CacheAccessError.from_os_error(exc, f"lock target {target_id}") from exc
        with held:  # only taking the lock is translated above, never the body's errors
            yield

    def _require_lease(self, lease: LeaseRecord, leased: list[bool]) -> None:
        """Record ``lease`` now if try_write skipped it (raises CacheFullError if still full)."""
        if not leased[0]:
            self.index.add_lease(lease)
            leased[0] = True

    # --- helpers shared by the modes ------------------------------------------------------
    def _run_dir_mode(self, tid: str, rid: str) -> str | None:
        """The mode that made run directory ``{tid}/{rid}``: as the run directory says (its
        mode file, written at publish), else from its shape when that tells (an isolated run
        keeps its download beside its workspace, a copy-on-write run only its own copy), else
        (a non-archive target) as the index recorded it; None if unknown."""
        recorded = read_run_mode(self.layout.run_dir(tid, rid))
        if recorded is not None:
            return recorded
        run_dir = self.layout.run_dir(tid, rid)
        if os.path.lexists(run_dir / "workspace"):
            return "isolated" if os.path.lexists(run_dir / "target") else "copy-on-write"
        entry = self.index.get(f"{tid}/{rid}")
        return entry.mode if entry is not None and entry.kind == "run" else None

    def _run_result(self, tid: str, rid: str) -> str | None:
        run_dir = self.layout.run_dir(tid, rid)
        ws = run_dir / "workspace"
        if os.path.lexists(ws):
            return str(ws)
        tgt = run_dir / "target"
        if run_dir.is_dir() and tgt.exists():
            return str(tgt)
        return None

    def _publish_run(
        self, tid: str, rid: str, stage: Path, name: str, nbytes: int, files: int, mode: str
    ) -> str:
        # The run directory says which mode made it (a rebuild and cleanup read it back).
        (stage / RUN_MODE_FILE).write_text(mode + "\n")
        self.hooks.reached(Phase.STAGED_RUN)
        run_dir = self.layout.run_dir(tid, rid)
        # The shared lock keeps gc from removing an empty {tid}/ between mkdir and rename;
        # copy-on-write callers already hold it (flock is per open file, so this nests).
        lock = (
            contextlib.nullcontext()
            if mode == "copy-on-write"
            else self.target_lock(tid, exclusive=False, purpose="publish run")
        )
        with lock:
            try:
                fsops.rename_into(self._root, stage, run_dir, keep_mode=False)
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                # The same run id raced itself; the first one wins, ours is discarded.
                existing = self._run_result(tid, rid)
                if existing is None:
                    raise
                return existing
            self._publish_entry(
                target_id=tid, kind="run", run_id=rid, mode=mode, nbytes=nbytes, files=files
            )
        return str(run_dir / name)

    def _publish_entry(
        self,
        *,
        target_id: str,
        kind: str,
        run_id: str | None = None,
        mode: str,
        nbytes: int,
        files: int,
    ) -> None:
        """Record a just-published entry in the index (its key follows from kind and ids)."""

        key = f"{target_id}/{_ENTRY_NAME.get(kind) or run_id}"
        now = time.time()
        self.index.publish(EntryRecord(key, target_id, kind, run_id, mode, nbytes, files, now, now))
        self.publications += 1
        self.hooks.reached(Phase.PUBLISHED)

    def _lease(
        self, lease_id: str, tid: str, rid: str | None, pins: tuple[str, ...], owner: LeaseOwner
    ) -> LeaseRecord:
        return self.index.new_lease(lease_id, tid, rid, pins, owner=owner)

    def _end_own_lease(self, lease: LeaseRecord) -> None:
        """A failed get ends the lease it took, unless a later attempt of the same run took
        it over meanwhile (the lease is then that attempt's, and so is the run directory)."""
        self.index.try_write(
            "end lease", self.index.end_lease, lease.lease_id, attempt=lease.attempt
        )

    def _staging(self, tid: str, purpose: str) -> contextlib.AbstractContextManager[Path]:
        return staging.staging_dir(self.layout, tid, purpose)

    def _fetch(self, tid: str, dest: Path, mode: str, cached: Path, transfer: Transfer) -> bool:
        """Put the target object at ``dest``: a copy of the verified download the other
        shared slot already holds (shared <-> copy-on-write), else a download. Under the
        target's exclusive lock, so ``cached`` cannot go away meanwhile. True if downloaded."""
        if cached.is_file():
            log.info(
                "Cache MISS: %s (mode: %s), copying the download already cached at %s",
                tid,
                mode,
                cached,
            )
            try:
                shutil.copyfile(cached, dest)
            except OSError as exc:
                self._raise_if_full(exc, dest.parent, cached.stat().st_size)
                raise
            return False
        self._download(tid, dest, mode, transfer)
        return True

    def _fetch_extracting(
        self,
        tid: str,
        dest: Path,
        workspace: Path,
        mode: str,
        cached: Path,
        transfer: Transfer,
        *,
        read_only: bool,
    ) -> tuple[bool, ExtractStats | None]:
        """``_fetch``, extracting a downloaded tar into ``workspace`` while it arrives: (True if
        downloaded, the extraction's stats or None when the caller still has to extract)."""
        from forgespace.cache import streamed

        if cached.is_file() or not streamed.ENABLED or not streamed.accepts_tap(self.store):
            return self._fetch(tid, dest, mode, cached, transfer), None
        return True, self._download_extracting(tid, dest, workspace, mode, transfer, read_only)

    def _download_extracting(
        self, tid: str, dest: Path, workspace: Path, mode: str, transfer: Transfer, read_only: bool
    ) -> ExtractStats | None:
        """Download to ``dest`` while a helper thread extracts a tar into ``workspace``
        (cache/streamed.py). Returns only once the download verified: the stats, or None when
        nothing was extracted (a zip, no archive, a restarted download)."""
        from forgespace.cache import streamed

        if not streamed.ENABLED or not streamed.accepts_tap(self.store):
            self._download(tid, dest, mode, transfer)
            return None
        job = streamed.StreamedExtraction(
            tid, workspace, max_bytes=self.settings.cache_max_size, read_only=read_only
        ).start()
        try:
            self._download(tid, dest, mode, transfer, tap=job.tap, check=job.check)
        except BaseException as exc:
            job.finish(download_ok=False)
            if not isinstance(exc, streamed.StopDownload):
                raise
        else:
            job.finish(download_ok=True)
        if job.error is None or job.stopped_by_download:
            return job.stats  # None after a restart: extracted again from the verified file
        with self._extract_errors(tid, workspace, src_size(dest)):
            raise job.error

    def _download(
        self,
        tid: str,
        dest: Path,
        mode: str,
        transfer: Transfer,
        *,
        tap: DownloadTap | None = None,
        check: Callable[[], None] | None = None,
    ) -> Path:
        """Download into ``dest``; ``tap`` lets a reader follow it and ``check`` (called with
        each chunk) may stop it by raising."""
        store = self.store
        info = store.stat_target(tid)
        self._make_room(info.size, tid)
        log.info("Cache MISS: %s (mode: %s), downloading from %s", tid, mode, store.display_name)
        first = [True]
        caller = transfer.progress

        def progress(done: int, total: int) -> None:
            if check is not None:
                check()
            if first[0] and done > 0:
                first[0] = False
                self.hooks.reached(Phase.DOWNLOAD)
            if caller is not None:
                caller(done, total)

        wanted = check is not None or self.hooks is not NO_HOOKS or caller is not None
        extra: dict[str, Any] = {} if tap is None else {"tap": tap}
        try:
            got = store.download_target(tid, dest, progress if wanted else None, **extra)
        except BaseException as exc:
            from forgespace.cache.streamed import StopDownload

            if isinstance(exc, Exception) and not isinstance(exc, StopDownload):
                self._metrics.observe_download_failure(exc)
            self._raise_if_full(exc, dest.parent, info.size)
            raise
        self.index.count("downloads")
        self.index.count("bytes_downloaded", got.size)
        transfer.downloaded_bytes = got.size
        self.hooks.reached(Phase.DOWNLOADED)
        return dest

    def _extracted(
        self, tid: str, src: Path, dest: Path, streamed: ExtractStats | None, *, read_only: bool
    ) -> ExtractStats | None:
        """The workspace's stats: ``streamed`` when extraction already happened while
        downloading, else ``src`` extracted into ``dest`` when it is an archive (None if not)."""
        if streamed is not None:
            return streamed
        if self._unpack_kind(src) is None:
            return None
        stats: ExtractStats = self._extract(tid, src, dest, read_only=read_only)
        return stats

    def _extract(self, tid: str, src: Path, dest: Path, *, read_only: bool = False) -> Any:
        """Extract safely; ``read_only`` (shared copies) sets 0444/0555 modes in the same pass.
        A refused archive is reported by its target id, not by the staging file's path."""
        from forgespace.cache import blobstore
        from forgespace.cache.archive import extract_archive

        with self._extract_errors(tid, dest, src_size(src)):
            if blobstore.is_manifest(src):  # stored incrementally: built from blobs
                return blobstore.materialise(self, tid, src, dest, read_only=read_only)
            return extract_archive(
                src, dest, max_bytes=self.settings.cache_max_size, read_only=read_only
            )

    @contextlib.contextmanager
    def _extract_errors(self, tid: str, dest: Path, size: int) -> Iterator[None]:
        """Report a refused archive by its target id, and a full disk as CacheFullError."""
        try:
            yield
        except (UnsafeArchiveError, CorruptArchiveError) as exc:
            # reported by its target id, not by the staging file's path
            where = f": member {exc.member!r}" if exc.member is not None else ""
            raise type(exc)(
                f"target {tid} refused: archive{where} {exc.reason}",
                archive=f"target {tid}",
                member=exc.member,
                reason=exc.reason,
            ) from exc
        except BaseException as exc:
            self._raise_if_full(exc, dest.parent, size)
            raise

    @staticmethod
    def _unpack_kind(src: Path) -> str | None:
        """What ``_extract`` makes a workspace from: an archive's kind, ``"manifest"`` for a
        target stored incrementally, None for a file target."""
        from forgespace.cache.archive import detect_archive
        from forgespace.cache.blobstore import is_manifest

        return detect_archive(src) or ("manifest" if is_manifest(src) else None)

    def _raise_if_full(self, exc: BaseException, stage: Path, size: int) -> None:
        if not is_nospace(exc, chain=True):
            return
        free = _dir_free(self.layout.root)
        # The staging dir is removed by _staging's exit; say so in the error.
        raise CacheFullError(
            errno.ENOSPC,
            f"no space left on device in the cache {self.layout.root} while writing "
            f"{fsops.shown(stage)} "
            f"(object {size} bytes, {free} bytes free now); the partial entry was removed "
            f"and the cache is unchanged",
        ) from exc

    def _make_room(self, size: int, tid: str) -> None:
        from forgespace.cache.eviction import make_room

        make_room(self, size, target_id=tid)

    def _discard(self, path: Path) -> None:
        """Rename into trash, then delete: nobody ever sees half a directory (fsops)."""
        fsops.discard(self._root, path)

    def _unmount_under(self, path: Path) -> None:
        if self.cow_backend != "overlay" and not (self.layout.overlay_dir).exists():
            return
        fsops.unmount_under([path], root=self._root)


class Waiter:
    """Bounded wait for a target's publication without queueing on the exclusive lock.

    Only one process needs the exclusive lock to publish; the others, once they see it
    busy, wait on the *shared* lock (granted to all of them together when the publisher
    releases) instead of passing the exclusive lock along one by one. The whole wait is
    bounded by CACHE_LOCK_TIMEOUT.
    """

    def __init__(self, cache: Engine, tid: str) -> None:
        self.cache = cache
        self.tid = tid
        self.timeout = cache.settings.cache_lock_timeout
        self.deadline = time.monotonic() + self.timeout
        self.delay = 0.001

    def remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def try_exclusive(self, stack: contextlib.ExitStack, purpose: str) -> bool:
        """Take the exclusive lock into ``stack`` if free; else back off briefly (False)."""
        try:
            stack.enter_context(
                self.cache.target_lock(self.tid, exclusive=True, blocking=False, purpose=purpose)
            )
            return True
        except LockTimeoutError as busy:
            if time.monotonic() >= self.deadline:
                raise LockTimeoutError(
                    f"timed out after {self.timeout:g}s waiting to publish target {self.tid}; "
                    f"{busy}",
                    lock_path=busy.lock_path,
                    holder=busy.holder,
                ) from None
            # Brief hit-path holders of the shared lock also make this fail: back off.
            time.sleep(self.delay)
            self.delay = min(self.delay * 2, 0.05)
            return False


def src_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
