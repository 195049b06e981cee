"""Leases through the real Temporal dev server (issue 12, items 2 and 3): heartbeats renew a
run's lease, `forgespace run --timeout` cleans up before it fails the run, and the worker's
sweep releases the leases of workflows that closed without cleaning up (terminated, past
their execution timeout, their worker killed)."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from support.temporal import (
    FIXTURE_WORKFLOWS,
    WorkerProcess,
    in_process_worker,
    start_worker_process,
)
from temporalio.client import Client, WorkflowHandle

from forgespace.cache.workspace import WorkspaceCache
from forgespace.config import Settings
from forgespace.storage import open_store
from forgespace.temporal.api import MEMO_KEY, WorkflowRequest
from forgespace.temporal.devserver import DevServer
from forgespace.temporal.runner import RunJob, run_job

pytestmark = pytest.mark.integration


def make_target(settings: Settings, tmp_path: Path) -> tuple[str, Path]:
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "hello.txt").write_text("hello\n")
    return open_store(settings).upload_target(proj), proj


async def workspace_of(handle: WorkflowHandle[Any, Any], timeout: float = 30) -> str:
    """The workspace path the run recorded in its memo, once it has one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        memo = await (await handle.describe()).memo()
        if MEMO_KEY in memo:
            return str(memo[MEMO_KEY]["path"])
        await asyncio.sleep(0.1)
    raise TimeoutError(f"run {handle.id} recorded no workspace in {timeout}s")


