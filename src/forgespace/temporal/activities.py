"""Storage activities: thin wrappers over the workspace cache, run on the worker's hosts.

Activities are methods of ``CacheActivities``, an object holding the process's one
``WorkspaceCache`` (samples-python ``hello_activity_method`` style). The cache is synchronous:
each call runs in the object's thread pool so the worker's event loop stays free, while a
heartbeat loop on the event loop reports progress (phase, bytes done/total) every few
seconds, also while the call waits for another process's download of the same target.

Errors: invalid input (our ``ValueError`` family), ``TargetNotFoundError``,
``UnsafeArchiveError`` and ``BackendUnavailableError`` become non-retryable
``ApplicationError``s whose ``type`` is the error class name; a transient ``StorageError``
(and anything unexpected) stays retryable.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from temporalio import activity
from temporalio.exceptions import ApplicationError

from forgespace.errors import (
    BackendUnavailableError,
    ForgespaceError,
    StorageError,
    TargetNotFoundError,
    UnsafeArchiveError,
)
from forgespace.layout import IsolationMode, validate_id
from forgespace.temporal.api import (
    CLEANUP_ACTIVITY,
    GET_TARGET_ACTIVITY,
    HOST_QUEUE_ACTIVITY,
    PREPARE_ACTIVITY,
    UPLOAD_RESULTS_ACTIVITY,
    PreparedWorkspace,
)

if TYPE_CHECKING:
    from forgespace.cache.workspace import WorkspaceCache

log = logging.getLogger(__name__)

T = TypeVar("T")

HEARTBEAT_INTERVAL = 2.0
RESULT_FORMATS = {
    "json": ("json", "application/json"),
    "sarif": ("sarif", "application/sarif+json"),
}
_WORKFLOW_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")

_NON_RETRYABLE: tuple[type[BaseException], ...] = (
    TargetNotFoundError,
    UnsafeArchiveError,
    BackendUnavailableError,
)


def to_application_error(exc: BaseException) -> ApplicationError:
    """The ApplicationError an activity raises for ``exc`` (type = the error's class name)."""
    non_retryable = isinstance(exc, _NON_RETRYABLE) or (
        isinstance(exc, ForgespaceError) and isinstance(exc, ValueError)
    )
    if isinstance(exc, StorageError):
        non_retryable = not exc.transient
    return ApplicationError(str(exc), type=type(exc).__name__, non_retryable=non_retryable)


def host_task_queue(task_queue: str, cache_dir: str | Path, host: str | None = None) -> str:
    """The host-unique queue of a worker: named after its host and its cache directory.

    Workers sharing a host and a CACHE_DIR share the queue (they share the workspaces too), and
    a worker restarted there resumes the queue with the workspaces still on disk.
    """
    host = host or socket.gethostname()
    digest = hashlib.sha256(str(Path(cache_dir).resolve()).encode()).hexdigest()[:12]
    return f"{task_queue}@{host}-{digest}"


class _Progress:
    """Latest progress of a running call, written by its thread, read by the heartbeat loop."""

    def __init__(self, phase: str) -> None:
        self._lock = threading.Lock()
        self.details: dict[str, Any] = {"phase": phase}

    def update(self, **kw: Any) -> None:
        with self._lock:
            self.details.update(kw)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return dict(self.details)

    def download_callback(self) -> Callable[[int, int], None]:
        def cb(done: int, total: int) -> None:
            self.update(phase="download", bytes_done=done, bytes_total=total)

        return cb


class CacheActivities:
    """The storage activities of one worker process, bound to its cache and host queue."""

    def __init__(
        self,
        cache: WorkspaceCache,
        *,
        host_queue: str,
        host: str | None = None,
        executor: ThreadPoolExecutor | None = None,
        heartbeat_interval: float = HEARTBEAT_INTERVAL,
    ) -> None:
        self.cache = cache
        self.host_queue = host_queue
        self.host = host or socket.gethostname()
        self.heartbeat_interval = heartbeat_interval
        self._own_executor = executor is None
        self.executor = executor or ThreadPoolExecutor(
            max_workers=32, thread_name_prefix="forgespace-activity"
        )

    def close(self) -> None:
        if self._own_executor:
            self.executor.shutdown(wait=False, cancel_futures=True)

    def activities(self) -> list[Callable[..., Any]]:
        """Every activity to register on a worker."""
        return [
            self.host_task_queue,
            self.prepare_workspace,
            self.get_target,
            self.cleanup_cache,
            self.upload_results,
        ]

    async def _run(self, fn: Callable[[], T], progress: _Progress) -> T:
        """Run ``fn`` in the pool; heartbeat its progress until it returns."""
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self.executor, fn)
        started = time.monotonic()
        while True:
            done, _ = await asyncio.wait({fut}, timeout=self.heartbeat_interval)
            if done:
                break
            details = progress.snapshot()
            details["elapsed_s"] = round(time.monotonic() - started, 1)
            activity.heartbeat(details)
        try:
            return fut.result()
        except ForgespaceError as exc:
            raise to_application_error(exc) from exc

    def _get(self, target_id: str, run_id: str | None, mode: str, progress: _Progress) -> Any:
        validate_id(target_id, "target_id")
        iso = IsolationMode.parse(mode)
        if run_id is not None:
            validate_id(run_id, "run_id")
        return self.cache.get_target_report(
            target_id,
            run_id,
            workspace_isolation=iso.value,
            progress=progress.download_callback(),
        )

    @activity.defn(name=HOST_QUEUE_ACTIVITY)
    async def host_task_queue(self) -> str:
        """Runs on the shared queue: which host queue the rest of the workflow should use."""
        return self.host_queue

    @activity.defn(name=PREPARE_ACTIVITY)
    async def prepare_workspace(
        self, target_id: str, run_id: str | None, workspace_isolation: str = "isolated"
    ) -> PreparedWorkspace:
        """get_target plus what the runner reports: downloaded or served from the cache."""
        progress = _Progress("get_target")
        result = await self._run(
            lambda: self._get(target_id, run_id, workspace_isolation, progress), progress
        )
        activity.logger.info(
            "workspace %s for run %s of %s (%s, %s)",
            result.path,
            run_id,
            target_id,
            workspace_isolation,
            "downloaded" if result.downloaded else "from cache",
        )
        return PreparedWorkspace(
            path=str(result.path),
            downloaded=bool(result.downloaded),
            workspace_isolation=IsolationMode.parse(workspace_isolation).value,
            task_queue=self.host_queue,
            host=self.host,
        )

    @activity.defn(name=GET_TARGET_ACTIVITY)
    async def get_target(
        self, target_id: str, run_id: str | None = None, workspace_isolation: str = "isolated"
    ) -> str:
        """FuzzForge-compatible: the local path of the run's workspace (or target file)."""
        progress = _Progress("get_target")
        result = await self._run(
            lambda: self._get(target_id, run_id, workspace_isolation, progress), progress
        )
        return str(result.path)

    @activity.defn(name=CLEANUP_ACTIVITY)
    async def cleanup_cache(
        self,
        target_path: str,
        workspace_isolation: str = "isolated",
        run_id: str | None = None,
    ) -> None:
        """End the run's lease; isolated/copy-on-write: remove its run directory."""

        def call() -> None:
            mode = IsolationMode.parse(workspace_isolation).value
            if run_id is not None:
                validate_id(run_id, "run_id")
            self.cache.cleanup_cache(target_path, workspace_isolation=mode, run_id=run_id)

        await self._run(call, _Progress("cleanup"))

    @activity.defn(name=UPLOAD_RESULTS_ACTIVITY)
    async def upload_results(
        self, workflow_id: str, results: Any, results_format: str = "json"
    ) -> str:
        """Store ``results`` under ``{workflow_id}/results.{json|sarif}``; return the location."""
        if not isinstance(workflow_id, str) or not _WORKFLOW_ID.match(workflow_id):
            raise ApplicationError(
                f"invalid workflow_id {workflow_id!r}: expected 1-255 characters of "
                "A-Z a-z 0-9 . _ - starting with a letter or digit",
                type="ValueError",
                non_retryable=True,
            )
        if results_format not in RESULT_FORMATS:
            raise ApplicationError(
                f"invalid results_format {results_format!r}: expected one of "
                + ", ".join(RESULT_FORMATS),
                type="ValueError",
                non_retryable=True,
            )
        ext, content_type = RESULT_FORMATS[results_format]
        data = json.dumps(results, indent=2, sort_keys=True, default=str).encode()
        key = f"{workflow_id}/results.{ext}"
        store = self.cache.store
        return await self._run(
            lambda: store.put_result(key, data, content_type), _Progress("upload_results")
        )
