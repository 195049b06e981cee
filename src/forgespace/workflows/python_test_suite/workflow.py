"""python_test_suite: the target's own pytest suite in a copy-on-write copy of the target."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from forgespace.temporal.api import WorkflowRequest
    from forgespace.workflows._tools.workflow_common import number_param, run_tool
    from forgespace.workflows.python_test_suite.activities import python_test_suite_run


@workflow.defn(name="python_test_suite")
class PythonTestSuite:
    """Runs the suite; findings = failed tests + errors."""

    @workflow.run
    async def run(self, request: WorkflowRequest) -> dict[str, Any]:
        budget = number_param(request.parameters, "timeout_seconds", 600)
        return await run_tool(
            request,
            python_test_suite_run,
            time_budget=timedelta(seconds=budget),
            count_findings=lambda r: int(r["failed"]) + int(r["errors"]),
            writes_workspace=True,
        )


WORKFLOW = PythonTestSuite
