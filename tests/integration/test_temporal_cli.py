"""`forgespace workflows` and `forgespace run` as a user runs them (subprocess, real server)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from support.s3server import env_for
from support.temporal import FIXTURE_WORKFLOWS, WorkerProcess, cli_command, start_worker_process
from temporalio.client import Client

from forgespace.config import Settings
from forgespace.temporal.devserver import DevServer

pytestmark = pytest.mark.integration

FIXTURE_ARGS = ["--workflows-dir", str(FIXTURE_WORKFLOWS), "--no-bundled"]


def cli(settings: Settings, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = env_for(settings)
    # No TEMPORAL_ADDRESS: the embedded dev server and an in-process worker.
    env.pop("TEMPORAL_ADDRESS", None)
    env["COLUMNS"] = "1000"
    return subprocess.run(
        cli_command(*args), env=env, capture_output=True, text=True, timeout=timeout
    )


def make_project(root: Path) -> Path:
    proj = root / "proj"
    proj.mkdir()
    (proj / "hello.txt").write_text("hello\n")
    return proj


def test_workflows_json_lists_each_package_with_its_mode(settings: Settings) -> None:
    proc = cli(settings, "workflows", "--json", *FIXTURE_ARGS)
    assert proc.returncode == 0, proc.stderr
    listed = json.loads(proc.stdout)
    assert listed == [
        {
            "name": f"fs_marker_{suffix}",
            "version": "1.0",
            "vertical": "test",
            "workspace_isolation": mode,
            "description": f"Test fixture that inspects its {mode} workspace",
        }
        for suffix, mode in [
            ("copy_on_write", "copy-on-write"),
            ("isolated", "isolated"),
            ("shared", "shared"),
        ]
    ]


def test_run_json_shape_one_download_for_shared_and_sarif_per_run(
    settings: Settings, tmp_path: Path
) -> None:
    proj = make_project(tmp_path)
    sarif = tmp_path / "out" / "report.sarif"
    proc = cli(
        settings,
        "run",
        "fs_marker_shared",
        str(proj),
        "--runs",
        "3",
        "--param",
        "sarif=true",
        "--json",
        "--sarif",
        str(sarif),
        *FIXTURE_ARGS,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)  # stdout holds the JSON object and nothing else
    assert set(report) == {"workflow", "target_id", "workspace_isolation", "runs", "cache"}
    assert report["workflow"] == "fs_marker_shared"
    assert report["workspace_isolation"] == "shared"
    tid = report["target_id"]
    runs = report["runs"]
    assert len(runs) == 3 and len({r["run_id"] for r in runs}) == 3
    ws = str(settings.cache_dir / tid / "workspace")
    for r in runs:
        assert set(r) == {"run_id", "status", "workspace", "findings", "error", "result"}
        assert r["status"] == "completed" and r["error"] is None
        assert r["workspace"] == ws
        assert r["findings"] == 1 and isinstance(r["findings"], int)
        assert r["result"]["seen"]["after"] == ["hello.txt"]
        written = sarif.with_name(f"report-{r['run_id']}.sarif")
        assert json.loads(written.read_text())["run"] == r["run_id"]
    assert report["cache"] == {"downloads": 1, "hits": 2}
    # Human output went to stderr: the summary table and the cache figures.
    assert "3 runs, 1 download(s), 2 served from the cache" in proc.stderr
    assert f"User code downloaded to: {ws}" in proc.stderr


def test_run_exits_non_zero_and_reports_the_error_when_a_run_fails(
    settings: Settings, tmp_path: Path
) -> None:
    proj = make_project(tmp_path)
    proc = cli(
        settings,
        "run",
        "fs_marker_isolated",
        str(proj),
        "--param",
        "fail=true",
        "--json",
        *FIXTURE_ARGS,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    [run] = json.loads(proc.stdout)["runs"]
    assert run["status"] == "failed"
    assert "FixtureFailure" in run["error"] and "asked to fail" in run["error"]
    # cleanup_cache ran in `finally`: nothing of the run is left.
    tid = json.loads(proc.stdout)["target_id"]
    assert not (settings.cache_dir / tid / run["run_id"]).exists()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["no_such_workflow"], "unknown workflow 'no_such_workflow'"),
        (["fs_marker_shared", "--isolation", "isolate"], "invalid workspace_isolation 'isolate'"),
        (["fs_marker_shared", "--param", "novalue"], "invalid --param 'novalue'"),
        (["fs_marker_shared", "--runs", "0"], "--runs"),
    ],
)
def test_run_rejects_bad_input_before_starting_anything(
    settings: Settings, tmp_path: Path, args: list[str], needle: str
) -> None:
    proj = make_project(tmp_path)
    name, *rest = args
    proc = cli(settings, "run", name, str(proj), *rest, *FIXTURE_ARGS, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr
    assert proc.stdout == ""
    # Nothing uploaded.
    assert not settings.storage_dir.exists() or not os.listdir(settings.storage_dir)


def test_ctrl_c_cancels_the_submitted_runs(
    settings: Settings,
    tmp_path: Path,
    temporal_server: DevServer,
    task_queue: str,
    worker_processes: list[WorkerProcess],
) -> None:
    """Against a cluster, an interrupted `forgespace run` does not leave its runs going."""
    env = env_for(settings.with_(temporal_address=temporal_server.address))
    worker = start_worker_process(env, task_queue, tmp_path / "w.log")
    worker_processes.append(worker)
    worker.wait_ready()
    started = tmp_path / "started"
    err = tmp_path / "run.err"
    with open(err, "wb") as errf:
        proc = subprocess.Popen(
            cli_command(
                "run",
                "fs_marker_isolated",
                str(make_project(tmp_path)),
                "--task-queue",
                task_queue,
                "--param",
                "hold_seconds=60",
                "--param",
                f"started_file={started}",
                *FIXTURE_ARGS,
            ),
            env={**env, "COLUMNS": "1000"},
            stdout=subprocess.PIPE,
            stderr=errf,
        )
    try:
        deadline = time.monotonic() + 60
        while not started.exists():
            assert proc.poll() is None, err.read_text()
            assert time.monotonic() < deadline, err.read_text()
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    text = err.read_text()
    assert "cancelling 1 run(s)" in text
    m = re.search(r"started run (\S+) \(workflow id (\S+)\)", text)
    assert m is not None, text
    run_id, wid = m.groups()
    tid = wid.removeprefix("fs_marker_isolated-").removesuffix(f"-{run_id}")

    async def status() -> str:
        client = await Client.connect(temporal_server.address)
        h = client.get_workflow_handle(wid)
        for _ in range(100):
            desc = await h.describe()
            if desc.status is not None and desc.status.name != "RUNNING":
                return desc.status.name
            await asyncio.sleep(0.1)
        return "RUNNING"

    assert asyncio.run(status()) == "CANCELED"
    # The cancelled run stopped its activity and cleaned up on its host.
    assert not (settings.cache_dir / tid / run_id).exists()
