"""The index tells the truth after a rebuild and under concurrent publishes (issue 12, item 6):
run modes come from the run directory itself, overlay runs are sized by their upper layer, a
publish racing a rebuild is kept, and Prometheus counts hits and misses as the index does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.procs import make_project

from forgespace.cache import index as index_module
from forgespace.cache import metrics
from forgespace.cache.workspace import WorkspaceCache
from forgespace.config import Settings
from forgespace.storage import open_store


def test_rebuild_keeps_each_runs_mode_and_cleanup_still_accepts_it(
    settings: Settings, tmp_path: Path
) -> None:
    """A non-archive target: an isolated run and a copy-on-write run look the same on disk
    ({rid}/target). After a rebuild each keeps its mode, and cleanup of each succeeds."""
    (tmp_path / "tool").write_bytes(b"\x7fELF not an archive")
    cache = WorkspaceCache(settings)
    tid = cache.store.upload_target(tmp_path / "tool")
    iso = cache.get_target(tid, "ri", "isolated")
    cow = cache.get_target(tid, "rc", "copy-on-write")
    cache.index.rebuild()
    modes = {e.run_id: e.mode for e in cache.index.entries_of(tid) if e.kind == "run"}
    assert modes == {"ri": "isolated", "rc": "copy-on-write"}
    cache.cleanup_cache(iso, "isolated")
    cache.cleanup_cache(cow, "copy-on-write")
    assert not Path(iso).exists() and not Path(cow).exists()


def test_a_publish_during_a_rebuild_walk_is_not_lost(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process publishes a run while the rebuild walks the disk: its row survives."""
    store = open_store(settings)
    tid = store.upload_target(make_project(tmp_path / "p", files=3))
    cache = WorkspaceCache(settings)
    cache.get_target(tid, "before", "isolated")
    real = index_module.scan_entries
    env = {
        **os.environ,
        "CACHE_DIR": str(settings.cache_dir),
        "STORAGE_DIR": str(settings.storage_dir),
    }
    code = (
        "from forgespace import Settings, WorkspaceCache\n"
        f"WorkspaceCache(Settings.from_env()).get_target({tid!r}, 'during', 'isolated')\n"
    )

    def walk_while_another_publishes(*a: object, **kw: object) -> list[index_module.EntryRecord]:
        found = real(*a, **kw)  # type: ignore[arg-type]
        subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
        return found

    monkeypatch.setattr(index_module, "scan_entries", walk_while_another_publishes)
    cache.index.rebuild()
    keys = {e.key for e in cache.index.entries()}
    assert {f"{tid}/before", f"{tid}/during"} <= keys


def test_copy_on_write_copying_the_shared_download_counts_one_miss_in_both(
    settings: Settings, tmp_path: Path
) -> None:
    """Shared first, then copy-on-write: the second get copies the cached download (no new
    download). Index and Prometheus both count it as a miss."""
    cache = WorkspaceCache(settings)
    tid = cache.store.upload_target(make_project(tmp_path / "p", files=3))
    cache.get_target(tid, "s", "shared")
    before_idx = cache.index.counters()
    hits0 = metrics.value("forgespace_cache_hits_total", mode="copy-on-write")
    misses0 = metrics.value("forgespace_cache_misses_total", mode="copy-on-write")
    res = cache.get_target_report(tid, "c", "copy-on-write")
    assert not res.downloaded
    after_idx = cache.index.counters()
    idx_miss = after_idx.get("misses", 0) - before_idx.get("misses", 0)
    idx_hit = after_idx.get("hits", 0) - before_idx.get("hits", 0)
    prom_miss = metrics.value("forgespace_cache_misses_total", mode="copy-on-write") - misses0
    prom_hit = metrics.value("forgespace_cache_hits_total", mode="copy-on-write") - hits0
    assert (idx_hit, idx_miss) == (prom_hit, prom_miss) == (0, 1)


def test_rebuild_sizes_an_overlay_run_by_its_upper_layer(
    settings: Settings, tmp_path: Path
) -> None:
    if os.geteuid() != 0:
        pytest.skip("overlay mounts need root here")
    ov = settings.with_(cow_backend="overlay")
    cache = WorkspaceCache(ov)
    tid = cache.store.upload_target(make_project(tmp_path / "p", files=40, size=4000))
    ws = Path(cache.get_target(tid, "r1", "copy-on-write"))
    (ws / "mine.bin").write_bytes(b"x" * 1000)
    try:
        cache.index.rebuild()
        (run,) = [e for e in cache.index.entries_of(tid) if e.kind == "run"]
        shared = cache.index.get(f"{tid}/shared")
        assert shared is not None and shared.bytes > 100_000
        assert 1000 <= run.bytes < 2000, run
    finally:
        cache.cleanup_cache(ws, "copy-on-write")
