"""The storage activities run without a server (temporalio's ActivityEnvironment) on a real
cache and local store: FuzzForge-compatible results, error types, heartbeats, results upload."""

from __future__ import annotations

import asyncio
import json
import os
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

    def slow(*a: Any, **kw: Any) -> Any:
        time.sleep(0.5)  # e.g. waiting for another process's download
        return real(*a, **kw)

    cache.get_target_report = slow  # type: ignore[method-assign]
    acts = CacheActivities(cache, host_queue="q", heartbeat_interval=0.05)
    beats: list[Any] = []
    env = ActivityEnvironment()
    env.on_heartbeat = lambda *d: beats.append(d[0])
    try:
        path = run(acts.get_target, tid, "r1", "isolated", env=env)
    finally:
        acts.close()
    assert Path(path).is_dir()
    # while the call waits, beats say so; once it downloads they carry the bytes (test below)
    waiting = [b for b in beats if b["phase"] == "get_target"]
    assert len(waiting) >= 3 and beats[0]["phase"] == "get_target"
    assert waiting[-1]["elapsed_s"] >= 0.3


def test_upload_results_stores_json_in_the_store(acts: CacheActivities, settings: Settings) -> None:
    results = {"findings": [{"file": "a.py", "line": 3}], "summary": {"high": 1}}
    location = run(acts.upload_results, "wf-1.run_2", results, "json")
    assert location.endswith("wf-1.run_2/results.json")
    assert json.loads(Path(location).read_text()) == results
    sarif = run(acts.upload_results, "wf-1.run_2", {"version": "2.1.0"}, "sarif")
    assert sarif.endswith("results.sarif")


@pytest.mark.parametrize(
    ("wid", "fmt", "needle"),
    [("../escape", "json", "invalid workflow_id"), ("wf", "xml", "invalid results_format")],
)
def test_upload_results_refuses_bad_input(
    acts: CacheActivities, settings: Settings, wid: str, fmt: str, needle: str
) -> None:
    with pytest.raises(ApplicationError, match=needle) as ei:
        run(acts.upload_results, wid, {}, fmt)
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
