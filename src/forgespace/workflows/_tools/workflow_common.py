"""What the bundled workflow packages share on both sides of Temporal.

Workflow side (``run_tool``): get the run's workspace on one host (``run_in_workspace``), run
the tool's activity there with a heartbeat timeout, store the results through
``upload_results`` (JSON, plus the SARIF log when the tool makes one) and return
``{"findings", "workspace", "result"}``.

Activity side (``tool_activity_call``): turn bad input (parameters are checked against
metadata.yaml by ``forgespace.temporal.parameters.bundled_parameters``) into a non-retryable
``ApplicationError``, pass heartbeats through (``activity.heartbeat``) and stop the tool when
the activity is cancelled, and keep the result under Temporal's payload size limit.

Workflows import this module through ``workflow.unsafe.imports_passed_through()``; it does no
I/O at import.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any

from temporalio import activity, workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ApplicationError, CancelledError

from forgespace.temporal.api import WorkflowRequest, Workspace, run_in_workspace

# Results cross Temporal as one payload (2 MB hard limit by default): keep well below it.
MAX_RESULT_BYTES = 1_000_000
# Temporal delivers a cancellation to a sync activity only through a heartbeat; tools
# heartbeat about once a second, so this is ample and still notices a dead worker quickly.
HEARTBEAT_TIMEOUT = timedelta(seconds=60)
# Time the activity may take beyond the tool's own time budget (start-up, reporting).
ACTIVITY_MARGIN = timedelta(minutes=2)


def number_param(parameters: Mapping[str, Any], name: str, default: float) -> float:
    """A numeric parameter read defensively in workflow code (a bad value is the activity's
    to report; the workflow must not fail its task on it)."""
    value = parameters.get(name, default)
    try:
        number = float(value)
    except (TypeError, ValueError):
        return default
    return number if math.isfinite(number) and number > 0 else default


async def run_tool(
    request: WorkflowRequest,
    activity_fn: Any,
    *,
    time_budget: timedelta,
    count_findings: Callable[[dict[str, Any]], int],
    writes_workspace: bool = False,
) -> dict[str, Any]:
    """Run ``activity_fn(workspace_path, parameters)`` in the run's workspace; see module doc.

    A tool that ``writes_workspace`` refuses a shared workspace (an ``--isolation shared``
    override): its writes would reach every other run of the target.
    """
    if writes_workspace and request.workspace_isolation == "shared":
        raise ApplicationError(
            f"{workflow.info().workflow_type} writes into its workspace, so it cannot run in "
            "shared mode (the workspace is read-only and shared by concurrent runs); "
            "use isolated or copy-on-write",
            type="ValueError",
            non_retryable=True,
        )

    async def body(ws: Workspace) -> dict[str, Any]:
        result: dict[str, Any] = await ws.execute(
            activity_fn,
            ws.path,
            dict(request.parameters),
            start_to_close_timeout=time_budget + ACTIVITY_MARGIN,
            heartbeat_timeout=HEARTBEAT_TIMEOUT,
            retry_policy=RetryPolicy(
                initial_interval=timedelta(seconds=1),
                maximum_attempts=2,
                non_retryable_error_types=["ValueError", "ToolError", "SandboxStartError"],
            ),
        )
        locations = {"json": await ws.upload_results(result, "json")}
        if isinstance(result.get("sarif"), dict):
            locations["sarif"] = await ws.upload_results(result["sarif"], "sarif")
        result["results_location"] = locations
        findings = count_findings(result)
        workflow.logger.info(
            "%s run %s: %d finding(s), results at %s",
            workflow.info().workflow_type,
            ws.run_id,
            findings,
            locations["json"],
        )
        return {"findings": findings, "workspace": ws.path, "result": result}

    return await run_in_workspace(request, body)


def activity_heartbeat(details: dict[str, Any]) -> None:
    """Heartbeat callback for tools: report ``details``, stop when the activity is cancelled."""
    activity.heartbeat(details)
    if activity.is_cancelled() or activity.is_worker_shutdown():
        raise CancelledError("activity cancelled")


def fit_payload(result: dict[str, Any], *, limit: int = MAX_RESULT_BYTES) -> dict[str, Any]:
    """Drop findings (and SARIF results) from the end until the JSON fits ``limit`` bytes.

    The counts in the tool's summary stay the real ones; ``result["truncated"]`` says how
    many findings were left out.
    """
    size = len(json.dumps(result, default=str))
    if size <= limit:
        return result
    findings = list(result.get("findings") or [])
    total = len(findings)
    keep = total
    while keep > 0 and size > limit:
        keep = keep * 3 // 4
        result["findings"] = findings[:keep]
        sarif = result.get("sarif")
        if isinstance(sarif, dict):
            for run in sarif.get("runs", []):
                run["results"] = run.get("results", [])[:keep]
        result["truncated"] = {"findings_total": total, "findings_kept": keep}
        size = len(json.dumps(result, default=str))
    return result


def tool_activity_call(
    call: Callable[[], dict[str, Any]],
) -> dict[str, Any]:
    """Run a tool call in an activity, mapping bad input and tool failures to ApplicationErrors."""
    from forgespace.errors import MissingExtraError, SandboxStartError
    from forgespace.workflows._tools.common import ToolError

    try:
        return fit_payload(call())
    except ValueError as exc:
        raise ApplicationError(str(exc), type="ValueError", non_retryable=True) from exc
    except SandboxStartError as exc:
        # bwrap could not set the sandbox up: another attempt on this host would fail alike.
        raise ApplicationError(str(exc), type="SandboxStartError", non_retryable=True) from exc
    except MissingExtraError as exc:
        # The tool is not installed on this worker: retrying here cannot help.
        raise ApplicationError(str(exc), type="MissingExtraError", non_retryable=True) from exc
    except ToolError as exc:
        raise ApplicationError(str(exc), type="ToolError", non_retryable=True) from exc
