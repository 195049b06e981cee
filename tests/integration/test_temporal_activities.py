"""The storage activities run without a server (temporalio's ActivityEnvironment) on a real
cache and local store: FuzzForge-compatible results, error types, heartbeats, results upload."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from forgespace.cache.workspace import WorkspaceCache
from forgespace.config import Settings
from forgespace.storage import open_store
from forgespace.temporal.activities import CacheActivities


def make_target(settings: Settings, tmp_path: Path) -> str:
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "a.txt").write_text("a\n")
    return open_store(settings).upload_target(proj)


@pytest.fixture
def acts(settings: Settings) -> Iterator[CacheActivities]:
    a = CacheActivities(WorkspaceCache(settings), host_queue="q@host", host="host")
    yield a
    a.close()


def run(fn: Any, *args: Any, env: ActivityEnvironment | None = None) -> Any:
    return asyncio.run((env or ActivityEnvironment()).run(fn, *args))


def test_get_target_returns_the_path_and_cleanup_removes_the_run(
    acts: CacheActivities, settings: Settings, tmp_path: Path
) -> None:
    tid = make_target(settings, tmp_path)
    path = run(acts.get_target, tid, "run1", "isolated")
    assert path == str(settings.cache_dir / tid / "run1" / "workspace")
    assert (Path(path) / "a.txt").read_text() == "a\n"
    run(acts.cleanup_cache, path, "isolated")
    assert not (settings.cache_dir / tid / "run1").exists()


def test_prepare_reports_download_then_cache_hit_and_the_host_queue(
    acts: CacheActivities, settings: Settings, tmp_path: Path
) -> None:
    tid = make_target(settings, tmp_path)
    first = run(acts.prepare_workspace, tid, "r1", "shared")
    second = run(acts.prepare_workspace, tid, "r2", "shared")
    assert (first.downloaded, second.downloaded) == (True, False)
    assert first.path == second.path == str(settings.cache_dir / tid / "workspace")
    assert first.task_queue == "q@host" and first.workspace_isolation == "shared"
    assert run(acts.host_task_queue) == "q@host"


@pytest.mark.parametrize(
    ("args", "error_type"),
    [
        (("no-such-target", "r1", "isolated"), "TargetNotFoundError"),
        (("t1", "r1", "isolate"), "InvalidModeError"),
        (("../etc", "r1", "isolated"), "InvalidIdError"),
        (("t1", None, "isolated"), "InvalidIdError"),
    ],
)
def test_bad_input_is_a_non_retryable_error_of_its_type(
    acts: CacheActivities, args: tuple[Any, ...], error_type: str
) -> None:
    with pytest.raises(ApplicationError) as ei:
        run(acts.get_target, *args)
    assert ei.value.type == error_type
    assert ei.value.non_retryable


def test_cleanup_outside_the_cache_is_refused(
    acts: CacheActivities, settings: Settings, tmp_path: Path
) -> None:
    victim = tmp_path / "keep"
    victim.mkdir()
    with pytest.raises(ApplicationError) as ei:
        run(acts.cleanup_cache, str(victim), "isolated")
    assert ei.value.type == "CleanupRefusedError" and ei.value.non_retryable
    assert victim.exists()


def test_slow_calls_heartbeat_their_progress(settings: Settings, tmp_path: Path) -> None:
    tid = make_target(settings, tmp_path)
    cache = WorkspaceCache(settings)
    real = cache.get_target_report

    beats: list[Any] = []
    three_beats = threading.Event()

    def slow(*a: Any, **kw: Any) -> Any:
        # e.g. waiting for another process's download: until three beats said so (a condition,
        # not a sleep, so a loaded machine only makes it slower, never wrong)
        assert three_beats.wait(30), beats
        return real(*a, **kw)

    def on_beat(*d: Any) -> None:
        beats.append(d[0])
        if sum(1 for b in beats if b["phase"] == "get_target") >= 3:
            three_beats.set()

    cache.get_target_report = slow  # type: ignore[method-assign]
    acts = CacheActivities(cache, host_queue="q", heartbeat_interval=0.05)
    env = ActivityEnvironment()
    env.on_heartbeat = on_beat
    try:
        path = run(acts.get_target, tid, "r1", "isolated", env=env)
    finally:
        acts.close()
    assert Path(path).is_dir()
    # while the call waits, beats say so; once it downloads they carry the bytes (test below)
    waiting = [b for b in beats if b["phase"] == "get_target"]
    assert len(waiting) >= 3 and beats[0]["phase"] == "get_target"
    elapsed = [b["elapsed_s"] for b in waiting]
    assert elapsed == sorted(elapsed) and elapsed[-1] > elapsed[0] >= 0  # the wait's own clock


def test_upload_results_stores_json_in_the_store(acts: CacheActivities, settings: Settings) -> None:
    results = {"findings": [{"file": "a.py", "line": 3}], "summary": {"high": 1}}
    location = run(acts.upload_results, "wf-1.run_2", results, "json")
    assert location.endswith("wf-1.run_2/results.json")
    assert json.loads(Path(location).read_text()) == results
    sarif = run(acts.upload_results, "wf-1.run_2", {"version": "2.1.0"}, "sarif")
    assert sarif.endswith("results.sarif")


def test_upload_results_stores_other_formats_as_json_like_fuzzforge(acts: CacheActivities) -> None:
    location = run(acts.upload_results, "wf-3", {"a": 1}, "xml")
    assert location.endswith("wf-3/results.json")
    assert json.loads(Path(location).read_text()) == {"a": 1}


def test_upload_results_location_is_fuzzforge_url_with_s3() -> None:
    from forgespace.temporal.activities import _results_url

    assert _results_url("s3://results/wf/results.json", "http://minio:9000/") == (
        "http://minio:9000/results/wf/results.json"
    )
    assert _results_url("s3://results/k", "minio:9000") == "http://minio:9000/results/k"
    assert _results_url("/store/.results/wf/results.json", None).startswith("/store")


@pytest.mark.parametrize("wid", ["../escape", "wf\n"])  # "$" would let a final newline through
def test_upload_results_refuses_a_bad_workflow_id(
    acts: CacheActivities, settings: Settings, wid: str
) -> None:
    with pytest.raises(ApplicationError, match="invalid workflow_id") as ei:
        run(acts.upload_results, wid, {}, "json")
    assert ei.value.non_retryable
    results_dir = settings.storage_dir / ".results"
    assert not results_dir.exists() or not any(results_dir.rglob("*"))


class _SlowStore:
    """The real store, with a pause per downloaded chunk so heartbeats can see the download."""

    def __init__(self, inner: Any, pause: float) -> None:
        self.inner, self.pause = inner, pause
        self.display_name = inner.display_name

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def download_target(self, tid: str, dest: Any, progress: Any = None) -> Any:
        def slow(done: int, total: int) -> None:
            time.sleep(self.pause)
            if progress is not None:
                progress(done, total)

        return self.inner.download_target(tid, dest, slow)


def test_downloads_heartbeat_bytes_done_and_total(settings: Settings, tmp_path: Path) -> None:
    blob = tmp_path / "blob.bin"
    blob.write_bytes(os.urandom(8 * 2**20))
    tid = open_store(settings).upload_target(blob)
    cache = WorkspaceCache(settings, store=_SlowStore(open_store(settings), 0.05))
    acts = CacheActivities(cache, host_queue="q", heartbeat_interval=0.02)
    beats: list[Any] = []
    env = ActivityEnvironment()
    env.on_heartbeat = lambda *d: beats.append(d[0])
    try:
        run(acts.get_target, tid, "r1", "isolated", env=env)
    finally:
        acts.close()
    downloads = [b for b in beats if b.get("phase") == "download"]
    assert downloads, beats
    assert all(b["bytes_total"] == 8 * 2**20 for b in downloads)
    done = [b["bytes_done"] for b in downloads]
    assert done == sorted(done) and 0 < done[0] < 8 * 2**20


# --- cancellation and release_run -----------------------------------------------------------


class _GatedStore:
    """The real store; each downloaded chunk waits ``pause`` s, and counts what it served."""

    def __init__(self, inner: Any, pause: float) -> None:
        self.inner, self.pause = inner, pause
        self.display_name = inner.display_name
        self.chunks = 0
        self.started = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def download_target(self, tid: str, dest: Any, progress: Any = None) -> Any:
        def slow(done: int, total: int) -> None:
            self.chunks += 1
            self.started.set()
            time.sleep(self.pause)
            if progress is not None:
                progress(done, total)

        return self.inner.download_target(tid, dest, slow)


def big_target(settings: Settings, tmp_path: Path, mib: int = 16) -> str:
    blob = tmp_path / "big.bin"
    blob.write_bytes(os.urandom(mib * 2**20))
    return open_store(settings).upload_target(blob)


def leftovers(settings: Settings, tid: str) -> list[str]:
    """What of ``tid`` is on disk besides the shared slots, plus staging dirs and trash."""
    meta = settings.cache_dir / ".forgespace"
    found = [p.name for d in (meta / "tmp", meta / "trash") if d.is_dir() for p in d.iterdir()]
    tdir = settings.cache_dir / tid
    if tdir.is_dir():
        found += [p.name for p in tdir.iterdir() if p.name not in ("shared", "workspace")]
    return found


@pytest.mark.parametrize("mode", ["isolated", "copy-on-write", "shared"])
def test_cancel_mid_download_stops_it_and_leaves_nothing(
    settings: Settings, tmp_path: Path, mode: str
) -> None:
    tid = big_target(settings, tmp_path)
    store = _GatedStore(open_store(settings), 0.2)
    cache = WorkspaceCache(settings, store=store)
    acts = CacheActivities(cache, host_queue="q", heartbeat_interval=0.05)
    env = ActivityEnvironment()

    async def main() -> BaseException | None:
        task = asyncio.ensure_future(env.run(acts.prepare_workspace, tid, "r1", mode))
        while not store.started.is_set():
            await asyncio.sleep(0.01)
        env.cancel()
        try:
            await asyncio.wait_for(task, timeout=20)
        except BaseException as exc:  # the cancellation is the result
            return exc
        return None

    try:
        t0 = time.monotonic()
        err = asyncio.run(main())
        took = time.monotonic() - t0
    finally:
        acts.close()
    assert isinstance(err, asyncio.CancelledError), err
    # It returned only once the cache call's thread was done: nothing of the run remains.
    assert acts.inflight(tid, "r1") == 0
    # Stopped at the next chunk instead of finishing the download (a count, not a duration).
    assert store.chunks < 16, (store.chunks, took)
    assert not cache.index.live_leases()
    assert leftovers(settings, tid) == []
    assert not (settings.cache_dir / tid / "workspace").exists()
    assert not (settings.cache_dir / tid / "target").exists()


def test_cancel_after_the_call_finished_releases_what_it_got(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The cache call completes (downloaded, published, leased), then the activity is
    cancelled before the call's thread hands the result over: the cancelled activity releases
    the run instead of leaking it."""
    tid = make_target(settings, tmp_path)
    cache = WorkspaceCache(settings)
    real = cache.get_target_report
    gate, finished = threading.Event(), threading.Event()

    def gated(*a: Any, **kw: Any) -> Any:
        result = real(*a, **kw)  # the whole call, download included, before any cancel
        finished.set()
        assert gate.wait(20)
        return result

    cache.get_target_report = gated  # type: ignore[method-assign]
    acts = CacheActivities(cache, host_queue="q", heartbeat_interval=0.05)
    env = ActivityEnvironment()
    held: list[list[str]] = []

    async def main() -> BaseException | None:
        task = asyncio.ensure_future(env.run(acts.get_target, tid, "r1", "isolated"))
        while not finished.is_set():
            await asyncio.sleep(0.01)
        held.append([le.run_id for le in cache.index.live_leases()])
        env.cancel()
        await asyncio.sleep(0.3)
        assert not task.done()  # still waiting for its thread
        gate.set()
        try:
            await asyncio.wait_for(task, timeout=20)
        except BaseException as exc:  # the cancellation is the result
            return exc
        return None

    try:
        with caplog.at_level(logging.INFO, logger="forgespace.temporal.activities"):
            err = asyncio.run(main())
    finally:
        acts.close()
    assert isinstance(err, asyncio.CancelledError), err
    assert held == [["r1"]]  # the call had got its workspace and its lease
    assert "was cancelled after it finished; released" in caplog.text
    assert not (settings.cache_dir / tid / "r1").exists()
    assert not cache.index.live_leases()


