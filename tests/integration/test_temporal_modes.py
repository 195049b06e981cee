"""Each isolation mode end to end through the real Temporal dev server (in-process worker).

The fixture workflows (tests/fixtures/workflows) list their workspace, write a marker named
after their run (isolated, copy-on-write) and return what they saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from support.s3server import env_for
from support.temporal import (
    FIXTURE_WORKFLOWS,
    WorkerProcess,
    in_process_worker,
    start_worker_process,
)
from temporalio.api.enums.v1 import PendingActivityState
from temporalio.client import Client, WorkflowFailureError
from temporalio.exceptions import ActivityError, ApplicationError

from forgespace.cache.workspace import WorkspaceCache
from forgespace.config import Settings
from forgespace.storage import open_store
from forgespace.temporal import api as api_module
from forgespace.temporal.api import MEMO_KEY, WorkflowRequest
from forgespace.temporal.devserver import DevServer
from forgespace.temporal.runner import RunJob, run_job
from forgespace.temporal.worker import run_worker

pytestmark = pytest.mark.integration


def make_project(root: Path) -> Path:
    proj = root / "proj"
    (proj / "pkg").mkdir(parents=True)
    (proj / "hello.txt").write_text("hello\n")
    (proj / "pkg" / "mod.py").write_text("X = 1\n")
    return proj


async def run_workflows(
    server: DevServer,
    settings: Settings,
    task_queue: str,
    workflow: str,
    target_id: str,
    mode: str,
    n: int,
    params: dict[str, Any] | None = None,
) -> list[tuple[str, dict[str, Any] | BaseException, dict[str, Any]]]:
    """Run ``n`` concurrent runs; (run_id, result or failure, memo workspace entry) each."""
    client = await Client.connect(server.address, namespace=server.namespace)
    async with in_process_worker(settings, client, task_queue):
        handles = []
        for i in range(n):
            rid = f"r{i}-{uuid.uuid4().hex[:6]}"
            req = WorkflowRequest(target_id, rid, mode, dict(params or {}))
            h = await client.start_workflow(
                workflow, req, id=f"{workflow}-{rid}", task_queue=task_queue
            )
            handles.append((rid, h))

        async def one(rid: str, h: Any) -> tuple[str, Any, dict[str, Any]]:
            try:
                res: Any = await asyncio.wait_for(h.result(), timeout=60)
            except WorkflowFailureError as exc:
                res = exc
            memo = await (await h.describe()).memo()
            return rid, res, memo.get(MEMO_KEY, {})

        return list(await asyncio.gather(*(one(r, h) for r, h in handles)))


def test_isolated_runs_get_their_own_workspace_and_it_is_removed(
    temporal_server: DevServer,
    settings: Settings,
    task_queue: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    tid = open_store(settings).upload_target(make_project(tmp_path))
    out = asyncio.run(
        run_workflows(
            temporal_server,
            settings,
            task_queue,
            "fs_marker_isolated",
            tid,
            "isolated",
            8,
            {"hold_seconds": 0.5, "write": True},
        )
    )
    assert len(out) == 8
    for rid, res, memo in out:
        assert isinstance(res, dict), res
        ws = str(settings.cache_dir / tid / rid / "workspace")
        assert res["workspace"] == ws
        seen = res["result"]["seen"]
        # Each run sees the target and its own marker, never another run's.
        assert seen["before"] == ["hello.txt", "pkg"]
        assert seen["after"] == ["hello.txt", f"marker-{rid}", "pkg"]
        assert res["findings"] == 3
        assert memo["path"] == ws and memo["downloaded"] is True
        assert f"User code downloaded to: {ws}" in caplog.text
        # cleanup_cache ran on the host: the run directory is gone.
        assert not (settings.cache_dir / tid / rid).exists()
    assert not WorkspaceCache(settings).index.live_leases()


def test_shared_runs_download_once_and_keep_the_workspace(
    temporal_server: DevServer,
    settings: Settings,
    task_queue: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    tid = open_store(settings).upload_target(make_project(tmp_path))
    out = asyncio.run(
        run_workflows(temporal_server, settings, task_queue, "fs_marker_shared", tid, "shared", 4)
    )
    ws = str(settings.cache_dir / tid / "workspace")
    assert [isinstance(r, dict) for _, r, _ in out] == [True] * 4, out
    assert all(r["workspace"] == ws for _, r, _ in out)  # type: ignore[index]
    assert sorted(m["downloaded"] for _, _, m in out) == [False, False, False, True]
    assert all(r["result"]["seen"]["after"] == ["hello.txt", "pkg"] for _, r, _ in out)  # type: ignore[index]
    # The troubleshooting grep: shared paths carry no run id.
    assert f"User code downloaded to: {ws}" in caplog.text
    assert (settings.cache_dir / tid / "workspace" / "hello.txt").read_text() == "hello\n"
    assert not WorkspaceCache(settings).index.live_leases()


def test_copy_on_write_runs_see_only_their_writes_and_shared_copy_stays_pristine(
    temporal_server: DevServer, settings: Settings, task_queue: str, tmp_path: Path
) -> None:
    tid = open_store(settings).upload_target(make_project(tmp_path))
    out = asyncio.run(
        run_workflows(
            temporal_server,
            settings,
            task_queue,
            "fs_marker_copy_on_write",
            tid,
            "copy-on-write",
            4,
            {"hold_seconds": 0.3, "write": True},
        )
    )
    for rid, res, _ in out:
        assert isinstance(res, dict), res
        assert res["workspace"] == str(settings.cache_dir / tid / rid / "workspace")
        assert res["result"]["seen"]["after"] == ["hello.txt", f"marker-{rid}", "pkg"]
        assert not (settings.cache_dir / tid / rid).exists()
    assert sorted(m["downloaded"] for _, _, m in out) == [False, False, False, True]
    pristine = settings.cache_dir / tid / "shared" / "workspace"
    assert sorted(p.name for p in pristine.iterdir()) == ["hello.txt", "pkg"]


def test_failing_body_still_cleans_up(
    temporal_server: DevServer, settings: Settings, task_queue: str, tmp_path: Path
) -> None:
    tid = open_store(settings).upload_target(make_project(tmp_path))
    [(rid, res, memo)] = asyncio.run(
        run_workflows(
            temporal_server,
            settings,
            task_queue,
            "fs_marker_isolated",
            tid,
            "isolated",
            1,
            {"fail": True},
        )
    )
    assert isinstance(res, WorkflowFailureError)
    assert isinstance(res.cause, ApplicationError) and res.cause.type == "FixtureFailure"
    assert memo["path"] == str(settings.cache_dir / tid / rid / "workspace")
    assert not (settings.cache_dir / tid / rid).exists()
    assert not WorkspaceCache(settings).index.live_leases()


def test_missing_target_fails_at_once_with_its_error_type(
    temporal_server: DevServer, settings: Settings, task_queue: str
) -> None:
    [(_, res, _)] = asyncio.run(
        run_workflows(
            temporal_server,
            settings,
            task_queue,
            "fs_marker_isolated",
            "no-such-target",
            "isolated",
            1,
        )
    )
    assert isinstance(res, WorkflowFailureError)
    act = res.cause
    assert isinstance(act, ActivityError)
    app = act.cause
    assert isinstance(app, ApplicationError)
    assert app.type == "TargetNotFoundError" and app.non_retryable
    assert "no-such-target" in app.message


def test_runner_override_of_the_mode_is_used_and_logged(
    temporal_server: DevServer,
    settings: Settings,
    task_queue: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`forgespace run` with a workspace_isolation parameter against an existing server."""
    caplog.set_level(logging.INFO)
    remote = settings.with_(temporal_address=temporal_server.address)
    proj = make_project(tmp_path)

    async def main() -> dict[str, Any]:
        client = await Client.connect(temporal_server.address)
        async with in_process_worker(settings, client, task_queue):
            job = RunJob(
                workflow="fs_marker_shared",
                path=proj,
                runs=2,
                params={"workspace_isolation": "isolated", "write": True},
                task_queue=task_queue,
                workflows_dirs=[FIXTURE_WORKFLOWS],
                bundled=False,
                sarif=None,
            )
            return await run_job(remote, job)

    report = asyncio.run(main())
    assert report["workspace_isolation"] == "isolated"
    assert "overrides metadata.yaml's shared" in caplog.text
    tid = report["target_id"]
    assert [r["status"] for r in report["runs"]] == ["completed", "completed"]
    for r in report["runs"]:
        assert r["workspace"] == str(settings.cache_dir / tid / r["run_id"] / "workspace")
        assert r["result"]["seen"]["after"] == ["hello.txt", f"marker-{r['run_id']}", "pkg"]
    assert report["cache"] == {"downloads": 2, "hits": 0}


