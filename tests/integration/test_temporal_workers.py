"""Worker processes against the real dev server: host affinity across two caches, a worker
SIGKILLed mid-run, invalid metadata stopping start-up."""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from support.s3server import env_for
from support.temporal import (
    FIXTURE_WORKFLOWS,
    NO_AFFINITY_WORKFLOWS,
    WorkerProcess,
    cli_command,
    start_worker_process,
)
from temporalio.client import Client, WorkflowFailureError

from forgespace.config import Settings
from forgespace.storage import open_store
from forgespace.temporal.api import MEMO_KEY, WorkflowRequest
from forgespace.temporal.devserver import DevServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def make_project(root: Path) -> Path:
    proj = root / "proj"
    proj.mkdir(parents=True)
    (proj / "hello.txt").write_text("hello\n")
    return proj


def worker_env(settings: Settings, server: DevServer, cache_dir: Path) -> dict[str, str]:
    env = env_for(settings.with_(cache_dir=cache_dir, temporal_address=server.address))
    env["TEMPORAL_NAMESPACE"] = server.namespace
    return env


async def start_runs(
    server: DevServer,
    task_queue: str,
    workflow: str,
    target_id: str,
    mode: str,
    n: int,
    params: dict[str, Any],
) -> list[tuple[str, Any]]:
    client = await Client.connect(server.address, namespace=server.namespace)
    out = []
    for i in range(n):
        rid = f"r{i}-{uuid.uuid4().hex[:6]}"
        h = await client.start_workflow(
            workflow,
            WorkflowRequest(target_id, rid, mode, dict(params)),
            id=f"{workflow}-{rid}",
            task_queue=task_queue,
        )
        out.append((rid, h))
    return out


async def results(handles: list[tuple[str, Any]], timeout: float) -> list[tuple[str, Any, Any]]:
    async def one(rid: str, h: Any) -> tuple[str, Any, Any]:
        res = await asyncio.wait_for(h.result(), timeout=timeout)
        memo = await (await h.describe()).memo()
        return rid, res, memo.get(MEMO_KEY)

    return list(await asyncio.gather(*(one(r, h) for r, h in handles)))


def test_two_worker_processes_with_their_own_caches_run_every_run_on_the_right_host(
    temporal_server: DevServer,
    settings: Settings,
    task_queue: str,
    tmp_path: Path,
    worker_processes: list[WorkerProcess],
) -> None:
    """Each run's download, work and cleanup happen in one cache; without host affinity a
    run's work lands on the other worker, whose cache lacks the workspace, and fails."""
    tid = open_store(settings).upload_target(make_project(tmp_path))
    caches = [tmp_path / "cache-a", tmp_path / "cache-b"]
    for i, cache in enumerate(caches):
        env = worker_env(settings, temporal_server, cache)
        extra = ["--workflows-dir", str(NO_AFFINITY_WORKFLOWS)]
        extra += ["--metrics-port", "0"] if i == 0 else []
        worker_processes.append(
            start_worker_process(env, task_queue, tmp_path / f"w{i}.log", *extra)
        )
    for w in worker_processes:
        w.wait_ready()
    _, metrics_port = worker_processes[0].metrics_endpoint()

    params = {"write": True, "hold_seconds": 0.2}

    async def main() -> tuple[list[tuple[str, Any, Any]], str, list[BaseException | None]]:
        handles = await start_runs(
            temporal_server, task_queue, "fs_marker_isolated", tid, "isolated", 20, params
        )
        out = await results(handles, timeout=90)
        metrics = await asyncio.to_thread(scrape, f"http://127.0.0.1:{metrics_port}/metrics")
        # Control: the same work routed FuzzForge-style on the shared queue.
        control = await start_runs(
            temporal_server, task_queue, "fs_no_affinity", tid, "isolated", 20, params
        )
        errors: list[BaseException | None] = []
        for _, h in control:
            try:
                await asyncio.wait_for(h.result(), timeout=60)
                errors.append(None)
            except WorkflowFailureError as exc:
                errors.append(exc.cause.cause if exc.cause is not None else exc)
        return out, metrics, errors

    out, metrics, control_errors = asyncio.run(main())
    # Without host affinity some runs' work or cleanup lands on the worker that lacks their
    # workspace (the work finds no workspace, or that cache refuses a path of another cache):
    # this test catches a routing regression.
    failed = [getattr(e, "type", repr(e)) for e in control_errors if e is not None]
    assert failed, "every control run succeeded: the test would not catch missing affinity"
    assert set(failed) <= {"WorkspaceMissing", "CleanupRefusedError"}, control_errors
    used: set[str] = set()
    for rid, res, memo in out:
        seen = res["result"]["seen"]
        cache = Path(seen["cache_dir"])
        # The work ran in the worker holding the workspace, in that worker's cache.
        assert res["workspace"] == str(cache / tid / rid / "workspace")
        assert memo["path"] == res["workspace"]
        assert seen["after"] == ["hello.txt", f"marker-{rid}"]
        assert not (cache / tid / rid).exists(), "cleanup ran on another host"
        used.add(str(cache))
    # Both workers took runs, so routing was really exercised.
    assert used == {str(c) for c in caches}
    # The first worker serves Prometheus metrics: one download per isolated run it served.
    in_a = sum(1 for _, res, _ in out if res["result"]["seen"]["cache_dir"] == str(caches[0]))
    assert f"forgespace_cache_downloads_total {float(in_a)}" in metrics
    for w in worker_processes:
        w.stop()
        assert w.proc.returncode == 0, w.text()[-2000:]


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return str(r.read().decode())


