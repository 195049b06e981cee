"""`forgespace run`'s runner without a Temporal server: what it reports (finding counts, the
summary's workspace lines, SARIF files), how it shows progress on a terminal, what it refuses
before connecting, and what an interrupted run says about its runs' cleanup."""

from __future__ import annotations

import asyncio
import io
import json
import socket
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from temporalio import workflow

from forgespace.config import Settings
from forgespace.errors import WorkflowParameterError
from forgespace.temporal import runner
from forgespace.temporal.devserver import DevServerError
from forgespace.temporal.discovery import WorkflowMetadata, WorkflowPackage
from forgespace.temporal.runner import (
    Progress,
    RunInputError,
    RunJob,
    RunState,
    count_findings,
    plan_mode,
    print_summary,
    run_job,
    write_sarif,
)


def recording_console(*, terminal: bool = False) -> Console:
    """A console writing into a buffer (``console.file.getvalue()``), wide enough for one
    line per message."""
    return Console(file=io.StringIO(), force_terminal=terminal, width=200, color_system=None)


def printed(console: Console) -> str:
    out = console.file
    assert isinstance(out, io.StringIO)
    return out.getvalue()


# --- the finding count of results of other shapes (FuzzForge style) -----------------------


@pytest.mark.parametrize(
    ("result", "count"),
    [
        (["not", "a", "mapping"], 0),
        ({"findings": True}, 0),  # a flag, not a count
        ({"findings": 4}, 4),
        ({"findings": [{"a": 1}, {"b": 2}]}, 2),
        ({"summary": {"total_findings": 7}}, 7),
        ({"summary": {"total_findings": "7"}}, 0),  # not a count either
        (
            {"sarif": {"runs": [{"results": [{}, {}]}, "garbage", {"results": None}, {}]}},
            2,
        ),
        ({"sarif": {"runs": "none"}}, 0),
        ({"status": "ok"}, 0),
    ],
)
def test_findings_of_other_result_shapes_are_counted_from_what_they_carry(
    result: Any, count: int
) -> None:
    assert count_findings(result) == count


# --- the summary: where each run's workspace is now ----------------------------------------


def summary_of(states: list[RunState], mode: str, *, local: bool = True) -> list[str]:
    report = runner._job_report("wf", "t1", mode, states)
    console = recording_console()
    print_summary(console, report, states, local=local)
    return printed(console).splitlines()


def test_the_summary_says_where_each_workspace_is_now(tmp_path: Path) -> None:
    left = tmp_path / "left-behind"
    left.mkdir()
    states = [
        RunState("r1", "w1", status="completed", workspace=str(left), done=True),
        RunState("r2", "w2", status="completed", workspace=str(tmp_path / "gone"), done=True),
        RunState("r3", "w3", status="failed", error="ValueError: boom", done=True),
    ]
    lines = summary_of(states, "isolated")
    assert lines[0] == "wf on t1 (isolated): 1 of 3 failed"
    assert f"    workspace: {left} (still there: the workflow did not clean it up)" in lines
    assert "    workspace: removed by the run's cleanup (isolated)" in lines
    assert "    workspace: none reported" in lines
    assert "    error: ValueError: boom" in lines
    assert lines[-1] == "cache: 3 runs, 0 downloads, 0 served from the cache"


def test_a_shared_workspace_evicted_meanwhile_is_not_shown_as_cached(tmp_path: Path) -> None:
    kept = tmp_path / "kept"
    kept.mkdir()
    states = [
        RunState("r1", "w1", status="completed", workspace=str(kept), done=True),
        RunState("r2", "w2", status="completed", workspace=str(tmp_path / "evicted"), done=True),
    ]
    lines = summary_of(states, "shared")
    assert f"    workspace: {kept} (shared: stays cached for the next runs)" in lines
    assert f"    workspace: {tmp_path / 'evicted'} (shared; no longer cached)" in lines
    # Runs against a cluster: the path is on another host, so nothing is said about it.
    remote = summary_of(states[1:], "shared", local=False)
    assert f"    workspace: {tmp_path / 'evicted'} (shared: stays cached for the next runs)" in (
        remote
    )


