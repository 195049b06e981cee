"""Fleet locality on three worker hosts: shared-mode runs go to a host that already holds
their target, so the fleet downloads each target about once instead of once per host.

Each worker is a host of its own (mount + UTS namespace, a private tmpfs over CACHE_DIR:
support/hosts.py); the store is shared. 30 shared-mode runs over 5 targets are submitted over
a few seconds. Random placement (FORGESPACE_LOCALITY_WAIT=off) is measured in the same test
on fresh hosts for comparison; a host SIGKILLed mid-way fails no run and costs at most one
extra download per target it held.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
from support.hosts import namespaces_problem, on_host, start_host_worker
from support.s3server import env_for
from support.temporal import FIXTURE_WORKFLOWS, WorkerProcess, cli_command
from temporalio.client import Client

from forgespace.config import Settings
from forgespace.storage import open_store
from forgespace.temporal.api import WorkflowRequest
from forgespace.temporal.devserver import DevServer
from forgespace.temporal.fleet import read_ads

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HOSTS = ("fl-host-a", "fl-host-b", "fl-host-c")
TARGETS = 5
RUNS = 30
# Generous against a loaded machine: a live host starts a queued download in milliseconds.
WAIT = "10s"


@pytest.fixture
def targets(settings: Settings, tmp_path: Path) -> list[str]:
    """Five distinct targets in the shared store; ``hello.txt`` names each one."""
    reason = namespaces_problem()
    if reason:
        pytest.skip(reason)
    store = open_store(settings)
    ids = []
    for i in range(TARGETS):
        proj = tmp_path / f"proj{i}"
        proj.mkdir()
        (proj / "hello.txt").write_text(f"target {i}\n")
        ids.append(store.upload_target(proj))
    settings.cache_dir.mkdir(parents=True, exist_ok=True)  # each host's tmpfs mount point
    return ids


def start_hosts(
    settings: Settings,
    server: DevServer,
    task_queue: str,
    log_dir: Path,
    locality_wait: str,
    procs: list[WorkerProcess],
) -> dict[str, WorkerProcess]:
    env = env_for(settings.with_(temporal_address=server.address))
    env["TEMPORAL_NAMESPACE"] = server.namespace
    env["FORGESPACE_LOCALITY_WAIT"] = locality_wait
    hosts = {}
    for host in HOSTS:
        w = start_host_worker(env, task_queue, log_dir / f"{host}.log", host, FIXTURE_WORKFLOWS)
        procs.append(w)
        hosts[host] = w
    for w in hosts.values():
        w.wait_ready()
    return hosts


def plan(ids: list[str], seed: int) -> list[int]:
    """Which target each of the 30 runs uses: every target 6 times, in a shuffled order."""
    order = [i % TARGETS for i in range(RUNS)]
    random.Random(seed).shuffle(order)
    return order


async def submit_and_wait(
    server: DevServer,
    task_queue: str,
    ids: list[str],
    order: list[int],
    *,
    spread: float = 3.0,
    midway: Any = None,
) -> list[tuple[int, dict[str, Any]]]:
    """Start the runs ``spread`` seconds apart in total (``midway()`` after half of them),
    then wait for every result; a failed run raises."""
    client = await Client.connect(server.address, namespace=server.namespace)
    handles = []
    for n, i in enumerate(order):
        if n == len(order) // 2 and midway is not None:
            await asyncio.to_thread(midway)
        rid = f"r{n}-{uuid.uuid4().hex[:6]}"
        h = await client.start_workflow(
            "fs_marker_shared",
            WorkflowRequest(ids[i], rid, "shared", {"hold_seconds": 0.5}),
            id=f"fleet-{rid}",
            task_queue=task_queue,
        )
        handles.append((i, h))
        await asyncio.sleep(spread / len(order))
    results = await asyncio.gather(*(asyncio.wait_for(h.result(), 180) for _, h in handles))
    return [(i, r) for (i, _), r in zip(handles, results, strict=True)]


def check_runs(
    settings: Settings, ids: list[str], out: list[tuple[int, dict[str, Any]]]
) -> dict[str, int]:
    """Every run saw its own target's shared workspace; returns downloads by host queue."""
    downloads: dict[str, int] = {}
    for i, res in out:
        assert res["workspace"] == str(settings.cache_dir / ids[i] / "workspace")
        assert res["result"]["mode"] == "shared"
        assert res["result"]["seen"]["hello"] == f"target {i}\n"
        q = res["result"]["task_queue"]
        downloads[q] = downloads.get(q, 0) + int(res["result"]["downloaded"])
    return downloads


