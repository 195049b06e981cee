"""`forgespace workflows` and `forgespace run` as a user runs them (subprocess, real server)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import time
import urllib.request
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


def interrupted_run(
    env: dict[str, str], tmp_path: Path, workflow: str, *args: str
) -> tuple[subprocess.Popen[bytes], Path]:
    """Start `forgespace run WORKFLOW` on a fixture workflow that holds until interrupted, wait
    until its run body has started (it writes ``started_file``), then send SIGINT. Returns the
    process (still finishing) and the file its stderr goes to."""
    started = tmp_path / "started"
    err = tmp_path / "run.err"
    with open(err, "wb") as errf:
        proc = subprocess.Popen(
            cli_command(
                "run",
                workflow,
                str(make_project(tmp_path)),
                *args,
                "--param",
                f"started_file={started}",
                *FIXTURE_ARGS,
            ),
            env={**env, "COLUMNS": "1000"},
            stdout=subprocess.PIPE,
            stderr=errf,
        )
    deadline = time.monotonic() + 60
    while not started.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the run never started: {err.read_text()}")
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    return proc, err


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
        "-v",  # the workflows' own log lines too
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
    assert "cache: 3 runs, 1 download, 2 served from the cache" in proc.stderr
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
    # cleanup_cache ran in `finally`: nothing of the run is left, and the summary says so
    # instead of showing the deleted path as the run's workspace.
    tid = json.loads(proc.stdout)["target_id"]
    assert not (settings.cache_dir / tid / run["run_id"]).exists()
    assert "workspace: removed by the run's cleanup (isolated)" in proc.stderr
    assert str(settings.cache_dir / tid / run["run_id"]) not in proc.stderr
    assert "asked to fail" in proc.stderr


def test_run_summary_names_the_findings_and_fail_on_gates_on_severity(
    settings: Settings, tmp_path: Path
) -> None:
    """The bundled scanner on the example app: the summary shows what was found (severity,
    file:line, rule), where the results went and the shared workspace; no SDK INFO logs
    without -v; --fail-on high exits 1 because high findings exist."""
    app = Path(__file__).resolve().parents[2] / "examples" / "vulnerable_app"
    proc = cli(settings, "run", "security_assessment", str(app), "--fail-on", "high")
    assert proc.returncode == 1, proc.stderr[-3000:]
    err = proc.stderr
    assert proc.stdout == ""
    assert "INFO" not in err and "Traceback" not in err, err
    assert re.search(r"13 findings \(4 high, 4 medium, 5 low\)", err), err
    assert re.search(r"high +app/handlers\.py:10 +B602 +subprocess call with shell=True", err), err
    assert "... 8 more in the results" in err
    m = re.search(r"results: json (\S+results\.json), sarif (\S+results\.sarif)", err)
    assert m is not None, err
    assert json.loads(Path(m.group(1)).read_text())["summary"]["total"] == 13
    assert "(shared: stays cached for the next runs)" in err
    assert "--fail-on high: 4 finding(s) at or above high" in err
    # Below every finding's severity the gate stays open; with --json the report is alone
    # on stdout.
    proc = cli(settings, "run", "security_assessment", str(app), "--json", "--fail-on", "low")
    assert proc.returncode == 1 and json.loads(proc.stdout)["runs"][0]["findings"] == 13


@pytest.mark.parametrize("bad", ["severe", "HIGHEST", ""])
def test_fail_on_refuses_an_unknown_severity(settings: Settings, tmp_path: Path, bad: str) -> None:
    proc = cli(settings, "run", "fs_marker_shared", str(make_project(tmp_path)), "--fail-on", bad)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "expected one of high, medium, low" in proc.stderr


@pytest.mark.parametrize("timeout", ["2h", "90m", "600", "1.5h"])
def test_timeout_accepts_durations(settings: Settings, tmp_path: Path, timeout: str) -> None:
    proc = cli(
        settings, "run", "fs_marker_shared", str(make_project(tmp_path)), "--timeout", timeout,
        "--json", *FIXTURE_ARGS,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["runs"][0]["status"] == "completed"


@pytest.mark.parametrize("timeout", ["2 hours", "-5", "0", "h"])
def test_timeout_refuses_what_is_not_a_duration(
    settings: Settings, tmp_path: Path, timeout: str
) -> None:
    proc = cli(
        settings, "run", "fs_marker_shared", str(make_project(tmp_path)), "--timeout", timeout,
        *FIXTURE_ARGS,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "--timeout" in proc.stderr
    assert not settings.storage_dir.exists() or not os.listdir(settings.storage_dir)


@pytest.mark.parametrize(
    "workflow", ["fs_marker_isolated", "fs_marker_shared", "fs_marker_copy_on_write"]
)
def test_sigint_cancels_waits_for_cleanup_and_leaves_no_lease_nor_run_dir(
    settings: Settings, tmp_path: Path, workflow: str
) -> None:
    """Ctrl-C on an embedded `forgespace run --json` mid-run: the run is cancelled, its cleanup
    runs before the in-process worker stops, exit 130 with one line, nothing on stdout."""
    env = env_for(settings)
    env.pop("TEMPORAL_ADDRESS", None)
    proc, err = interrupted_run(env, tmp_path, workflow, "--json", "--param", "hold_seconds=120")
    try:
        out, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = err.read_text()
    assert proc.returncode == 130, text
    assert out == b""  # --json: no document for an interrupted job, and no core log lines
    assert "Traceback" not in text and "CancelledError" not in text, text
    assert "waiting up to 30 s for their cleanup" in text
    assert text.rstrip().splitlines()[-1] == "interrupted: 1 run cancelled, cleanup done"
    m = re.search(r"started run (\S+) \(workflow id (\S+)\)", text)
    assert m is not None, text
    run_id, wid = m.groups()
    tid = wid.removeprefix(f"{workflow}-").removesuffix(f"-{run_id}")
    status = json.loads(
        subprocess.run(
            cli_command("cache", "status", "--json"), env=env, capture_output=True, check=True
        ).stdout
    )
    assert status["live_leases"] == 0
    listed = json.loads(
        subprocess.run(
            cli_command("cache", "ls", "--json"), env=env, capture_output=True, check=True
        ).stdout
    )
    kinds = [e["kind"] for t in listed["targets"] for e in t["entries"]]
    assert "run" not in kinds, listed
    assert not (settings.cache_dir / tid / run_id).exists()
    assert sorted(os.listdir(settings.cache_dir / tid)) in ([], ["shared"], ["target", "workspace"])


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
    proc, err = interrupted_run(
        env,
        tmp_path,
        "fs_marker_isolated",
        "--task-queue",
        task_queue,
        "--param",
        "hold_seconds=60",
    )
    try:
        assert proc.wait(30) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    text = err.read_text()
    assert "cancelling 1 run;" in text
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


def test_ui_serves_temporal_web_ui_on_a_loopback_port(settings: Settings, tmp_path: Path) -> None:
    env = env_for(settings)
    env.pop("TEMPORAL_ADDRESS", None)
    started = tmp_path / "started"
    err = tmp_path / "run.err"
    with open(err, "wb") as errf:
        proc = subprocess.Popen(
            cli_command(
                "run",
                "fs_marker_shared",
                str(make_project(tmp_path)),
                "--ui",
                "--param",
                "hold_seconds=120",
                "--param",
                f"started_file={started}",
                *FIXTURE_ARGS,
            ),
            env={**env, "COLUMNS": "1000"},
            stdout=subprocess.DEVNULL,
            stderr=errf,
        )
    try:
        deadline = time.monotonic() + 60
        while not started.exists():
            assert proc.poll() is None, err.read_text()
            assert time.monotonic() < deadline, err.read_text()
            time.sleep(0.1)
        m = re.search(r"Temporal Web UI: (http://127\.0\.0\.1:\d+)", err.read_text())
        assert m is not None, err.read_text()
        with urllib.request.urlopen(m.group(1), timeout=10) as resp:
            assert resp.status == 200
            assert b"<html" in resp.read(4096).lower()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(90) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