def test_the_mode_the_runs_reported_wins_over_the_planned_one() -> None:
    states = [
        RunState("r1", "w1", status="completed", workspace_isolation="copy-on-write", done=True)
    ]
    report = runner._job_report("wf", "t1", "isolated", states)
    assert report["workspace_isolation"] == "copy-on-write"
    assert report["runs"] == [
        {
            "run_id": "r1",
            "status": "completed",
            "workspace": "",
            "findings": 0,
            "error": None,
            "result": {},
        }
    ]


# --- --sarif ---------------------------------------------------------------------------------


def test_sarif_is_written_per_run_and_a_run_without_one_is_named(tmp_path: Path) -> None:
    log = {"version": "2.1.0", "runs": [{"results": []}]}
    report = {
        "runs": [
            {"run_id": "r1", "result": {"sarif": log}},
            {"run_id": "r2", "result": {"findings": 0}},
            {"run_id": "r3", "result": "not a mapping"},
        ]
    }
    console = recording_console()
    written = write_sarif(report, tmp_path / "out" / "scan.sarif", console)
    assert written == [tmp_path / "out" / "scan-r1.sarif"]
    assert json.loads(written[0].read_text()) == log
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["scan-r1.sarif"]
    text = printed(console)
    assert "run r2: no SARIF in its result" in text
    assert "run r3: no SARIF in its result" in text
    assert f"SARIF of run r1 written to {written[0]}" in text


# --- progress on a terminal ----------------------------------------------------------------


def test_a_terminal_gets_one_live_line_per_run_with_its_step_and_heartbeat() -> None:
    states = [
        RunState("r1", "w1", status="running", step="bandit (attempt 2)", details="files=3"),
        RunState("r2-long", "w2", status="running", step="starting"),
        RunState("r3", "w3", status="completed", step="stale step", done=True),
    ]
    console = recording_console(terminal=True)
    with Progress(console, states, "scan on t1 (isolated, 3 runs)") as progress:
        assert progress.live is not None
        progress.show()
    lines = [line.rstrip() for line in printed(console).splitlines()]
    text = "\n".join(lines)
    assert "scan on t1 (isolated, 3 runs), 0 s" in text
    # Run ids padded to one width, then the status, step and heartbeat details.
    assert "r1       running    bandit (attempt 2)  files=3" in text
    assert "r2-long  running    starting" in text
    # A finished run shows its status only.
    assert "r3       completed" in text and "stale step" not in text


def test_heartbeat_details_are_one_short_line() -> None:
    assert runner._compact({"phase": "fuzz", "executions": 12}) == "phase=fuzz executions=12"
    assert runner._compact(["a", 1]) == "['a', 1]"
    long = runner._compact("x" * 200, width=20)
    assert long == "x" * 19 + "…" and len(long) == 20


# --- what is refused before anything connects or is uploaded ----------------------------------


def run_sync(settings: Settings, job: RunJob) -> dict[str, Any]:
    return asyncio.run(run_job(settings, job, console=recording_console()))


@pytest.mark.parametrize(
    ("job_args", "message"),
    [
        ({"runs": 0}, "invalid --runs 0: expected 1 or more"),
        ({"path": Path("/nonexistent/forgespace-target")}, "does not exist"),
    ],
)
def test_bad_runs_or_path_are_refused_before_anything_is_stored(
    settings: Settings, tmp_path: Path, job_args: dict[str, Any], message: str
) -> None:
    job = RunJob(**{"workflow": "secret_detection", "path": tmp_path, **job_args})
    with pytest.raises(RunInputError, match=message):
        run_sync(settings, job)
    assert not settings.storage_dir.exists()
    assert not settings.cache_dir.exists()


