"""Deterministic races through the cache's hook phases (issue 11, item 2): a child process is
held exactly between the shared-lock miss and the exclusive attempt, between gc's plan and
its execution, and between a publish and the lease record, while this process acts; each
re-check under the lock then decides. No sleeps decide an order: the child waits on an
event the test sets."""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.faults import HoldAt
from support.procs import make_project

from forgespace.cache.hooks import Phase
from forgespace.cache.workspace import WorkspaceCache
from forgespace.config import Settings
from forgespace.storage import open_store

CTX = multiprocessing.get_context("fork")
WAIT_S = 60.0


def _child(settings: Settings, hooks: HoldAt, call: Callable[[WorkspaceCache], Any], out: Any):
    try:
        out.put(("ok", call(WorkspaceCache(settings, hooks=hooks))))
    except BaseException as exc:
        out.put(("error", repr(exc)))


@pytest.fixture
def held_child() -> Iterator[Callable[..., Any]]:
    """Start ``call(cache)`` in a forked process whose cache holds at ``phase``; returns
    (hooks, result getter)."""
    procs: list[Any] = []

    def start(settings: Settings, phase: Phase, call: Callable[[WorkspaceCache], Any]) -> Any:
        hooks = HoldAt(phase)
        out = CTX.Queue()
        p = CTX.Process(target=_child, args=(settings, hooks, call, out))
        p.start()
        procs.append(p)
        assert hooks.arrived.wait(WAIT_S), f"the child never reached {phase}"

        def result() -> Any:
            hooks.go.set()
            status, value = out.get(timeout=WAIT_S)
            p.join(WAIT_S)
            assert status == "ok", value
            return value

        return hooks, result

    yield start
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(10)


@pytest.fixture
def tid(settings: Settings, tmp_path: Path) -> str:
    return open_store(settings).upload_target(make_project(tmp_path / "project", files=5))


def _shared(rid: str) -> Callable[[WorkspaceCache], Any]:
    def call(cache: WorkspaceCache) -> Any:
        r = cache.get_target_report(cache_tid(cache), rid, "shared")
        return r.path, r.downloaded

    return call


def cache_tid(cache: WorkspaceCache) -> str:
    (tid,) = [p.name for p in Path(cache.settings.storage_dir).iterdir() if p.is_dir()]
    return tid


@pytest.mark.parametrize("mode", ["shared", "copy-on-write"])
def test_a_publish_between_the_shared_miss_and_the_exclusive_lock_is_seen(
    settings: Settings, tid: str, held_child: Callable[..., Any], mode: str
) -> None:
    """The child misses under the shared lock and is held before the exclusive attempt; this
    process downloads and publishes meanwhile. The child's re-check under the exclusive lock
    finds the entry: one download in all, and the child reports a hit."""

    def call(cache: WorkspaceCache) -> Any:
        r = cache.get_target_report(tid, "child", mode)
        return r.path, r.downloaded

    _, result = held_child(settings, Phase.SHARED_MISS, call)
    mine = WorkspaceCache(settings).get_target_report(tid, "parent", mode)
    assert mine.downloaded
    path, downloaded = result()
    assert not downloaded and Path(path).is_dir()
    assert WorkspaceCache(settings).index.counters().get("downloads") == 1


def test_an_entry_leased_between_gc_plan_and_execute_is_kept(
    settings: Settings, tid: str, held_child: Callable[..., Any]
) -> None:
    """gc plans to evict an expired, unleased shared workspace and is held before executing;
    a run takes it meanwhile. gc's re-check under the target lock keeps it."""
    quick = settings.with_(cache_ttl=1.0)
    first = WorkspaceCache(quick)
    ws = first.get_target(tid, "old", "shared")
    first.cleanup_cache(ws, "shared", run_id="old")
    time.sleep(1.1)  # past CACHE_TTL: a lower bound, not a race

    def gc(cache: WorkspaceCache) -> Any:
        report = cache.gc()
        return [p.key for p in report.plan], [(s.key, s.why) for s in report.skipped]

    _, result = held_child(quick, Phase.GC_PLANNED, gc)
    assert WorkspaceCache(quick).get_target(tid, "new", "shared") == ws
    planned, skipped = result()
    assert f"{tid}/workspace" in planned
    assert (f"{tid}/workspace", "leased") in skipped
    assert Path(ws, "run.sh").is_file()


