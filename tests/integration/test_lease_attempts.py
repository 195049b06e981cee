"""A lease belongs to the attempt that took it (issue 12, item 1), and a shared cleanup without
a run id ends only its own workflow's leases (item 4): the storage activities run in
temporalio's ActivityEnvironment with the attempt numbers a server retry would give them."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from temporalio.testing import ActivityEnvironment

from forgespace.cache.hooks import Phase
from forgespace.cache.index import LeaseOwner
from forgespace.cache.workspace import WorkspaceCache
from forgespace.config import Settings
from forgespace.storage import open_store
from forgespace.temporal.activities import CacheActivities


def make_target(settings: Settings, tmp_path: Path) -> str:
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "a.txt").write_text("a\n")
    return open_store(settings).upload_target(proj)


def env_for(attempt: int = 1, workflow_id: str = "wf-1", activity_id: str = "1") -> Any:
    env = ActivityEnvironment()
    env.info = dataclasses.replace(
        env.info, attempt=attempt, workflow_id=workflow_id, activity_id=activity_id
    )
    return env


class HoldFirst:
    """Hooks that hold the first call reaching ``phase`` until ``go`` is set."""

    def __init__(self, phase: Phase) -> None:
        self.phase = phase
        self.arrived = threading.Event()
        self.go = threading.Event()
        self._first = True
        self._lock = threading.Lock()

    def reached(self, phase: Phase) -> None:
        if phase != self.phase:
            return
        with self._lock:
            first, self._first = self._first, False
        if first:
            self.arrived.set()
            assert self.go.wait(30), "the test never let the held call go on"


@pytest.fixture
def acts(settings: Settings) -> Iterator[CacheActivities]:
    a = CacheActivities(WorkspaceCache(settings), host_queue="q@host", host="host")
    yield a
    a.close()


@pytest.mark.parametrize("mode", ["isolated", "copy-on-write"])
def test_a_stale_attempt_returning_late_leaves_its_retry_the_run(
    settings: Settings, tmp_path: Path, mode: str
) -> None:
    """Attempt 1 of get_target is cancelled (the server timed it out) while its thread still
    works; attempt 2 gets the run's workspace; attempt 1's thread then finishes, and its
    cancellation releases what *it* took: nothing of attempt 2's (lease and directory stay)."""
    tid = make_target(settings, tmp_path)
    hold = HoldFirst(Phase.STAGED_RUN if mode == "isolated" else Phase.COW_COPIED)
    cache = WorkspaceCache(settings, hooks=hold)
    acts = CacheActivities(cache, host_queue="q", heartbeat_interval=0.05)
    env1, env2 = env_for(attempt=1), env_for(attempt=2)

    async def main() -> tuple[BaseException | None, str]:
        first = asyncio.ensure_future(env1.run(acts.get_target, tid, "r1", mode))
        while not hold.arrived.is_set():
            await asyncio.sleep(0.01)
        env1.cancel()  # what the server's start-to-close timeout does to a heartbeating attempt
        second = await asyncio.wait_for(env2.run(acts.get_target, tid, "r1", mode), 30)
        hold.go.set()
        try:
            await asyncio.wait_for(first, 30)
        except BaseException as exc:
            return exc, second
        return None, second

    try:
        err, path = asyncio.run(main())
    finally:
        acts.close()
    assert isinstance(err, asyncio.CancelledError), err
    assert Path(path, "a.txt").read_text() == "a\n", "the retry's workspace was deleted"
    (lease,) = cache.index.live_leases()
    assert lease.attempt is not None and lease.attempt.endswith("#2")


