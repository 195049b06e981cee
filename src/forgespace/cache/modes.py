"""The three isolation modes: how each gets a run its workspace and publishes what it built.

* shared: one download and one read-only workspace per target, ``{tid}/target`` and
  ``{tid}/workspace``; a hit checks an O(1) stamp and re-extracts a tampered workspace.
* copy-on-write: one download and one pristine read-only copy, ``{tid}/shared/``; each run
  gets its own writable copy ``{tid}/{rid}/workspace`` (copy_file_range/reflink, or an overlay
  mount with the overlay backend).
* isolated: each run downloads and extracts its own ``{tid}/{rid}/``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from forgespace.cache import fsops, snapshot, staging
from forgespace.cache import manifest as mf
from forgespace.cache.engine import Engine, GetResult, Transfer, Waiter, src_size
from forgespace.cache.hooks import Phase
from forgespace.errors import ForgespaceError
from forgespace.layout import OVERLAY_ATTEMPT_FILE, RETIRED_PREFIX

if TYPE_CHECKING:
    from forgespace.cache.index import LeaseOwner, LeaseRecord

log = logging.getLogger("forgespace.cache")


class Modes(Engine):
    """get_target of each mode over the engine's machinery."""

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
        if self._unpack_kind(target) is None:
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

    def get_shared(
        self, tid: str, rid: str | None, transfer: Transfer, owner: LeaseOwner
    ) -> GetResult:
        key = f"{tid}/workspace"
        lease = self._lease(f"{key}#{rid}", tid, rid, (key,), owner) if rid is not None else None
        tampered = False
        waiter = Waiter(self, tid)
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
            self.hooks.reached(Phase.SHARED_MISS)
            with contextlib.ExitStack() as held:
                if not waiter.try_exclusive(held, "download shared"):
                    continue  # someone else is publishing: wait for it on the shared lock
                try:
                    path = self._shared_complete(tid)
                except _Tampered:
                    # Re-extracted beside it and swapped in by publish_shared (retire_workspace)
                    path = None
                if path is not None:
                    self.index.try_write("hit", self.index.access, key, lease=lease, hit=True)
                    log.info("Cache HIT: %s (mode: shared)", tid)
                    return GetResult(path, False, "shared", tid, rid)
                downloaded = self.publish_shared(tid, tampered, transfer)
                path = self._shared_complete(tid)
                if path is None:  # pragma: no cover - we just published under the lock
                    raise ForgespaceError(f"shared workspace of {tid} vanished after publish")
                self.index.access(key, lease=lease, hit=False)
                return GetResult(path, downloaded, "shared", tid, rid, hit=False)

    def publish_shared(self, tid: str, repair: bool, transfer: Transfer) -> bool:
        """Under the exclusive lock: make {tid}/target and {tid}/workspace complete.
        Returns True when it downloaded (False when it re-extracted a cached target)."""
        staging.sweep_leftovers(self.layout, tid)
        target = self.layout.shared_target(tid)
        with self._staging(tid, "shared") as stage:
            downloaded = False
            streamed = None
            if target.exists():
                # Cached download whose workspace is missing (crash between the two renames,
                # a half-done eviction, or tampering): re-extract, no new download.
                log.info("Cache MISS: %s (mode: shared), extracting the cached download", tid)
                src = target
            else:
                src = stage / "target"
                cached = self.layout.cow_shared_target(tid)
                downloaded, streamed = self._fetch_extracting(
                    tid, src, stage / "workspace", "shared", cached, transfer, read_only=True
                )
                os.chmod(src, 0o444)
            fetched = downloaded or src != target
            stats = self._extracted(tid, src, stage / "workspace", streamed, read_only=True)
            if stats is not None:
                self.hooks.reached(Phase.EXTRACTED)
                mf.write_manifest(
                    mf.manifest_path(self.layout.meta_dir, tid, "shared"), stats.manifest
                )
                snapshot.save_seal(self._root, tid, "shared", stats.seal)
            if fetched:
                fsops.rename_into(self._root, stage / "target", target)
                self.hooks.reached(Phase.SHARED_TARGET_PUBLISHED)
            if stats is not None:
                ws = self.layout.shared_workspace(tid)
                if os.path.lexists(ws):  # a tampered copy: the repaired one is ready beside it
                    self.retire_workspace(tid)
                fsops.rename_into(self._root, stage / "workspace", ws)
                mf.write_stamp(mf.stamp_path(self.layout.meta_dir, tid, "shared"), ws)
            else:
                self._file_targets.add(tid)
            self._publish_entry(
                target_id=tid,
                kind="shared",
                mode="shared",
                nbytes=target.stat().st_size + (stats.bytes if stats else 0),
                files=(stats.files if stats else 0) + 1,
            )
            if repair:
                self.index.count("repairs")
        return downloaded

    def retire_workspace(self, tid: str) -> None:
        """Under the exclusive lock: move the shared workspace out of the way of its repaired
        copy. Unleased, it is deleted; leased, runs still work in it (their open directories
        and cwd), so it is kept as ``{tid}/.retired-*`` until no lease pins the workspace
        (gc reclaims it: eviction.reclaim_retired)."""
        ws = self.layout.shared_workspace(tid)
        if not self.index.is_leased(f"{tid}/workspace"):
            self._discard(ws)
            return
        aside = self.layout.target_dir(tid) / f"{RETIRED_PREFIX}{uuid.uuid4().hex[:12]}"
        fsops.rename_into(self._root, ws, aside)
        log.warning(
            "shared workspace %s is in use by leased runs: kept its modified copy as %s until "
            "they end; new lookups get the repaired copy",
            ws,
            aside.name,
        )

    # --- copy-on-write -------------------------------------------------------------------
    def get_cow(self, tid: str, rid: str, transfer: Transfer, owner: LeaseOwner) -> GetResult:
        run_key = f"{tid}/{rid}"
        shared_key = f"{tid}/shared"
        pins = (run_key, shared_key) if self.cow_backend == "overlay" else (run_key,)
        lease = self._lease(run_key, tid, rid, pins, owner)
        # Before staging, so gc never takes the run directory we are about to create. On a
        # full cache a hit (the run's directory exists) is served without it; anything that
        # creates a directory records it first (_require_lease).
        leased = [self.index.try_write("lease", self.index.add_lease, lease)]
        try:
            return self._get_cow_locked(tid, rid, lease, leased, transfer)
        except BaseException:
            self._end_own_lease(lease)
            raise

    def _get_cow_locked(
        self, tid: str, rid: str, lease: LeaseRecord, leased: list[bool], transfer: Transfer
    ) -> GetResult:
        shared_dir = self.layout.cow_shared_dir(tid)
        published = downloaded = False
        waiter = Waiter(self, tid)
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
                    return GetResult(
                        existing, downloaded, "copy-on-write", tid, rid, hit=not published
                    )
                self._require_lease(lease, leased)
                if shared_dir.is_dir():
                    # The shared lock keeps gc off shared/ while we copy from it.
                    path = self._make_cow_run(tid, rid)
                    # One access (one hit or miss counted) on the shared copy records the
                    # lease; the run entry was just published with last_access = now.
                    self.index.access(f"{tid}/shared", lease=lease, hit=not published)
                    if not published:
                        log.info("Cache HIT: %s (mode: copy-on-write)", tid)
                    return GetResult(path, downloaded, "copy-on-write", tid, rid, hit=not published)
            self.hooks.reached(Phase.SHARED_MISS)
            with contextlib.ExitStack() as held:
                if waiter.try_exclusive(held, "download copy-on-write") and not shared_dir.is_dir():
                    downloaded = self._publish_cow_shared(tid, transfer)
                    published = True

    def _lost_overlay(self, path: str) -> bool:
        ws = Path(path)
        if ws.name != "workspace" or os.path.ismount(ws):
            return False
        base = staging.run_overlay_base(self.layout, ws.parent.parent.name, ws.parent.name)
        return base is not None and base.is_dir()

    def _remount_overlay(self, tid: str, rid: str, ws: Path) -> str | None:
        """A run's overlay is gone (e.g. after a reboot) but its upper layer is still on disk:
        mount it again so the run keeps its writes; if that fails, drop the run directory."""
        from forgespace.cache import overlay

        base = staging.run_overlay_base(self.layout, tid, rid)
        lower = self.layout.cow_shared_workspace(tid)
        try:
            if base is None:
                raise FileNotFoundError(f"the upper layer of run {rid} of {tid}")
            if not lower.is_dir():
                raise FileNotFoundError(lower)
            overlay.mount_overlay(lower, base / "upper", base / "work", ws)
            log.warning("overlay of run %s of %s was no longer mounted; mounted it again", rid, tid)
            return str(ws)
        except (OSError, ForgespaceError) as exc:
            log.warning("overlay of run %s of %s is lost (%s); rebuilding the run", rid, tid, exc)
            self._discard(self.layout.run_dir(tid, rid))
            fsops.remove(self._root, self.layout.overlay_dir / tid / rid)
            return None

    def _publish_cow_shared(self, tid: str, transfer: Transfer) -> bool:
        staging.sweep_leftovers(self.layout, tid)
        with self._staging(tid, "cow") as stage:
            src = stage / "target"
            ws = stage / "workspace"
            cached = self.layout.shared_target(tid)
            downloaded, streamed = self._fetch_extracting(
                tid, src, ws, "copy-on-write", cached, transfer, read_only=True
            )
            os.chmod(src, 0o444)
            stats = self._extracted(tid, src, ws, streamed, read_only=True)
            if stats is not None:
                self.hooks.reached(Phase.EXTRACTED)
                mf.write_manifest(
                    mf.manifest_path(self.layout.meta_dir, tid, "cow"), stats.manifest
                )
                snapshot.save_seal(self._root, tid, "cow", stats.seal)
            fsops.rename_into(self._root, stage, self.layout.cow_shared_dir(tid))
            if stats is not None:
                mf.write_stamp(
                    mf.stamp_path(self.layout.meta_dir, tid, "cow"),
                    self.layout.cow_shared_workspace(tid),
                )
            self._publish_entry(
                target_id=tid,
                kind="cow-shared",
                mode="copy-on-write",
                nbytes=src_size(self.layout.cow_shared_target(tid)) + (stats.bytes if stats else 0),
                files=(stats.files if stats else 0) + 1,
            )
        return downloaded

    def _make_cow_run(self, tid: str, rid: str) -> str:
        """Under the shared target lock: build the run's private copy and publish it."""
        shared_ws = self.layout.cow_shared_workspace(tid)
        shared_target = self.layout.cow_shared_target(tid)
        staging.sweep_leftovers(self.layout, tid)
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
            self.hooks.reached(Phase.COW_COPIED)
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
        """Mount the run's overlay in staging, its upper/work directories owned by this
        staging attempt (staging.overlay_attempt_dir): a retry of the same run id gets its
        own, and a sweep reclaims them once neither the attempt nor the run owns them."""
        from forgespace.cache import overlay

        stage = mountpoint.parent
        base = staging.overlay_attempt_dir(self.layout, tid, rid, stage)
        with fsops.dir_fd(self._root, fsops.parts_under(self._root, base), create=True) as bfd:
            os.mkdir("upper", dir_fd=bfd)
            os.mkdir("work", dir_fd=bfd)
        # Goes with the staging directory into the run directory: the publish rename hands
        # the upper layer over to the run.
        (stage / OVERLAY_ATTEMPT_FILE).write_text(base.name + "\n")
        mountpoint.mkdir()
        try:
            overlay.mount_overlay(lower, base / "upper", base / "work", mountpoint)
        except BaseException:
            fsops.remove(self._root, base)
            raise
        return "overlay"

    # --- isolated ------------------------------------------------------------------------
    def get_isolated(self, tid: str, rid: str, transfer: Transfer, owner: LeaseOwner) -> GetResult:
        run_key = f"{tid}/{rid}"
        lease = self._lease(run_key, tid, rid, (run_key,), owner)
        leased = [self.index.try_write("lease", self.index.add_lease, lease)]
        try:
            # Under the shared lock like the other modes' hits: gc and a stale attempt's
            # release decide under the exclusive lock, so neither can remove what this
            # returns between the check and the lease.
            with self.target_lock(tid, exclusive=False, purpose="isolated hit"):
                existing = self._run_result(tid, rid)
                if existing is not None:
                    self.index.try_write("hit", self.index.access, run_key, lease=lease, hit=True)
                    log.info("Cache HIT: %s (mode: isolated)", tid)
                    return GetResult(existing, False, "isolated", tid, rid)
            self._require_lease(lease, leased)
            staging.sweep_leftovers(self.layout, tid)
            with self._staging(tid, f"run-{rid}") as stage:
                src, ws = stage / "target", stage / "workspace"
                streamed = self._download_extracting(
                    tid, src, ws, "isolated", transfer, read_only=False
                )
                nbytes, files, name = src.stat().st_size, 1, "target"
                stats = self._extracted(tid, src, ws, streamed, read_only=False)
                if stats is not None:
                    self.hooks.reached(Phase.EXTRACTED)
                    nbytes, files, name = nbytes + stats.bytes, files + stats.files, "workspace"
                path = self._publish_run(tid, rid, stage, name, nbytes, files, "isolated")
            # Records the lease again: its TTL counts from now, not from the download's start.
            self.index.access(run_key, lease=lease, hit=False)
            return GetResult(path, True, "isolated", tid, rid, hit=False)
        except BaseException:
            self._end_own_lease(lease)
            raise


class _Tampered(Exception):
    """The O(1) stamp of a shared workspace does not match its publish-time stamp."""