def test_worker_sweeps_the_cache_every_cleanup_interval(
    temporal_server: DevServer, settings: Settings, task_queue: str, tmp_path: Path
) -> None:
    """The shared workspace outlives its runs; once unleased and older than CACHE_TTL, the
    worker's periodic sweep (CACHE_CLEANUP_INTERVAL) evicts it without anyone calling gc."""
    quick = settings.with_(cache_ttl=1.0, cache_cleanup_interval=0.5)
    tid = open_store(quick).upload_target(make_project(tmp_path))
    ws = quick.cache_dir / tid / "workspace"

    async def main() -> bool:
        client = await Client.connect(temporal_server.address)
        async with in_process_worker(quick, client, task_queue, sweep=True):
            h = await client.start_workflow(
                "fs_marker_shared",
                WorkflowRequest(tid, "r1", "shared", {}),
                id=f"sweep-{uuid.uuid4().hex}",
                task_queue=task_queue,
            )
            res = await asyncio.wait_for(h.result(), timeout=30)
            assert res["workspace"] == str(ws)
            deadline = time.monotonic() + 15
            while ws.exists() and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            return ws.exists()

    assert asyncio.run(main()) is False


def test_runner_shows_heartbeat_details_of_running_activities(
    temporal_server: DevServer, settings: Settings, task_queue: str, tmp_path: Path
) -> None:
    """Progress lines (no terminal) carry the running activity and its heartbeat details."""
    remote = settings.with_(temporal_address=temporal_server.address)
    proj = make_project(tmp_path)
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=False, width=300)

    async def main() -> dict[str, Any]:
        client = await Client.connect(temporal_server.address)
        async with in_process_worker(settings, client, task_queue):
            job = RunJob(
                workflow="fs_marker_isolated",
                path=proj,
                params={"hold_seconds": 4},
                task_queue=task_queue,
                workflows_dirs=[FIXTURE_WORKFLOWS],
                bundled=False,
            )
            return await run_job(remote, job, console=console)

    report = asyncio.run(main())
    [run] = report["runs"]
    assert run["status"] == "completed"
    out = buf.getvalue()
    progress = [ln for ln in out.splitlines() if f"{run['run_id']}: running" in ln]
    assert any(
        "fixture_inspect_workspace" in ln and "held_s=" in ln and "of_s=4" in ln for ln in progress
    ), out
    assert "cache: 1 run, 1 download, 0 served from the cache" in out


