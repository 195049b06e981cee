"""Activity of cargo_fuzzing: build the fuzz target and run libFuzzer, heartbeating live stats."""

from __future__ import annotations

from typing import Any

from temporalio import activity

from forgespace.workflows._tools.cargo_fuzz import run_cargo_fuzz
from forgespace.workflows._tools.workflow_common import (
    activity_heartbeat,
    check_parameters,
    tool_activity_call,
)

PARAMETERS: dict[str, Any] = {
    "target_name": None,
    "max_iterations": 1_000_000,
    "timeout_seconds": 60,
    "max_len": None,
    "max_crashes": 0,
    "sanitizer": "address",
}


@activity.defn(name="cargo_fuzz")
def cargo_fuzz(workspace: str, parameters: dict[str, Any]) -> dict[str, Any]:
    """Build and fuzz the workspace's cargo-fuzz target; heartbeat details are
    ``{"phase", "executions", "exec_per_sec", "coverage", "corpus_size", "crashes"}``."""

    def call() -> dict[str, Any]:
        # Values are checked against metadata.yaml's schema before the run starts.
        p = check_parameters(parameters, PARAMETERS)
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
