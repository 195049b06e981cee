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

Cancellation: a cancelled ``prepare_workspace``/``get_target`` (the workflow was cancelled or
timed out; Temporal tells the activity through its heartbeats) stops its download at the next
chunk, waits until the cache call in its thread has really returned (heartbeating meanwhile),
releases what the call took if it got that far, and only then reports the cancellation. So
with ``WAIT_CANCELLATION_COMPLETED`` the workflow never goes on while the thread still
writes. ``release_run`` releases a run by its ids when its workspace path never reached the
workflow (a prepare that died with its worker, timed out, or was cancelled).
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
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from temporalio import activity
from temporalio.exceptions import ApplicationError

from forgespace.cache.index import LeaseOwner
from forgespace.errors import (
    BackendUnavailableError,
    ForgespaceError,
    SandboxStartError,
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
    RELEASE_ACTIVITY,
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
# Longer than a target id (Temporal workflow ids), same characters; fullmatch (a trailing
# newline must not pass).
_WORKFLOW_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")


class RunReleasedError(ForgespaceError):
    """A get_target call stopped mid-download: its activity was cancelled or its run released."""


_NON_RETRYABLE: tuple[type[BaseException], ...] = (
    TargetNotFoundError,
    UnsafeArchiveError,
    BackendUnavailableError,
    RunReleasedError,
    SandboxStartError,
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


def attempt_owner() -> LeaseOwner:
    """The lease owner of the running activity: this attempt of this activity of this
    workflow run (a retry is another attempt, and takes the run's lease over)."""
    info = activity.info()
    return LeaseOwner(
        attempt=f"{info.workflow_id}/{info.workflow_run_id}/{info.activity_id}#{info.attempt}",
        workflow_id=info.workflow_id,
        workflow_run_id=info.workflow_run_id,
    )


class _Progress:
    """Latest progress of a running call, written by its thread, read by the heartbeat loop."""

    def __init__(self, phase: str, what: str = "") -> None:
        self._lock = threading.Lock()
        self.details: dict[str, Any] = {"phase": phase}
        self.what = what
        # Set when the activity is cancelled or the run released: the download stops at its
        # next chunk instead of running to the end for nobody.
        self.stop = threading.Event()

    def update(self, **kw: Any) -> None:
        with self._lock:
            self.details.update(kw)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return dict(self.details)

    def download_callback(self) -> Callable[[int, int], None]:
        def cb(done: int, total: int) -> None:
            if self.stop.is_set():
                raise RunReleasedError(
                    f"download of {self.what or 'the target'} stopped after {done} of {total} "
                    "bytes: the activity was cancelled or its run released"
                )
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
        # Cache calls of a run still running in this process's threads, by (target, run): a
        # release waits for them (a cancelled activity may have returned before its thread).
        self._inflight: dict[tuple[str, str], list[tuple[Future[Any], _Progress]]] = {}
        self._inflight_lock = threading.Lock()

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
            self.release_run,
            self.upload_results,
        ]

    # --- running cache calls in the pool -------------------------------------------------
    async def _beat_until(self, fut: asyncio.Future[Any], progress: _Progress, t0: float) -> None:
        """Wait for ``fut``, heartbeating ``progress`` every ``heartbeat_interval``."""
        while True:
            done, _ = await asyncio.wait({fut}, timeout=self.heartbeat_interval)
            if done:
                return
            details = progress.snapshot()
            details["elapsed_s"] = round(time.monotonic() - t0, 1)
            activity.heartbeat(details)

    def _track(self, key: tuple[str, str], cf: Future[Any], progress: _Progress) -> None:
        item = (cf, progress)
        with self._inflight_lock:
            self._inflight.setdefault(key, []).append(item)

        def untrack(_: Future[Any]) -> None:
            with self._inflight_lock:
                items = self._inflight.get(key, [])
                if item in items:
                    items.remove(item)
                if not items:
                    self._inflight.pop(key, None)

        cf.add_done_callback(untrack)

    def inflight(self, target_id: str, run_id: str) -> int:
        """How many cache calls of this run still run in this process's threads."""
        with self._inflight_lock:
            return len(self._inflight.get((target_id, run_id), []))

    async def _run(
        self,
        fn: Callable[[], T],
        progress: _Progress,
        *,
        run_key: tuple[str, str] | None = None,
        on_cancel: Callable[[T], Any] | None = None,
    ) -> T:
        """Run ``fn`` in the pool; heartbeat its progress until it returns.

        When the activity is cancelled, ``fn`` is asked to stop (its download aborts at the
        next chunk) and awaited; if it still succeeded, ``on_cancel(result)`` releases what
        it got. Only then does the cancellation propagate.
        """
        cf = self.executor.submit(fn)
        if run_key is not None:
            self._track(run_key, cf, progress)
        fut = asyncio.wrap_future(cf)
        t0 = time.monotonic()
        try:
            await self._beat_until(fut, progress, t0)
        except asyncio.CancelledError:
            progress.stop.set()
            await self._settle(fut, progress, t0, on_cancel)
            raise
        try:
            return fut.result()
        except ForgespaceError as exc:
            raise to_application_error(exc) from exc

    async def _settle(
        self,
        fut: asyncio.Future[T],
        progress: _Progress,
        t0: float,
        on_cancel: Callable[[T], Any] | None,
    ) -> None:
        """After a cancellation: wait for the thread, then release what it got, if anything."""
        what = progress.what or "cache call"
        progress.update(phase="cancelling")
        try:
            await self._beat_until(fut, progress, t0)
        except asyncio.CancelledError:
            # Cancelled again (the worker is shutting down): stop waiting. The thread ends on
            # its own; the workflow's release_run waits for it on a live worker.
            log.warning("%s: cancelled twice; not waiting for its thread any more", what)
            raise
        if fut.cancelled():
            return  # never started
        exc = fut.exception()
        if exc is not None:
            # The engine undid its own work (staging removed, lease ended) before raising.
            log.info("%s stopped after cancellation: %s", what, exc)
            return
        if on_cancel is None:
            return
        result = fut.result()
        try:
            await asyncio.wrap_future(self.executor.submit(on_cancel, result))
            log.info("%s was cancelled after it finished; released %s", what, result)
        except Exception:
            log.exception("%s was cancelled; releasing %s failed", what, result)

    # --- get / release ---------------------------------------------------------------------
    def _get(
        self, target_id: str, run_id: str | None, mode: str, progress: _Progress, owner: LeaseOwner
    ) -> Any:
        validate_id(target_id, "target_id")
        iso = IsolationMode.parse(mode)
        if run_id is not None:
            validate_id(run_id, "run_id")
        return self.cache.get_target_report(
            target_id,
            run_id,
            workspace_isolation=iso.value,
            progress=progress.download_callback(),
            owner=owner,
        )

    async def _get_async(self, target_id: str, run_id: str | None, mode: str) -> Any:
        progress = _Progress("get_target", f"target {target_id} for run {run_id}")
        key = (target_id, run_id) if isinstance(run_id, str) else None
        # Read here, on the event loop: the activity context does not reach the pool's threads.
        owner = attempt_owner()

        def release(_: Any) -> None:
            # Shared without a run id takes no lease, so there is nothing of its own to end.
            # Only what this attempt took: a retry that took the run over keeps it.
            if run_id is not None:
                self.cache.release(target_id, run_id, mode, attempt=owner.attempt)

        return await self._run(
            lambda: self._get(target_id, run_id, mode, progress, owner),
            progress,
            run_key=key,
            on_cancel=release,
        )

    # --- activities ----------------------------------------------------------------------
    @activity.defn(name=HOST_QUEUE_ACTIVITY)
    async def host_task_queue(self) -> str:
        """Runs on the shared queue: which host queue the rest of the workflow should use."""
        return self.host_queue

    @activity.defn(name=PREPARE_ACTIVITY)
    async def prepare_workspace(
        self, target_id: str, run_id: str | None = None, workspace_isolation: str = "isolated"
    ) -> PreparedWorkspace:
        """get_target plus what the runner reports: downloaded or served from the cache."""
        result = await self._get_async(target_id, run_id, workspace_isolation)
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
        result = await self._get_async(target_id, run_id, workspace_isolation)
        return str(result.path)

    @activity.defn(name=CLEANUP_ACTIVITY)
    async def cleanup_cache(
        self,
        target_path: str,
        workspace_isolation: str = "isolated",
        run_id: str | None = None,
    ) -> None:
        """End the run's lease; isolated/copy-on-write: remove its run directory."""

        owner = attempt_owner()

        def call() -> None:
            mode = IsolationMode.parse(workspace_isolation).value
            if run_id is not None:
                validate_id(run_id, "run_id")
            # The workflow's id lets a shared cleanup without a run id end its own leases only.
            self.cache.cleanup_cache(
                target_path, workspace_isolation=mode, run_id=run_id, owner=owner
            )

        await self._run(call, _Progress("cleanup"))

    @activity.defn(name=RELEASE_ACTIVITY)
    async def release_run(
        self, target_id: str, run_id: str, workspace_isolation: str = "isolated"
    ) -> dict[str, Any]:
        """Release what run ``run_id`` of ``target_id`` holds on this host, by ids.

        For a run whose workspace path never reached its workflow (its prepare was cancelled,
        timed out or died with its worker): first stops and waits for any cache call of that
        run still running in this process, then sweeps dead processes' staging directories
        of the target, ends the run's lease and (isolated, copy-on-write) removes its run
        directory. Idempotent; only bad ids or mode are (non-retryable) errors. Returns what
        it did: ``leases_ended`` and the ``removed`` paths.
        """
        try:
            validate_id(target_id, "target_id")
            validate_id(run_id, "run_id")
            mode = IsolationMode.parse(workspace_isolation).value
        except ForgespaceError as exc:
            raise to_application_error(exc) from exc
        progress = _Progress("release", f"release of run {run_id} of target {target_id}")
        t0 = time.monotonic()
        with self._inflight_lock:
            pending = list(self._inflight.get((target_id, run_id), []))
        if pending:
            progress.update(phase="release-waiting", calls=len(pending))
            for _, p in pending:
                p.stop.set()
            # Cancelling this activity does not cancel the calls it waits for (shield).
            waits = [asyncio.shield(asyncio.wrap_future(cf)) for cf, _ in pending]
            await self._beat_until(
                asyncio.ensure_future(asyncio.gather(*waits, return_exceptions=True)), progress, t0
            )
        out = await self._run(
            lambda: self.cache.release(target_id, run_id, mode).to_dict(), progress
        )
        activity.logger.info(
            "released run %s of %s (%s): %d lease(s) ended, removed %s",
            run_id,
            target_id,
            mode,
            out["leases_ended"],
            out["removed"] or "nothing",
        )
        return out

    @activity.defn(name=UPLOAD_RESULTS_ACTIVITY)
    async def upload_results(
        self, workflow_id: str, results: Any, results_format: str = "json"
    ) -> str:
        """Store ``results`` under ``{workflow_id}/results.{json|sarif}``; return the location.

        As FuzzForge's activity of the same name: a format other than ``json``/``sarif`` is
        stored as JSON (with a warning), and with the s3 backend the location is the object's
        URL ``{S3_ENDPOINT}/{S3_RESULTS_BUCKET}/{key}`` (the local backend: the file's path).
        """
        if not isinstance(workflow_id, str) or not _WORKFLOW_ID.fullmatch(workflow_id):
            raise ApplicationError(
                f"invalid workflow_id {workflow_id!r}: expected 1-255 characters of "
                "A-Z a-z 0-9 . _ - starting with a letter or digit",
                type="ValueError",
                non_retryable=True,
            )
        if results_format not in RESULT_FORMATS:
            activity.logger.warning(
                "upload_results: format %r is not one of %s; stored as JSON (as FuzzForge does)",
                results_format,
                ", ".join(RESULT_FORMATS),
            )
            results_format = "json"
        ext, content_type = RESULT_FORMATS[results_format]
        data = json.dumps(results, indent=2, sort_keys=True, default=str).encode()
        key = f"{workflow_id}/results.{ext}"
        store = self.cache.store
        location = await self._run(
            lambda: store.put_result(key, data, content_type), _Progress("upload_results")
        )
        return _results_url(location, self.cache.settings.s3_endpoint)


def _results_url(location: str, endpoint: str | None) -> str:
    """``s3://bucket/key`` as the URL FuzzForge returns (``{endpoint}/bucket/key``)."""
    if location.startswith("s3://") and endpoint:
        base = endpoint if "://" in endpoint else f"http://{endpoint}"
        return f"{base.rstrip('/')}/{location.removeprefix('s3://')}"
    return location