def cache_status(worker: WorkerProcess, settings: Settings) -> dict[str, Any]:
    """`forgespace cache status --json` run on that host (in its mount namespace)."""
    enter = ["nsenter", "--target", str(worker.proc.pid), "--mount", "--uts", "--"]
    proc = subprocess.run(
        [*enter, *cli_command("cache", "status", "--json")],
        env=env_for(settings),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    doc: dict[str, Any] = json.loads(proc.stdout)
    return doc


def fleet_status(settings: Settings, task_queue: str) -> dict[str, Any]:
    proc = subprocess.run(
        cli_command("fleet", "status", "--json", "--task-queue", task_queue),
        env=env_for(settings),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    doc: dict[str, Any] = json.loads(proc.stdout)
    return doc


def stop_all(hosts: dict[str, WorkerProcess]) -> None:
    for w in hosts.values():
        w.stop()
        assert w.proc.returncode == 0, w.text()[-2000:]


def test_runs_go_to_the_host_holding_their_target(
    targets: list[str],
    temporal_server: DevServer,
    settings: Settings,
    task_queue: str,
    tmp_path: Path,
    worker_processes: list[WorkerProcess],
) -> None:
    order = plan(targets, seed=19)
    # Random placement first (locality off), on its own hosts and task queue.
    random_q = f"{task_queue}-random"
    (tmp_path / "random").mkdir()
    hosts = start_hosts(
        settings, temporal_server, random_q, tmp_path / "random", "off", worker_processes
    )
    out = asyncio.run(submit_and_wait(temporal_server, random_q, targets, order))
    random_downloads = sum(check_runs(settings, targets, out).values())
    stop_all(hosts)

    (tmp_path / "locality").mkdir()
    hosts = start_hosts(
        settings, temporal_server, task_queue, tmp_path / "locality", WAIT, worker_processes
    )
    out = asyncio.run(submit_and_wait(temporal_server, task_queue, targets, order))
    by_queue = check_runs(settings, targets, out)
    downloads = sum(by_queue.values())
    print(f"downloads for {RUNS} runs of {TARGETS} targets on {len(HOSTS)} hosts: ")
    print(f"  random placement {random_downloads}, locality {downloads}")
    assert downloads <= TARGETS + 1, (downloads, by_queue)
    assert downloads <= random_downloads
    # Each host's own cache agrees with what the runs reported (cache status --json).
    statuses = {host: cache_status(w, settings) for host, w in hosts.items()}
    assert sum(s["downloads"] for s in statuses.values()) == downloads, statuses
    assert sum(s["hits"] for s in statuses.values()) == RUNS - downloads
    # The operator's view: every target held, by the hosts whose caches hold it.
    fleet = fleet_status(settings, task_queue)
    assert fleet["totals"]["live_hosts"] == len(HOSTS)
    assert set(fleet["targets"]) == set(targets)
    assert fleet["totals"]["downloads"] == downloads
    assert fleet["totals"]["downloads_saved"] == RUNS - downloads
    for tid, modes in fleet["targets"].items():
        for host in modes["shared"]:
            assert (on_host(hosts[host], settings.cache_dir / tid / "workspace")).is_dir()
    stop_all(hosts)
    # A stopped host says so at once: nobody prefers it any more.
    assert {a.state for a in read_ads(open_store(settings), task_queue)} == {"stopped"}


def test_a_host_killed_midway_fails_no_run(
    targets: list[str],
    temporal_server: DevServer,
    settings: Settings,
    task_queue: str,
    tmp_path: Path,
    worker_processes: list[WorkerProcess],
) -> None:
    hosts = start_hosts(settings, temporal_server, task_queue, tmp_path, WAIT, worker_processes)
    store = open_store(settings)
    killed: dict[str, Any] = {}

    def kill_the_busiest_holder() -> None:
        ads = [a for a in read_ads(store, task_queue) if a.state == "serving"]
        victim = max(ads, key=lambda a: (len(a.holds.get("shared", [])), a.host))
        killed["host"] = victim.host
        killed["held"] = set(victim.holds.get("shared", []))
        w = hosts[victim.host]
        w.proc.send_signal(signal.SIGKILL)
        w.proc.wait(10)

    out = asyncio.run(
        submit_and_wait(
            temporal_server,
            task_queue,
            targets,
            plan(targets, seed=7),
            midway=kill_the_busiest_holder,
        )
    )
    check_runs(settings, targets, out)  # every run completed, on its target's workspace
    assert killed["held"], "the killed host held nothing: the test would prove nothing"
    survivors = {h: w for h, w in hosts.items() if h != killed["host"]}
    # Downloads made by the survivors, plus those the killed host made for runs it finished.
    survivor_downloads = sum(cache_status(w, settings)["downloads"] for w in survivors.values())
    dead_queue_downloads = sum(
        int(res["result"]["downloaded"])
        for _, res in out
        if f"@{killed['host']}-" in res["result"]["task_queue"]
    )
    total = survivor_downloads + dead_queue_downloads
    print(f"killed {killed['host']} holding {len(killed['held'])} target(s); downloads {total}")
    # A stale advertisement costs at most one extra download per target the host held.
    assert total <= TARGETS + len(killed["held"]), (survivor_downloads, dead_queue_downloads)
    stop_all(survivors)