def test_release_with_a_stale_attempt_token_is_a_no_op(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tid = make_target(settings, tmp_path)
    cache = WorkspaceCache(settings)
    old, new = LeaseOwner("wf/run/1#1", "wf"), LeaseOwner("wf/run/1#2", "wf")
    cache.get_target_report(tid, "r1", "isolated", owner=old)
    path = cache.get_target_report(tid, "r1", "isolated", owner=new).path
    with caplog.at_level(logging.DEBUG, "forgespace.cache"):
        out = cache.release(tid, "r1", "isolated", attempt=old.attempt)
    assert out.leases_ended == 0 and out.removed == []
    assert Path(path).is_dir()
    assert "no-op" in caplog.text
    # The owner can release it, once; again is a no-op.
    assert cache.release(tid, "r1", "isolated", attempt=new.attempt).leases_ended == 1
    assert not Path(path).exists()
    assert cache.release(tid, "r1", "isolated", attempt=new.attempt).leases_ended == 0


def test_a_failed_stale_attempt_does_not_end_its_retrys_lease(
    settings: Settings, tmp_path: Path
) -> None:
    """The engine's own undo (a get that fails ends the lease it took) skips a lease that a
    later attempt of the same run took over meanwhile."""
    tid = make_target(settings, tmp_path)
    hold = HoldFirst(Phase.DOWNLOADED)
    cache = WorkspaceCache(settings, hooks=hold)
    errors: list[BaseException] = []

    def first() -> None:
        try:
            cache.get_target_report(tid, "r1", "isolated", owner=LeaseOwner("a#1"))
        except BaseException as exc:
            errors.append(exc)

    real = cache._modes._extracted  # after the download, streamed or not

    def failing(*a: Any, **kw: Any) -> Any:
        if threading.current_thread().name == "stale":
            raise OSError("the stale attempt fails after its retry started")
        return real(*a, **kw)

    cache._modes._extracted = failing  # type: ignore[method-assign]
    t = threading.Thread(target=first, name="stale")
    t.start()
    assert hold.arrived.wait(30)
    path = cache.get_target_report(tid, "r1", "isolated", owner=LeaseOwner("a#2")).path
    hold.go.set()
    t.join(30)
    assert errors and isinstance(errors[0], OSError)
    assert [le.attempt for le in cache.index.live_leases()] == ["a#2"]
    assert Path(path, "a.txt").is_file()


def test_shared_cleanup_without_run_id_ends_only_its_workflows_lease(
    acts: CacheActivities, settings: Settings, tmp_path: Path
) -> None:
    """Runs A and B (two workflows) share a workspace; B's two-argument cleanup (and a retry
    of it) ends B's lease, never A's."""
    tid = make_target(settings, tmp_path)
    ws = asyncio.run(env_for(workflow_id="wf-a").run(acts.get_target, tid, "ra", "shared"))
    asyncio.run(env_for(workflow_id="wf-b").run(acts.get_target, tid, "rb", "shared"))
    for attempt in (1, 2):  # the second is a Temporal retry of the same cleanup
        env = env_for(attempt=attempt, workflow_id="wf-b", activity_id="2")
        asyncio.run(env.run(acts.cleanup_cache, ws, "shared"))
    assert [le.run_id for le in acts.cache.index.live_leases()] == ["ra"]


def test_shared_cleanup_without_run_id_never_ends_another_live_runs_lease(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Outside Temporal: a two-argument shared cleanup ends the lease its own cache object
    took, else the one lease whose process exited; never the lease of a run in another live
    process (nor anything when its own get named no run)."""
    tid = make_target(settings, tmp_path)
    code = (
        "import sys; from forgespace import Settings, WorkspaceCache\n"
        "c = WorkspaceCache(Settings.from_env())\n"
        f"print(c.get_target({tid!r}, 'a', 'shared'), flush=True)\n"
        "sys.stdin.read()\n"
    )
    env = {
        **os.environ,
        "CACHE_DIR": str(settings.cache_dir),
        "STORAGE_DIR": str(settings.storage_dir),
    }
    holder = subprocess.Popen(
        [sys.executable, "-c", code],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        ws = holder.stdout.readline().strip()
        mine = WorkspaceCache(settings)
        mine.get_target(tid, "b", "shared")
        mine.cleanup_cache(ws, "shared")  # ends b's, the lease this object took
        with caplog.at_level(logging.DEBUG, "forgespace.cache"):
            mine.cleanup_cache(ws, "shared")  # a retry: a's process still runs -> nothing
            other = WorkspaceCache(settings)
            other.get_target(tid, None, "shared")  # takes no lease ...
            other.cleanup_cache(ws, "shared")  # ... so its cleanup ends none
        assert [le.run_id for le in mine.index.live_leases()] == ["a"]
        assert "without a run id" in caplog.text
    finally:
        holder.communicate("", timeout=30)
    WorkspaceCache(settings).cleanup_cache(ws, "shared")  # a's process exited: its lease ends
    assert mine.index.live_leases() == []


def test_cleanup_of_a_run_already_released_is_a_no_op(
    acts: CacheActivities, settings: Settings, tmp_path: Path
) -> None:
    tid = make_target(settings, tmp_path)
    path = asyncio.run(env_for().run(acts.get_target, tid, "r1", "copy-on-write"))
    asyncio.run(env_for().run(acts.release_run, tid, "r1", "copy-on-write"))
    asyncio.run(env_for(activity_id="3").run(acts.cleanup_cache, path, "copy-on-write"))
    assert not Path(path).exists() and not acts.cache.index.live_leases()


def test_cleanup_from_another_workflow_leaves_the_run_alone(
    acts: CacheActivities, settings: Settings, tmp_path: Path
) -> None:
    tid = make_target(settings, tmp_path)
    path = asyncio.run(env_for(workflow_id="wf-a").run(acts.get_target, tid, "r1", "isolated"))
    asyncio.run(env_for(workflow_id="wf-b").run(acts.cleanup_cache, path, "isolated"))
    assert Path(path).is_dir() and len(acts.cache.index.live_leases()) == 1
    asyncio.run(env_for(workflow_id="wf-a").run(acts.cleanup_cache, path, "isolated"))
    assert not Path(path).exists() and not acts.cache.index.live_leases()