def test_cancelled_run_stops_its_activity_then_cleans_up(
    temporal_server: DevServer, settings: Settings, task_queue: str, tmp_path: Path
) -> None:
    tid = open_store(settings).upload_target(make_project(tmp_path))
    started = tmp_path / "started"

    async def main() -> BaseException | None:
        client = await Client.connect(temporal_server.address)
        async with in_process_worker(settings, client, task_queue):
            h = await client.start_workflow(
                "fs_marker_isolated",
                WorkflowRequest(
                    tid, "r1", "isolated", {"hold_seconds": 60, "started_file": str(started)}
                ),
                id=f"cancel-{uuid.uuid4().hex}",
                task_queue=task_queue,
            )
            deadline = time.monotonic() + 30
            while not started.exists() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert (settings.cache_dir / tid / "r1" / "workspace").is_dir()
            await h.cancel()
            try:
                await asyncio.wait_for(h.result(), timeout=30)
            except WorkflowFailureError as exc:
                return exc.cause
            return None

    t0 = time.monotonic()
    cause = asyncio.run(main())
    assert type(cause).__name__ == "CancelledError", cause
    assert time.monotonic() - t0 < 30  # the 60 s hold was interrupted
    assert not (settings.cache_dir / tid / "r1").exists()
    assert not WorkspaceCache(settings).index.live_leases()


