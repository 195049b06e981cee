"""Leases of Temporal runs: renewed by their heartbeats, released once their workflow closed.

Renewal. A run's lease expires CACHE_LEASE_TTL after its last renewal, which makes the TTL "how long
after a worker dies its runs are reclaimed". While the run works, every heartbeat of any of
its activities on this worker (the bundled tool activities heartbeat every few seconds, as do
``get_target``/``prepare_workspace`` while they download) renews every lease its workflow
holds in this worker's cache, at most once per ``every`` seconds per workflow: one indexed
UPDATE a minute, not one per heartbeat.

Release however a run ends. Each lease records the workflow (id and run id) of the activity
that took it. ``release_closed_workflows`` (the worker's sweep, at start-up and every
CACHE_CLEANUP_INTERVAL) asks Temporal about each workflow holding a lease here and releases
the leases of those that closed without cleaning up (terminated, timed out, their worker
killed): the run directory goes with the lease, as cleanup_cache would have done. A workflow
Temporal cannot tell about (the server unreachable) keeps its leases until the next sweep.

A deadline that cleans up. A workflow execution timeout closes the run on the server, and its
``finally`` (run_in_workspace's cleanup) never runs. ``RunDeadline`` (a workflow interceptor
on forgespace workers) enforces the deadline ``forgespace run --timeout`` puts in the memo
(``DEADLINE_MEMO_KEY``) inside the workflow instead: a timer cancels the body, the body's
cleanup runs, and the run then fails with ``RunTimeoutError``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from temporalio import activity, workflow
from temporalio.api.enums.v1 import WorkflowExecutionStatus
from temporalio.client import Client
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode
from temporalio.worker import (
    ActivityInboundInterceptor,
    ActivityOutboundInterceptor,
    ExecuteWorkflowInput,
    Interceptor,
    WorkflowInboundInterceptor,
    WorkflowInterceptorClassInput,
)

if TYPE_CHECKING:
    from forgespace.cache.workspace import WorkspaceCache

__all__ = ["DEADLINE_MEMO_KEY", "LeaseRenewal", "RunDeadline", "release_closed_workflows"]

log = logging.getLogger(__name__)

RENEW_EVERY_S = 60.0
#: Memo key of a run's deadline in seconds from its start (set by ``forgespace run``).
DEADLINE_MEMO_KEY = "forgespace.deadline_s"


class LeaseRenewal(Interceptor):
    """Worker interceptor: a heartbeat renews its workflow's leases (rate-limited)."""

    def __init__(self, cache: WorkspaceCache, *, every: float | None = None) -> None:
        """``every``: at most one renewal per workflow this often (default: a minute, or a
        quarter of CACHE_LEASE_TTL when that is shorter)."""
        self.cache = cache
        self.every = every or min(RENEW_EVERY_S, cache.settings.cache_lease_ttl / 4)
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _Inbound(next, self)

    def beat(self, workflow_id: str | None) -> bool:
        """Renew ``workflow_id``'s leases unless done less than ``every`` seconds ago. True if
        it renewed. Never raises: a heartbeat must not fail because the index could not be
        written (the next one tries again)."""
        if not workflow_id:
            return False
        now = time.monotonic()
        with self._lock:
            last = self._last.get(workflow_id)
            if last is not None and now - last < self.every:
                return False
            self._last[workflow_id] = now
            if len(self._last) > 10000:  # workflows long gone: forget them
                cutoff = now - self.every
                self._last = {k: v for k, v in self._last.items() if v > cutoff}
        try:
            n = self.cache.renew(workflow_id=workflow_id)
        except Exception as exc:
            with self._lock:
                self._last.pop(workflow_id, None)
            log.warning("renewing the leases of workflow %s failed: %s", workflow_id, exc)
            return False
        log.debug("heartbeat renewed %d lease(s) of workflow %s", n, workflow_id)
        return True