@workflow.defn(name="takes_target_id_probe")
class TakesTargetId:
    """A FuzzForge-style workflow: its run method takes ``target_id`` and picks its own mode."""

    @workflow.run
    async def run(self, target_id: str, depth: int = 3) -> dict[str, Any]:
        return {"target_id": target_id, "depth": depth}


def target_id_package(tmp_path: Path, mode: str) -> WorkflowPackage:
    meta = WorkflowMetadata(name="probe", workspace_isolation=mode)
    return WorkflowPackage("probe", tmp_path, meta, "probe", False, workflow=TakesTargetId)


def test_a_workflow_choosing_its_own_mode_accepts_only_that_mode(tmp_path: Path) -> None:
    pkg = target_id_package(tmp_path, "shared")
    assert pkg.takes_target_id
    # Saying the mode it uses anyway is fine; asking for another is refused, not ignored.
    assert plan_mode(pkg, "shared", "--isolation") == "shared"
    assert plan_mode(pkg, None, "--isolation") == "shared"
    with pytest.raises(WorkflowParameterError) as ei:
        plan_mode(pkg, "isolated", "--isolation")
    msg = str(ei.value)
    assert "--isolation isolated" in msg and "metadata.yaml: shared" in msg
    assert str(tmp_path) in msg


def test_ui_with_a_cluster_points_at_its_own_ui_and_a_dead_cluster_is_named(
    tmp_path: Path,
) -> None:
    # A bound socket that does not listen: connecting to it is refused at once.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{sock.getsockname()[1]}"
        settings = Settings.from_env(
            {
                "CACHE_DIR": str(tmp_path / "cache"),
                "STORAGE_DIR": str(tmp_path / "store"),
                "TEMPORAL_ADDRESS": address,
            }
        )
        job = RunJob(workflow="secret_detection", path=tmp_path, ui=True)
        console = recording_console()
        session = runner._TemporalSession()
        with pytest.raises(DevServerError) as ei:
            asyncio.run(asyncio.wait_for(session.open(settings, job, console), 60))
    assert f"cannot connect to Temporal at {address}" in str(ei.value)
    assert "(namespace default)" in str(ei.value)
    assert "--ui: TEMPORAL_ADDRESS is set; use that cluster's own Web UI" in printed(console)
    assert session.server is None  # no embedded server was started for a cluster


# --- interrupted: what became of the runs -----------------------------------------------------


class CancellableHandle:
    """The part of a WorkflowHandle that cancelling uses."""

    def __init__(self) -> None:
        self.cancelled = 0

    async def cancel(self) -> None:
        self.cancelled += 1


def test_interrupted_after_every_run_ended_cancels_nothing() -> None:
    handle = CancellableHandle()
    states = [RunState("r1", "w1", status="completed", done=True)]
    console = recording_console()
    line = asyncio.run(runner._cancel_runs([handle], states, [None], console))  # type: ignore[list-item]
    assert line == "interrupted (every run had already ended)"
    assert handle.cancelled == 0
    assert printed(console) == ""


def test_a_cleanup_that_does_not_end_in_time_is_reported_not_awaited(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(runner, "CANCEL_WAIT", 0.2)

    async def scenario() -> tuple[str, list[CancellableHandle]]:
        handles = [CancellableHandle(), CancellableHandle()]
        states = [RunState("r1", "w1", status="running"), RunState("r2", "w2", status="running")]
        ended = asyncio.Event()
        # r1's cleanup ends once it is cancelled; r2's never does.
        quick = asyncio.create_task(ended.wait())
        stuck = asyncio.create_task(asyncio.Event().wait())
        ended.set()
        try:
            line = await runner._cancel_runs(handles, states, [quick, stuck], recording_console())
        finally:
            stuck.cancel()
        return line, handles

    line, handles = asyncio.run(scenario())
    assert [h.cancelled for h in handles] == [1, 1]
    assert line.startswith("interrupted: 2 runs cancelled, cleanup of 1 not awaited")
    assert "CACHE_LEASE_TTL" in line and "forgespace cache gc" in line