# --- cancelled / timed-out downloads -------------------------------------------------------


class _SlowStore:
    """The real store; downloads of ``slow`` targets wait ``pause`` s per 1 MiB chunk and
    record how many chunks they served (and that they started)."""

    def __init__(self, inner: Any, slow: set[str], pause: float) -> None:
        self.inner, self.slow, self.pause = inner, slow, pause
        self.display_name = inner.display_name
        self.chunks: dict[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def download_target(self, tid: str, dest: Any, progress: Any = None) -> Any:
        if tid not in self.slow:
            return self.inner.download_target(tid, dest, progress)

        def slow(done: int, total: int) -> None:
            self.chunks[tid] = self.chunks.get(tid, 0) + 1
            time.sleep(self.pause)
            if progress is not None:
                progress(done, total)

        return self.inner.download_target(tid, dest, slow)


@contextlib.asynccontextmanager
async def worker_with_cache(
    settings: Settings, client: Client, task_queue: str, cache: WorkspaceCache
) -> AsyncIterator[None]:
    """An in-process forgespace worker (both queues) whose cache uses ``cache``'s store."""
    stop = asyncio.Event()
    ready: list[Any] = []
    task = asyncio.create_task(
        run_worker(
            settings,
            client,
            task_queue=task_queue,
            workflows_dirs=[FIXTURE_WORKFLOWS],
            bundled=False,
            stop=stop,
            on_ready=ready.append,
            cache=cache,
            sweep=False,
        )
    )
    while not ready:
        if task.done():
            task.result()
        await asyncio.sleep(0.05)
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=30)


async def activity_types(handle: Any) -> list[str]:
    """Names of the activities a workflow scheduled, in order."""
    history = await handle.fetch_history()
    return [
        e.activity_task_scheduled_event_attributes.activity_type.name
        for e in history.events
        if e.HasField("activity_task_scheduled_event_attributes")
    ]


