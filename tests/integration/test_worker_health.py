"""A real `forgespace worker` process: /healthz answers 200 while it polls and its cache takes
writes, 503 naming the problem when the cache is read-only or gone or Temporal is down; the
metrics server binds loopback unless told otherwise."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from support.s3server import env_for
from support.temporal import WorkerProcess, start_worker_process

from forgespace.config import Settings
from forgespace.temporal.devserver import DevServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def get(url: str) -> tuple[int, dict[str, Any] | str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            body = r.read().decode()
            status = r.status
    except urllib.error.HTTPError as e:
        body, status = e.read().decode(), e.code
    try:
        return status, json.loads(body)
    except json.JSONDecodeError:
        return status, body


@pytest.fixture
def own_server(tmp_path: Path):
    """A dev server of this test alone: the test stops it."""
    server = DevServer(db_dir=tmp_path / "temporal")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def ro_bind(tmp_path: Path):
    """``ro_bind(path)`` makes ``path`` a read-only bind mount of itself (even root cannot
    write there); unmounted after the test."""
    mounted: list[Path] = []

    def make(path: Path) -> None:
        for cmd in (
            ["mount", "--bind", str(path), str(path)],
            ["mount", "-o", "remount,bind,ro", str(path)],
        ):
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
            if r.returncode != 0:
                if cmd[1] == "-o":
                    subprocess.run(["umount", str(path)], timeout=30)
                pytest.skip(f"cannot make a read-only bind mount here: {r.stderr.strip()}")
        mounted.append(path)

    yield make
    for path in mounted:
        subprocess.run(["umount", str(path)], timeout=30)


def wait_for_status(url: str, status: int, timeout: float = 20) -> dict[str, Any]:
    """The /healthz body once it answers ``status`` (the worker may still be starting)."""
    deadline = time.monotonic() + timeout
    while True:
        got, body = get(url)
        if got == status:
            assert isinstance(body, dict), body
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} answered {got} {body}, expected {status}")
        time.sleep(0.2)


def test_healthz_is_200_when_healthy_and_503_naming_what_is_wrong(
    own_server: DevServer,
    settings: Settings,
    task_queue: str,
    tmp_path: Path,
    worker_processes: list[WorkerProcess],
    ro_bind,
) -> None:
    cache_dir = tmp_path / "cache"
    env = env_for(settings.with_(cache_dir=cache_dir, temporal_address=own_server.address))
    env["TEMPORAL_NAMESPACE"] = own_server.namespace
    worker = start_worker_process(env, task_queue, tmp_path / "w.log", "--metrics-port", "0")
    worker_processes.append(worker)
    worker.wait_ready()
    addr, port = worker.metrics_endpoint()
    assert addr == "127.0.0.1"  # loopback unless --metrics-addr says otherwise
    healthz = f"http://127.0.0.1:{port}/healthz"

    # The ready line comes as the workers start; they poll once Temporal has validated them.
    body = wait_for_status(healthz, 200)
    assert body["status"] == "ok" and "problems" not in body
    assert body["worker"]["polling"] is True and body["worker"]["task_queue"] == task_queue
    assert body["cache"] == {"dir": str(cache_dir), "writable": True}
    # /metrics is still served next to it.
    status, text = get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200 and "forgespace_cache_hits_total" in str(text)
    # The probe leaves nothing behind.
    assert list((cache_dir / ".forgespace" / "tmp").iterdir()) == []

    # Read-only cache (as a remount would make it): even a root worker cannot write.
    ro_bind(cache_dir)
    body = wait_for_status(healthz, 503)
    assert body["status"] == "unhealthy" and body["cache"]["writable"] is False
    assert body["worker"]["polling"] is True
    assert len(body["problems"]) == 1 and "cache not writable" in body["problems"][0]
    assert "Read-only file system" in body["problems"][0]
    subprocess.run(["umount", str(cache_dir)], check=True, timeout=30)
    wait_for_status(healthz, 200)

    # CACHE_DIR gone (a volume that vanished): reported, and not silently re-created.
    cache_dir.rename(tmp_path / "cache-moved")
    body = wait_for_status(healthz, 503)
    assert "cache not writable" in body["problems"][0]
    assert not cache_dir.exists()
    (tmp_path / "cache-moved").rename(cache_dir)
    wait_for_status(healthz, 200)

    # Temporal gone: the workers keep retrying their polls, and serve nothing meanwhile.
    own_server.stop()
    body = wait_for_status(healthz, 503)
    assert body["worker"]["polling"] is False and body["cache"]["writable"] is True
    assert any("Temporal at" in p and "not reachable" in p for p in body["problems"])


def test_metrics_addr_binds_the_given_address(
    own_server: DevServer,
    settings: Settings,
    task_queue: str,
    tmp_path: Path,
    worker_processes: list[WorkerProcess],
) -> None:
    env = env_for(settings.with_(temporal_address=own_server.address))
    args = ("--metrics-port", "0", "--metrics-addr", "0.0.0.0")
    worker = start_worker_process(env, task_queue, tmp_path / "w.log", *args)
    worker_processes.append(worker)
    worker.wait_ready()
    addr, port = worker.metrics_endpoint()
    assert addr == "0.0.0.0"
    r = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True)
    if r.returncode == 0:
        assert f"0.0.0.0:{port}" in r.stdout, r.stdout
    wait_for_status(f"http://127.0.0.1:{port}/healthz", 200)


def test_an_unusable_metrics_addr_is_one_line(settings: Settings, settings_env) -> None:
    env = settings_env(settings)
    cmd = [
        sys.executable,
        "-c",
        "from forgespace.cli import main; main()",
        "worker",
        "--metrics-port",
        "0",
        "--metrics-addr",
        "192.0.2.1",  # TEST-NET: not an address of this host
    ]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert "invalid --metrics-addr/--metrics-port 192.0.2.1:0" in r.stderr
