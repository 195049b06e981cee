"""Activity of security_assessment: bandit + file scanner over the shared (read-only) workspace."""

from __future__ import annotations

from typing import Any

from temporalio import activity

from forgespace.temporal.parameters import bundled_parameters
from forgespace.workflows._tools.static_scan import assess
from forgespace.workflows._tools.workflow_common import (
    activity_heartbeat,
    tool_activity_call,
)


@activity.defn(name="security_assessment_scan")
def security_assessment_scan(workspace: str, parameters: dict[str, Any]) -> dict[str, Any]:
    """Scan the workspace; returns findings, a summary by severity and a SARIF 2.1.0 log."""

    def call() -> dict[str, Any]:
        p = bundled_parameters("security_assessment", parameters)
        return assess(
            workspace,
            large_file_bytes=p["large_file_bytes"],
            timeout_seconds=p["timeout_seconds"],
            heartbeat=activity_heartbeat,
        )

    return tool_activity_call(call)


ACTIVITIES = [security_assessment_scan]
