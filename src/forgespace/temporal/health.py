"""The worker's ``/healthz``: its Temporal workers are polling and its cache takes writes.

"Polling" is two checks: both Temporal workers of the process are running (started, not shut
down by a fatal error), and the Temporal frontend answers its health check (a worker whose
server is gone keeps running and retrying its polls, and serves nothing meanwhile).

A load balancer, Kubernetes or systemd's watchdog script reads one answer: 200 with a JSON
body when both hold, 503 with the list of what is wrong otherwise. The cache check writes and
removes a tiny file under ``{CACHE_DIR}/.forgespace/tmp`` (where staging happens, so it fails
exactly when a download would: a read-only remount, a vanished volume, a full disk) and never
creates a missing CACHE_DIR: a missing one is reported, not papered over.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol


class _Polling(Protocol):
    @property
    def is_running(self) -> bool: ...


def cache_write_problem(tmp_dir: Path) -> str | None:
    """Why a file cannot be written under ``tmp_dir`` right now, or None when it can."""
    name = tmp_dir / f".healthz-{os.getpid()}-{threading.get_ident()}"
    try:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, b"ok")
        finally:
            os.close(fd)
            os.unlink(name)
    except OSError as exc:
        return f"cache not writable: cannot write under {tmp_dir}: {exc.strerror or exc}"
    return None


class WorkerHealth:
    """``/healthz`` of one worker process (a ``cache.metrics.HealthCheck``)."""

    def __init__(
        self,
        *,
        cache_dir: Path,
        tmp_dir: Path,
        task_queue: str,
        host_queue: str,
        temporal_problem: Callable[[], str | None] | None = None,
    ) -> None:
        self.cache_dir = cache_dir
        #: Why the Temporal frontend cannot be reached, or None (a bounded call).
        self.temporal_problem = temporal_problem
        self.tmp_dir = tmp_dir
        self.task_queue = task_queue
        self.host_queue = host_queue
        #: The Temporal workers; empty until they have started.
        self.workers: Sequence[_Polling] = ()

    def __call__(self) -> tuple[bool, dict[str, Any]]:
        problems: list[str] = []
        polling = bool(self.workers) and all(w.is_running for w in self.workers)
        if not polling:
            problems.append(
                "Temporal workers not polling"
                + ("" if self.workers else " (not started yet)")
                + f": task queue {self.task_queue}, host queue {self.host_queue}"
            )
        temporal = None
        if polling and self.temporal_problem is not None:
            temporal = self.temporal_problem()
            if temporal is not None:
                polling = False
                problems.append(temporal)
        cache_problem = cache_write_problem(self.tmp_dir)
        if cache_problem is not None:
            problems.append(cache_problem)
        body: dict[str, Any] = {
            "status": "ok" if not problems else "unhealthy",
            "worker": {
                "polling": polling,
                "task_queue": self.task_queue,
                "host_queue": self.host_queue,
            },
            "cache": {"dir": str(self.cache_dir), "writable": cache_problem is None},
        }
        if problems:
            body["problems"] = problems
        return not problems, body
