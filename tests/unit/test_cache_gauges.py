"""The cache gauges (bytes, entries, live leases) follow every publish, cleanup and eviction,
and a cache hit does not pay for refreshing them."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.procs import make_project

from forgespace.cache import metrics
from forgespace.cache.workspace import WorkspaceCache
from forgespace.config import Settings
from forgespace.storage import open_store


def gauges() -> tuple[float, float, float]:
    return (
        metrics.value("forgespace_cache_bytes"),
        metrics.value("forgespace_cache_entries"),
        metrics.value("forgespace_cache_live_leases"),
    )


@pytest.fixture
def cache(settings: Settings, tmp_path: Path) -> WorkspaceCache:
    # Another test of this process may have left the module-level gauges anywhere.
    metrics.set_cache_state(-1, -1, entries=-1, limit=-1)
    return WorkspaceCache(settings)


def test_gauges_move_at_publish_and_cleanup_not_at_a_hit(
    cache: WorkspaceCache, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = open_store(settings)
    a = store.upload_target(make_project(tmp_path / "a", files=6, seed="a"))
    b = store.upload_target(make_project(tmp_path / "b", files=9, seed="b"))

    run_a = cache.get_target(a, "r1", "isolated")
    s = cache.index.summary()
    assert gauges() == (s.bytes, 1, 1) and s.bytes > 0
    assert metrics.value("forgespace_cache_limit_bytes") == settings.cache_max_size

    cache.get_target(b, "r2", "shared")
    s2 = cache.index.summary()
    assert gauges() == (s2.bytes, 2, 2) and s2.bytes > s.bytes

    # A hit publishes nothing: no index aggregate on the hot path.
    calls = []
    real = cache.index.summary
    monkeypatch.setattr(cache.index, "summary", lambda *a, **k: calls.append(1) or real(*a, **k))
    cache.get_target(b, "r3", "shared")
    assert calls == []
    monkeypatch.setattr(cache.index, "summary", real)

    cache.cleanup_cache(run_a, "isolated")
    s3 = cache.index.summary()
    # The isolated run is gone; target b keeps its shared entry and the two shared leases.
    assert gauges() == (s3.bytes, 1, 2) and s3.bytes < s2.bytes

    shared_path = cache.get_target(b, "r2", "shared")
    cache.cleanup_cache(shared_path, "shared", run_id="r2")
    cache.cleanup_cache(shared_path, "shared", run_id="r3")
    assert gauges() == (s3.bytes, 1, 0)


def test_gauges_move_at_eviction(cache: WorkspaceCache, settings: Settings, tmp_path: Path) -> None:
    store = open_store(settings)
    a = store.upload_target(make_project(tmp_path / "a", files=6, seed="a"))
    path = cache.get_target(a, None, "shared")
    cache.cleanup_cache(path, "shared")
    assert gauges()[1] == 1
    # A sweep with a limit of one byte evicts the unleased entry (LRU).
    WorkspaceCache(settings.with_(cache_max_size=1)).gc()
    assert gauges() == (0, 0, 0)
