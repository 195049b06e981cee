"""cargo_fuzzing: build a Rust cargo-fuzz target offline and fuzz it in an isolated workspace."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from forgespace.temporal.api import WorkflowRequest
    from forgespace.workflows._tools.cargo_fuzz import BUILD_TIMEOUT_SECONDS
    from forgespace.workflows._tools.workflow_common import number_param, run_tool
    from forgespace.workflows.cargo_fuzzing.activities import cargo_fuzz


@workflow.defn(name="cargo_fuzzing")
class CargoFuzzing:
    """Fuzzes one ``fuzz_target!`` of the target's ``fuzz/`` project; findings = distinct
    crashes."""

    @workflow.run
    async def run(self, request: WorkflowRequest) -> dict[str, Any]:
        budget = number_param(request.parameters, "timeout_seconds", 60)
        return await run_tool(
            request,
            cargo_fuzz,
            time_budget=timedelta(seconds=budget + BUILD_TIMEOUT_SECONDS),
            count_findings=lambda r: int(r["unique_crashes"]),
            writes_workspace=True,
        )


WORKFLOW = CargoFuzzing
