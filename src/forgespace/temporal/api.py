# Over 500 lines for now: the workflow-side API (Workspace, run_in_workspace) and the host
# choice with its fallbacks; the host choice is the next piece to move out (to fleet.py).
"""What a workflow package uses from inside a workflow: the request and ``run_in_workspace``.

This module is workflow-safe: importing it does no I/O and touches nothing but the Temporal
SDK's workflow API, so workflows import it through ``workflow.unsafe.imports_passed_through()``::

    with workflow.unsafe.imports_passed_through():
        from forgespace.temporal.api import WorkflowRequest, Workspace, run_in_workspace

    @workflow.defn(name="my_scan")
    class MyScan:
        @workflow.run
        async def run(self, request: WorkflowRequest) -> dict:
            async def body(ws: Workspace) -> dict:
                out = await ws.execute(scan_activity, ws.path, request.parameters)
                return {"findings": len(out), "workspace": ws.path, "result": out}

            return await run_in_workspace(request, body)

Host affinity (Temporal's worker-specific task queue pattern): ``get_target`` returns a path on
the disk of the worker that ran it, so the workflow first asks the shared task queue for a
worker's host-unique queue, then runs the download, every activity of ``body`` and the
cleanup on that queue. The host queue is named after the worker's host *and* its cache
directory, so a worker restarted on the same host with the same cache resumes the queue
(and the workspace on disk). When no worker polls the host queue any more (the host is gone),
activities there hit their schedule-to-start timeout and the whole sequence starts again on
another host, up to ``WorkspaceOptions.host_attempts`` times.

Fleet locality: a shared or copy-on-write run first asks ``forgespace_choose_host`` for a host
that already holds its target (``forgespace.temporal.fleet``), tries that host's queue for at
most ``FORGESPACE_LOCALITY_WAIT`` (delay scheduling), and then takes any host as above.

Cancellation and failure of the download: ``prepare_workspace`` is awaited with
``WAIT_CANCELLATION_COMPLETED`` (its worker stops the download and releases what it took
before reporting the cancellation), and when it ends without handing back a path (cancelled,
timed out, its worker died) ``run_in_workspace`` runs ``release_run`` on the same host queue,
which ends the run's lease and removes its run directory by ids. Without it the lease (and an
isolated/copy-on-write run directory) would stay until CACHE_LEASE_TTL.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, CancelledError, TimeoutType
from temporalio.exceptions import TimeoutError as TemporalTimeoutError
from temporalio.workflow import ActivityCancellationType

__all__ = [
    "CACHE_MEMO_KEY",
    "CHOOSE_HOST_ACTIVITY",
    "CLEANUP_ACTIVITY",
    "GET_TARGET_ACTIVITY",
    "HOST_QUEUE_ACTIVITY",
    "LOCALITY_TRIES",
    "MEMO_KEY",
    "PREPARE_ACTIVITY",
    "RELEASE_ACTIVITY",
    "RUN_TOOL_ACTIVITY",
    "UPLOAD_RESULTS_ACTIVITY",
    "HostChoice",
    "PreparedWorkspace",
    "ToolRequest",
    "ToolResult",
    "WorkflowRequest",
    "Workspace",
    "WorkspaceOptions",
    "choose_host_queue",
    "record_workspace",
    "register_metadata_modes",
    "run_in_workspace",
]

# Activity names (the worker registers exactly these).
HOST_QUEUE_ACTIVITY = "forgespace_host_task_queue"
CHOOSE_HOST_ACTIVITY = "forgespace_choose_host"
PREPARE_ACTIVITY = "prepare_workspace"
GET_TARGET_ACTIVITY = "get_target"
CLEANUP_ACTIVITY = "cleanup_cache"
RELEASE_ACTIVITY = "release_run"
UPLOAD_RESULTS_ACTIVITY = "upload_results"
RUN_TOOL_ACTIVITY = "forgespace_run_tool"

# Memo key under which run_in_workspace records the workspace it got (the runner reads it to
# report the path and whether the target was downloaded or served from the cache).
MEMO_KEY = "forgespace_workspace"
# Memo key counting the run's get_target calls: {"downloads": n, "hits": m}, whoever made them
# (run_in_workspace, or the host-affinity interceptor for workflows calling get_target).
CACHE_MEMO_KEY = "forgespace_cache"

T = TypeVar("T")

# workflow name -> metadata.yaml's workspace_isolation, filled by the worker process when it
# loads its packages (register_metadata_modes); read by run_in_workspace without any I/O.
_METADATA_MODES: dict[str, str] = {}


def register_metadata_modes(modes: Mapping[str, str]) -> None:
    """Tell ``run_in_workspace`` each workflow's metadata.yaml mode (call outside workflows).

    Then a run whose ``workspace_isolation`` differs from its workflow's metadata is logged
    (a warning in the workflow's log) by whichever worker runs it, whoever started it.
    """
    _METADATA_MODES.update(modes)


@dataclass
class WorkflowRequest:
    """The one argument of every forgespace workflow's run method.

    ``workspace_isolation`` is resolved by the runner (metadata.yaml, or an override) before
    the workflow starts; ``parameters`` are the metadata's default_parameters merged with the
    run's ``--param k=v`` values.
    """

    target_id: str
    run_id: str
    workspace_isolation: str = "isolated"
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class PreparedWorkspace:
    """What the ``prepare_workspace`` activity returns (crosses the Temporal boundary)."""

    path: str
    downloaded: bool
    workspace_isolation: str
    task_queue: str
    host: str


@dataclass
class HostChoice:
    """What ``forgespace_choose_host`` returns (see ``forgespace.temporal.fleet``).

    ``task_queue``: the preferred host's queue (it holds the target, or owns it), to be tried
    with a schedule-to-start timeout of ``wait_seconds``; None = no preference, use
    ``fallback_queue`` (the answering worker's own host queue).
    """

    task_queue: str | None
    host: str | None
    wait_seconds: float
    reason: str
    fallback_queue: str


@dataclass
class ToolRequest:
    """One external command for ``forgespace_run_tool`` (built by ``Workspace.run_tool``).

    ``argv[0] == "python"`` means the worker's interpreter; ``cwd`` is relative to the
    workspace; ``env`` is added to the sandbox's allow-listed environment; ``limits`` maps
    ``address_space``/``file_size`` (bytes), ``cpu_seconds``, ``processes`` to a number or
    None (unlimited), defaults for those left out.
    """

    workspace: str
    workspace_isolation: str
    argv: list[str]
    cwd: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    timeout_seconds: float = 600.0
    limits: dict[str, int | None] | None = None
    output_bytes: int = 65536


@dataclass
class ToolResult:
    """What ``forgespace_run_tool`` returns: exit code (None when it timed out and was
    killed), the last ``output_bytes`` of stdout and stderr, and whether it was sandboxed."""

    exit_code: int | None
    stdout: str
    stderr: str
    timed_out: bool
    sandboxed: bool
    duration_seconds: float


@dataclass(frozen=True)
class WorkspaceOptions:
    """Timeouts used by ``run_in_workspace``; the defaults suit real targets.

    ``host_schedule_to_start`` is how long an activity may wait on the host queue before the
    host counts as gone (keep it above the longest legitimate wait for a free activity slot).
    """

    host_lookup_timeout: timedelta = timedelta(seconds=30)
    prepare_timeout: timedelta = timedelta(hours=2)
    prepare_heartbeat_timeout: timedelta = timedelta(seconds=60)
    host_schedule_to_start: timedelta = timedelta(minutes=5)
    cleanup_timeout: timedelta = timedelta(minutes=10)
    activity_timeout: timedelta = timedelta(hours=1)
    activity_heartbeat_timeout: timedelta | None = timedelta(minutes=2)
    activity_max_attempts: int = 3
    host_attempts: int = 3


def _retry(max_attempts: int) -> RetryPolicy:
    return RetryPolicy(
        initial_interval=timedelta(seconds=1),
        backoff_coefficient=2.0,
        maximum_interval=timedelta(seconds=30),
        maximum_attempts=max_attempts,
    )


def _host_lost(exc: BaseException) -> bool:
    """True when an activity failed because no worker picked it up from its host queue."""
    cause = exc.__cause__ if isinstance(exc, ActivityError) else None
    return isinstance(cause, TemporalTimeoutError) and cause.type == TimeoutType.SCHEDULE_TO_START


class Workspace:
    """A run's workspace on one worker host, handed to the body of ``run_in_workspace``.

    ``path`` is valid only on the host polling ``task_queue``: run every activity that touches
    it through ``execute`` (or pass ``task_queue=ws.task_queue`` yourself).
    """

    def __init__(
        self, request: WorkflowRequest, prepared: PreparedWorkspace, options: WorkspaceOptions
    ) -> None:
        self.request = request
        self.path = prepared.path
        self.task_queue = prepared.task_queue
        self.host = prepared.host
        self.downloaded = prepared.downloaded
        self.workspace_isolation = prepared.workspace_isolation
        self.options = options

    @property
    def target_id(self) -> str:
        return self.request.target_id

    @property
    def run_id(self) -> str:
        return self.request.run_id

    @property
    def parameters(self) -> dict[str, Any]:
        return self.request.parameters

    async def execute(
        self,
        activity: Any,
        *args: Any,
        start_to_close_timeout: timedelta | None = None,
        heartbeat_timeout: timedelta | bool | None = True,
        retry_policy: RetryPolicy | None = None,
        result_type: type | None = None,
        schedule_to_start_timeout: timedelta | None = None,
    ) -> Any:
        """Execute ``activity`` (function or name) on this workspace's host and return its result.

        Defaults: start-to-close ``options.activity_timeout``, heartbeat timeout
        ``options.activity_heartbeat_timeout`` (pass ``heartbeat_timeout=None`` for an activity
        that does not heartbeat), ``options.activity_max_attempts`` attempts, and
        ``options.host_schedule_to_start`` as the schedule-to-start timeout that detects a
        lost host.
        """
        hb: timedelta | None
        if heartbeat_timeout is True:
            hb = self.options.activity_heartbeat_timeout
        elif heartbeat_timeout is False:
            hb = None
        else:
            hb = heartbeat_timeout
        return await workflow.execute_activity(
            activity,
            args=list(args),
            task_queue=self.task_queue,
            start_to_close_timeout=start_to_close_timeout or self.options.activity_timeout,
            schedule_to_start_timeout=schedule_to_start_timeout
            or self.options.host_schedule_to_start,
            heartbeat_timeout=hb,
            retry_policy=retry_policy or _retry(self.options.activity_max_attempts),
            result_type=result_type,
            # On cancellation wait until the activity stopped, so cleanup never removes a
            # workspace an activity still writes to.
            cancellation_type=ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
        )

    async def run_tool(
        self,
        argv: list[str],
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: timedelta = timedelta(minutes=10),
        limits: Mapping[str, int | None] | None = None,
        output_bytes: int = 65536,
        retry_policy: RetryPolicy | None = None,
    ) -> ToolResult:
        """Run ``argv`` in this workspace's sandbox on its host and return a ``ToolResult``.

        The command sees the workspace (read-only for a shared run) and nothing else of the
        host's data, has no network and runs as uid 65534 (see ``forgespace.sandbox``). It is
        killed, with all it started, after ``timeout`` or when the run is cancelled. One
        attempt by default (a tool that writes is rarely safe to repeat); a sandbox that
        cannot start fails the activity as non-retryable ``SandboxStartError``.
        """
        request = ToolRequest(
            workspace=self.path,
            workspace_isolation=self.workspace_isolation,
            argv=list(argv),
            cwd=cwd,
            env=dict(env or {}),
            timeout_seconds=timeout.total_seconds(),
            limits=dict(limits) if limits is not None else None,
            output_bytes=output_bytes,
        )
        result = await self.execute(
            RUN_TOOL_ACTIVITY,
            request,
            start_to_close_timeout=timeout + timedelta(minutes=2),
            heartbeat_timeout=timedelta(seconds=60),
            retry_policy=retry_policy
            or RetryPolicy(
                maximum_attempts=1, non_retryable_error_types=["ValueError", "SandboxStartError"]
            ),
            result_type=ToolResult,
        )
        assert isinstance(result, ToolResult)
        return result

    async def upload_results(
        self, results: Any, results_format: str = "json", workflow_id: str | None = None
    ) -> str:
        """Store ``results`` through the ``upload_results`` activity; returns the location."""
        wid = workflow_id or workflow.info().workflow_id
        return str(
            await self.execute(
                UPLOAD_RESULTS_ACTIVITY,
                wid,
                results,
                results_format,
                start_to_close_timeout=timedelta(minutes=10),
                heartbeat_timeout=None,
            )
        )


async def _host_queue(options: WorkspaceOptions) -> str:
    return str(
        await workflow.execute_activity(
            HOST_QUEUE_ACTIVITY,
            start_to_close_timeout=options.host_lookup_timeout,
            retry_policy=_retry(10),
        )
    )


# How many preferred hosts a run tries (each for at most the locality wait) before any host.
LOCALITY_TRIES = 2


async def choose_host_queue(
    target_id: str, workspace_isolation: str, options: WorkspaceOptions, tried: Sequence[str] = ()
) -> tuple[str, timedelta | None]:
    """The host queue a run's download should go to, and its schedule-to-start timeout.

    Isolated runs ask the shared queue for any host, as before fleet locality. Shared and
    copy-on-write runs ask ``forgespace_choose_host`` (an activity, so replays see the same
    answer): a host holding the target (else its rendezvous owner) comes back with the
    locality wait as its timeout (None: ``options.host_schedule_to_start``). ``tried`` are the
    preferred queues that did not start the download within that wait: the next choice
    excludes them, and after ``LOCALITY_TRIES`` of them any host is taken.
    """
    if len(tried) >= LOCALITY_TRIES or workspace_isolation == "isolated":
        return await _host_queue(options), None
    choice = await workflow.execute_activity(
        CHOOSE_HOST_ACTIVITY,
        args=[target_id, workspace_isolation, list(tried)],
        start_to_close_timeout=options.host_lookup_timeout,
        retry_policy=_retry(10),
        result_type=HostChoice,
    )
    assert isinstance(choice, HostChoice)
    if choice.task_queue is None:
        return choice.fallback_queue, None
    workflow.logger.info(
        "target %s (%s): preferring host %s (%s), waiting up to %.1fs for it",
        target_id,
        workspace_isolation,
        choice.host,
        choice.reason,
        choice.wait_seconds,
    )
    # Temporal reads a zero timeout as "none": at least one second.
    return choice.task_queue, timedelta(seconds=max(1.0, choice.wait_seconds))


async def _prepare(
    request: WorkflowRequest,
    task_queue: str,
    options: WorkspaceOptions,
    schedule_to_start: timedelta | None = None,
) -> PreparedWorkspace:
    result = await workflow.execute_activity(
        PREPARE_ACTIVITY,
        args=[request.target_id, request.run_id, request.workspace_isolation],
        task_queue=task_queue,
        start_to_close_timeout=options.prepare_timeout,
        schedule_to_start_timeout=schedule_to_start or options.host_schedule_to_start,
        heartbeat_timeout=options.prepare_heartbeat_timeout,
        retry_policy=_retry(5),
        result_type=PreparedWorkspace,
        # On cancellation wait until the worker stopped the download and released what it
        # took, so release_run never races a thread still writing the run's directory.
        cancellation_type=ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
    )
    assert isinstance(result, PreparedWorkspace)
    return result


def _may_hold(exc: ActivityError) -> bool:
    """Whether a failed prepare may have left a lease or run directory on its host.

    Not when the activity itself reported a non-retryable error (its cache call returned
    after undoing its own work, and the same ids would fail the same way), nor when it was
    cancelled before any worker started it (then nothing was taken, and a host that is gone
    would hold the cancellation up for the release's schedule-to-start timeout).
    """
    cause = exc.cause
    if isinstance(cause, ApplicationError) and cause.non_retryable:
        return False
    return not (isinstance(cause, CancelledError) and not exc.started_event_id)


async def _release(
    request: WorkflowRequest, task_queue: str, options: WorkspaceOptions, why: str
) -> None:
    """Run ``release_run`` on the host queue; log, never raise (the prepare's error wins)."""
    workflow.logger.warning(
        "Run %s of target %s: no workspace path came back (%s); releasing what the run "
        "holds on host queue %s",
        request.run_id,
        request.target_id,
        why,
        task_queue,
    )
    try:
        out = await workflow.execute_activity(
            RELEASE_ACTIVITY,
            args=[request.target_id, request.run_id, request.workspace_isolation],
            task_queue=task_queue,
            start_to_close_timeout=options.cleanup_timeout,
            schedule_to_start_timeout=options.host_schedule_to_start,
            # It waits (heartbeating) for a download of the run still stopping on that host.
            heartbeat_timeout=options.prepare_heartbeat_timeout,
            retry_policy=_retry(5),
        )
    except ActivityError as exc:
        if _host_lost(exc):
            workflow.logger.warning(
                "release_run of run %s skipped: host queue %s has no worker (its lease "
                "expires after CACHE_LEASE_TTL)",
                request.run_id,
                task_queue,
            )
        else:
            workflow.logger.error(
                "release_run of run %s failed: %s", request.run_id, exc.cause or exc
            )
        return
    workflow.logger.info("release_run of run %s: %s", request.run_id, out)


def _warn_if_overridden(request: WorkflowRequest) -> None:
    name = workflow.info().workflow_type
    meta = _METADATA_MODES.get(name)
    if meta is not None and request.workspace_isolation != meta:
        workflow.logger.warning(
            "workflow %s run %s: workspace_isolation %s overrides metadata.yaml's %s",
            name,
            request.run_id,
            request.workspace_isolation,
            meta,
        )


async def _cleanup(ws: Workspace, *, body_failed: bool) -> None:
    try:
        await workflow.execute_activity(
            CLEANUP_ACTIVITY,
            args=[ws.path, ws.workspace_isolation, ws.run_id],
            task_queue=ws.task_queue,
            start_to_close_timeout=ws.options.cleanup_timeout,
            schedule_to_start_timeout=ws.options.host_schedule_to_start,
            retry_policy=_retry(5),
        )
    except ActivityError as exc:
        if _host_lost(exc):
            # The host is gone and its cache with it; the lease would expire anyway.
            workflow.logger.warning(
                "cleanup_cache of %s skipped: host queue %s has no worker", ws.path, ws.task_queue
            )
            return
        if body_failed:
            # Do not hide the body's error behind the cleanup's.
            workflow.logger.error("cleanup_cache of %s failed: %s", ws.path, exc.__cause__ or exc)
            return
        raise


def record_workspace(prepared: PreparedWorkspace) -> None:
    """Record a get_target in the run's memo: the latest workspace under ``MEMO_KEY`` and the
    running download / cache-hit counts under ``CACHE_MEMO_KEY`` (what `forgespace run` sums)."""
    counts = dict(workflow.memo_value(CACHE_MEMO_KEY, {"downloads": 0, "hits": 0}))
    counts["downloads" if prepared.downloaded else "hits"] += 1
    workflow.upsert_memo(
        {
            MEMO_KEY: {
                "path": prepared.path,
                "downloaded": prepared.downloaded,
                "host": prepared.host,
                "task_queue": prepared.task_queue,
                "workspace_isolation": prepared.workspace_isolation,
            },
            CACHE_MEMO_KEY: counts,
        }
    )


class _Again(enum.Enum):
    """Why ``run_in_workspace`` goes round again, on another host."""

    #: The preferred host did not start the download in time: choose again without it; no
    #: host attempt is spent.
    HOST_BUSY = "host busy"
    #: Nobody serves the chosen host queue: nothing was taken there.
    NO_WORKER = "no worker"
    #: The host went away while the body ran: start again elsewhere.
    HOST_LOST = "host lost"


async def run_in_workspace(
    request: WorkflowRequest,
    body: Callable[[Workspace], Awaitable[T]],
    *,
    options: WorkspaceOptions | None = None,
) -> T:
    """Get the run's workspace on one worker host, await ``body(ws)``, clean up on that host.

    Logs ``User code downloaded to: {path}``; records the workspace (path, host, downloaded)
    in the workflow memo under ``MEMO_KEY``; runs ``cleanup_cache`` in ``finally`` also when
    ``body`` fails, and ``release_run`` when the download is cancelled or fails before a path
    came back. Logs a warning when the request's mode differs from the workflow's
    metadata.yaml (see ``register_metadata_modes``). Returns what ``body`` returns.
    """
    opts = options or WorkspaceOptions()
    _warn_if_overridden(request)
    attempt = 0
    tried: list[str] = []  # preferred host queues that did not start the download in time
    while True:
        attempt += 1
        last_attempt = attempt >= opts.host_attempts
        task_queue, locality_wait = await choose_host_queue(
            request.target_id, request.workspace_isolation, opts, tried
        )
        workflow.logger.info(
            "Run %s of target %s: workspace host queue %s (attempt %d, %s)",
            request.run_id,
            request.target_id,
            task_queue,
            attempt,
            request.workspace_isolation,
        )
        prepared = await _prepare_workspace(
            request, task_queue, opts, locality_wait, last_attempt=last_attempt
        )
        if prepared is _Again.HOST_BUSY:
            attempt -= 1
            tried.append(task_queue)
            continue
        if isinstance(prepared, _Again):
            continue
        ws = Workspace(request, prepared, opts)
        outcome = await _run_body(ws, body, task_queue=task_queue, last_attempt=last_attempt)
        if isinstance(outcome, _Again):
            tried.append(task_queue)  # never prefer it again in this run
            continue
        return outcome


async def _prepare_workspace(
    request: WorkflowRequest,
    task_queue: str,
    opts: WorkspaceOptions,
    locality_wait: timedelta | None,
    *,
    last_attempt: bool,
) -> PreparedWorkspace | _Again:
    """The run's workspace on the host of ``task_queue`` (recorded in the memo), or why to try
    another host. Whatever a failed or cancelled prepare may have taken is released."""
    cancelled_before = workflow.cancellation_reason() is not None
    try:
        prepared = await _prepare(request, task_queue, opts, locality_wait)
    except ActivityError as exc:
        if _host_lost(exc) and locality_wait is not None:
            # The preferred host did not start it in time (busy, or gone): nothing was
            # taken there; choose again without it, not spending a host attempt.
            workflow.logger.info(
                "host queue %s did not start the download within %s; choosing again",
                task_queue,
                locality_wait,
            )
            return _Again.HOST_BUSY
        if _host_lost(exc):
            # Nobody picked it up there: it took nothing, and a release could not run.
            if not last_attempt:
                workflow.logger.warning("host queue %s has no worker; trying another", task_queue)
                return _Again.NO_WORKER
            raise
        if _may_hold(exc):
            await _release(request, task_queue, opts, str(exc.cause or exc))
        if not cancelled_before and workflow.cancellation_reason() is not None:
            # Cancelled, and the prepare could not confirm it (e.g. its worker died and it
            # timed out): the run ends as cancelled, as asked, not as failed.
            raise asyncio.CancelledError(
                f"workflow cancelled while its workspace was prepared ({exc.cause or exc})"
            ) from exc
        raise
    except asyncio.CancelledError:
        # The cancel arrived together with the prepare's result (the SDK then raises
        # instead of returning it): the run has a workspace whose path we never saw.
        await _release(request, task_queue, opts, "cancelled as the prepare completed")
        raise
    if not cancelled_before and workflow.cancellation_reason() is not None:
        # The download finished just before the cancellation reached its worker, so the
        # activity completed and Temporal handed us its result: honour the cancel anyway.
        await _cleanup(Workspace(request, prepared, opts), body_failed=True)
        raise asyncio.CancelledError("workflow cancelled while its workspace was prepared")
    workflow.logger.info(f"User code downloaded to: {prepared.path}")
    record_workspace(prepared)
    return prepared


async def _run_body(
    ws: Workspace,
    body: Callable[[Workspace], Awaitable[T]],
    *,
    task_queue: str,
    last_attempt: bool,
) -> T | _Again:
    """``body(ws)``, then the workspace's cleanup on its host (also when the body failed),
    unless the host went away and the run starts again elsewhere."""
    body_failed = True
    host_gone = False
    try:
        result = await body(ws)
        body_failed = False
        return result
    except ActivityError as exc:
        if _host_lost(exc) and not last_attempt:
            # Nobody serves that host queue any more, so its cleanup could not run either.
            host_gone = True
            workflow.logger.warning(
                "host queue %s lost during the run; starting again on another host",
                task_queue,
            )
            return _Again.HOST_LOST
        raise
    finally:
        if not host_gone:
            await _cleanup(ws, body_failed=body_failed)