def test_make_room_rechecks_a_victim_leased_after_its_plan(
    settings: Settings, tmp_path: Path, held_child: Callable[..., Any]
) -> None:
    """make_room (a download needing space) plans to evict another target's unleased
    workspace and is held; a run takes that workspace meanwhile: it is kept."""
    store = open_store(settings)
    a = store.upload_target(make_project(tmp_path / "a", files=40))
    b = store.upload_target(make_project(tmp_path / "b", files=40, seed="b"))
    cache = WorkspaceCache(settings)
    ws_a = cache.get_target(a, "old", "shared")
    cache.cleanup_cache(ws_a, "shared", run_id="old")
    size_a = cache.index.total_bytes()
    small = settings.with_(cache_max_size=size_a + 1)

    def get_b(c: WorkspaceCache) -> Any:
        return c.get_target(b, "rb", "shared")

    _, result = held_child(small, Phase.GC_PLANNED, get_b)
    assert WorkspaceCache(small).get_target(a, "new", "shared") == ws_a
    assert Path(result()).is_dir()  # proceeds over the limit, with a warning
    assert Path(ws_a, "run.sh").is_file()


@pytest.mark.parametrize("mode", ["shared", "isolated", "copy-on-write"])
def test_gc_between_publish_and_lease_never_takes_the_new_entry(
    settings: Settings, tid: str, held_child: Callable[..., Any], mode: str
) -> None:
    """The child has published its entry and is held before recording its access and lease;
    gc with an expired TTL runs meanwhile and must leave what the child is about to return."""
    quick = settings.with_(cache_ttl=0.001)

    def call(cache: WorkspaceCache) -> Any:
        return cache.get_target(tid, "child", mode)

    _, result = held_child(quick, Phase.PUBLISHED, call)
    time.sleep(0.01)  # past CACHE_TTL
    report = WorkspaceCache(quick).gc()
    assert report.evicted == []
    path = result()
    assert Path(path, "run.sh").is_file()


def test_an_isolated_hit_waits_for_gc_deleting_its_lapsed_run(
    settings: Settings, tid: str, held_child: Callable[..., Any]
) -> None:
    """A run's lease lapsed and gc decided (under the exclusive target lock) to delete its run
    directory; the run's retry asks for its workspace at that moment. The hit checks under the
    shared lock, so it waits for gc and then builds a fresh copy: it never returns the
    directory gc is deleting."""
    import threading

    from support.clock import expire_leases

    cache = WorkspaceCache(settings)
    first = Path(cache.get_target(tid, "r1", "isolated"))
    expire_leases(settings.cache_dir, [f"{tid}/r1"])  # the run's worker died a TTL ago

    def gc(c: WorkspaceCache) -> Any:
        return [(p.key, p.reason) for p in c.gc().evicted]

    _, result = held_child(settings, Phase.GC_VICTIM_CHECKED, gc)  # holds the exclusive lock
    got: list[str] = []
    retry = threading.Thread(
        target=lambda: got.append(WorkspaceCache(settings).get_target(tid, "r1", "isolated"))
    )
    retry.start()
    # Give an unlocked hit every chance to return the doomed path before gc goes on; with the
    # lock the retry is still waiting whatever the machine's speed (this only bounds how long
    # the test looks for the bug).
    retry.join(timeout=2.0)
    assert result() == [(f"{tid}/r1", "orphan")]
    retry.join(WAIT_S)
    assert got, "the retry never returned"
    path = Path(got[0])
    assert path == first  # the same run's path, built again
    assert (path / "run.sh").is_file(), "the retry returned the directory gc deleted"
    assert f"{tid}/r1" in {e.key for e in WorkspaceCache(settings).index.entries()}


def test_a_staging_directory_whose_owner_holds_its_lock_at_execution_is_kept(
    settings: Settings, tid: str, held_child: Callable[..., Any]
) -> None:
    """gc plans a staging directory whose owner lock nobody holds (a dead owner's leftover)
    and is held before executing; meanwhile a process holds that owner lock. gc asks again
    at execution, keeps the directory and says why; once the lock is free, gc removes it."""
    import fcntl
    import os

    from forgespace.cache import staging

    cache = WorkspaceCache(settings)
    cache.get_target(tid, "r1", "isolated")  # the cache's directories exist
    token = "f" * 32
    name = staging.staging_name(tid, "download", token, "abcd1234")
    stage = cache.layout.tmp_dir / name
    stage.mkdir()
    (stage / "part").write_bytes(b"half a download")
    key = str(stage.relative_to(settings.cache_dir))

    def gc(c: WorkspaceCache) -> Any:
        report = c.gc()
        planned = [(p.key, p.kind) for p in report.plan]
        return planned, [(s.key, s.target_id, s.why) for s in report.skipped], report.evicted

    _, result = held_child(settings, Phase.GC_PLANNED, gc)
    owners = staging.owners_dir(cache.layout)
    owners.mkdir(parents=True, exist_ok=True)
    fd = os.open(owners / f"{token}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # the owner is alive now
        planned, skipped, evicted = result()
        assert (key, "staging") in planned
        assert (key, tid, "owner alive") in skipped
        assert [e for e in evicted if e.key == key] == []
        assert (stage / "part").read_bytes() == b"half a download"
    finally:
        os.close(fd)  # the owner is gone: its lock is free
    again = WorkspaceCache(settings).gc()
    assert [e.key for e in again.evicted if e.kind == "staging"] == [key]
    assert not stage.exists()
