"""Each isolation mode end to end through the real Temporal dev server (in-process worker).

The fixture workflows (tests/fixtures/workflows) list their workspace, write a marker named
after their run (isolated, copy-on-write) and return what they saw.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from support.temporal import FIXTURE_WORKFLOWS, in_process_worker
from temporalio.client import Client, WorkflowFailureError
from temporalio.exceptions import ActivityError, ApplicationError

from forgespace.cache.workspace import WorkspaceCache
from forgespace.config import Settings
from forgespace.storage import open_store
from forgespace.temporal.api import MEMO_KEY, WorkflowRequest
from forgespace.temporal.devserver import DevServer
from forgespace.temporal.runner import RunJob, run_job

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
    assert "1 runs, 1 download(s), 0 served from the cache" in out


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