def test_cancel_or_timeout_mid_download_releases_the_run_and_the_worker_goes_on(
    temporal_server: DevServer, settings: Settings, task_queue: str, tmp_path: Path
) -> None:
    """Each mode is cancelled while its download runs (16 chunks at 1 s each); a fifth run
    hits its execution timeout mid-download. Afterwards nothing of those runs is leased or on
    disk, and the same worker serves a following run."""
    store = open_store(settings)
    tids: dict[str, str] = {}
    for name in ("isolated", "copy-on-write", "shared", "timeout"):
        blob = tmp_path / f"{name}.bin"
        blob.write_bytes(os.urandom(16 * 2**20))
        tids[name] = store.upload_target(blob)
    slow = _SlowStore(open_store(settings), set(tids.values()), pause=1.0)
    cache = WorkspaceCache(settings, store=slow)
    fast_tid = store.upload_target(make_project(tmp_path))
    workflow_of = {
        "isolated": "fs_marker_isolated",
        "copy-on-write": "fs_marker_copy_on_write",
        "shared": "fs_marker_shared",
        "timeout": "fs_marker_isolated",
    }

    async def main() -> tuple[dict[str, Any], dict[str, list[str]], Any]:
        client = await Client.connect(temporal_server.address)
        async with worker_with_cache(settings, client, task_queue, cache):
            handles = {}
            for name, tid in tids.items():
                mode = "isolated" if name == "timeout" else name
                handles[name] = await client.start_workflow(
                    workflow_of[name],
                    WorkflowRequest(tid, f"run-{name.replace('-', '')}", mode, {}),
                    id=f"slow-{name}-{uuid.uuid4().hex[:8]}",
                    task_queue=task_queue,
                    execution_timeout=timedelta(seconds=6) if name == "timeout" else None,
                )
            deadline = time.monotonic() + 20
            while len(slow.chunks) < len(tids) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert len(slow.chunks) == len(tids), slow.chunks
            for name, h in handles.items():
                if name != "timeout":
                    await h.cancel()
            outcomes: dict[str, Any] = {}
            for name, h in handles.items():
                try:
                    outcomes[name] = await asyncio.wait_for(h.result(), timeout=30)
                except WorkflowFailureError as exc:
                    outcomes[name] = exc.cause
            scheduled = {name: await activity_types(h) for name, h in handles.items()}
            # The timed-out run's worker learns it at its next heartbeat: wait for its release.
            deadline = time.monotonic() + 15
            while cache.index.live_leases() and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            following = await client.execute_workflow(
                "fs_marker_isolated",
                WorkflowRequest(fast_tid, "after", "isolated", {"write": True}),
                id=f"after-{uuid.uuid4().hex[:8]}",
                task_queue=task_queue,
                execution_timeout=timedelta(seconds=30),
            )
            return outcomes, scheduled, following

    outcomes, scheduled, following = asyncio.run(main())
    for name in ("isolated", "copy-on-write", "shared"):
        assert type(outcomes[name]).__name__ == "CancelledError", (name, outcomes[name])
        # The workflow released by ids after its prepare came back without a path.
        assert scheduled[name][-2:] == ["prepare_workspace", "release_run"], scheduled[name]
    assert type(outcomes["timeout"]).__name__ == "TimeoutError", outcomes["timeout"]
    # Every download stopped early (16 chunks would be the whole object).
    assert all(0 < n < 16 for n in slow.chunks.values()), slow.chunks
    assert cache.index.live_leases() == []
    for name, tid in tids.items():
        tdir = settings.cache_dir / tid
        left = sorted(p.name for p in tdir.iterdir()) if tdir.exists() else []
        assert left == [], (name, left)
    meta = settings.cache_dir / ".forgespace"
    assert list((meta / "tmp").iterdir()) == [] and list((meta / "trash").iterdir()) == []
    assert following["workspace"] == str(settings.cache_dir / fast_tid / "after" / "workspace")
    assert following["result"]["seen"]["after"] == ["hello.txt", "marker-after", "pkg"]


RELEASE_WORKFLOWS = FIXTURE_WORKFLOWS / "_release"


def _pending_activity_state(desc: Any) -> str:
    pending = desc.raw_description.pending_activities
    return PendingActivityState.Name(pending[0].state) if pending else ""