async def gone(path: Path, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while path.exists() and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    return not path.exists()


def test_heartbeats_renew_the_lease_of_a_run_longer_than_the_lease_ttl(
    temporal_server: DevServer, settings: Settings, task_queue: str, tmp_path: Path
) -> None:
    """CACHE_LEASE_TTL 2 s, a run that works (heartbeating) for 7 s, the worker's sweep every
    0.3 s with a CACHE_TTL of 0.5 s: without renewal the sweep evicts the workspace under
    the running activity; with it, the run finds its workspace intact to the end."""
    quick = settings.with_(cache_lease_ttl=2.0, cache_ttl=0.5, cache_cleanup_interval=0.3)
    tid, _ = make_target(quick, tmp_path)

    async def main() -> Any:
        client = await Client.connect(temporal_server.address)
        async with in_process_worker(quick, client, task_queue, sweep=True):
            h = await client.start_workflow(
                "fs_marker_copy_on_write",
                WorkflowRequest(tid, "r1", "copy-on-write", {"hold_seconds": 7}),
                id=f"renew-{uuid.uuid4().hex}",
                task_queue=task_queue,
            )
            return await asyncio.wait_for(h.result(), timeout=60)

    res = asyncio.run(main())
    seen = res["result"]["seen"]
    assert "hello.txt" in seen["after"] and seen["attempt"] == 1
    assert not WorkspaceCache(quick).index.live_leases()


def test_run_timeout_cancels_the_body_then_cleans_up(
    temporal_server: DevServer, settings: Settings, task_queue: str, tmp_path: Path
) -> None:
    """`forgespace run --timeout 3` on a run that would work for 60 s: the run fails as timed
    out, and its copy-on-write copy and lease are gone at once (no sweep involved)."""
    remote = settings.with_(temporal_address=temporal_server.address)
    _, proj = make_target(settings, tmp_path)

    async def main() -> dict[str, Any]:
        client = await Client.connect(temporal_server.address)
        async with in_process_worker(settings, client, task_queue, sweep=False):
            job = RunJob(
                workflow="fs_marker_copy_on_write",
                path=proj,
                params={"hold_seconds": 60},
                task_queue=task_queue,
                workflows_dirs=[FIXTURE_WORKFLOWS],
                bundled=False,
                timeout=timedelta(seconds=3),
                sarif=None,
            )
            return await asyncio.wait_for(run_job(remote, job), timeout=90)

    report = asyncio.run(main())
    [run] = report["runs"]
    assert run["status"] == "failed" and "timed out" in (run["error"] or "")
    assert run["workspace"] and not Path(run["workspace"]).exists()
    assert not WorkspaceCache(settings).index.live_leases()


@pytest.mark.parametrize("ending", ["terminated", "execution-timeout"])
def test_worker_sweep_releases_the_leases_of_closed_workflows(
    temporal_server: DevServer, settings: Settings, task_queue: str, tmp_path: Path, ending: str
) -> None:
    """A run closed by the server (terminated, or past its execution timeout) never runs its
    cleanup; the worker's periodic sweep asks Temporal, and releases its run directory and
    lease. A run still open keeps both."""
    quick = settings.with_(cache_cleanup_interval=0.5)
    tid, _ = make_target(quick, tmp_path)

    async def main() -> tuple[bool, bool, bool]:
        client = await Client.connect(temporal_server.address)
        async with in_process_worker(quick, client, task_queue, sweep=True):
            timeout = timedelta(seconds=4) if ending == "execution-timeout" else None
            doomed = await client.start_workflow(
                "fs_marker_isolated",
                WorkflowRequest(tid, "doomed", "isolated", {"hold_seconds": 60}),
                id=f"doomed-{uuid.uuid4().hex}",
                task_queue=task_queue,
                execution_timeout=timeout,
            )
            alive = await client.start_workflow(
                "fs_marker_isolated",
                WorkflowRequest(tid, "alive", "isolated", {"hold_seconds": 60}),
                id=f"alive-{uuid.uuid4().hex}",
                task_queue=task_queue,
            )
            doomed_ws = Path(await workspace_of(doomed))
            alive_ws = Path(await workspace_of(alive))
            if ending == "terminated":
                await doomed.terminate("test: terminated mid-run")
            released = await gone(doomed_ws.parent)
            await asyncio.sleep(1.5)  # three more sweeps
            kept = alive_ws.is_dir()
            await alive.terminate("test: done")
            return released, kept, await gone(alive_ws.parent)

    released, kept, then_released = asyncio.run(main())
    assert released, "the closed run's directory was not released by the sweep"
    assert kept, "the sweep released a run that is still open"
    assert then_released
    assert not WorkspaceCache(quick).index.live_leases()


def test_killed_worker_restarted_releases_the_runs_closed_meanwhile(
    temporal_server: DevServer,
    temporal_env: dict[str, str],
    settings: Settings,
    task_queue: str,
    tmp_path: Path,
    worker_processes: list[WorkerProcess],
) -> None:
    """A worker SIGKILLed mid-run leaves the run's directory and lease; the run is then
    terminated. The worker started again on the same cache releases them at start-up."""
    tid, _ = make_target(settings, tmp_path)
    env = {
        **temporal_env,
        "CACHE_DIR": str(settings.cache_dir),
        "STORAGE_DIR": str(settings.storage_dir),
        "PATH": "/usr/bin:/bin",
    }
    first = start_worker_process(env, task_queue, tmp_path / "w1.log")
    worker_processes.append(first)
    first.wait_ready()

    async def start_and_kill() -> str:
        client = await Client.connect(temporal_server.address)
        h = await client.start_workflow(
            "fs_marker_copy_on_write",
            WorkflowRequest(tid, "r1", "copy-on-write", {"hold_seconds": 60}),
            id=f"killed-{uuid.uuid4().hex}",
            task_queue=task_queue,
        )
        ws = await workspace_of(h)
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(10)
        await h.terminate("test: its worker died")
        return ws

    ws = Path(asyncio.run(start_and_kill()))
    assert ws.parent.is_dir() and WorkspaceCache(settings).index.live_leases()
    second = start_worker_process(env, task_queue, tmp_path / "w2.log")
    worker_processes.append(second)
    second.wait_ready()
    index = WorkspaceCache(settings).index
    deadline = time.monotonic() + 30
    # The release removes the directory first and ends the lease right after: wait for both.
    while (ws.parent.exists() or index.live_leases()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not ws.parent.exists(), second.text()[-2000:]
    assert not index.live_leases()
