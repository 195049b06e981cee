"""Activity of secret_detection: detect-secrets over the shared workspace, values masked."""

from __future__ import annotations

from typing import Any

from temporalio import activity

from forgespace.temporal.parameters import bundled_parameters
from forgespace.workflows._tools.secret_scan import detect_secrets_scan
from forgespace.workflows._tools.workflow_common import (
    activity_heartbeat,
    tool_activity_call,
)


@activity.defn(name="secret_detection_scan")
def secret_detection_scan(workspace: str, parameters: dict[str, Any]) -> dict[str, Any]:
    """Scan the workspace for secrets; only masked values leave the scanning subprocess."""

    def call() -> dict[str, Any]:
        p = bundled_parameters("secret_detection", parameters)
        return detect_secrets_scan(
            workspace,
            max_file_bytes=p["max_file_bytes"],
            timeout_seconds=p["timeout_seconds"],
            heartbeat=activity_heartbeat,
        )

    return tool_activity_call(call)


ACTIVITIES = [secret_detection_scan]
