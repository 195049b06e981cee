"""The bundled workflows end to end through the real Temporal dev server.

A forgespace worker serving the bundled packages runs in the test's event loop; runs are
submitted like `forgespace run` does (``run_job``) or straight through the Temporal client
when several workflows must share one target id.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import json
import shutil
import subprocess
import sys
import uuid
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest
from support.temporal import in_process_worker
from temporalio.client import Client

from forgespace.cache.workspace import WorkspaceCache
from forgespace.config import Settings
from forgespace.errors import WorkflowParameterError
from forgespace.storage import open_store
from forgespace.temporal.api import MEMO_KEY, WorkflowRequest
from forgespace.temporal.devserver import DevServer
from forgespace.temporal.runner import RunJob, run_job
from forgespace.temporal.worker import WorkerInfo
from forgespace.workflows._tools.common import tree_digest

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PLANTED_SECRETS = (
    "AKIAIOSFODNN7EXAMPLE",
    "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "hunter2-not-a-real-password",
    "ghp_0123456789abcdefABCDEF0123456789abcd",
    "demo-secret-key-not-real",
)
LIVE_STATS_KEYS = {"executions", "exec_per_sec", "corpus_size", "crashes"}


def bundled_worker(
    settings: Settings, client: Client, task_queue: str
) -> AbstractAsyncContextManager[WorkerInfo]:
    """A forgespace worker serving only the bundled workflow packages, in this event loop."""
    return in_process_worker(settings, client, task_queue, workflows_dirs=(), bundled=True)


@pytest.fixture
def cluster_settings(settings: Settings, temporal_server: DevServer) -> Settings:
    """The test's local-store settings pointed at the session's dev server."""
    return dataclasses.replace(
        settings,
        temporal_address=temporal_server.address,
        temporal_namespace=temporal_server.namespace,
    )


def content_digest(root: Path, *, skip: tuple[str, ...] = ()) -> str:
    """Relative paths and bytes of every file (modes and times left out)."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if rel.split("/")[0] in skip:
            continue
        h.update(rel.encode() + b"\0")
        if p.is_file():
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def run_bundled_job(settings: Settings, task_queue: str, job: RunJob) -> dict[str, Any]:
    """`forgespace run`'s job against the session server, served by a bundled worker."""

    async def main() -> dict[str, Any]:
        assert settings.temporal_address
        client = await Client.connect(
            settings.temporal_address, namespace=settings.temporal_namespace
        )
        async with bundled_worker(settings, client, task_queue):
            return await run_job(settings, job)

    return asyncio.run(main())


