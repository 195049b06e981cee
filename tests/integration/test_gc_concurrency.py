"""gc with the real WorkspaceCache: LRU order from get_target, TTL, leases, rebuild, and gc
racing real processes that get_target the same targets."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import threading
import time
from pathlib import Path

import pytest
from support.clock import age_entries, expire_leases
from support.procs import make_project, tree_digest

from forgespace.cache.workspace import WorkspaceCache
from forgespace.config import Settings
from forgespace.storage import open_store


def upload(
    settings: Settings, tmp_path: Path, name: str, files: int = 20, *, classic: bool = False
) -> str:
    store = open_store(settings)
    # classic: one archive per target, so an entry's bytes are all it costs (incremental
    # targets also keep their blobs, which count toward CACHE_MAX_SIZE: test_incremental.py)
    store.incremental = not classic  # type: ignore[attr-defined]
    return store.upload_target(make_project(tmp_path / name, files=files, seed=name))


def keys(cache: WorkspaceCache) -> set[str]:
    return {e.key for e in cache.index.entries()}


def test_lru_order_is_set_by_get_target_accesses(settings: Settings, tmp_path: Path) -> None:
    a, b, c = (upload(settings, tmp_path, n) for n in ("a", "b", "c"))
    cache = WorkspaceCache(settings)
    for tid in (a, b, c):
        cache.get_target(tid, workspace_isolation="shared")
        time.sleep(0.01)
    cache.get_target(a, workspace_isolation="shared")  # a hit: a is now the most recent
    sizes = {e.target_id: e.bytes for e in cache.index.entries()}
    # room for exactly one of them: the two least recently used go, in that order
    small = WorkspaceCache(settings.with_(cache_max_size=max(sizes.values())))
    report = small.gc()
    assert [(p.target_id, p.reason) for p in report.evicted] == [(b, "lru"), (c, "lru")]
    assert keys(cache) == {f"{a}/workspace"}
    assert not (settings.cache_dir / b).exists() and not (settings.cache_dir / c).exists()
    assert cache.get_target_report(a, workspace_isolation="shared").downloaded is False
    assert cache.get_target_report(b, workspace_isolation="shared").downloaded is True


def test_ttl_evicts_what_was_not_accessed_for_cache_ttl(settings: Settings, tmp_path: Path) -> None:
    settings = settings.with_(cache_ttl=3600.0)
    old, new = upload(settings, tmp_path, "old"), upload(settings, tmp_path, "new")
    cache = WorkspaceCache(settings)
    cache.get_target(old, workspace_isolation="shared")
    cache.get_target(new, workspace_isolation="copy-on-write", run_id="r1")
    cache.cleanup_cache(cache.layout.run_workspace(new, "r1"), "copy-on-write")
    # Two hours pass for everything published so far...
    age_entries(settings.cache_dir, [f"{old}/workspace", f"{new}/shared"], 7200)
    cache.get_target(new, workspace_isolation="copy-on-write", run_id="r2")  # touches shared/
    report = cache.gc()
    assert [(p.key, p.reason) for p in report.evicted] == [(f"{old}/workspace", "ttl")]
    assert keys(cache) == {f"{new}/shared", f"{new}/r2"}
    assert cache.index.counters()["evictions_ttl"] == 1
    assert cache.get_target_report(old, workspace_isolation="shared").downloaded


def test_leases_protect_until_cleanup_ends_them(settings: Settings, tmp_path: Path) -> None:
    settings = settings.with_(cache_ttl=3600.0)
    tid = upload(settings, tmp_path, "t")
    cache = WorkspaceCache(settings)
    shared = cache.get_target(tid, "s1", "shared")
    iso = cache.get_target(tid, "i1", "isolated")
    cow = cache.get_target(tid, "c1", "copy-on-write")
    # Two hours pass: TTL too wants every entry gone.
    age_entries(settings.cache_dir, sorted(keys(cache)), 7200)
    # A limit of 1 byte: LRU too wants everything unleased gone. (The getters use the normal
    # limit, which also bounds an archive's extracted size.)
    report = WorkspaceCache(settings.with_(cache_max_size=1)).gc()
    # copy-on-write runs own a full copy: their shared copy is not pinned (copy backend)
    assert [p.key for p in report.evicted] == [f"{tid}/shared"]
    for p in (shared, iso, cow):
        assert Path(p).is_dir() and tree_digest(Path(p)) == tree_digest(tmp_path / "t")
    cache.cleanup_cache(iso, "isolated")
    cache.cleanup_cache(cow, "copy-on-write")
    assert Path(shared).is_dir() and cache.gc().evicted == []
    cache.cleanup_cache(shared, "shared", run_id="s1")
    report = cache.gc()
    assert [(p.key, p.reason) for p in report.evicted] == [(f"{tid}/workspace", "ttl")]
    assert keys(cache) == set() and not (settings.cache_dir / tid).exists()


def test_expired_lease_makes_the_run_directory_an_orphan(
    settings: Settings, tmp_path: Path
) -> None:
    tid = upload(settings, tmp_path, "t")
    cache = WorkspaceCache(settings)
    gone = cache.get_target(tid, "crashed", "isolated")  # its run never calls cleanup
    expire_leases(settings.cache_dir, [f"{tid}/crashed"])  # one lease TTL later
    live = cache.get_target(tid, "live", "isolated")
    report = cache.gc()
    assert [(p.key, p.reason) for p in report.evicted] == [(f"{tid}/crashed", "orphan")]
    assert not Path(gone).exists() and Path(live).is_dir()


def test_dry_run_deletes_nothing(settings: Settings, tmp_path: Path) -> None:
    tid = upload(settings, tmp_path, "t")
    cache = WorkspaceCache(settings)
    ws = cache.get_target(tid, workspace_isolation="shared")
    before = tree_digest(settings.cache_dir / tid)
    report = WorkspaceCache(settings.with_(cache_max_size=1)).gc(dry_run=True)
    assert [(p.key, p.reason) for p in report.plan] == [(f"{tid}/workspace", "lru")]
    assert report.evicted == [] and report.total_after == 0
    assert tree_digest(settings.cache_dir / tid) == before and Path(ws).is_dir()
    assert keys(cache) == {f"{tid}/workspace"}


@pytest.mark.parametrize("damage", ["deleted", "garbage"])
def test_index_is_rebuilt_from_disk(
    settings: Settings, tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    tid = upload(settings, tmp_path, "t")
    cache = WorkspaceCache(settings)
    cache.get_target(tid, "s1", "shared")
    iso = cache.get_target(tid, "i1", "isolated")
    cache.get_target(tid, "c1", "copy-on-write")
    want = {(e.key, e.kind, e.bytes) for e in cache.index.entries()}
    index_path = cache.layout.index_path
    if damage == "deleted":
        for suffix in ("", "-wal", "-shm"):
            Path(f"{index_path}{suffix}").unlink(missing_ok=True)
    else:
        index_path.write_bytes(b"\x00garbage" * 4096)
    with caplog.at_level(logging.WARNING):
        fresh = WorkspaceCache(settings)
    assert any("rebuil" in r.getMessage() for r in caplog.records)
    assert {(e.key, e.kind, e.bytes) for e in fresh.index.entries()} == want
    # served from the rebuilt index without a new download, and nothing live is evicted
    assert fresh.get_target_report(tid, "s2", "shared").downloaded is False
    assert fresh.gc().evicted == []
    fresh.cleanup_cache(iso, "isolated")  # the lease id convention survives the rebuild
    assert not fresh.index.is_leased(f"{tid}/i1")


# --- gc racing real processes --------------------------------------------------------------
ROUNDS = 6


def _getter(settings: Settings, calls: list[tuple[str, str, str]], expected: dict, out) -> None:
    """One OS process: get_target, check the workspace is complete, clean up; repeat."""
    cache = WorkspaceCache(settings)
    errors: list[str] = []
    downloads = 0
    for tid, rid, mode in calls:
        try:
            res = cache.get_target_report(tid, rid, mode)
            downloads += res.downloaded
            got = tree_digest(Path(res.path))
            if got != expected[tid]:
                missing = sorted(set(expected[tid]) - set(got))[:3]
                errors.append(f"{mode} {tid}/{rid}: incomplete workspace, missing {missing}")
            cache.cleanup_cache(res.path, mode, run_id=rid if mode == "shared" else None)
        except Exception as exc:
            errors.append(f"{mode} {tid}/{rid}: {type(exc).__name__}: {exc}")
    out.put((os.getpid(), errors, downloads))


@pytest.mark.slow
def test_gc_racing_eight_processes_never_breaks_a_get(settings: Settings, tmp_path: Path) -> None:
    targets = [upload(settings, tmp_path, n, files=40) for n in ("x", "y")]
    expected = {t: tree_digest(tmp_path / n) for t, n in zip(targets, ("x", "y"), strict=True)}
    modes = ["shared", "copy-on-write", "isolated", "shared"]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = []
    for i in range(8):
        calls = [
            (targets[(i + r) % 2], f"p{i}-r{r}", modes[(i + r) % len(modes)]) for r in range(ROUNDS)
        ]
        procs.append(ctx.Process(target=_getter, args=(settings, calls, expected, out)))
    # gc wants the cache empty: everything unleased is evicted as soon as it is seen
    gc_cache = WorkspaceCache(settings.with_(cache_max_size=1, cache_ttl=0.0))
    stop = threading.Event()
    gc_errors: list[BaseException] = []
    evicted = [0]

    def gc_loop() -> None:
        while not stop.is_set():
            try:
                evicted[0] += len(gc_cache.gc().evicted)
            except BaseException as exc:
                gc_errors.append(exc)
                return
            time.sleep(0.005)

    gc_thread = threading.Thread(target=gc_loop)
    gc_thread.start()
    try:
        for p in procs:
            p.start()
        results = [out.get(timeout=120) for _ in procs]
    finally:
        stop.set()
        gc_thread.join(30)
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    assert gc_errors == []
    assert [e for _, errs, _ in results for e in errs] == []
    assert all(p.exitcode == 0 for p in procs)
    # the race really happened: gc evicted entries the getters then had to fetch again
    assert evicted[0] > 0
    assert sum(d for _, _, d in results) > 2
    # and it ends consistent: one more gc leaves nothing unleased behind, nothing leased
    gc_cache.gc()
    assert gc_cache.index.live_leases() == []
    assert keys(gc_cache) == set()
    assert sorted(p.name for p in settings.cache_dir.iterdir()) == [".forgespace"]


def test_metrics_follow_gets_and_evictions_and_are_served(
    settings: Settings, tmp_path: Path
) -> None:
    import socket
    import urllib.request

    from forgespace.cache import metrics

    tid = upload(settings, tmp_path, "m")
    cache = WorkspaceCache(settings)
    hits0 = metrics.value("forgespace_cache_hits_total", mode="shared")
    misses0 = metrics.value("forgespace_cache_misses_total", mode="shared")
    downloads0 = metrics.value("forgespace_cache_downloads_total")
    lru0 = metrics.value("forgespace_cache_evictions_total", reason="lru")
    cache.get_target(tid, workspace_isolation="shared")
    cache.get_target(tid, workspace_isolation="shared")
    assert metrics.value("forgespace_cache_misses_total", mode="shared") == misses0 + 1
    assert metrics.value("forgespace_cache_hits_total", mode="shared") == hits0 + 1
    assert metrics.value("forgespace_cache_downloads_total") == downloads0 + 1
    assert metrics.value("forgespace_cache_downloaded_bytes_total") > 0
    assert (
        metrics.value("forgespace_get_target_duration_seconds_count", mode="shared", outcome="hit")
        >= 1
    )
    WorkspaceCache(settings.with_(cache_max_size=1)).gc()
    assert metrics.value("forgespace_cache_evictions_total", reason="lru") == lru0 + 1
    assert metrics.value("forgespace_cache_bytes") == 0
    assert metrics.value("forgespace_cache_entries") == 0
    assert metrics.value("forgespace_cache_limit_bytes") == 1
    # Port 0: the server binds a free port itself (no probe-then-bind race); stopped here.
    server = metrics.start_metrics_server(0, addr="127.0.0.1")
    port = server.server_port
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    finally:
        server.close()
    with pytest.raises(OSError):  # stopped: nothing listens there any more
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    body = body.decode()
    assert 'forgespace_cache_evictions_total{reason="lru"}' in body
    assert "forgespace_get_target_duration_seconds_bucket" in body


def test_overlay_run_pins_the_shared_copy_and_its_dead_mount_is_removed(
    settings: Settings, tmp_path: Path
) -> None:
    from forgespace.cache import overlay
    from forgespace.errors import BackendUnavailableError

    settings = settings.with_(cow_backend="overlay")
    try:
        cache = WorkspaceCache(settings)
    except BackendUnavailableError as exc:
        pytest.skip(f"overlay mounts refused here: {exc}")
    tid = upload(settings, tmp_path, "ov")
    ws = Path(cache.get_target(tid, "o1", "copy-on-write"))
    assert ws in overlay.mounts_under(cache.layout.root)
    greedy = WorkspaceCache(settings.with_(cache_max_size=1))
    # The live run's lease pins its overlay's lower layer, the shared copy.
    assert greedy.gc().evicted == []
    expire_leases(settings.cache_dir, [f"{tid}/o1"])  # the run died without cleanup
    report = greedy.gc()
    assert {(p.key, p.reason) for p in report.evicted} == {
        (f"{tid}/o1", "orphan"),
        (f"{tid}/shared", "lru"),
    }
    assert overlay.mounts_under(cache.layout.root) == []
    assert not (cache.layout.overlay_dir / tid / "o1").exists()
    assert not (settings.cache_dir / tid).exists()


@pytest.mark.slow
def test_gc_killed_mid_deletion_is_finished_by_the_next_gc(
    settings: Settings, tmp_path: Path, settings_env
) -> None:
    import signal
    import subprocess
    import sys

    from support.procs import wait_for

    from forgespace.cli.cache_cmds import verify_doc

    cache = WorkspaceCache(settings)
    victims = [upload(settings, tmp_path, f"v{i}", files=3000) for i in range(2)]
    for tid in victims:
        cache.get_target(tid, workspace_isolation="shared")
    keep = upload(settings, tmp_path, "keep")
    kept = Path(cache.get_target(keep, "live-run", "shared"))
    # Every unleased entry goes (CACHE_MAX_SIZE cannot be set below 1 MiB: TTL 0 instead).
    env = {**settings_env(settings), "CACHE_TTL": "0"}
    trash = cache.layout.trash_dir
    gc = subprocess.Popen(
        [sys.executable, "-c", "from forgespace.cli import main; main()", "cache", "gc"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        # SIGKILL while a renamed workspace is being deleted from the trash
        wait_for(lambda: any(trash.iterdir()) or gc.poll() is not None, 30, "gc deleting")
        gc.send_signal(signal.SIGKILL)
    finally:
        gc.wait(30)
    assert gc.returncode == -signal.SIGKILL, "gc finished before it could be killed"
    assert any(trash.iterdir())  # it really died half way
    # Nobody sees half a workspace meanwhile: each victim is complete or gone.
    for i, tid in enumerate(victims):
        ws = settings.cache_dir / tid / "workspace"
        assert not ws.exists() or tree_digest(ws) == tree_digest(tmp_path / f"v{i}")
    WorkspaceCache(settings.with_(cache_max_size=1)).gc()
    assert list(trash.iterdir()) == []
    assert keys(cache) == {f"{keep}/workspace"}
    assert tree_digest(kept) == tree_digest(tmp_path / "keep")
    doc = verify_doc(cache, repair=False)
    assert doc["ok"], doc


def test_room_is_made_before_a_download(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    a, b, c, d = (upload(settings, tmp_path, n, files=30, classic=True) for n in "abcd")
    probe = WorkspaceCache(settings)
    probe.get_target(a, workspace_isolation="shared")
    size = probe.index.get(f"{a}/workspace").bytes  # type: ignore[union-attr]
    obj = probe.layout.shared_target(a).stat().st_size  # what make_room reserves
    # two entries fit, but not two entries plus the next object
    cache = WorkspaceCache(settings.with_(cache_max_size=2 * size + obj // 2))
    cache.get_target(b, workspace_isolation="shared")  # a, b cached: 2 sizes
    cache.get_target(a, workspace_isolation="shared")  # a is now the most recent
    cache.get_target(c, "run-c", "shared")  # must evict b (LRU, unleased) first
    assert keys(cache) == {f"{a}/workspace", f"{c}/workspace"}
    assert cache.index.counters()["evictions_lru"] == 1
    # with every other entry leased nothing can go: it still proceeds (disk has room)
    cache.get_target(a, "run-a", "shared")
    with caplog.at_level(logging.WARNING, logger="forgespace.cache.eviction"):
        cache.get_target(d, workspace_isolation="shared")
    assert keys(cache) == {f"{a}/workspace", f"{c}/workspace", f"{d}/workspace"}
    (warning,) = [r.getMessage() for r in caplog.records]
    assert f"CACHE_MAX_SIZE={2 * size + obj // 2}" in warning and "2 live lease(s)" in warning
