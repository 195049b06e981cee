# Over 500 lines for now: planning, executing and operator eviction; the plan is the natural first
# split.
"""Eviction: plan what to remove, then execute the plan safely while runs are live.

Rules, in order (``collect_garbage``):

1. ``ttl``      every unleased entry not accessed for CACHE_TTL;
2. ``lru``      then the least recently accessed unleased entries until the indexed total is
                <= CACHE_MAX_SIZE;
3. ``orphan``   run directories no live lease pins (the lease expired or was never recorded:
                the run is gone), entries on disk the index does not know (a crash between
                publish's rename and its index write), index rows whose directory is gone, and
                overlay mounts of dead runs;
4. ``leftover`` staging directories of dead processes in ``.forgespace/tmp`` (recognised by
                their owner lock, not by age), anything left in ``.forgespace/trash``, and
                overlay upper/work dirs that neither a live staging attempt nor a run owns
                and no mounted overlay uses (staging.sweep_overlays).

Safety: every deletion happens under ``cache.target_lock(tid, blocking=False)``, the same lock a
get_target of that target holds, so nothing is deleted while a get_target is in flight; a busy
target is skipped and reported, never waited for (we never wait while holding a lock). Inside
the lock the lease and the last access are read again: a run that took a lease or touched the
entry after the plan was made keeps it. Deletion is rename-into-trash first (nobody sees half a
directory), then delete.

gc never walks workspace files: sizes come from the index (recorded at publish). It lists the
top two levels of CACHE_DIR to find what the index does not know.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from forgespace.cache import fsops, staging
from forgespace.cache.hooks import NO_HOOKS, CacheHooks, Phase
from forgespace.cache.index import CacheIndex, EntryRecord, scan_entries
from forgespace.config import Settings
from forgespace.errors import (
    CacheAccessError,
    CacheFullError,
    LockTimeoutError,
    UnsafeCacheEntryError,
)
from forgespace.layout import RETIRED_PREFIX, CacheLayout, is_valid_id
from forgespace.storage.pack import tree_usage

log = logging.getLogger(__name__)

REASONS = ("ttl", "lru", "orphan", "leftover")


class CacheLike(Protocol):
    """What eviction needs from a WorkspaceCache."""

    settings: Settings
    layout: CacheLayout
    index: CacheIndex

    def target_lock(
        self,
        target_id: str,
        *,
        exclusive: bool = True,
        timeout: float | None = None,
        blocking: bool = True,
    ) -> AbstractContextManager[Any]: ...


@dataclass(frozen=True)
class PlannedEviction:
    """One thing the plan removes. ``key`` is an index key or a path relative to CACHE_DIR."""

    key: str
    target_id: str
    kind: str  # "shared" | "cow-shared" | "run" | "staging" | "trash" | "mount" | "stale-row"
    reason: str  # "ttl" | "lru" | "orphan" | "leftover"
    bytes: int
    last_access: float = 0.0  # as planned: a later access keeps the entry


@dataclass(frozen=True)
class SkippedEviction:
    """A planned eviction not executed, and why (busy target, leased meanwhile...)."""

    key: str
    target_id: str
    why: str


@dataclass
class GcReport:
    """The plan, and (unless dry_run) what executing it freed."""

    plan: list[PlannedEviction]
    freed_bytes: int
    total_before: int
    total_after: int
    dry_run: bool
    evicted: list[PlannedEviction] = field(default_factory=list)
    skipped: list[SkippedEviction] = field(default_factory=list)
    limit: int = 0
    adopted: list[str] = field(default_factory=list)
    plan_seconds: float = 0.0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """The stable JSON shape of ``forgespace cache gc --json`` (docs/operations.md)."""

        def item(p: PlannedEviction) -> dict[str, Any]:
            return {
                "key": p.key,
                "target_id": p.target_id,
                "kind": p.kind,
                "reason": p.reason,
                "bytes": p.bytes,
                "last_access": p.last_access or None,
            }

        return {
            "dry_run": self.dry_run,
            "limit_bytes": self.limit,
            "total_before": self.total_before,
            "total_after": self.total_after,
            "freed_bytes": self.freed_bytes,
            "plan": [item(p) for p in self.plan],
            "evicted": [item(p) for p in self.evicted],
            "skipped": [
                {"key": s.key, "target_id": s.target_id, "why": s.why} for s in self.skipped
            ],
            "adopted": list(self.adopted),
            "plan_seconds": round(self.plan_seconds, 6),
            "seconds": round(self.seconds, 6),
        }


# --- planning ----------------------------------------------------------------------------
def entry_paths(layout: CacheLayout, e: EntryRecord) -> list[Path]:
    """The paths an index entry covers (shared covers workspace and target)."""
    if e.kind == "shared":
        return [layout.shared_workspace(e.target_id), layout.shared_target(e.target_id)]
    if e.kind == "cow-shared":
        return [layout.cow_shared_dir(e.target_id)]
    if e.run_id is None:
        return []
    return [layout.run_dir(e.target_id, e.run_id)]


def plan_eviction(
    cache: CacheLike, *, now: float | None = None, scan_disk: bool = True
) -> tuple[list[PlannedEviction], int]:
    """(plan, indexed total bytes) for the rules in the module docstring. Reads only."""
    settings, layout, index = cache.settings, cache.layout, cache.index
    t = time.time() if now is None else now
    entries = index.entries()  # least recently accessed first
    leased = index.leased_keys(t)
    total = sum(e.bytes for e in entries)
    plan: list[PlannedEviction] = []
    chosen: set[str] = set()

    def add(e: EntryRecord, reason: str) -> None:
        plan.append(PlannedEviction(e.key, e.target_id, e.kind, reason, e.bytes, e.last_access))
        chosen.add(e.key)

    known = {e.key for e in entries}
    on_disk: list[EntryRecord] = []
    if scan_disk:
        # Only the top two directory levels are listed (no workspace walk).
        on_disk = scan_entries(layout, with_sizes=False)
        disk_keys = {e.key for e in on_disk}
        # Index rows whose directory is gone (a crash between the rename and the index write
        # of a deletion): nothing to delete, only the row to drop.
        for e in entries:
            if e.key not in disk_keys:
                plan.append(
                    PlannedEviction(
                        e.key, e.target_id, "stale-row", "orphan", e.bytes, e.last_access
                    )
                )
                chosen.add(e.key)
    for e in entries:
        if e.key in chosen or e.key in leased:
            continue
        if e.kind == "run":
            add(e, "orphan")  # no live lease: its run ended without cleanup or expired
        elif e.last_access < t - settings.cache_ttl:
            add(e, "ttl")
    remaining = total - sum(p.bytes for p in plan)
    for e in entries:
        if remaining <= settings.cache_max_size:
            break
        if e.key in chosen or e.key in leased:
            continue
        add(e, "lru")
        remaining -= e.bytes
    if scan_disk:
        plan.extend(_plan_unindexed(on_disk, known, leased))
        planned_runs = {p.key for p in plan if p.kind == "run"}
        for m in _plan_mounts(layout, leased):
            run_key = _run_key_of(layout, layout.root / m.key)
            if run_key is None or run_key[1] not in planned_runs:
                plan.append(m)
        plan.extend(_plan_leftovers(layout))
    return plan, total


def _plan_unindexed(
    on_disk: list[EntryRecord], known: set[str], leased: set[str]
) -> list[PlannedEviction]:
    # Sizes of what the index does not know are not walked (bytes 0: unknown).
    out = []
    for e in on_disk:
        if e.key in known or e.key in leased:
            continue
        if e.kind == "run":
            out.append(PlannedEviction(e.key, e.target_id, "run", "orphan", 0))
    return out


def _plan_mounts(layout: CacheLayout, leased: set[str]) -> list[PlannedEviction]:
    from forgespace.cache import overlay

    out = []
    # Only the overlays forgespace makes: any other mount is the operator's, and deletion
    # never crosses it either (fsops.unmount_under keeps the same rule).
    for mp in overlay.mounts_under(layout.root, fstype="overlay"):
        key = _run_key_of(layout, mp)
        if key is not None and key[1] not in leased:  # leased holds run keys, not pairs
            out.append(
                PlannedEviction(str(mp.relative_to(layout.root)), key[0], "mount", "orphan", 0)
            )
    return out


def _run_key_of(layout: CacheLayout, path: Path) -> tuple[str, str] | None:
    """(target_id, run key) when ``path`` lies inside a run directory."""
    try:
        rel = path.relative_to(layout.root).parts
    except ValueError:
        return None
    if len(rel) >= 2 and rel[0] != layout.meta_dir.name and rel[1] not in ("shared", "workspace"):
        return rel[0], f"{rel[0]}/{rel[1]}"
    return None


def _plan_leftovers(layout: CacheLayout) -> list[PlannedEviction]:
    out = []
    try:
        for d in staging.dead_staging(layout):
            b, _ = tree_usage(d.path, one_filesystem=True)
            out.append(PlannedEviction(_rel(layout, d.path), d.target_id, "staging", "leftover", b))
    except UnsafeCacheEntryError as exc:
        log.warning("gc: %s", exc)  # a planted .forgespace/tmp: never followed
    try:
        for name in sorted(fsops.listdir(layout.root, fsops.TRASH)):
            p = layout.trash_dir / name
            b, _ = tree_usage(p, one_filesystem=True)
            out.append(PlannedEviction(_rel(layout, p), "", "trash", "leftover", b))
    except UnsafeCacheEntryError as exc:
        log.warning("gc: %s", exc)
    return out


def _rel(layout: CacheLayout, p: Path) -> str:
    return str(p.relative_to(layout.root))


# --- executing ----------------------------------------------------------------------------
def collect_garbage(cache: CacheLike, *, dry_run: bool = False) -> GcReport:
    """Plan, then (unless ``dry_run``) execute TTL, LRU and orphan eviction.

    Never deletes a leased entry or one whose target is busy (skipped and reported).
    """
    t0 = time.perf_counter()
    plan, total_before = plan_eviction(cache)
    plan_seconds = time.perf_counter() - t0
    limit = cache.settings.cache_max_size
    if dry_run:
        projected = total_before - sum(p.bytes for p in plan if p.kind in _INDEXED_KINDS)
        return GcReport(
            plan, 0, total_before, projected, True, limit=limit, plan_seconds=plan_seconds,
            seconds=time.perf_counter() - t0,
        )  # fmt: skip
    report = GcReport(plan, 0, total_before, total_before, False, limit=limit)
    _hooks(cache).reached(Phase.GC_PLANNED)
    # Orphans first: a dead run's overlay is unmounted before its lower layer (the shared
    # copy) can go.
    for item in sorted(plan, key=lambda p: p.reason != "orphan"):
        execute(cache, item, report)
    try:
        # overlay upper/work dirs no live staging attempt or run owns (e.g. its staging
        # directory went without them): nothing indexes them, so only this finds them
        gone = staging.sweep_overlays(cache.layout)
        if gone:
            log.info("gc: removed %d unowned overlay dir(s): %s", len(gone), gone[:5])
        staging.remove_dead_owners(cache.layout)
    except UnsafeCacheEntryError as exc:
        log.warning("gc: %s", exc)
    reclaim_retired(cache)
    _remove_empty_target_dirs(cache)
    from forgespace.cache import blobstore

    blobstore.sweep(cache)  # blobs no remaining entry references, by the same TTL/LRU rules
    report.adopted = adopt_unindexed(cache)
    expired: list[Any] = []

    def purge() -> None:
        expired.extend(cache.index.purge_expired_leases())

    cache.index.try_write("drop expired leases", purge)  # on a full disk: the next gc
    if expired:
        log.info("gc: dropped %d expired lease(s)", len(expired))
    cache.index.checkpoint()
    report.total_after = cache.index.total_bytes()
    report.plan_seconds = plan_seconds
    report.seconds = time.perf_counter() - t0
    _update_gauges(cache)
    if report.evicted or report.skipped:
        log.info(
            "gc: evicted %d item(s), freed %d bytes (indexed total %d -> %d, limit %d); skipped %d",
            len(report.evicted),
            report.freed_bytes,
            total_before,
            report.total_after,
            limit,
            len(report.skipped),
        )
    return report


_INDEXED_KINDS = ("shared", "cow-shared", "run", "stale-row")


def _hooks(cache: CacheLike) -> CacheHooks:
    """The test seam of the cache (forgespace.cache.hooks); none for a bare CacheLike."""
    return getattr(cache, "hooks", NO_HOOKS)


def execute(cache: CacheLike, item: PlannedEviction, report: GcReport) -> bool:
    """Carry out one planned eviction (gc and make_room alike); True when it was evicted.

    The one per-victim guard: an entry that cannot be removed (permissions, a busy mount...)
    is skipped and reported, never stopping the sweep or failing the download that needed
    room; whatever already reached the trash goes with the next gc. Only a cache that cannot
    be written at all (CacheAccessError) stops everything."""
    before = len(report.evicted)
    try:
        _execute(cache, item, report)
    except OSError as exc:
        if isinstance(exc, CacheAccessError):
            raise
        log.warning("gc: could not evict %s: %s", item.key, exc)
        report.skipped.append(SkippedEviction(item.key, item.target_id, f"error: {exc}"))
    return len(report.evicted) > before


def _execute(cache: CacheLike, item: PlannedEviction, report: GcReport) -> None:
    layout, index = cache.layout, cache.index
    if item.kind == "trash":
        fsops.remove(layout.root, layout.root / item.key)
        _done(cache, item, report, item.bytes)
        return
    if item.kind == "staging":
        p = layout.root / item.key
        dead = {d.path: d for d in staging.dead_staging(layout, item.target_id)}
        if p not in dead:
            report.skipped.append(SkippedEviction(item.key, item.target_id, "owner alive"))
            return
        staging.remove_staging(layout, dead[p])
        _done(cache, item, report, item.bytes)
        return
    try:
        with cache.target_lock(item.target_id, blocking=False):
            why = _recheck(cache, item)
            if why:
                report.skipped.append(SkippedEviction(item.key, item.target_id, why))
                return
            _hooks(cache).reached(Phase.GC_VICTIM_CHECKED)
            if item.kind == "mount":
                from forgespace.cache import overlay

                overlay.unmount(layout.root / item.key)
                _done(cache, item, report, 0)
                return
            entry = index.get(item.key)
            paths = entry_paths(layout, entry) if entry else _paths_for_key(layout, item)
            if item.kind == "run":
                # overlay upper/work dirs of the run (overlay backend), after its mount
                paths.append(layout.overlay_dir / item.key)
            _unmount_inside(layout, paths)
            _delete_via_trash(layout, paths)
            # Delete, then record: on a full disk the deletion is what frees the space. A row
            # that still cannot be removed is a stale row the next gc drops.
            index.try_write("forget an evicted entry", index.remove, item.key)
            _forget_records(layout, item)
            with contextlib.suppress(OSError):
                os.rmdir(layout.target_dir(item.target_id))  # only when now empty
    except LockTimeoutError:
        report.skipped.append(SkippedEviction(item.key, item.target_id, "target busy"))
        return
    # A stale row frees nothing on disk (its directory was already gone).
    _done(cache, item, report, 0 if item.kind == "stale-row" else item.bytes)


def _recheck(cache: CacheLike, item: PlannedEviction) -> str:
    """Why the planned item must now be kept ('' = still evictable). Runs inside the lock."""
    index = cache.index
    if item.kind == "mount":
        run_key = _run_key_of(cache.layout, cache.layout.root / item.key)
        return "leased" if run_key and index.is_leased(run_key[1]) else ""
    entry = index.get(item.key)
    if item.kind == "stale-row":
        # Only a row goes (nothing on disk): even a leased one, e.g. left by an eviction on a
        # full disk that could delete but not record.
        if entry is None:
            return "already gone"
        on_disk = any(os.path.lexists(p) for p in entry_paths(cache.layout, entry))
        return "back on disk" if on_disk else ""
    if index.is_leased(item.key):
        return "leased"
    if entry is None:
        if item.bytes == 0 and item.kind == "run":
            return ""  # an unindexed orphan run directory
        return "already gone"
    if entry.last_access > item.last_access:
        return "accessed since the plan"
    return ""


def _paths_for_key(layout: CacheLayout, item: PlannedEviction) -> list[Path]:
    if item.kind == "stale-row":
        return []
    return [layout.root / item.key]


def _forget_records(layout: CacheLayout, item: PlannedEviction) -> None:
    from forgespace.cache import manifest

    kind = {"shared": "shared", "cow-shared": "cow"}.get(item.kind)
    if kind:
        manifest.remove_records(layout.meta_dir, item.target_id, kind)


def _unmount_inside(layout: CacheLayout, paths: list[Path]) -> None:
    fsops.unmount_under(paths, root=layout.root)


def _done(cache: CacheLike, item: PlannedEviction, report: GcReport, freed: int) -> None:
    report.evicted.append(item)
    report.freed_bytes += freed
    counter = f"evictions_{item.reason}"
    with contextlib.suppress(Exception):
        cache.index.count(counter)
        cache.index.count("evicted_bytes", freed)
    from forgespace.cache import metrics

    metrics.observe_eviction(item.reason, freed)
    log.debug("evicted %s (%s, %s, %d bytes)", item.key, item.kind, item.reason, freed)


def _update_gauges(cache: CacheLike) -> None:
    from forgespace.cache import metrics

    with contextlib.suppress(Exception):
        metrics.refresh_from_index(cache.index, cache.settings.cache_max_size)


# --- deletion -----------------------------------------------------------------------------
def _delete_via_trash(layout: CacheLayout, paths: list[Path]) -> None:
    """Rename each path into .forgespace/trash (atomic: nobody sees half of it), then delete
    (fsops: through directory fds, never following a link or crossing a mount)."""
    for p in paths:
        try:
            fsops.discard(layout.root, p)
        except UnsafeCacheEntryError as exc:
            # Refused, never followed or crossed; what reached the trash goes with a later gc
            # once the planted entry is gone (`cache verify` reports it).
            log.warning("%s", exc)


# --- room before a download ---------------------------------------------------------------
def plan_room(
    entries: list[EntryRecord], leased: set[str], *, target_id: str
) -> list[PlannedEviction]:
    """Victims for making room before a download, least recently used first: unleased
    entries of other targets (pure; make_room executes them until the object fits)."""
    return [
        PlannedEviction(e.key, e.target_id, e.kind, "lru", e.bytes, e.last_access)
        for e in entries
        if e.target_id != target_id and e.key not in leased
    ]


def make_room(cache: CacheLike, incoming_bytes: int, *, target_id: str) -> None:
    """Evict least-recently-used unleased entries of other targets so ``incoming_bytes`` fit.

    Called by the engine before a download, while it holds ``target_id``'s lock: other
    targets' locks are only tried (non-blocking), so this never waits while holding a lock.
    If the object still cannot fit under CACHE_MAX_SIZE, it proceeds with a warning naming
    the limit, the size and the leases when the filesystem has room, and raises
    CacheFullError when it has not.
    """
    settings, index = cache.settings, cache.index
    limit = settings.cache_max_size
    total = index.total_bytes()
    if total + incoming_bytes <= limit:
        return
    now = time.time()
    leased = index.leased_keys(now)
    report = GcReport([], 0, total, total, False, limit=limit)
    plan = plan_room(index.entries(), leased, target_id=target_id)
    _hooks(cache).reached(Phase.GC_PLANNED)
    for item in plan:
        if total + incoming_bytes <= limit:
            break
        if execute(cache, item, report):
            total -= item.bytes
    if total + incoming_bytes <= limit:
        _update_gauges(cache)
        return
    leases = index.live_leases(now)
    free = shutil.disk_usage(cache.layout.root).free
    detail = (
        f"cache limit CACHE_MAX_SIZE={limit} bytes, {total} bytes cached, incoming object "
        f"{incoming_bytes} bytes for {target_id}; {len(leases)} live lease(s) pin "
        f"{len(leased)} entr{'y' if len(leased) == 1 else 'ies'}"
        + (f" (busy, not evicted: {len(report.skipped)})" if report.skipped else "")
    )
    if free < incoming_bytes:
        raise CacheFullError(
            errno.ENOSPC,
            f"no room for {target_id}: {detail}; the filesystem has only {free} bytes free",
        )
    log.warning("cache over its limit after evicting all it could: %s; proceeding", detail)
    _update_gauges(cache)


def _is_target_dir(d: os.DirEntry[str]) -> bool:
    # valid ids only: never .forgespace, never a stray name a lock file would be made for
    return is_valid_id(d.name) and d.is_dir(follow_symlinks=False)


def reclaim_retired(cache: CacheLike) -> list[Path]:
    """Delete the tampered shared workspaces a repair kept aside (``{tid}/.retired-*``) once no
    lease pins the target's shared workspace (checked under the target lock, like any
    eviction). Returns what went."""
    gone: list[Path] = []
    with contextlib.suppress(FileNotFoundError), os.scandir(cache.layout.root) as it:
        tops = [d for d in it if _is_target_dir(d)]
    for d in tops:
        try:
            with os.scandir(d.path) as inner:
                retired = [Path(e.path) for e in inner if e.name.startswith(RETIRED_PREFIX)]
        except OSError:
            continue
        if not retired:
            continue
        try:
            with cache.target_lock(d.name, blocking=False):
                if cache.index.is_leased(f"{d.name}/workspace"):
                    continue
                for p in retired:
                    fsops.discard(cache.layout.root, p)
                    gone.append(p)
        except LockTimeoutError:
            continue
    if gone:
        log.info("gc: removed %d retired shared workspace(s) no run uses any more", len(gone))
    return gone


def _remove_empty_target_dirs(cache: CacheLike) -> None:
    # cleanup_cache leaves {tid}/ behind when it removes the target's last run directory.
    # The engine creates {tid}/ and renames into it under the target lock: remove it only
    # under that lock, and only when it is empty (rmdir refuses otherwise).
    tops: list[os.DirEntry[str]] = []
    with contextlib.suppress(FileNotFoundError), os.scandir(cache.layout.root) as it:
        tops = [d for d in it if _is_target_dir(d)]
    for d in tops:
        try:
            with os.scandir(d.path) as inner:
                if next(inner, None) is not None:
                    continue
        except OSError:
            continue
        try:
            with cache.target_lock(d.name, blocking=False):
                os.rmdir(d.path)
        except (LockTimeoutError, OSError):
            continue


def adopt_unindexed(cache: CacheLike) -> list[str]:
    """Index shared workspaces and copy-on-write shared copies found on disk but not in the
    index (a crash between publish's rename and its index write): measured once (a walk of
    that entry only), last access = now, so TTL and LRU apply to them from now on. Run
    directories are not adopted: without a lease they are orphans."""
    adopted = []
    index, layout = cache.index, cache.layout
    known = {e.key for e in index.entries()}
    for e in scan_entries(layout, with_sizes=False):
        if e.kind == "run" or e.key in known:
            continue
        try:
            with cache.target_lock(e.target_id, blocking=False):
                if index.get(e.key) is not None:
                    continue
                found = [x for x in scan_entries_of(layout, e.target_id) if x.key == e.key]
                what = "index an entry found on disk"
                if found and index.try_write(what, index.publish, found[0]):
                    adopted.append(e.key)
        except LockTimeoutError:
            continue  # busy: maybe publishing it right now; the next gc looks again
    if adopted:
        log.warning(
            "indexed %d entr%s found on disk but missing from the index: %s",
            len(adopted),
            "y" if len(adopted) == 1 else "ies",
            ", ".join(adopted[:5]),
        )
    return adopted


def scan_entries_of(layout: CacheLayout, target_id: str) -> list[EntryRecord]:
    """scan_entries (with sizes) restricted to one target directory."""
    return scan_entries(layout, with_sizes=True, only=target_id)


# --- operator eviction --------------------------------------------------------------------
def evict_target(
    cache: CacheLike, target_id: str, *, force: bool = False, timeout: float = 30.0
) -> list[PlannedEviction]:
    """Remove everything cached for ``target_id`` (``forgespace cache evict``).

    Refuses (CleanupRefusedError naming the leases) while a live lease pins any of its
    entries, unless ``force``, which ends those leases first: runs using them lose their
    workspace. Waits at most ``timeout`` for a get_target of that target in flight.
    """
    from forgespace.errors import CleanupRefusedError
    from forgespace.layout import validate_id

    validate_id(target_id, "target_id")
    layout, index = cache.layout, cache.index
    evicted: list[PlannedEviction] = []
    with cache.target_lock(target_id, timeout=timeout):
        leases = [le for le in index.live_leases() if le.target_id == target_id]
        if leases and not force:
            ids = ", ".join(f"{le.lease_id} (held by {le.holder})" for le in leases[:5])
            raise CleanupRefusedError(
                f"refusing to evict target {target_id}: {len(leases)} live lease(s) pin it: "
                f"{ids}{' ...' if len(leases) > 5 else ''}; end those runs (cleanup) or pass "
                "--force; nothing was deleted"
            )
        entries = index.entries_of(target_id)
        tdir = layout.target_dir(target_id)
        paths = [tdir, layout.overlay_dir / target_id]
        _unmount_inside(layout, paths)
        # Delete, then record (a full disk is freed by the deletion; records that still cannot
        # be written are reconciled by the next gc: stale rows dropped, dead leases expire).
        _delete_via_trash(layout, paths)
        for le in leases:
            index.try_write("end a lease of an evicted target", index.end_lease, le.lease_id)
        for e in entries:
            index.try_write("forget an evicted entry", index.remove, e.key)
            item = PlannedEviction(e.key, target_id, e.kind, "operator", e.bytes, e.last_access)
            _forget_records(layout, item)
            evicted.append(item)
            with contextlib.suppress(Exception):
                index.count("evictions_operator")
            from forgespace.cache import metrics

            metrics.observe_eviction("operator", e.bytes)
    _update_gauges(cache)
    if evicted:
        log.info("evicted target %s (%d entries) on request", target_id, len(evicted))
    return evicted


def evict_entry(cache: CacheLike, key: str, *, reason: str = "operator") -> bool:
    """Evict one indexed entry now if it is unleased and its target is not busy."""
    e = cache.index.get(key)
    if e is None:
        return False
    item = PlannedEviction(e.key, e.target_id, e.kind, reason, e.bytes, e.last_access)
    return execute(cache, item, GcReport([], 0, 0, 0, False))
