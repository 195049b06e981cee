"""security_assessment: bandit and a file scanner over a shared, read-only workspace."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from forgespace.temporal.api import WorkflowRequest
    from forgespace.workflows._tools.workflow_common import number_param, run_tool
    from forgespace.workflows.security_assessment.activities import security_assessment_scan


@workflow.defn(name="security_assessment")
class SecurityAssessment:
    """Static assessment; ``result["sarif"]`` is the SARIF 2.1.0 log."""

    @workflow.run
    async def run(self, request: WorkflowRequest) -> dict[str, Any]:
        budget = number_param(request.parameters, "timeout_seconds", 600)
        return await run_tool(
            request,
            security_assessment_scan,
            time_budget=timedelta(seconds=budget),
            count_findings=lambda r: int(r["summary"]["total"]),
        )


WORKFLOW = SecurityAssessment