async def run_many(
    settings: Settings,
    task_queue: str,
    runs: list[tuple[str, WorkflowRequest]],
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Start every (workflow, request) at once; return (result, memo workspace entry) each."""
    assert settings.temporal_address
    client = await Client.connect(settings.temporal_address, namespace=settings.temporal_namespace)
    async with bundled_worker(settings, client, task_queue):
        handles = [
            await client.start_workflow(name, req, id=f"{name}-{req.run_id}", task_queue=task_queue)
            for name, req in runs
        ]

        async def one(h: Any) -> tuple[dict[str, Any], dict[str, Any]]:
            result = await asyncio.wait_for(h.result(), timeout=90)
            memo = await (await h.describe()).memo()
            return result, memo[MEMO_KEY]

        return list(await asyncio.gather(*(one(h) for h in handles)))


def reproduce(target_dir: Path, module: str, data: bytes) -> str:
    """Feed ``data`` to TestOneInput in a fresh interpreter; the exception type it raised."""
    code = (
        f"import sys; sys.path.insert(0, {str(target_dir)!r}); import {module} as m\n"
        f"try:\n    m.TestOneInput({data!r})\n"
        "except Exception as e:\n    print(type(e).__name__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    return out.stdout.strip()


def test_atheris_finds_the_planted_crash_in_every_isolated_run(
    cluster_settings: Settings, task_queue: str
) -> None:
    job = RunJob(
        workflow="atheris_fuzzing",
        path=EXAMPLES / "fuzz_target",
        runs=3,
        params={"max_iterations": 5_000_000, "timeout_seconds": 40, "max_crashes": 1},
        task_queue=task_queue,
    )

    report = run_bundled_job(cluster_settings, task_queue, job)
    assert report["workspace_isolation"] == "isolated"
    runs = report["runs"]
    assert len({r["workspace"] for r in runs}) == 3
    for run in runs:
        assert run["status"] == "completed", run["error"]
        assert run["findings"] == 1
        assert run["workspace"].endswith(f"/{run['run_id']}/workspace")
        result = run["result"]
        [finding] = result["findings"]
        assert finding["exception_type"] == "builtins.IndexError"
        data = base64.b64decode(finding["input_base64"])
        assert reproduce(EXAMPLES / "fuzz_target", "fuzz_header", data) == "IndexError"
        # Crash and corpus were written inside the run's own workspace (removed at cleanup).
        assert finding["crash_file"].startswith(".atheris/crashes/")
        assert not Path(run["workspace"]).exists()
        # Results went through upload_results (local store: a file we can read back).
        stored = json.loads(Path(result["results_location"]["json"]).read_text())
        assert stored["findings"][0]["signature"] == finding["signature"]
    # Isolated: every run downloaded its own copy.
    assert report["cache"] == {"downloads": 3, "hits": 0}
    assert not WorkspaceCache(cluster_settings).index.live_leases()


def test_atheris_live_stats_are_heartbeat_details(
    cluster_settings: Settings, task_queue: str
) -> None:
    tid = open_store(cluster_settings).upload_target(EXAMPLES / "fuzz_target")
    # A time budget of 4 s and an iteration budget no machine spends in 4 s, so the run lasts
    # long enough to be watched; the assertions below hold whichever budget ends it.
    budget = {"timeout_seconds": 4, "max_iterations": 2_000_000_000}
    req = WorkflowRequest(tid, f"live-{uuid.uuid4().hex[:6]}", "isolated", budget)

    async def main() -> tuple[list[dict[str, Any]], dict[str, Any]]:
        assert cluster_settings.temporal_address
        client = await Client.connect(
            cluster_settings.temporal_address, namespace=cluster_settings.temporal_namespace
        )
        seen: list[dict[str, Any]] = []
        async with bundled_worker(cluster_settings, client, task_queue):
            h = await client.start_workflow(
                "atheris_fuzzing", req, id=f"atheris-{req.run_id}", task_queue=task_queue
            )
            result_task = asyncio.create_task(h.result())
            while not result_task.done():
                desc = await h.describe()
                for pa in desc.raw_description.pending_activities:
                    if pa.activity_type.name == "atheris_fuzz" and pa.heartbeat_details.payloads:
                        values = await client.data_converter.decode(pa.heartbeat_details.payloads)
                        seen.append(values[-1])
                await asyncio.sleep(0.5)
            return seen, await result_task

    seen, result = asyncio.run(main())
    assert seen, "no heartbeat details were visible while the fuzzer ran"
    assert all(set(d) == LIVE_STATS_KEYS for d in seen)
    assert seen[-1]["executions"] > 0
    final = result["result"]
    assert max(d["executions"] for d in seen) <= final["executions"]
    # What the budgets guarantee, not which one ran out first.
    assert final["executions"] <= budget["max_iterations"]
    if final["stopped"] == "max_iterations":
        assert final["executions"] == budget["max_iterations"]
    else:
        assert final["stopped"] == "timeout", final["stopped"]


def test_shared_scans_run_against_one_download_and_leave_it_untouched(
    cluster_settings: Settings, task_queue: str
) -> None:
    tid = open_store(cluster_settings).upload_target(EXAMPLES / "vulnerable_app")
    mode = "shared"
    first = [("security_assessment", WorkflowRequest(tid, "first", mode, {}))]
    [(res0, memo0)] = asyncio.run(run_many(cluster_settings, task_queue, first))
    ws = Path(res0["workspace"])
    assert ws == cluster_settings.cache_dir / tid / "workspace"
    assert memo0["downloaded"] is True
    # The shared workspace holds exactly the uploaded files, nothing the scan wrote.
    assert content_digest(ws) == content_digest(EXAMPLES / "vulnerable_app")
    before = tree_digest(ws)

    more = [
        ("security_assessment", WorkflowRequest(tid, "sa-2", mode, {})),
        ("secret_detection", WorkflowRequest(tid, "sd-1", mode, {})),
        ("secret_detection", WorkflowRequest(tid, "sd-2", mode, {})),
    ]
    out = asyncio.run(run_many(cluster_settings, task_queue, more))
    assert tree_digest(ws) == before  # byte for byte, modes and times included
    assert [memo["downloaded"] for _, memo in out] == [False, False, False]
    assert all(Path(res["workspace"]) == ws for res, _ in out)
    assert ws.is_dir()  # shared cleanup removes nothing

    # security_assessment: bandit and the file scanner found the planted problems; SARIF.
    for res in (res0, out[0][0]):
        result = res["result"]
        rules = {f["rule_id"] for f in result["findings"]}
        assert {"B602", "B307", "B301", "B324", "FS001"} <= rules
        assert res["findings"] == result["summary"]["total"] > 0
        sarif = result["sarif"]
        assert sarif["version"] == "2.1.0"
        assert {r["tool"]["driver"]["name"] for r in sarif["runs"]} == {
            "bandit",
            "forgespace-file-scanner",
        }
        stored = json.loads(Path(result["results_location"]["sarif"]).read_text())
        assert stored["version"] == "2.1.0"

    # secret_detection: found and masked; raw values nowhere in results or stored files.
    for res, _ in out[1:]:
        result = res["result"]
        types = {(f["file"], f["type"]) for f in result["findings"]}
        assert ("app/settings.py", "AWS Access Key") in types
        assert ("deploy/id_rsa", "Private Key") in types
        text = json.dumps(res) + Path(result["results_location"]["json"]).read_text()
        for secret in PLANTED_SECRETS:
            assert secret not in text
    assert not WorkspaceCache(cluster_settings).index.live_leases()


def test_concurrent_copy_on_write_test_suites_do_not_see_each_other(
    cluster_settings: Settings, task_queue: str, tmp_path: Path
) -> None:
    project = tmp_path / "project"
    shutil.copytree(EXAMPLES / "pytest_project", project)
    # A test that fails when another run's files are visible in its copy: it marks the copy,
    # waits while the other runs do the same, then looks for their marks and reports.
    (project / "tests" / "test_private_copy.py").write_text(
        "import os, time, uuid\n"
        "from pathlib import Path\n\n"
        "def test_only_my_marker_is_here():\n"
        "    root = Path.cwd()\n"
        "    assert not (root / 'forgespace-reports' / 'coverage.json').exists()\n"
        "    mine = root / f'marker-{uuid.uuid4().hex}'\n"
        "    mine.write_text(str(os.getpid()))\n"
        "    time.sleep(1.5)\n"
        "    assert sorted(p.name for p in root.glob('marker-*')) == [mine.name]\n"
    )
    tid = open_store(cluster_settings).upload_target(project)
    mode = "copy-on-write"
    runs = [("python_test_suite", WorkflowRequest(tid, f"cow-{i}", mode, {})) for i in range(3)]
    out = asyncio.run(run_many(cluster_settings, task_queue, runs))
    for i, (res, _) in enumerate(out):
        result = res["result"]
        assert res["workspace"] == str(cluster_settings.cache_dir / tid / f"cow-{i}" / "workspace")
        failed = [f["test"] for f in result["failures"]]
        assert failed == ["tests.test_stock::test_low_stock_includes_threshold"], failed
        assert (result["tests"], result["passed"], result["errors"]) == (6, 5, 0)
        assert res["findings"] == 1
        assert 50 < result["coverage_percent"] < 100
        assert result["reports"]["junit_xml"] == "forgespace-reports/junit.xml"
        assert not (cluster_settings.cache_dir / tid / f"cow-{i}").exists()
    assert sorted(memo["downloaded"] for _, memo in out) == [False, False, True]
    # The shared copy under the run copies holds the uploaded files and nothing the suites
    # wrote (no caches, markers, reports).
    pristine = cluster_settings.cache_dir / tid / "shared" / "workspace"
    assert content_digest(pristine) == content_digest(project)
    assert not WorkspaceCache(cluster_settings).index.live_leases()


def test_bad_parameter_is_refused_before_upload_and_start(
    cluster_settings: Settings, task_queue: str
) -> None:
    """forgespace run checks the parameters against metadata.yaml's schema first; a run
    started straight through Temporal is checked again by the activity (test_tools_activities)."""
    job = RunJob(
        workflow="secret_detection",
        path=EXAMPLES / "vulnerable_app",
        params={"max_file_size": 10},
        task_queue=task_queue,
    )
    with pytest.raises(WorkflowParameterError) as ei:
        asyncio.run(run_job(cluster_settings, job))
    assert "no parameter 'max_file_size'" in str(ei.value)
    assert "max_file_bytes" in str(ei.value)
    store_dir = cluster_settings.storage_dir
    assert not store_dir.exists() or not list(store_dir.rglob("target"))


def test_workflows_that_write_refuse_a_shared_workspace(
    cluster_settings: Settings, task_queue: str
) -> None:
    job = RunJob(
        workflow="python_test_suite",
        path=EXAMPLES / "pytest_project",
        isolation="shared",
        task_queue=task_queue,
    )

    report = run_bundled_job(cluster_settings, task_queue, job)
    [run] = report["runs"]
    assert run["status"] == "failed"
    assert "cannot run in shared mode" in run["error"]
    # Refused before any workspace was made: nothing was downloaded into the cache.
    assert report["cache"] == {"downloads": 0, "hits": 0}
    assert not (cluster_settings.cache_dir / report["target_id"]).exists()
