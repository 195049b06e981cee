"""secret_detection: detect-secrets over a shared, read-only workspace (values masked)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from forgespace.temporal.api import WorkflowRequest
    from forgespace.workflows._tools.workflow_common import number_param, run_tool
    from forgespace.workflows.secret_detection.activities import secret_detection_scan


@workflow.defn(name="secret_detection")
class SecretDetection:
    """Secret scan; ``result["sarif"]`` is a SARIF 2.1.0 log of the masked findings."""

    @workflow.run
    async def run(self, request: WorkflowRequest) -> dict[str, Any]:
        budget = number_param(request.parameters, "timeout_seconds", 600)
        return await run_tool(
            request,
            secret_detection_scan,
            time_budget=timedelta(seconds=budget),
            count_findings=lambda r: int(r["summary"]["total"]),
        )


WORKFLOW = SecretDetection
