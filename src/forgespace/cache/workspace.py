"""The workspace cache engine: ``get_target`` / ``cleanup_cache`` in three isolation modes.

Correctness by construction, not by timing:

* **One download per target** (shared and copy-on-write): a per-target ``flock`` in
  ``.forgespace/locks/{tid}.lock``. A hit holds it *shared* for a few microseconds (check
  published + record lease), a miss holds it *exclusive*, re-checks, downloads and
  publishes. gc takes it exclusive and non-blocking, so it can never evict between a
  hit's check and its lease. No global lock is held while downloading.
* **Atomic publish**: everything is built in a staging directory under
  ``.forgespace/tmp`` (same filesystem) and renamed into place. The completeness markers:
  shared -> ``{tid}/workspace`` exists (the ``target`` is renamed first; a non-archive
  target is complete when ``{tid}/target`` exists and is not an archive);
  copy-on-write -> ``{tid}/shared`` exists (the whole directory is renamed at once);
  run directories -> ``{tid}/{rid}`` exists (renamed at once).
* **Leftovers of dead processes**: a staging directory is named
  ``{tid}~{purpose}~{owner token}~{random}`` and its owner holds an exclusive flock on
  ``.forgespace/owners/{token}.lock`` for its whole life. When that lock can be taken the
  owner is dead (the kernel released it) and the staging directory is garbage, whatever
  its age. ``.forgespace/trash/*`` is always garbage (already invisible). A shared
  ``target`` without its ``workspace`` is re-extracted by the next get.
  ``sweep_leftovers()`` removes all of this; the next get of a target sweeps that target.
* **Leases** outlive the process (index rows); cleanup_cache ends them.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import socket
import stat
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from forgespace.cache import fsops
from forgespace.cache import manifest as mf
from forgespace.cache.locks import (
    OwnerToken,
    flock,
    owner_is_dead,
    parse_staging_name,
    purpose_matches,
    remove_dead_owner,
    staging_name,
)
from forgespace.config import Settings
from forgespace.errors import (
    CacheAccessError,
    CacheFullError,
    CleanupRefusedError,
    ForgespaceError,
    IntegrityError,
    InvalidIdError,
    LockTimeoutError,
    UnsafeArchiveError,
)
from forgespace.layout import CacheLayout, IsolationMode, validate_id

if TYPE_CHECKING:
    from forgespace.cache.index import CacheIndex, LeaseRecord
    from forgespace.storage.base import ProgressFn, Store

log = logging.getLogger("forgespace.cache")

_HOST = socket.gethostname()
_NOSPACE = (errno.ENOSPC, errno.EDQUOT)

# Test hook: FORGESPACE_FAULT_PAUSE="phase[,phase...]" makes this process announce the
# phase (a file in FORGESPACE_FAULT_SIGNAL_DIR) and sleep there, so crash tests can
# SIGKILL it at a precise point. Phases: download (after the first bytes arrived),
# downloaded, extracted, shared-target-published, cow-copied, staged-run.
_FAULT_ENV = "FORGESPACE_FAULT_PAUSE"
_FAULT_DIR_ENV = "FORGESPACE_FAULT_SIGNAL_DIR"


@dataclass(frozen=True)
class GetResult:
    """What one get_target did: the path it returns and whether it downloaded."""

    path: str
    downloaded: bool
    mode: str
    target_id: str
    run_id: str | None


def _is_nospace(exc: BaseException) -> bool:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in _NOSPACE:
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def _dir_free(path: Path) -> int:
    try:
        st = os.statvfs(path)
    except OSError:
        return -1
    return st.f_bavail * st.f_frsize


class WorkspaceCache:
    """Workspaces for workflow runs under one CACHE_DIR (see the module docstring).

    ``store`` defaults to the one ``settings`` configures (opened on first use, so
    cleanup and gc never need the store).
    """

    def __init__(
        self, settings: Settings, store: Store | None = None, *, read_only: bool = False
    ) -> None:
        """``read_only`` (``cache verify`` without ``--repair``): create nothing; CACHE_DIR
        and its ``.forgespace`` must exist (CacheAccessError otherwise)."""
        from forgespace.cache.index import CacheIndex, make_cache_dirs

        self.settings = settings
        self.layout = CacheLayout(Path(settings.cache_dir))
        self._store = store
        self._root = self.layout.root
        if not read_only:
            make_cache_dirs(
                self.layout, (self.layout.locks_dir, self.layout.tmp_dir, self.layout.trash_dir)
            )
        self._owners_dir = self.layout.meta_dir / "owners"
        self.index: CacheIndex = CacheIndex(
            self.layout, lease_ttl=settings.cache_lease_ttl, create=not read_only
        )
        self._tls = threading.local()
        self._file_targets: set[str] = set()  # ids whose object is not an archive (immutable)
        self._hit_path_cache: dict[str, tuple[str, str]] = {}
        # Imported here, not on the first get: prometheus_client costs ~80 ms of CPU, which
        # 16 processes waking up together for their first hit would otherwise pay at once.
        try:
            from forgespace.cache import metrics
        except ImportError:  # metrics are optional (prometheus_client missing)
            metrics = None  # type: ignore[assignment]
        self._metrics: Any = metrics
        faults = os.environ.get(_FAULT_ENV, "")
        self._faults = frozenset(p for p in faults.split(",") if p)
        self.cow_backend = settings.cow_backend
        if self.cow_backend == "overlay" and not read_only:
            from forgespace.cache import overlay

            # Fail at start-up, not at the first copy-on-write run.
            overlay.probe_overlay(self.layout.overlay_dir / ".probe")
            log.info("copy-on-write backend: overlay (mount per run)")
        else:
            log.debug("copy-on-write backend: copy (copy_file_range/reflink per file)")

    # --- store ---------------------------------------------------------------------------
    @property
    def store(self) -> Store:
        if self._store is None:
            from forgespace.storage import open_store

            self._store = open_store(self.settings)
        return self._store

    @store.setter
    def store(self, value: Store) -> None:
        self._store = value

    # --- locks ---------------------------------------------------------------------------
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

    # --- public API ----------------------------------------------------------------------
    def get_target(
        self,
        target_id: str,
        run_id: str | None = None,
        workspace_isolation: str | IsolationMode = "isolated",
    ) -> str:
        """Return the path of the run's workspace (or of the target file for a
        non-archive target), downloading at most once per target for shared and
        copy-on-write. See docs in README `## Workspace cache`."""
        return self.get_target_report(target_id, run_id, workspace_isolation).path

    def get_target_report(
        self,
        target_id: str,
        run_id: str | None = None,
        workspace_isolation: str | IsolationMode = "isolated",
        progress: ProgressFn | None = None,
    ) -> GetResult:
        """Like get_target, and tell whether this call downloaded.

        ``progress(bytes_done, bytes_total)`` is called from this thread while this call
        downloads the object (not while it waits for another process's download)."""
        mode = IsolationMode.parse(workspace_isolation)
        validate_id(target_id, "target_id")
        if run_id is not None:
            validate_id(run_id, "run_id")
        elif mode is not IsolationMode.SHARED:
            raise InvalidIdError(
                f"run_id is required for workspace_isolation {mode.value!r} "
                "(only 'shared' accepts none)"
            )
        t0 = time.perf_counter()
        self._tls.downloaded_bytes = 0
        self._tls.progress = progress
        self._tls.published = False
        if mode is IsolationMode.SHARED:
            res = self._get_shared(target_id, run_id)
        elif mode is IsolationMode.COPY_ON_WRITE:
            assert run_id is not None
            res = self._get_cow(target_id, run_id)
        else:
            assert run_id is not None
            res = self._get_isolated(target_id, run_id)
        self._observe(res, time.perf_counter() - t0)
        if self._tls.published:
            # After the lease is taken, so live leases count this run. A hit publishes
            # nothing and skips this (its lease shows at the next publish/cleanup/sweep).
            self._refresh_gauges()
        return res

    # --- shared --------------------------------------------------------------------------
    def _shared_complete(self, tid: str) -> str | None:
        """Path a shared hit returns, or None if not (completely) published. O(1)."""
        ws, stamp_file = self._hit_paths(tid)
        try:
            st = os.stat(ws)
        except FileNotFoundError:
            st = None
        if st is not None:
            stamp = mf.read_stamp(stamp_file)
            if stamp is None:
                # published by a process killed before it wrote the stamp: record it now
                with contextlib.suppress(OSError):
                    mf.write_stamp(Path(stamp_file), Path(ws))
            elif stamp != mf.stamp_of(st):
                raise _Tampered(ws)
            return ws
        target = self.layout.shared_target(tid)
        if tid in self._file_targets:
            return str(target) if target.exists() else None
        if not target.exists():
            return None
        from forgespace.cache.archive import detect_archive

        if detect_archive(target) is None:
            self._file_targets.add(tid)
            return str(target)
        return None  # an archive whose workspace is not (yet/any more) there

    def _hit_paths(self, tid: str) -> tuple[str, str]:
        # Strings computed once per target: pathlib arithmetic was a quarter of a hit's cost.
        got = self._hit_path_cache.get(tid)
        if got is None:
            if len(self._hit_path_cache) > 4096:
                self._hit_path_cache.clear()
            got = (
                str(self.layout.shared_workspace(tid)),
                str(mf.stamp_path(self.layout.meta_dir, tid, "shared")),
            )
            self._hit_path_cache[tid] = got
        return got

    def _get_shared(self, tid: str, rid: str | None) -> GetResult:
        key = f"{tid}/workspace"
        lease = self._lease(f"{key}#{rid}", tid, rid, (key,)) if rid is not None else None
        tampered = False
        waiter = _Waiter(self, tid)
        while True:
            try:
                with self.target_lock(tid, exclusive=False, timeout=waiter.remaining()):
                    path = self._shared_complete(tid)
                    if path is not None:
                        # a full disk must not cost the hit: the record is skipped, with a warning
                        self.index.try_write("hit", self.index.access, key, lease=lease, hit=True)
                        log.info("Cache HIT: %s (mode: shared)", tid)
                        return GetResult(path, False, "shared", tid, rid)
            except _Tampered as t:
                tampered = True
                log.warning(
                    "shared workspace %s was modified since it was published (noticed by run "
                    "%s); re-extracting it from the cached target",
                    t.args[0],
                    rid or "(no run id)",
                )
            with contextlib.ExitStack() as held:
                if not waiter.try_exclusive(held, "download shared"):
                    continue  # someone else is publishing: wait for it on the shared lock
                try:
                    path = self._shared_complete(tid)
                except _Tampered:
                    path = None
                    self._discard(self.layout.shared_workspace(tid))
                if path is not None:
                    self.index.try_write("hit", self.index.access, key, lease=lease, hit=True)
                    log.info("Cache HIT: %s (mode: shared)", tid)
                    return GetResult(path, False, "shared", tid, rid)
                downloaded = self._publish_shared(tid, tampered)
                path = self._shared_complete(tid)
                if path is None:  # pragma: no cover - we just published under the lock
                    raise ForgespaceError(f"shared workspace of {tid} vanished after publish")
                self.index.access(key, lease=lease, hit=False)
                return GetResult(path, downloaded, "shared", tid, rid)

    def _publish_shared(self, tid: str, repair: bool) -> bool:
        """Under the exclusive lock: make {tid}/target and {tid}/workspace complete.
        Returns True when it downloaded (False when it re-extracted a cached target)."""
        from forgespace.cache.archive import detect_archive

        self.sweep_leftovers(tid)
        target = self.layout.shared_target(tid)
        with self._staging(tid, "shared") as stage:
            downloaded = False
            if target.exists():
                # Cached download whose workspace is missing (crash between the two renames,
                # a half-done eviction, or tampering): re-extract, no new download.
                log.info("Cache MISS: %s (mode: shared), extracting the cached download", tid)
                src = target
            else:
                src = stage / "target"
                downloaded = self._fetch(tid, src, "shared", self.layout.cow_shared_target(tid))
                os.chmod(src, 0o444)
            fetched = downloaded or src != target
            kind = detect_archive(src)
            stats = None
            if kind is not None:
                stats = self._extract(tid, src, stage / "workspace", read_only=True)
                self._fault("extracted")
                mf.write_manifest(
                    mf.manifest_path(self.layout.meta_dir, tid, "shared"), stats.manifest
                )
            if fetched:
                fsops.rename_into(self._root, stage / "target", target)
                self._fault("shared-target-published")
            if kind is not None:
                ws = self.layout.shared_workspace(tid)
                fsops.rename_into(self._root, stage / "workspace", ws)
                mf.write_stamp(mf.stamp_path(self.layout.meta_dir, tid, "shared"), ws)
            else:
                self._file_targets.add(tid)
            size = target.stat().st_size
            now = time.time()
            self._publish_entry(
                f"{tid}/workspace",
                tid,
                "shared",
                None,
                "shared",
                size + (stats.bytes if stats else 0),
                (stats.files if stats else 0) + 1,
                now,
            )
            if repair:
                self.index.count("repairs")
        return downloaded

    # --- copy-on-write -------------------------------------------------------------------
    def _get_cow(self, tid: str, rid: str) -> GetResult:
        run_key = f"{tid}/{rid}"
        shared_key = f"{tid}/shared"
        pins = (run_key, shared_key) if self.cow_backend == "overlay" else (run_key,)
        lease = self._lease(run_key, tid, rid, pins)
        # Before staging, so gc never takes the run directory we are about to create. On a
        # full cache a hit (the run's directory exists) is served without it; anything that
        # creates a directory records it first (_require_lease).
        leased = [self.index.try_write("lease", self.index.add_lease, lease)]
        try:
            return self._get_cow_locked(tid, rid, lease, leased)
        except BaseException:
            self.index.try_write("end lease", self.index.end_lease, lease.lease_id)
            raise

    def _require_lease(self, lease: LeaseRecord, leased: list[bool]) -> None:
        """Record ``lease`` now if try_write skipped it (raises CacheFullError if still full)."""
        if not leased[0]:
            self.index.add_lease(lease)
            leased[0] = True

    def _get_cow_locked(
        self, tid: str, rid: str, lease: LeaseRecord, leased: list[bool]
    ) -> GetResult:
        shared_dir = self.layout.cow_shared_dir(tid)
        published = downloaded = False
        waiter = _Waiter(self, tid)
        while True:
            with self.target_lock(tid, exclusive=False, timeout=waiter.remaining()):
                existing = self._run_result(tid, rid)
                if existing is not None and self._lost_overlay(existing):
                    existing = self._remount_overlay(tid, rid, Path(existing))
                # The same run asking again (a retried activity). A run directory an isolated
                # run of this run id made still gets the copy-on-write download beside it.
                if existing is not None and (
                    shared_dir.is_dir() or self._run_dir_mode(tid, rid) != "isolated"
                ):
                    self.index.try_write(
                        "hit", self.index.access, f"{tid}/{rid}", lease=lease, hit=not published
                    )
                    log.info("Cache HIT: %s (mode: copy-on-write)", tid)
                    return GetResult(existing, downloaded, "copy-on-write", tid, rid)
                self._require_lease(lease, leased)
                if shared_dir.is_dir():
                    # The shared lock keeps gc off shared/ while we copy from it.
                    path = self._make_cow_run(tid, rid)
                    # One access (one hit or miss counted) on the shared copy records the
                    # lease; the run entry was just published with last_access = now.
                    self.index.access(f"{tid}/shared", lease=lease, hit=not published)
                    if not published:
                        log.info("Cache HIT: %s (mode: copy-on-write)", tid)
                    return GetResult(path, downloaded, "copy-on-write", tid, rid)
            with contextlib.ExitStack() as held:
                if waiter.try_exclusive(held, "download copy-on-write") and not shared_dir.is_dir():
                    downloaded = self._publish_cow_shared(tid)
                    published = True

    def _lost_overlay(self, path: str) -> bool:
        ws = Path(path)
        return (
            ws.name == "workspace"
            and (self.layout.overlay_dir / ws.parent.parent.name / ws.parent.name).is_dir()
            and not os.path.ismount(ws)
        )

    def _remount_overlay(self, tid: str, rid: str, ws: Path) -> str | None:
        """A run's overlay is gone (e.g. after a reboot) but its upper layer is still on disk:
        mount it again so the run keeps its writes; if that fails, drop the run directory."""
        from forgespace.cache import overlay

        base = self.layout.overlay_dir / tid / rid
        lower = self.layout.cow_shared_workspace(tid)
        try:
            if not lower.is_dir():
                raise FileNotFoundError(lower)
            overlay.mount_overlay(lower, base / "upper", base / "work", ws)
            log.warning("overlay of run %s of %s was no longer mounted; mounted it again", rid, tid)
            return str(ws)
        except (OSError, ForgespaceError) as exc:
            log.warning("overlay of run %s of %s is lost (%s); rebuilding the run", rid, tid, exc)
            self._discard(self.layout.run_dir(tid, rid))
            fsops.remove(self._root, base)
            return None

    def _publish_cow_shared(self, tid: str) -> bool:
        from forgespace.cache.archive import detect_archive

        self.sweep_leftovers(tid)
        with self._staging(tid, "cow") as stage:
            src = stage / "target"
            downloaded = self._fetch(tid, src, "copy-on-write", self.layout.shared_target(tid))
            os.chmod(src, 0o444)
            stats = None
            if detect_archive(src) is not None:
                stats = self._extract(tid, src, stage / "workspace", read_only=True)
                self._fault("extracted")
                mf.write_manifest(
                    mf.manifest_path(self.layout.meta_dir, tid, "cow"), stats.manifest
                )
            fsops.rename_into(self._root, stage, self.layout.cow_shared_dir(tid))
            if stats is not None:
                mf.write_stamp(
                    mf.stamp_path(self.layout.meta_dir, tid, "cow"),
                    self.layout.cow_shared_workspace(tid),
                )
            self._publish_entry(
                f"{tid}/shared",
                tid,
                "cow-shared",
                None,
                "copy-on-write",
                src_size(self.layout.cow_shared_target(tid)) + (stats.bytes if stats else 0),
                (stats.files if stats else 0) + 1,
                time.time(),
            )
        return downloaded

    def _make_cow_run(self, tid: str, rid: str) -> str:
        """Under the shared target lock: build the run's private copy and publish it."""
        shared_ws = self.layout.cow_shared_workspace(tid)
        shared_target = self.layout.cow_shared_target(tid)
        self.sweep_leftovers(tid)
        with self._staging(tid, f"run-{rid}") as stage:
            t0 = time.perf_counter()
            nbytes = files = 0
            if shared_ws.is_dir():
                if self.cow_backend == "overlay":
                    method = self._stage_overlay(tid, rid, shared_ws, stage / "workspace")
                else:
                    from forgespace.cache.clone import materialize_copy

                    try:
                        cs = materialize_copy(shared_ws, stage / "workspace", writable=True)
                    except OSError as exc:
                        self._raise_if_full(exc, stage, 0)
                        raise
                    method, nbytes, files = cs.method, cs.bytes, cs.files
                name = "workspace"
            else:
                shutil.copyfile(shared_target, stage / "target")
                os.chmod(stage / "target", 0o644)
                method, nbytes, files, name = "copy", shared_target.stat().st_size, 1, "target"
            self._fault("cow-copied")
            log.info(
                "copy-on-write run %s of %s materialised by %s in %.1f ms",
                rid,
                tid,
                method,
                (time.perf_counter() - t0) * 1000,
            )
            path = self._publish_run(tid, rid, stage, name, nbytes, files, "copy-on-write")
        return path

    def _stage_overlay(self, tid: str, rid: str, lower: Path, mountpoint: Path) -> str:
        from forgespace.cache import overlay

        base = self.layout.overlay_dir / tid / rid
        if os.path.lexists(base):  # leftover of an earlier, dead attempt of this very run
            fsops.unmount_under([base], root=self._root)
            fsops.remove(self._root, base)
        with fsops.dir_fd(self._root, fsops.parts_under(self._root, base), create=True) as bfd:
            os.mkdir("upper", dir_fd=bfd)
            os.mkdir("work", dir_fd=bfd)
        mountpoint.mkdir()
        try:
            overlay.mount_overlay(lower, base / "upper", base / "work", mountpoint)
        except BaseException:
            fsops.remove(self._root, base)
            raise
        return "overlay"

    # --- isolated ------------------------------------------------------------------------
    def _get_isolated(self, tid: str, rid: str) -> GetResult:
        run_key = f"{tid}/{rid}"
        lease = self._lease(run_key, tid, rid, (run_key,))
        leased = [self.index.try_write("lease", self.index.add_lease, lease)]
        try:
            existing = self._run_result(tid, rid)
            if existing is not None:
                self.index.try_write("hit", self.index.access, run_key, lease=lease, hit=True)
                log.info("Cache HIT: %s (mode: isolated)", tid)
                return GetResult(existing, False, "isolated", tid, rid)
            self._require_lease(lease, leased)
            self.sweep_leftovers(tid)
            with self._staging(tid, f"run-{rid}") as stage:
                src = self._download(tid, stage / "target", "isolated")
                from forgespace.cache.archive import detect_archive

                nbytes, files, name = src.stat().st_size, 1, "target"
                if detect_archive(src) is not None:
                    stats = self._extract(tid, src, stage / "workspace")
                    self._fault("extracted")
                    nbytes, files, name = nbytes + stats.bytes, files + stats.files, "workspace"
                path = self._publish_run(tid, rid, stage, name, nbytes, files, "isolated")
            self.index.access(run_key, lease=lease, hit=False)
            return GetResult(path, True, "isolated", tid, rid)
        except BaseException:
            self.index.try_write("end lease", self.index.end_lease, lease.lease_id)
            raise

    # --- helpers shared by the modes ------------------------------------------------------
    def _run_dir_mode(self, tid: str, rid: str) -> str | None:
        """The mode that made run directory ``{tid}/{rid}``: from its shape when that tells
        (an isolated run keeps its download beside its workspace, a copy-on-write run only its
        own copy), else (a non-archive target) as the index recorded it; None if unknown."""
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
        self._fault("staged-run")
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
            self._publish_entry(f"{tid}/{rid}", tid, "run", rid, mode, nbytes, files, time.time())
        return str(run_dir / name)

    def _publish_entry(
        self,
        key: str,
        tid: str,
        kind: str,
        rid: str | None,
        mode: str,
        nbytes: int,
        files: int,
        now: float,
    ) -> None:
        from forgespace.cache.index import EntryRecord

        self.index.publish(EntryRecord(key, tid, kind, rid, mode, nbytes, files, now, now))
        self._tls.published = True

    def _lease(
        self, lease_id: str, tid: str, rid: str | None, pins: tuple[str, ...]
    ) -> LeaseRecord:
        from forgespace.cache.index import LeaseRecord

        now = time.time()
        return LeaseRecord(
            lease_id,
            tid,
            rid,
            pins,
            f"{_HOST}:{os.getpid()}",
            now,
            now + self.settings.cache_lease_ttl,
        )

    @contextlib.contextmanager
    def _staging(self, tid: str, purpose: str) -> Iterator[Path]:
        """A fresh staging dir owned by this process; removed on exit unless renamed away."""
        token = OwnerToken.for_dir(self._owners_dir, root=self._root).token
        name = staging_name(tid, purpose, token, uuid.uuid4().hex[:8])
        stage = self.layout.tmp_dir / name
        with fsops.dir_fd(
            self._root, fsops.parts_under(self._root, stage.parent), create=True
        ) as t:
            os.mkdir(name, dir_fd=t)
        try:
            yield stage
        finally:
            if os.path.lexists(stage):
                self._unmount_under(stage)
                self._discard(stage)

    def _fetch(self, tid: str, dest: Path, mode: str, cached: Path) -> bool:
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
        self._download(tid, dest, mode)
        return True

    def _download(self, tid: str, dest: Path, mode: str) -> Path:
        store = self.store
        info = store.stat_target(tid)
        self._make_room(info.size, tid)
        log.info("Cache MISS: %s (mode: %s), downloading from %s", tid, mode, store.display_name)
        first = [True]
        caller: ProgressFn | None = getattr(self._tls, "progress", None)

        def progress(done: int, total: int) -> None:
            if first[0] and done > 0:
                first[0] = False
                self._fault("download")
            if caller is not None:
                caller(done, total)

        try:
            got = store.download_target(
                tid, dest, progress if (self._faults or caller is not None) else None
            )
        except BaseException as exc:
            if isinstance(exc, Exception) and self._metrics is not None:
                self._metrics.observe_download_failure(exc)
            self._raise_if_full(exc, dest.parent, info.size)
            raise
        self.index.count("downloads")
        self.index.count("bytes_downloaded", got.size)
        self._tls.downloaded_bytes = got.size
        self._fault("downloaded")
        return dest

    def _extract(self, tid: str, src: Path, dest: Path, *, read_only: bool = False) -> Any:
        """Extract safely; ``read_only`` (shared copies) sets 0444/0555 modes in the same pass.
        A refused archive is reported by its target id, not by the staging file's path."""
        from forgespace.cache.archive import extract_archive

        try:
            return extract_archive(
                src, dest, max_bytes=self.settings.cache_max_size, read_only=read_only
            )
        except (UnsafeArchiveError, IntegrityError) as exc:
            why = str(exc).replace(f"archive {src}", "archive").replace(f"{src} ", "it ")
            raise type(exc)(f"target {tid} refused: {why}") from exc
        except BaseException as exc:
            self._raise_if_full(exc, dest.parent, src.stat().st_size)
            raise

    def _raise_if_full(self, exc: BaseException, stage: Path, size: int) -> None:
        if not _is_nospace(exc):
            return
        free = _dir_free(self.layout.root)
        # The staging dir is removed by _staging's exit; say so in the error.
        raise CacheFullError(
            errno.ENOSPC,
            f"no space left on device in the cache {self.layout.root} while writing {stage} "
            f"(object {size} bytes, {free} bytes free now); the partial entry was removed "
            f"and the cache is unchanged",
        ) from exc

    def _make_room(self, size: int, tid: str) -> None:
        try:
            from forgespace.cache import eviction
        except ImportError:
            return
        make_room = getattr(eviction, "make_room", None)
        if make_room is not None:
            make_room(self, size, target_id=tid)

    def _observe(self, res: GetResult, seconds: float) -> None:
        metrics = self._metrics
        if metrics is None:
            return
        metrics.observe_get(
            res.mode,
            hit=not res.downloaded,
            seconds=seconds,
            downloaded_bytes=getattr(self._tls, "downloaded_bytes", 0),
        )

    def _refresh_gauges(self) -> None:
        """Cache size, entries and live leases gauges from the index (SQL aggregates)."""
        if self._metrics is None:
            return
        try:
            self._metrics.refresh_from_index(self.index, self.settings.cache_max_size)
        except Exception as exc:  # the gauges must never fail the call that changed the cache
            log.debug("metrics: could not refresh the cache gauges: %s", exc)

    def _fault(self, phase: str) -> None:
        if phase not in self._faults:
            return
        sig_dir = Path(os.environ.get(_FAULT_DIR_ENV, str(self.layout.meta_dir)))
        sig_dir.mkdir(parents=True, exist_ok=True)
        (sig_dir / f"{phase}.{os.getpid()}").write_text(phase)
        time.sleep(120)  # bounded: the test kills us long before

    def _discard(self, path: Path) -> None:
        """Rename into trash, then delete: nobody ever sees half a directory (fsops)."""
        fsops.discard(self._root, path)

    def _unmount_under(self, path: Path) -> None:
        if self.cow_backend != "overlay" and not (self.layout.overlay_dir).exists():
            return
        fsops.unmount_under([path], root=self._root)

    # --- leftovers -----------------------------------------------------------------------
    def sweep_leftovers(self, target_id: str | None = None) -> list[Path]:
        """Remove staging dirs of dead processes (of ``target_id`` or all), the trash,
        and (for a full sweep) dead owner lock files. Returns what was removed.

        Safe at any time and without the target lock: a staging dir is only removed
        when its owner's lock is free, i.e. its owner process is dead.
        """
        removed: list[Path] = []
        tokens_alive: set[str] = set()
        names = fsops.listdir(self._root, fsops.parts_under(self._root, self.layout.tmp_dir))
        dead_cache: dict[str, bool] = {}
        for name in names:
            parsed = parse_staging_name(name)
            if parsed is None:
                continue
            tid, purpose, token = parsed
            if target_id is not None and tid != target_id:
                tokens_alive.add(token)
                continue
            dead = dead_cache.get(token)
            if dead is None:
                dead = dead_cache[token] = owner_is_dead(self._owners_dir, token, root=self._root)
            if not dead:
                tokens_alive.add(token)
                continue
            p = self.layout.tmp_dir / name
            self._unmount_under(p)
            self._discard(p)
            removed.append(p)
            rid = purpose.removeprefix("run-")
            if purpose.startswith("run-") and "#" in rid:  # a long run id, cut in the name
                with contextlib.suppress(OSError):
                    ov_tid = fsops.parts_under(self._root, self.layout.overlay_dir / tid)
                    for child in fsops.listdir(self._root, ov_tid):
                        if purpose_matches(purpose, f"run-{child}"):
                            rid = child
                            break
            ov = self.layout.overlay_dir / tid / rid
            # the dead run's overlay upper/work dirs, unless that run got published later
            published = os.path.lexists(self.layout.run_dir(tid, rid))
            if purpose.startswith("run-") and os.path.lexists(ov) and not published:
                self._unmount_under(ov)
                fsops.remove(self._root, ov)
                removed.append(ov)
        if target_id is None:
            removed.extend(
                self.layout.trash_dir / n for n in fsops.clear_dir(self._root, fsops.TRASH)
            )
            owners = fsops.parts_under(self._root, self._owners_dir)
            for name in fsops.listdir(self._root, owners):
                if name.endswith(".new"):  # killed while creating its lock; free if dead
                    remove_dead_owner(self._owners_dir, name, root=self._root)
                    continue
                token = name.removesuffix(".lock")
                if token not in tokens_alive and owner_is_dead(
                    self._owners_dir, token, root=self._root
                ):
                    remove_dead_owner(self._owners_dir, token, root=self._root)
        if removed:
            log.info("removed %d leftover(s) of dead processes: %s", len(removed), removed[:5])
        return removed

    # --- cleanup -------------------------------------------------------------------------
    def cleanup_cache(
        self,
        path: str | os.PathLike[str],
        workspace_isolation: str | IsolationMode = "isolated",
        run_id: str | None = None,
    ) -> None:
        """End the run's lease and remove its run directory (isolated, copy-on-write).

        shared removes nothing: it ends the run's lease (``run_id`` given) or one lease on
        that workspace. Anything that is not a run directory of this mode (or its
        workspace/target) inside CACHE_DIR is refused with CleanupRefusedError, and
        nothing is deleted. Cleaning a run that is already gone is not an error.
        """
        mode = IsolationMode.parse(workspace_isolation)
        tid, rest = self._parse_cleanup_path(path, mode)
        if mode is IsolationMode.SHARED:
            key = f"{tid}/workspace"
            if run_id is not None:
                validate_id(run_id, "run_id")
                self.index.end_lease(f"{key}#{run_id}")
            else:
                self.index.end_any_lease(key)
            self._refresh_gauges()
            return
        rid = rest
        run_dir = self.layout.run_dir(tid, rid)
        if os.path.lexists(run_dir):
            self._unmount_under(run_dir)
            self._discard(run_dir)
        ov = self.layout.overlay_dir / tid / rid
        if os.path.lexists(ov):
            self._unmount_under(ov)
            fsops.remove(self._root, ov)
        self.index.remove(f"{tid}/{rid}")
        self.index.end_lease(f"{tid}/{rid}")
        self._refresh_gauges()

    def _parse_cleanup_path(
        self, path: str | os.PathLike[str], mode: IsolationMode
    ) -> tuple[str, str]:
        """(target_id, run_id or 'workspace'/'target') of an acceptable path, else refuse."""
        raw = os.fspath(path)

        def refuse(why: str) -> CleanupRefusedError:
            accepted = (
                "{CACHE_DIR}/{target_id}/workspace or {CACHE_DIR}/{target_id}/target"
                if mode is IsolationMode.SHARED
                else "{CACHE_DIR}/{target_id}/{run_id}[/workspace|/target]"
            )
            return CleanupRefusedError(
                f"refusing to clean up {raw!r} (workspace_isolation {mode.value!r}): {why}; "
                f"accepted: {accepted} inside {self.layout.root}; nothing was deleted"
            )

        if not raw:
            raise refuse("empty path")
        p = os.path.abspath(raw)
        root_abs = os.path.abspath(self.layout.root)
        root_real = os.path.realpath(self.layout.root)
        rel = None
        for base in (root_abs, root_real):
            if p == base:
                raise refuse("that is CACHE_DIR itself")
            if p.startswith(base + os.sep):
                rel = p[len(base) + 1 :]
                break
        if rel is None:
            raise refuse("it is outside CACHE_DIR")
        parts = rel.split(os.sep)
        # No component may be a symlink: a link could point anywhere, even at another run.
        cur = root_real
        for part in parts:
            cur = os.path.join(cur, part)
            try:
                if stat.S_ISLNK(os.lstat(cur).st_mode):
                    raise refuse(f"{cur} is a symbolic link")
            except FileNotFoundError:
                break
        try:
            tid = validate_id(parts[0], "target_id")
        except InvalidIdError:
            raise refuse(f"{parts[0]!r} is not a target directory") from None
        if len(parts) == 1:
            raise refuse("that is a whole target directory, not a run directory")
        if mode is IsolationMode.SHARED:
            if len(parts) == 2 and parts[1] in ("workspace", "target"):
                return tid, parts[1]
            raise refuse("not the shared workspace or target of a target")
        if parts[1] == "shared":
            raise refuse("that is the copy-on-write shared copy")
        if parts[1] in ("workspace", "target"):
            raise refuse("that is the shared-mode workspace of the target")
        try:
            rid = validate_id(parts[1], "run_id")
        except InvalidIdError:
            raise refuse(f"{parts[1]!r} is not a run directory") from None
        if not (len(parts) == 2 or (len(parts) == 3 and parts[2] in ("workspace", "target"))):
            raise refuse("a path inside a run's workspace; pass the run directory or its workspace")
        if os.path.lexists(self.layout.run_dir(tid, rid)):
            made_by = self._run_dir_mode(tid, rid)
            if made_by is not None and made_by != mode.value:
                raise refuse(f"that is a run directory of workspace_isolation {made_by!r}")
        return tid, rid

    # --- verification --------------------------------------------------------------------
    def audit_internal(self) -> list[str]:
        """Entries planted where the cache expects its own (symlinks, non-directories, mount
        points, hard-linked lock files): one line each, naming the path. Reads only; every
        such entry is refused by the operations that meet it (fsops)."""
        return fsops.audit(self._root)

    def verify_shared(self, target_id: str) -> list[str]:
        """Full check of the shared workspace and the copy-on-write shared copy of a target
        against their publish-time manifests: one line per difference ('' prefix-free,
        each starting with the checked directory). Walks every file (not done on a hit)."""
        validate_id(target_id, "target_id")
        diffs: list[str] = []
        for kind, ws in (
            ("shared", self.layout.shared_workspace(target_id)),
            ("cow", self.layout.cow_shared_workspace(target_id)),
        ):
            if not ws.is_dir():
                continue
            expected = mf.read_manifest(mf.manifest_path(self.layout.meta_dir, target_id, kind))
            rel = os.path.relpath(ws, self.layout.root)
            if expected is None:
                diffs.append(f"{rel}: no manifest recorded")
                continue
            diffs.extend(f"{rel}: {d}" for d in mf.compare_tree(ws, expected))
        return diffs

    def repair_shared(self, target_id: str) -> bool:
        """Re-extract the shared workspace of ``target_id`` from its cached target (under the
        exclusive lock). Returns False when there is nothing cached to repair from."""
        validate_id(target_id, "target_id")
        with self.target_lock(target_id, exclusive=True, purpose="repair shared"):
            if not self.layout.shared_target(target_id).exists():
                return False
            ws = self.layout.shared_workspace(target_id)
            if ws.exists():
                self._discard(ws)
            self._publish_shared(target_id, True)
            return True

    # --- lifecycle -----------------------------------------------------------------------
    def gc(self, dry_run: bool = False) -> Any:
        """TTL + LRU sweep now (forgespace.cache.eviction.collect_garbage)."""
        from forgespace.cache.eviction import collect_garbage

        return collect_garbage(self, dry_run=dry_run)


class _Waiter:
    """Bounded wait for a target's publication without queueing on the exclusive lock.

    Only one process needs the exclusive lock to publish; the others, once they see it
    busy, wait on the *shared* lock (granted to all of them together when the publisher
    releases) instead of passing the exclusive lock along one by one. The whole wait is
    bounded by CACHE_LOCK_TIMEOUT.
    """

    def __init__(self, cache: WorkspaceCache, tid: str) -> None:
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


class _Tampered(Exception):
    """The O(1) stamp of a shared workspace does not match its publish-time stamp."""


def src_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
