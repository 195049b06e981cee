"""Worker "hosts" on one machine: each `forgespace worker` in its own mount and UTS namespace.

Each host gets a private tmpfs over the same CACHE_DIR path and its own host name, so every
host hands out identical-looking paths and a path is valid only on the host that created it;
the store (STORAGE_DIR) stays shared, like one MinIO. Needs root and unshare(1).

- ``namespaces_problem()``: None when this works here, else why (for ``pytest.skip``).
- ``start_host_worker(env, task_queue, log, host, workflows_dir)``: a ``WorkerProcess``.
- ``on_host(worker, path)``: ``path`` as that host sees it (through ``/proc/PID/root``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from support.temporal import WorkerProcess, start_worker_process

# Runs inside `unshare`: a private tmpfs over CACHE_DIR, then the host name, then the worker.
HOST_SCRIPT = 'mount -t tmpfs fs-cache "$CACHE_DIR" && hostname "$0" && exec "$@"'


def namespaces_problem() -> str | None:
    """Why worker hosts cannot be made here, or None."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return "needs root and unshare(1) to give each worker its own mount/UTS namespace"
    probe = subprocess.run(
        ["unshare", "--mount", "--uts", "--propagation", "private", "--", "true"],
        capture_output=True,
        text=True,
    )
    return None if probe.returncode == 0 else f"unshare refused: {probe.stderr.strip()}"


def start_host_worker(
    env: dict[str, str], task_queue: str, log: Path, host: str, workflows_dir: Path
) -> WorkerProcess:
    """`forgespace worker` as host ``host`` (its own namespaces; CACHE_DIR must exist)."""
    wrap = ["unshare", "--mount", "--uts", "--propagation", "private", "--"]
    wrap += ["sh", "-c", HOST_SCRIPT, host]
    return start_worker_process(env, task_queue, log, workflows_dir=workflows_dir, wrap=wrap)


def on_host(worker: WorkerProcess, path: str | Path) -> Path:
    """``path`` as the worker's host sees it (its mount namespace, through /proc)."""
    return Path(f"/proc/{worker.proc.pid}/root") / Path(path).relative_to("/")
