"""Two worker hosts: the design document's example and a FuzzForge-style shared scanner run
unchanged, every run correct, because forgespace pins each run's activities to the host of
its get_target (HostAffinityInterceptor).

Each worker is a "host" of its own: a mount namespace with a private tmpfs over the same
CACHE_DIR path and its own host name (UTS namespace). So both hosts hand out identical-looking
paths, and a path is valid only on the host that created it: an activity or cleanup landing on
the other host finds no workspace (the example activities then fail the run). Needs root
(unshare, mount); the store is shared (one STORAGE_DIR, like one MinIO).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from support.hosts import namespaces_problem, on_host, start_host_worker
from support.s3server import env_for
from support.temporal import WorkerProcess, cli_command

from forgespace.config import Settings
from forgespace.temporal.devserver import DevServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "workflows"
HOSTS = ("fs-host-a", "fs-host-b")
RUNS = 12


@pytest.fixture
def two_hosts(
    temporal_server: DevServer,
    settings: Settings,
    task_queue: str,
    tmp_path: Path,
    worker_processes: list[WorkerProcess],
) -> dict[str, WorkerProcess]:
    """Two `forgespace worker` processes serving examples/workflows, one per host."""
    reason = namespaces_problem()
    if reason:
        pytest.skip(reason)
    settings.cache_dir.mkdir(parents=True, exist_ok=True)  # the tmpfs mount point
    env = env_for(settings.with_(temporal_address=temporal_server.address))
    env["TEMPORAL_NAMESPACE"] = temporal_server.namespace
    # Routing is what these tests check: both hosts must take runs of the one target, which
    # fleet locality would send to one host (tests/integration/test_fleet_locality.py).
    env["FORGESPACE_LOCALITY_WAIT"] = "off"
    workers = {}
    for host in HOSTS:
        w = start_host_worker(env, task_queue, tmp_path / f"{host}.log", host, EXAMPLES)
        worker_processes.append(w)
        workers[host] = w
    for w in workers.values():
        w.wait_ready()
    return workers


def run_on_cluster(
    settings: Settings, server: DevServer, task_queue: str, workflow: str, target: Path
) -> dict[str, Any]:
    """`forgespace run` as a client of the cluster (TEMPORAL_ADDRESS set): it only submits."""
    env = env_for(settings.with_(temporal_address=server.address))
    env["TEMPORAL_NAMESPACE"] = server.namespace
    env["COLUMNS"] = "1000"
    args = ["run", workflow, str(target), "--runs", str(RUNS), "--json"]
    args += ["--task-queue", task_queue, "--workflows-dir", str(EXAMPLES), "--no-bundled"]
    proc = subprocess.run(cli_command(*args), env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report: dict[str, Any] = json.loads(proc.stdout)
    return report


def make_target(root: Path) -> Path:
    proj = root / "proj"
    (proj / "deploy").mkdir(parents=True)
    (proj / "hello.txt").write_text("hello\n")
    (proj / "deploy" / "id_rsa").write_text("not a real key\n")
    return proj


def test_design_example_on_two_hosts(
    two_hosts: dict[str, WorkerProcess],
    temporal_server: DevServer,
    settings: Settings,
    task_queue: str,
    tmp_path: Path,
) -> None:
    report = run_on_cluster(
        settings, temporal_server, task_queue, "my_workflow", make_target(tmp_path)
    )
    tid = report["target_id"]
    assert report["cache"] == {"downloads": RUNS, "hits": 0}
    used = set()
    for run in report["runs"]:
        assert run["status"] == "completed", run["error"]
        result = run["result"]
        host = result["host"]
        used.add(host)
        # The work ran where get_target put the workspace (elsewhere the path does not exist).
        assert result["workspace"] == run["workspace"]
        assert run["workspace"] == str(settings.cache_dir / tid / run["run_id"] / "workspace")
        assert (result["files"], result["other_runs_markers"]) == (2, [])
        # cleanup_cache ran on that host too: the run directory is gone from its disk.
        assert not on_host(two_hosts[host], settings.cache_dir / tid / run["run_id"]).exists()
    assert used == set(HOSTS), "both hosts must take runs for routing to be exercised"
    for w in two_hosts.values():
        w.stop()
        assert w.proc.returncode == 0, w.text()[-2000:]


def test_fuzzforge_style_shared_scanner_on_two_hosts(
    two_hosts: dict[str, WorkerProcess],
    temporal_server: DevServer,
    settings: Settings,
    task_queue: str,
    tmp_path: Path,
) -> None:
    report = run_on_cluster(
        settings, temporal_server, task_queue, "file_scanner", make_target(tmp_path)
    )
    tid = report["target_id"]
    shared = settings.cache_dir / tid / "workspace"
    used = set()
    for run in report["runs"]:
        assert run["status"] == "completed", run["error"]
        result = run["result"]
        assert run["workspace"] == result["target_path"] == str(shared)
        assert [f["file"] for f in result["findings"]] == ["deploy/id_rsa"]
        assert run["findings"] == 1
        used.add(result["summary"]["host"])
    assert used == set(HOSTS)
    # One download per host (shared mode), every other run served from that host's cache.
    assert report["cache"] == {"downloads": len(HOSTS), "hits": RUNS - len(HOSTS)}
    for host, w in two_hosts.items():
        assert (on_host(w, shared) / "hello.txt").read_text() == "hello\n", host
