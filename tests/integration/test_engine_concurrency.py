"""One download per target across real OS processes (and threads), on both backends.

8 processes ask at once for one shared target and 8 for one copy-on-write target on an
empty cache: exactly one object GET per target (counted at the S3 proxy, which sees every
process's requests; on the local store counted by the index's download counter), and every
returned workspace is complete.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from support.procs import make_project, run_getters, tree_digest
from support.s3server import S3Server

from forgespace.cache.workspace import GetResult, WorkspaceCache
from forgespace.config import Settings

pytestmark = pytest.mark.integration

N = 8


@pytest.mark.slow
def test_eight_processes_per_mode_one_download_each(
    any_store_settings: Settings,
    settings_env: Callable[[Settings], dict[str, str]],
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    settings = any_store_settings
    project = make_project(tmp_path / "project", files=300, size=2000)
    want = tree_digest(project)
    cache = WorkspaceCache(settings)
    tid_shared = cache.store.upload_target(project, target_id="t-shared")
    tid_cow = cache.store.upload_target(project, target_id="t-cow")
    calls = [(tid_shared, f"s{i}", "shared") for i in range(N)]
    calls += [(tid_cow, f"c{i}", "copy-on-write") for i in range(N)]

    results = run_getters(settings_env(settings), calls, tmp_path, timeout=90)

    errors = [r for r in results if "error" in r]
    assert not errors, errors
    shared, cow = results[:N], results[N:]
    assert sum(bool(r["downloaded"]) for r in shared) == 1
    assert sum(bool(r["downloaded"]) for r in cow) == 1
    assert {r["path"] for r in shared} == {str(cache.layout.shared_workspace(tid_shared))}
    assert {r["path"] for r in cow} == {
        str(cache.layout.run_workspace(tid_cow, f"c{i}")) for i in range(N)
    }
    for r in results:
        assert r["digest"] == want, f"incomplete workspace returned to pid {r['pid']}"
    assert len({r["pid"] for r in results}) == 2 * N
    if settings.storage_backend == "s3":
        server: S3Server = request.getfixturevalue("s3_server")
        assert server.get_count(f"{settings.s3_bucket}/{tid_shared}/target") == 1
        assert server.get_count(f"{settings.s3_bucket}/{tid_cow}/target") == 1
    counters = cache.index.counters()
    assert counters.get("downloads") == 2
    assert counters.get("misses", 0) + counters.get("hits", 0) == 2 * N
    # every copy-on-write run holds a lease; shared runs with a run id hold one each too
    assert len(cache.index.live_leases()) == 2 * N


def test_threads_of_one_process_share_one_download(settings: Settings, tmp_path: Path) -> None:
    project = make_project(tmp_path / "project", files=100)
    cache = WorkspaceCache(settings)
    tid = cache.store.upload_target(project)
    results: list[GetResult] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(N)

    def worker(i: int) -> None:
        try:
            barrier.wait()
            results.append(cache.get_target_report(tid, f"t{i}", "shared"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(N)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert sum(r.downloaded for r in results) == 1
    assert cache.index.counters().get("downloads") == 1
    assert tree_digest(Path(results[0].path)) == tree_digest(project)


def test_different_targets_download_in_parallel(settings: Settings, tmp_path: Path) -> None:
    """No global lock: while one target's download holds its lock, another target is served."""
    cache = WorkspaceCache(settings)
    a = cache.store.upload_target(make_project(tmp_path / "a", files=5, seed="a"))
    b = cache.store.upload_target(make_project(tmp_path / "b", files=5, seed="b"))
    with cache.target_lock(a, exclusive=True):  # as if a's download were in progress
        assert Path(cache.get_target(b, None, "shared")).is_dir()


@pytest.mark.slow
def test_mixed_shared_and_copy_on_write_processes_one_get(
    s3_settings: Settings,
    s3_server: S3Server,
    settings_env: Callable[[Settings], dict[str, str]],
    tmp_path: Path,
) -> None:
    project = make_project(tmp_path / "project", files=100)
    cache = WorkspaceCache(s3_settings)
    tid = cache.store.upload_target(project)
    calls = [(tid, f"m{i}", "shared" if i % 2 else "copy-on-write") for i in range(6)]
    results = run_getters(settings_env(s3_settings), calls, tmp_path, timeout=90)
    assert not [r for r in results if "error" in r]
    assert all(r["digest"] == tree_digest(project) for r in results)
    assert sum(bool(r["downloaded"]) for r in results) == 1
    assert s3_server.get_count(f"{s3_settings.s3_bucket}/{tid}/target") == 1
