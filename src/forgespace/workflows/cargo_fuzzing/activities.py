"""Activity of cargo_fuzzing: build the fuzz target and run libFuzzer, heartbeating live stats."""

from __future__ import annotations

from typing import Any

from temporalio import activity

from forgespace.temporal.parameters import bundled_parameters
from forgespace.workflows._tools.cargo_fuzz import run_cargo_fuzz
from forgespace.workflows._tools.workflow_common import (
    activity_heartbeat,
    tool_activity_call,
)


@activity.defn(name="cargo_fuzz")
def cargo_fuzz(workspace: str, parameters: dict[str, Any]) -> dict[str, Any]:
    """Build and fuzz the workspace's cargo-fuzz target; heartbeat details are
    ``{"phase", "executions", "exec_per_sec", "coverage", "corpus_size", "crashes"}``."""

    def call() -> dict[str, Any]:
        p = bundled_parameters("cargo_fuzzing", parameters)
        return run_cargo_fuzz(
            workspace,
            target_name=p["target_name"] or None,
            max_iterations=int(p["max_iterations"]),
            timeout_seconds=int(p["timeout_seconds"]),
            max_len=None if p["max_len"] is None else int(p["max_len"]),
            max_crashes=int(p["max_crashes"]),
            sanitizer=str(p["sanitizer"]),
            heartbeat=activity_heartbeat,
        )

    return tool_activity_call(call)


ACTIVITIES = [cargo_fuzz]
