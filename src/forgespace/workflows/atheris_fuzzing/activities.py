"""Activity of atheris_fuzzing: run the fuzzer in the workspace, heartbeating live stats."""

from __future__ import annotations

from typing import Any

from temporalio import activity

from forgespace.temporal.parameters import bundled_parameters
from forgespace.workflows._tools.fuzzing import run_atheris
from forgespace.workflows._tools.workflow_common import (
    activity_heartbeat,
    tool_activity_call,
)


@activity.defn(name="atheris_fuzz")
def atheris_fuzz(workspace: str, parameters: dict[str, Any]) -> dict[str, Any]:
    """Fuzz the workspace's TestOneInput; heartbeat details are
    ``{"executions", "exec_per_sec", "corpus_size", "crashes"}``."""

    def call() -> dict[str, Any]:
        p = bundled_parameters("atheris_fuzzing", parameters)
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
