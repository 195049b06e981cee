"""The workspace cache: ``get_target`` / ``cleanup_cache`` in three isolation modes.

``WorkspaceCache`` is a facade: the modes live in modes.py (over the machinery of engine.py),
staging and the leftover sweeper in staging.py, which paths cleanup may delete in cleanup.py,
verification in verify.py and eviction in eviction.py. docs/architecture.md maps each rule of
the workspace-isolation design to the function that implements it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from forgespace.cache import fsops, staging
from forgespace.cache import manifest as mf
from forgespace.cache.cleanup import parse_cleanup_path
from forgespace.cache.engine import GetResult, Transfer
from forgespace.cache.hooks import NO_HOOKS, CacheHooks
from forgespace.cache.index import LeaseOwner, LeaseRecord
from forgespace.cache.modes import Modes
from forgespace.config import Settings
from forgespace.errors import InvalidIdError
from forgespace.layout import CacheLayout, IsolationMode, validate_id

if TYPE_CHECKING:
    from forgespace.cache.eviction import GcReport
    from forgespace.cache.index import CacheIndex
    from forgespace.storage.base import ProgressFn, Store

__all__ = ["GetResult", "LeaseOwner", "Released", "WorkspaceCache"]

log = logging.getLogger("forgespace.cache")


@dataclass(frozen=True)
class Released:
    """What ``WorkspaceCache.release`` did for one run."""

    target_id: str
    run_id: str
    workspace_isolation: str
    leases_ended: int
    removed: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "target_id": self.target_id,
            "run_id": self.run_id,
            "workspace_isolation": self.workspace_isolation,
            "leases_ended": self.leases_ended,
            "removed": list(self.removed),
        }


class WorkspaceCache:
    """Workspaces for workflow runs under one CACHE_DIR.

    ``store`` defaults to the one ``settings`` configures (opened on first use, so
    cleanup and gc never need the store).
    """

    def __init__(
        self,
        settings: Settings,
        store: Store | None = None,
        *,
        read_only: bool = False,
        hooks: CacheHooks = NO_HOOKS,
    ) -> None:
        """``read_only`` (``cache verify`` without ``--repair``): create nothing; CACHE_DIR
        and its ``.forgespace`` must exist (CacheAccessError otherwise). ``hooks``: the test
        seam (forgespace.cache.hooks); production passes none."""
        from forgespace.cache.index import CacheIndex, make_cache_dirs

        self.settings = settings
        #: The test seam (forgespace.cache.hooks): gc reports its phase to it too.
        self.hooks = hooks
        self.layout = CacheLayout(Path(settings.cache_dir))
        if not read_only:
            make_cache_dirs(
                self.layout, (self.layout.locks_dir, self.layout.tmp_dir, self.layout.trash_dir)
            )
        self.index: CacheIndex = CacheIndex(
            self.layout, lease_ttl=settings.cache_lease_ttl, create=not read_only
        )
        self._modes = Modes(
            settings=settings, layout=self.layout, index=self.index, store=store, hooks=hooks
        )
        # Shared leases this object took (entry key -> lease ids, latest last).
        self._shared_taken: dict[str, list[str]] = {}
        self._taken_lock = threading.Lock()
        #: Hold the per-target lock (engine.Engine.target_lock: bounded, names the holder).
        self.target_lock = self._modes.target_lock
        # Imported here, not on the first get: prometheus_client costs ~80 ms of CPU, which
        # 16 processes waking up together for their first hit would otherwise pay at once.
        from forgespace.cache import metrics

        self._metrics = metrics
        self.cow_backend = settings.cow_backend
        if self.cow_backend == "overlay" and not read_only:
            from forgespace.cache import overlay

            # Fail at start-up, not at the first copy-on-write run.
            overlay.probe_overlay(self.layout.overlay_dir / ".probe")
            log.info("copy-on-write backend: overlay (mount per run)")
        else:
            log.debug("copy-on-write backend: copy (copy_file_range/reflink per file)")

    @property
    def store(self) -> Store:
        """The object store targets are downloaded from."""
        return self._modes.store

    @store.setter
    def store(self, value: Store) -> None:
        self._modes.store = value

    # --- get ---------------------------------------------------------------------------------
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
        *,
        owner: LeaseOwner | None = None,
    ) -> GetResult:
        """Like get_target, and tell whether this call downloaded.

        ``progress(bytes_done, bytes_total)`` is called from this thread while this call
        downloads the object (not while it waits for another process's download). ``owner``
        is who takes the run's lease (the Temporal activity attempt; default: this call):
        a later call for the same run takes the lease over, and this call's failure or a
        ``release(..., attempt=...)`` of it then touches nothing."""
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
        transfer = Transfer(progress)
        published = self._modes.publications
        owner = owner or LeaseOwner.fresh()
        if mode is IsolationMode.SHARED:
            res = self._modes.get_shared(target_id, run_id, transfer, owner)
        elif mode is IsolationMode.COPY_ON_WRITE:
            assert run_id is not None
            res = self._modes.get_cow(target_id, run_id, transfer, owner)
        else:
            assert run_id is not None
            res = self._modes.get_isolated(target_id, run_id, transfer, owner)
        self._metrics.observe_get(
            res.mode,
            hit=res.hit,  # decided where the index counted it
            seconds=time.perf_counter() - t0,
            downloaded_bytes=transfer.downloaded_bytes,
        )
        if mode is IsolationMode.SHARED and run_id is not None:
            with self._taken_lock:  # what a shared cleanup without a run id may end
                self._shared_taken.setdefault(f"{target_id}/workspace", []).append(
                    f"{target_id}/workspace#{run_id}"
                )
        if self._modes.publications != published:
            # After the lease is taken, so live leases count this run. A hit publishes
            # nothing and skips this (its lease shows at the next publish/cleanup/sweep).
            self._refresh_gauges()
        return res

    def _refresh_gauges(self) -> None:
        """Cache size, entries and live leases gauges from the index (SQL aggregates)."""
        try:
            self._metrics.refresh_from_index(self.index, self.settings.cache_max_size)
        except Exception as exc:  # the gauges must never fail the call that changed the cache
            log.debug("metrics: could not refresh the cache gauges: %s", exc)

    # --- cleanup and release -----------------------------------------------------------------
    def cleanup_cache(
        self,
        path: str | os.PathLike[str],
        workspace_isolation: str | IsolationMode = "isolated",
        run_id: str | None = None,
        *,
        owner: LeaseOwner | None = None,
    ) -> None:
        """End the run's lease and remove its run directory (isolated, copy-on-write).

        shared removes nothing: it ends the run's lease (``run_id`` given), else the leases
        the workflow of ``owner`` took on that workspace; with neither it ends nothing (a
        shared lease it cannot attribute may be another run's: it expires by the lease TTL).
        Anything that is not a run directory of this mode (or its workspace/target) inside
        CACHE_DIR is refused with CleanupRefusedError, and nothing is deleted. Cleaning a run
        that is already gone, or one another workflow holds, is a no-op (a debug log).
        """
        mode = IsolationMode.parse(workspace_isolation)
        tid, rest = parse_cleanup_path(self.layout, path, mode, self._modes._run_dir_mode)
        if mode is IsolationMode.SHARED:
            key = f"{tid}/workspace"
            if run_id is not None:
                validate_id(run_id, "run_id")
                if not self.index.end_lease(f"{key}#{run_id}"):
                    log.debug("cleanup of %s: run %s holds no lease on it (no-op)", key, run_id)
            else:
                self._end_unnamed_shared_lease(key, owner)
        else:
            held = self.index.lease(f"{tid}/{rest}")
            if (
                owner is not None
                and owner.workflow_id is not None
                and held is not None
                and held.workflow_id not in (None, owner.workflow_id)
            ):
                log.debug(
                    "cleanup of run %s of %s: its lease is workflow %s's, not %s's (no-op)",
                    rest,
                    tid,
                    held.workflow_id,
                    owner.workflow_id,
                )
            else:
                self._remove_run(tid, rest)
        self._refresh_gauges()

    def _end_unnamed_shared_lease(self, key: str, owner: LeaseOwner | None) -> None:
        """A shared cleanup that names no run ends a lease only when it knows whose: the
        leases its Temporal workflow took; else the latest one this cache object took and has
        not ended; else the one lease on the workspace whose taker (a library or CLI process
        on this host, outside any workflow) has exited. Never another live run's."""
        if owner is not None and owner.workflow_id is not None:
            ended = self.index.end_workflow_leases(key, owner.workflow_id)
            log.debug("cleanup of %s: %d lease(s) of workflow %s ended", key, ended,
                      owner.workflow_id)  # fmt: skip
            return
        with self._taken_lock:
            taken = self._shared_taken.get(key, [])
            while taken:
                if self.index.end_lease(taken.pop()):
                    log.debug("cleanup of %s: ended the latest lease this process took", key)
                    return
        leases = [
            le
            for le in self.index.all_leases()
            if key in le.pins and le.lease_id.startswith(f"{key}#") and le.workflow_id is None
        ]
        if len(leases) == 1 and not _holder_alive(leases[0].holder):
            self.index.end_lease(leases[0].lease_id)
            log.debug("cleanup of %s: ended lease %s (its process exited)", key, leases[0])
            return
        log.debug(
            "cleanup of %s without a run id: no lease ended (it may be another run's: pass "
            "run_id, or it expires CACHE_LEASE_TTL after its last renewal)",
            key,
        )

    def _remove_run(self, tid: str, rid: str, *, attempt: str | None = None) -> bool:
        """Remove run directory ``{tid}/{rid}`` (and its overlay layers) and end its lease,
        under the exclusive target lock (a get of the same run decides under the shared one).
        With ``attempt``, only while that attempt owns the run's lease. True if done."""
        root = self.layout.root
        key = f"{tid}/{rid}"
        with self.target_lock(tid, exclusive=True, purpose="release run"):
            if attempt is not None:
                held = self.index.lease(key)
                if held is None or held.attempt != attempt:
                    log.debug(
                        "release of run %s of %s by attempt %s: the lease is %s (no-op)",
                        rid,
                        tid,
                        attempt,
                        "gone" if held is None else f"attempt {held.attempt}'s",
                    )
                    return False
            for p in (self.layout.run_dir(tid, rid), self.layout.overlay_dir / tid / rid):
                if os.path.lexists(p):
                    fsops.unmount_under([p], root=root)
                    fsops.discard(root, p)
            self.index.remove(key)
            self.index.end_lease(key)
        return True

    def release(
        self,
        target_id: str,
        run_id: str,
        workspace_isolation: str | IsolationMode,
        *,
        attempt: str | None = None,
    ) -> Released:
        """Release what run ``run_id`` of ``target_id`` holds here, by ids (for a run whose
        workspace path never reached its workflow): sweep dead processes' staging directories
        of the target, end the run's lease and (isolated, copy-on-write) remove its run
        directory. Idempotent.

        With ``attempt`` (a cancelled get releasing what it took) only while that attempt
        still owns the run's lease: when a retry took it over, nothing is touched."""
        validate_id(target_id, "target_id")
        validate_id(run_id, "run_id")
        mode = IsolationMode.parse(workspace_isolation)
        removed = [str(p) for p in self.sweep_leftovers(target_id)]

        def held() -> int:
            return sum(
                1
                for le in self.index.all_leases()
                if le.target_id == target_id and le.run_id == run_id
            )

        before = held()
        if mode is IsolationMode.SHARED:
            # Ends exactly this run's lease on the shared workspace; removes nothing.
            self.index.end_lease(f"{target_id}/workspace#{run_id}", attempt=attempt)
        else:
            run_dir = self.layout.run_dir(target_id, run_id)
            present = os.path.lexists(run_dir)
            # Also when the directory is absent: it ends the lease the call took first.
            if self._remove_run(target_id, run_id, attempt=attempt) and present:
                removed.append(str(run_dir))
            self._refresh_gauges()
        return Released(target_id, run_id, mode.value, before - held(), removed)

    def release_lease(self, lease: LeaseRecord) -> bool:
        """Release one lease as its run's cleanup would have (a run lease: with its run
        directory), only while its attempt still owns it. True if something was released."""
        tid, rid = lease.target_id, lease.run_id
        if lease.lease_id.startswith(f"{tid}/workspace#") or rid is None:
            return self.index.end_lease(lease.lease_id, attempt=lease.attempt)
        if lease.lease_id != f"{tid}/{rid}":
            return False  # not a lease this cache takes: leave it to its TTL
        done = self._remove_run(tid, rid, attempt=lease.attempt)
        self._refresh_gauges()
        return done

    def renew(self, *, workflow_id: str | None = None, lease_id: str | None = None) -> int:
        """Renew leases now (their CACHE_LEASE_TTL counts again from now): every lease of
        Temporal workflow ``workflow_id``, or the lease ``lease_id``. Returns how many."""
        return self.index.renew(workflow_id=workflow_id, lease_id=lease_id)

    @contextlib.contextmanager
    def leased(
        self,
        target_id: str,
        run_id: str,
        workspace_isolation: str | IsolationMode = "isolated",
        *,
        renew_every: float | None = None,
    ) -> Iterator[str]:
        """``with cache.leased(tid, rid, mode) as path:`` -- get_target, keep the run's lease
        renewed while the block runs (a thread renews it every ``renew_every`` seconds,
        default a quarter of CACHE_LEASE_TTL, at most every minute), then cleanup_cache,
        however the block ends."""
        mode = IsolationMode.parse(workspace_isolation)
        path = self.get_target(target_id, run_id, mode)
        lease_id = (
            f"{target_id}/workspace#{run_id}"
            if mode is IsolationMode.SHARED
            else f"{target_id}/{run_id}"
        )
        every = renew_every or min(60.0, self.settings.cache_lease_ttl / 4)
        stop = threading.Event()

        def renewer() -> None:
            while not stop.wait(every):
                try:
                    self.index.renew(lease_id=lease_id)
                except Exception as exc:  # a failed renewal is retried at the next tick
                    log.warning("renewing lease %s failed: %s", lease_id, exc)

        t = threading.Thread(target=renewer, name=f"forgespace-renew-{run_id}", daemon=True)
        t.start()
        try:
            yield path
        finally:
            stop.set()
            t.join()
            self.cleanup_cache(path, mode, run_id)

    def sweep_leftovers(self, target_id: str | None = None) -> list[Path]:
        """Remove what dead processes left (staging.sweep_leftovers). Returns what went."""
        return staging.sweep_leftovers(self.layout, target_id)

    # --- verification ------------------------------------------------------------------------
    def audit_internal(self) -> list[str]:
        """Entries planted where the cache expects its own (symlinks, non-directories, mount
        points, hard-linked lock files): one line each, naming the path. Reads only; every
        such entry is refused by the operations that meet it (fsops)."""
        return fsops.audit(self.layout.root)

    def verify_shared(self, target_id: str) -> list[str]:
        """Full check of the shared workspace and the copy-on-write shared copy of a target
        against their publish-time manifests: one line per difference, each starting with
        the checked directory. Walks every file (not done on a hit)."""
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
            # Re-extracted beside the live workspace, then swapped in (Modes.retire_workspace:
            # kept aside while leased runs use it).
            self._modes.publish_shared(target_id, True, Transfer())
            return True

    # --- lifecycle ---------------------------------------------------------------------------
    def gc(self, dry_run: bool = False) -> GcReport:
        """TTL + LRU sweep now (forgespace.cache.eviction.collect_garbage)."""
        from forgespace.cache.eviction import collect_garbage

        return collect_garbage(self, dry_run=dry_run)


def _holder_alive(holder: str) -> bool:
    """Whether the ``host:pid`` that took a lease still runs (True when it cannot tell: another
    host, or a pid this user may not signal)."""
    host, _, pid = holder.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True
