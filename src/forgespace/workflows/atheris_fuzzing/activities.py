"""Activity of atheris_fuzzing: run the fuzzer in the workspace, heartbeating live stats."""

from __future__ import annotations

from typing import Any

from temporalio import activity

from forgespace.workflows._tools.fuzzing import run_atheris
from forgespace.workflows._tools.workflow_common import (
    activity_heartbeat,
    check_parameters,
    tool_activity_call,
)

PARAMETERS: dict[str, Any] = {
    "target_file": None,
    "max_iterations": 1_000_000,
    "timeout_seconds": 60,
    "max_crashes": 0,
}


@activity.defn(name="atheris_fuzz")
def atheris_fuzz(workspace: str, parameters: dict[str, Any]) -> dict[str, Any]:
    """Fuzz the workspace's TestOneInput; heartbeat details are
    ``{"executions", "exec_per_sec", "corpus_size", "crashes"}``."""

    def call() -> dict[str, Any]:
        p = check_parameters(parameters, PARAMETERS)
        return run_atheris(
            workspace,
            target_file=p["target_file"] or None,
            max_iterations=p["max_iterations"],
            timeout_seconds=p["timeout_seconds"],
            max_crashes=p["max_crashes"],
            heartbeat=activity_heartbeat,
        )

    return tool_activity_call(call)


ACTIVITIES = [atheris_fuzz]