@pytest.mark.parametrize("mode", ["isolated", "copy-on-write", "shared"])
def test_release_run_ends_the_lease_removes_the_run_dir_and_is_idempotent(
    acts: CacheActivities, settings: Settings, tmp_path: Path, mode: str
) -> None:
    tid = make_target(settings, tmp_path)
    # The run got its workspace but the path never reached its workflow; another run holds on.
    acts.cache.get_target(tid, "lost", mode)
    other = acts.cache.get_target(tid, "other", mode)
    out = run(acts.release_run, tid, "lost", mode)
    assert out["leases_ended"] == 1
    if mode == "shared":
        assert out["removed"] == []
    else:
        assert out["removed"] == [str(settings.cache_dir / tid / "lost")]
        assert not (settings.cache_dir / tid / "lost").exists()
    assert [(le.run_id, le.target_id) for le in acts.cache.index.live_leases()] == [("other", tid)]
    assert Path(other).exists()
    again = run(acts.release_run, tid, "lost", mode)
    assert (again["leases_ended"], again["removed"]) == (0, [])
    never = run(acts.release_run, tid, "never-started", mode)  # nothing to release: no error
    assert (never["leases_ended"], never["removed"]) == (0, [])
    assert len(acts.cache.index.live_leases()) == 1


@pytest.mark.parametrize(
    ("args", "error_type", "needle"),
    [
        (("../etc", "r1", "isolated"), "InvalidIdError", "invalid target_id '../etc'"),
        (("t1", "", "isolated"), "InvalidIdError", "invalid run_id ''"),
        (("t1", "r1", "isolate"), "InvalidModeError", "invalid workspace_isolation 'isolate'"),
    ],
)
def test_release_run_refuses_bad_input_non_retryably(
    acts: CacheActivities, settings: Settings, args: tuple[str, ...], error_type: str, needle: str
) -> None:
    with pytest.raises(ApplicationError) as ei:
        run(acts.release_run, *args)
    assert ei.value.type == error_type and ei.value.non_retryable
    assert needle in str(ei.value) and "expected" in str(ei.value)