class _Inbound(ActivityInboundInterceptor):
    def __init__(self, next: ActivityInboundInterceptor, renewal: LeaseRenewal) -> None:
        super().__init__(next)
        self._renewal = renewal

    def init(self, outbound: ActivityOutboundInterceptor) -> None:
        super().init(_Outbound(outbound, self._renewal))


class _Outbound(ActivityOutboundInterceptor):
    def __init__(self, next: ActivityOutboundInterceptor, renewal: LeaseRenewal) -> None:
        super().__init__(next)
        self._renewal = renewal

    def heartbeat(self, *details: Any) -> None:
        self._renewal.beat(activity.info().workflow_id)
        super().heartbeat(*details)


_OPEN = (
    WorkflowExecutionStatus.WORKFLOW_EXECUTION_STATUS_RUNNING,
    # Its next run may go on with what this one leased.
    WorkflowExecutionStatus.WORKFLOW_EXECUTION_STATUS_CONTINUED_AS_NEW,
)


async def _is_closed(client: Client, workflow_id: str, run_id: str | None) -> bool | None:
    """True if the workflow run is closed (or unknown to the server: its history was deleted
    after the retention period), False if open, None if the server could not tell."""
    try:
        desc = await client.get_workflow_handle(workflow_id, run_id=run_id).describe()
    except RPCError as exc:
        if exc.status == RPCStatusCode.NOT_FOUND:
            return True
        log.debug("lease sweep: cannot describe workflow %s: %s", workflow_id, exc)
        return None
    return desc.raw_description.workflow_execution_info.status not in _OPEN


async def release_closed_workflows(cache: WorkspaceCache, client: Client) -> list[str]:
    """Release every lease whose workflow is closed; returns the released lease ids."""
    loop = asyncio.get_running_loop()
    leases = await loop.run_in_executor(None, cache.index.all_leases)
    by_run: dict[tuple[str, str | None], list[Any]] = {}
    for le in leases:
        if le.workflow_id:
            by_run.setdefault((le.workflow_id, le.workflow_run_id), []).append(le)
    released: list[str] = []
    for (wid, rid), held in by_run.items():
        if not await _is_closed(client, wid, rid):
            continue
        for le in held:
            if await loop.run_in_executor(None, cache.release_lease, le):
                released.append(le.lease_id)
                log.info(
                    "lease %s released: its workflow %s (run %s) is closed", le.lease_id, wid, rid
                )
    return released


class RunDeadline(Interceptor):
    """Workflow interceptor: the memo's deadline cancels the body (so it cleans up), then
    fails the run with ``RunTimeoutError``."""

    def workflow_interceptor_class(
        self, input: WorkflowInterceptorClassInput
    ) -> type[WorkflowInboundInterceptor] | None:
        return _DeadlineInbound


class _DeadlineInbound(WorkflowInboundInterceptor):
    async def execute_workflow(self, input: ExecuteWorkflowInput) -> Any:
        seconds = workflow.memo_value(DEADLINE_MEMO_KEY, None)
        if not isinstance(seconds, int | float) or seconds <= 0:
            return await self.next.execute_workflow(input)
        body = asyncio.ensure_future(self.next.execute_workflow(input))
        try:
            await workflow.wait_condition(body.done, timeout=float(seconds))
        except TimeoutError:
            pass
        except asyncio.CancelledError:
            body.cancel()  # the run itself was cancelled: the body cleans up and says how
            return await body
        if body.done():
            return body.result()
        workflow.logger.warning("run deadline of %gs reached: cancelling its body", seconds)
        body.cancel()
        try:
            await body
        except BaseException as exc:  # what a cancelled body raises is not the run's outcome
            workflow.logger.info("body after its deadline: %s", exc)
        raise ApplicationError(
            f"run timed out after {seconds:g}s (its deadline); the body was cancelled and its "
            "workspace cleaned up",
            type="RunTimeoutError",
            non_retryable=True,
        )