def _wait_file(path: Path, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: {path} not written after {timeout}s")
        time.sleep(0.05)


@pytest.mark.parametrize("same_cache", [True, False], ids=["restart-same-host", "other-host"])
def test_worker_killed_mid_run_and_replaced_the_run_still_completes(
    temporal_server: DevServer,
    settings: Settings,
    task_queue: str,
    tmp_path: Path,
    worker_processes: list[WorkerProcess],
    same_cache: bool,
) -> None:
    """SIGKILL the worker while the run's activity holds its workspace, start another one:
    same cache -> it resumes the host queue and the activity's retry runs there; another
    cache -> the host queue's schedule-to-start timeout moves the whole run to the new host."""
    tid = open_store(settings).upload_target(make_project(tmp_path))
    cache_a = tmp_path / "cache-a"
    cache_b = cache_a if same_cache else tmp_path / "cache-b"
    started = tmp_path / "started"
    first = start_worker_process(
        worker_env(settings, temporal_server, cache_a), task_queue, tmp_path / "a.log"
    )
    worker_processes.append(first)
    first.wait_ready()

    async def main() -> tuple[str, Any, Any]:
        [(rid, h)] = await start_runs(
            temporal_server,
            task_queue,
            "fs_marker_isolated",
            tid,
            "isolated",
            1,
            {"write": True, "hold_seconds": 30, "started_file": str(started)},
        )
        await asyncio.to_thread(_wait_file, started, 30, "activity start")
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(10)
        second = start_worker_process(
            worker_env(settings, temporal_server, cache_b), task_queue, tmp_path / "b.log"
        )
        worker_processes.append(second)
        await asyncio.to_thread(second.wait_ready)
        [out] = await results([(rid, h)], timeout=60)
        return out

    rid, res, memo = asyncio.run(main())
    second = worker_processes[-1]
    seen = res["result"]["seen"]
    assert seen["pid"] == second.proc.pid
    assert seen["cache_dir"] == str(cache_b)
    assert res["workspace"] == str(cache_b / tid / rid / "workspace")
    assert memo["path"] == res["workspace"]
    if same_cache:
        assert seen["attempt"] >= 2  # the activity's retry, on the resumed host queue
    else:
        assert seen["attempt"] == 1  # a fresh start on the new host
    assert not (cache_b / tid / rid).exists()
    second.stop()


def test_invalid_workspace_isolation_stops_worker_start_up(
    temporal_server: DevServer, settings: Settings, task_queue: str, tmp_path: Path
) -> None:
    wf_dir = tmp_path / "wfs"
    shutil.copytree(FIXTURE_WORKFLOWS / "fs_marker_isolated", wf_dir / "bad_mode")
    meta = wf_dir / "bad_mode" / "metadata.yaml"
    meta.write_text(
        meta.read_text().replace("workspace_isolation: isolated", "workspace_isolation: isolate")
    )
    env = worker_env(settings, temporal_server, tmp_path / "cache")
    env["COLUMNS"] = "1000"  # rich wraps stderr at the terminal width; keep the path whole
    proc = subprocess.run(
        cli_command(
            "worker", "--task-queue", task_queue, "--workflows-dir", str(wf_dir), "--no-bundled"
        ),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr
    assert str(meta) in err
    assert "'isolate'" in err
    assert "isolated, shared, copy-on-write" in err
    assert "worker ready" not in proc.stderr


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_worker_without_address_runs_an_embedded_server_that_dies_with_it(
    settings: Settings,
    task_queue: str,
    tmp_path: Path,
    worker_processes: list[WorkerProcess],
    sig: signal.Signals,
) -> None:
    env = env_for(settings)
    env.pop("TEMPORAL_ADDRESS", None)
    w = start_worker_process(env, task_queue, tmp_path / "w.log")
    worker_processes.append(w)
    w.wait_ready()
    assert "embedded Temporal dev server" in w.text()
    [server_pid] = _children(w.proc.pid)
    assert _alive(server_pid)
    w.proc.send_signal(sig)
    w.proc.wait(30)
    if sig == signal.SIGTERM:
        assert w.proc.returncode == 0, w.text()[-2000:]
    deadline = time.monotonic() + 15
    while _alive(server_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(server_pid), f"dev server pid {server_pid} outlived its worker"