def test_release_run_stops_and_waits_for_a_download_of_that_run(
    settings: Settings, tmp_path: Path
) -> None:
    """A prepare of the run still downloads on this host (its activity was given up on):
    release stops it, waits for its thread, then releases; the prepare fails non-retryably."""
    tid = big_target(settings, tmp_path)
    store = _GatedStore(open_store(settings), 0.2)
    cache = WorkspaceCache(settings, store=store)
    acts = CacheActivities(cache, host_queue="q", heartbeat_interval=0.05)

    async def main() -> tuple[Any, Any]:
        get = asyncio.ensure_future(
            ActivityEnvironment().run(acts.prepare_workspace, tid, "r1", "isolated")
        )
        while not store.started.is_set():
            await asyncio.sleep(0.01)
        released = await ActivityEnvironment().run(acts.release_run, tid, "r1", "isolated")
        assert get.done()  # release returned only after the download's thread had stopped
        got: Any
        try:
            got = get.result()
        except BaseException as exc:  # the prepare's failure is the result
            got = exc
        return released, got

    try:
        released, got = asyncio.run(main())
    finally:
        acts.close()
    assert isinstance(got, ApplicationError) and got.type == "RunReleasedError", got
    assert got.non_retryable
    assert store.chunks < 16
    assert released["leases_ended"] == 0  # the stopped call had already ended its own lease
    assert not cache.index.live_leases()
    assert leftovers(settings, tid) == []