def test_prepare_killed_with_its_worker_then_cancelled_is_released_by_ids(
    temporal_server: DevServer,
    settings: Settings,
    task_queue: str,
    tmp_path: Path,
    worker_processes: list[WorkerProcess],
) -> None:
    """The worker downloading the run's target dies (SIGKILL) after the cancel reached it, so
    nothing on the worker side could release the run: its lease and the dead process's
    staging directory stay. run_in_workspace's release_run, served by the worker that resumes
    the host queue (same host, same cache), ends the lease and sweeps the staging directory."""
    tid = open_store(settings).upload_target(make_project(tmp_path))
    signals = tmp_path / "signals"
    env = env_for(settings.with_(temporal_address=temporal_server.address))
    env |= {"TEMPORAL_NAMESPACE": temporal_server.namespace}
    doomed = start_worker_process(
        env,
        task_queue,
        tmp_path / "doomed.log",
        "--workflows-dir",
        str(RELEASE_WORKFLOWS),
        pause=("download", signals),
    )
    worker_processes.append(doomed)
    doomed.wait_ready()
    index = WorkspaceCache(settings).index

    async def main() -> tuple[BaseException | None, list[str], dict[str, Any]]:
        client = await Client.connect(temporal_server.address, namespace=temporal_server.namespace)
        h = await client.start_workflow(
            "fs_release_probe",
            WorkflowRequest(tid, "doomed", "isolated", {}),
            id=f"release-{uuid.uuid4().hex[:8]}",
            task_queue=task_queue,
        )
        deadline = time.monotonic() + 30
        while not (signals.is_dir() and any(signals.iterdir())):
            assert time.monotonic() < deadline, doomed.text()[-2000:]
            await asyncio.sleep(0.05)
        assert [le.run_id for le in index.live_leases()] == ["doomed"]
        await h.cancel()
        while (
            _pending_activity_state(await h.describe()) != "PENDING_ACTIVITY_STATE_CANCEL_REQUESTED"
        ):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        doomed.proc.kill()
        doomed.proc.wait(10)
        # What the dead process left: its lease and its staging directory.
        assert [le.run_id for le in index.live_leases()] == ["doomed"]
        assert list((settings.cache_dir / ".forgespace" / "tmp").iterdir())
        async with in_process_worker(
            settings, client, task_queue, workflows_dirs=(FIXTURE_WORKFLOWS, RELEASE_WORKFLOWS)
        ):
            cause: BaseException | None = None
            try:
                await asyncio.wait_for(h.result(), timeout=40)
            except WorkflowFailureError as exc:
                cause = exc.cause
            # release_run did it (the worker here runs no start-up sweep, and the following
            # run's get of the target would sweep the staging directory too).
            assert index.live_leases() == []
            assert list((settings.cache_dir / ".forgespace" / "tmp").iterdir()) == []
            following = await client.execute_workflow(
                "fs_release_probe",
                WorkflowRequest(tid, "following", "isolated", {}),
                id=f"following-{uuid.uuid4().hex[:8]}",
                task_queue=task_queue,
                execution_timeout=timedelta(seconds=30),
            )
        return cause, await activity_types(h), following

    cause, scheduled, following = asyncio.run(main())
    assert type(cause).__name__ == "CancelledError", cause
    assert scheduled[-2:] == ["prepare_workspace", "release_run"], scheduled
    assert index.live_leases() == []
    assert not (settings.cache_dir / tid / "doomed").exists()
    assert list((settings.cache_dir / ".forgespace" / "tmp").iterdir()) == []
    assert following["workspace"] == str(settings.cache_dir / tid / "following" / "workspace")
    assert following["result"]["downloaded"] is True


def test_run_in_workspace_warns_when_the_request_overrides_the_metadata_mode(
    temporal_server: DevServer,
    settings: Settings,
    task_queue: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Whoever started the run: the worker knows the metadata mode (register_metadata_modes)
    and the workflow logs the override; a run in the metadata's own mode logs nothing."""
    caplog.set_level(logging.WARNING)
    # The worker registers the modes of the packages it loads: start from an empty registry.
    monkeypatch.setattr(api_module, "_METADATA_MODES", {})
    tid = open_store(settings).upload_target(make_project(tmp_path))

    async def main() -> list[dict[str, Any]]:
        client = await Client.connect(temporal_server.address)
        async with in_process_worker(
            settings, client, task_queue, workflows_dirs=(RELEASE_WORKFLOWS,)
        ):
            return [
                await client.execute_workflow(
                    "fs_release_probe",
                    WorkflowRequest(tid, rid, mode, {}),
                    id=f"override-{rid}-{uuid.uuid4().hex[:8]}",
                    task_queue=task_queue,
                    execution_timeout=timedelta(seconds=30),
                )
                for rid, mode in (("as-metadata", "isolated"), ("overridden", "shared"))
            ]

    out = asyncio.run(main())
    assert [r["result"]["mode"] for r in out] == ["isolated", "shared"]
    warnings = [
        r.getMessage() for r in caplog.records if "overrides metadata.yaml" in r.getMessage()
    ]
    assert len(warnings) == 1, warnings
    assert (
        "workflow fs_release_probe run overridden: workspace_isolation shared overrides "
        "metadata.yaml's isolated" in warnings[0]
    )
