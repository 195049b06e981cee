"""atheris_fuzzing: coverage-guided fuzzing of a Python target in an isolated workspace."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from forgespace.temporal.api import WorkflowRequest
    from forgespace.workflows._tools.workflow_common import number_param, run_tool
    from forgespace.workflows.atheris_fuzzing.activities import atheris_fuzz


@workflow.defn(name="atheris_fuzzing")
class AtherisFuzzing:
    """Fuzzes ``TestOneInput`` of the target; findings = distinct crashes."""

    @workflow.run
    async def run(self, request: WorkflowRequest) -> dict[str, Any]:
        budget = number_param(request.parameters, "timeout_seconds", 60)
        return await run_tool(
            request,
            atheris_fuzz,
            time_budget=timedelta(seconds=budget),
            count_findings=lambda r: int(r["unique_crashes"]),
            writes_workspace=True,
        )


WORKFLOW = AtherisFuzzing
