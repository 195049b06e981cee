"""Host affinity and cache reporting for workflows that know nothing about hosts.

FuzzForge-style workflow code (and the design document's example) calls ``get_target``,
its own activities and ``cleanup_cache`` on the default task queue. With several worker hosts
those calls could land on different hosts, and a workspace path is only valid on the host
that returned it. ``HostAffinityInterceptor`` (installed on every forgespace worker) fixes that
without touching the workflow code, per run:

- a ``get_target`` started without an explicit task queue asks for a host's own queue (for
  shared and copy-on-write, one that already holds the target: ``choose_host_queue``, with
  the same locality wait and fallback to any host as ``run_in_workspace``) and runs there,
  as ``prepare_workspace`` (the same cache call, which also reports whether it downloaded),
  and returns the path the workflow asked for. When no worker serves that host queue any
  more (schedule-to-start timeout) it asks for another host, up to
  ``WorkspaceOptions.host_attempts`` times: nothing was taken on a host that never started it;
- from then on the run's activities started without an explicit task queue (its own ones,
  ``cleanup_cache``, ``upload_results``, a second ``get_target``) go to that host queue, with
  a schedule-to-start timeout (when the code set none) so a host that disappears fails the
  activity instead of leaving it waiting forever;
- each ``get_target`` is recorded in the run's memo (``MEMO_KEY``: the first workspace;
  ``CACHE_MEMO_KEY``: downloads and cache hits so far), which is what ``forgespace run``
  reports, for this kind of workflow as for ``run_in_workspace`` ones.

Activities started with an explicit ``task_queue`` are left alone (``run_in_workspace`` routes
its own; code that picks a queue means it). The interceptor never changes a call's
``workspace_isolation``: a workflow that hard-codes its mode keeps it.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from typing import Any

from temporalio import workflow
from temporalio.exceptions import ActivityError
from temporalio.worker import (
    Interceptor,
    StartActivityInput,
    WorkflowInboundInterceptor,
    WorkflowInterceptorClassInput,
    WorkflowOutboundInterceptor,
)

from forgespace.temporal.api import (
    CHOOSE_HOST_ACTIVITY,
    GET_TARGET_ACTIVITY,
    HOST_QUEUE_ACTIVITY,
    PREPARE_ACTIVITY,
    PreparedWorkspace,
    WorkspaceOptions,
    _host_lost,
    choose_host_queue,
    record_workspace,
)

__all__ = ["HostAffinityInterceptor"]

_OPTIONS = WorkspaceOptions()
# The host lookups themselves run on the shared queue, untouched.
_LOOKUPS = (HOST_QUEUE_ACTIVITY, CHOOSE_HOST_ACTIVITY)


class HostAffinityInterceptor(Interceptor):
    """Worker interceptor: pins each run's activities to the host of its ``get_target``."""

    def workflow_interceptor_class(
        self, input: WorkflowInterceptorClassInput
    ) -> type[WorkflowInboundInterceptor] | None:
        return _Inbound


class _Inbound(WorkflowInboundInterceptor):
    def init(self, outbound: WorkflowOutboundInterceptor) -> None:
        super().init(_PinningOutbound(outbound))


class _PinningOutbound(WorkflowOutboundInterceptor):
    """One per workflow run (the SDK creates the interceptor chain per run)."""

    def __init__(self, next: WorkflowOutboundInterceptor) -> None:
        super().__init__(next)
        self._host_queue: str | None = None

    def start_activity(self, input: StartActivityInput) -> workflow.ActivityHandle[Any]:
        if input.task_queue is not None or input.activity in _LOOKUPS:
            return self.next.start_activity(input)
        if input.activity == GET_TARGET_ACTIVITY:
            # execute_activity awaits what start_activity returns: a task standing for the
            # lookup + prepare sequence behaves like the activity's handle for it.
            return asyncio.ensure_future(self._get_target(input))  # type: ignore[return-value]
        if self._host_queue is None:
            return self.next.start_activity(input)
        return self.next.start_activity(self._on_host(input, self._host_queue))

    @staticmethod
    def _on_host(input: StartActivityInput, queue: str) -> StartActivityInput:
        return dataclasses.replace(
            input,
            task_queue=queue,
            schedule_to_start_timeout=input.schedule_to_start_timeout
            or _OPTIONS.host_schedule_to_start,
        )

    async def _get_target(self, input: StartActivityInput) -> str:
        attempt = 0
        tried: list[str] = []
        while True:
            attempt += 1
            wait = None
            queue = self._host_queue
            if queue is None:
                tid, mode = _target_and_mode(input.args)
                queue, wait = await choose_host_queue(tid, mode, _OPTIONS, tried)
            on_host = self._on_host(input, queue)
            if wait is not None:
                on_host = dataclasses.replace(on_host, schedule_to_start_timeout=wait)
            prepare = dataclasses.replace(
                on_host,
                activity=PREPARE_ACTIVITY,
                # The activity heartbeats every few seconds: a worker that dies mid-download
                # is noticed in a minute instead of at the end of start_to_close_timeout.
                heartbeat_timeout=input.heartbeat_timeout or _OPTIONS.prepare_heartbeat_timeout,
                arg_types=None,
                ret_type=PreparedWorkspace,
            )
            try:
                prepared = await self.next.start_activity(prepare)
            except ActivityError as exc:
                if _host_lost(exc) and wait is not None:
                    # The preferred host did not start it within the locality wait.
                    workflow.logger.info("host queue %s busy or gone; choosing again", queue)
                    attempt -= 1
                    tried.append(queue)
                    continue
                retry_elsewhere = self._host_queue is None and attempt < _OPTIONS.host_attempts
                if _host_lost(exc) and retry_elsewhere:
                    workflow.logger.warning("host queue %s has no worker; trying another", queue)
                    continue
                raise
            assert isinstance(prepared, PreparedWorkspace)
            self._host_queue = prepared.task_queue
            record_workspace(prepared)
            workflow.logger.info(
                "get_target of run %s on host %s: %s (%s)",
                workflow.info().run_id,
                prepared.host,
                prepared.path,
                "downloaded" if prepared.downloaded else "from cache",
            )
            return prepared.path


def _target_and_mode(args: Sequence[Any]) -> tuple[str, str]:
    """``get_target(target_id, run_id=None, workspace_isolation="isolated")``'s id and mode."""
    tid = str(args[0]) if args else ""
    mode = str(args[2]) if len(args) > 2 else "isolated"
    return tid, mode
