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


def test_oldest_lease_gauge_is_the_creation_time_of_the_oldest_live_lease(
    cache: WorkspaceCache, settings: Settings, tmp_path: Path
) -> None:
    store = open_store(settings)
    a = store.upload_target(make_project(tmp_path / "a", files=3, seed="a"))
    first = cache.get_target(a, "r1", "isolated")
    cache.get_target(a, "r2", "isolated")
    leases = cache.index.live_leases()
    assert metrics.value("forgespace_cache_oldest_lease_created_timestamp_seconds") == min(
        le.created for le in leases
    )
    cache.cleanup_cache(first, "isolated")
    (left,) = cache.index.live_leases()
    assert metrics.value("forgespace_cache_oldest_lease_created_timestamp_seconds") == left.created
    cache.cleanup_cache(cache.get_target(a, "r2", "isolated"), "isolated")
    assert metrics.value("forgespace_cache_oldest_lease_created_timestamp_seconds") == 0


def test_a_failed_download_is_counted_by_error_type(
    cache: WorkspaceCache, settings: Settings, tmp_path: Path
) -> None:
    from forgespace.errors import IntegrityError

    store = open_store(settings)
    a = store.upload_target(make_project(tmp_path / "a", files=3, seed="a"))
    obj = Path(settings.storage_dir) / a / "target"
    obj.write_bytes(obj.read_bytes()[:-10])  # the object no longer matches what it carries
    before = metrics.value("forgespace_cache_download_failures_total", error="IntegrityError")
    with pytest.raises(IntegrityError):
        cache.get_target(a, "r1", "isolated")
    after = metrics.value("forgespace_cache_download_failures_total", error="IntegrityError")
    assert after == before + 1


def test_worker_sweeps_are_counted_and_stamped(cache: WorkspaceCache) -> None:
    import asyncio

    from forgespace.temporal.worker import _sweep_loop

    class Broken:
        def gc(self) -> None:
            raise OSError("disk on fire")

    async def one_pass(c: object) -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(_sweep_loop(c, 3600, stop))  # type: ignore[arg-type]
        await asyncio.sleep(0.5)  # the first sweep runs at start-up
        stop.set()
        await asyncio.wait_for(task, 10)

    ok0 = metrics.value("forgespace_cache_sweeps_total", outcome="ok")
    failed0 = metrics.value("forgespace_cache_sweeps_total", outcome="failed")
    asyncio.run(one_pass(Broken()))
    assert metrics.value("forgespace_cache_sweeps_total", outcome="failed") == failed0 + 1
    metrics.LAST_SWEEP.set(0)
    asyncio.run(one_pass(cache))
    assert metrics.value("forgespace_cache_sweeps_total", outcome="ok") == ok0 + 1
    assert metrics.value("forgespace_cache_last_sweep_success_timestamp_seconds") > 0
