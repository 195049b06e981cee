"""Activity of python_test_suite: the target's pytest suite with coverage, in its own copy."""

from __future__ import annotations

from typing import Any

from temporalio import activity

from forgespace.temporal.parameters import bundled_parameters
from forgespace.workflows._tools.pytest_suite import run_pytest_suite
from forgespace.workflows._tools.workflow_common import (
    activity_heartbeat,
    tool_activity_call,
)


@activity.defn(name="python_test_suite_run")
def python_test_suite_run(workspace: str, parameters: dict[str, Any]) -> dict[str, Any]:
    """Run the suite in ``workspace`` (a writable copy); counts, coverage, failed tests."""

    def call() -> dict[str, Any]:
        p = bundled_parameters("python_test_suite", parameters)
        return run_pytest_suite(
            workspace,
            pytest_args=p["pytest_args"],
            timeout_seconds=p["timeout_seconds"],
            heartbeat=activity_heartbeat,
        )

    return tool_activity_call(call)


ACTIVITIES = [python_test_suite_run]
