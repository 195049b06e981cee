"""The ``forgespace_run_tool`` activity: one external command in a run's sandboxed workspace.

Workflow authors call it through ``Workspace.run_tool`` (see ``forgespace.temporal.api``); it
runs on the workspace's host like every other activity of the run. The command starts through
the process's sandbox (``forgespace.sandbox.current()``): the workspace is its only project
data, read-write unless the run is ``shared``; no network; uid 65534; ``request.limits``.
stdout and stderr go to temporary files of the worker (bounded by the tool's file-size limit)
and their last ``output_bytes`` come back in the result.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import PurePosixPath
from typing import IO

from temporalio import activity
from temporalio.exceptions import ApplicationError, CancelledError

from forgespace import sandbox
from forgespace.errors import SandboxStartError
from forgespace.layout import IsolationMode
from forgespace.temporal.api import RUN_TOOL_ACTIVITY, ToolRequest, ToolResult

HEARTBEAT_INTERVAL = 1.0


def _tail(f: IO[bytes], limit: int) -> str:
    f.seek(0, 2)
    size = f.tell()
    f.seek(max(0, size - limit))
    return f.read().decode("utf-8", "replace")


def _argv(request: ToolRequest) -> list[str]:
    argv = list(request.argv)
    if not argv or not all(isinstance(a, str) and a for a in argv):
        raise ValueError(f"argv must be a non-empty list of non-empty strings, got {argv!r}")
    if argv[0] == "python":
        argv[0] = sys.executable  # the worker's interpreter, as the bundled tools use
    return argv


def _cwd(request: ToolRequest) -> str:
    """The tool's working directory: ``request.cwd`` inside the workspace."""
    rel = PurePosixPath(request.cwd or ".")
    if rel.is_absolute() or ".." in rel.parts:
        raise ValueError(f"cwd {request.cwd!r} must be a path relative to the workspace")
    return str(PurePosixPath(request.workspace) / rel)


def run_tool_sync(request: ToolRequest) -> ToolResult:
    """Run ``request`` to completion (or its timeout); heartbeat when inside an activity.

    Raises ValueError for a bad request and SandboxStartError when the sandbox did not
    come up; a tool that fails or times out is a result (``exit_code``, ``timed_out``).
    """
    mode = IsolationMode.parse(request.workspace_isolation)
    argv = _argv(request)
    limits = sandbox.Limits.from_mapping(request.limits)
    if request.timeout_seconds <= 0:
        raise ValueError(f"timeout_seconds must be positive, got {request.timeout_seconds!r}")
    cwd = _cwd(request)
    box = sandbox.current()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.monotonic()
        tool = box.popen(
            argv,
            workspace=request.workspace,
            writable=mode is not IsolationMode.SHARED,
            cwd=cwd,
            env=sandbox.tool_env(request.env),
            limits=limits,
            stdout=out,
            stderr=err,
        )
        timed_out = _wait(tool, started, request.timeout_seconds)
        stderr = _tail(err, request.output_bytes)
        tool.check_started(stderr.splitlines()[-5:])
        tool.close()
        return ToolResult(
            exit_code=tool.proc.returncode if not timed_out else None,
            stdout=_tail(out, request.output_bytes),
            stderr=stderr,
            timed_out=timed_out,
            sandboxed=tool.sandboxed,
            duration_seconds=round(time.monotonic() - started, 3),
        )


def _wait(tool: sandbox.ToolProcess, started: float, timeout_seconds: float) -> bool:
    """Wait for the tool to end, heartbeating inside an activity; True when it was killed at
    its timeout. Cancelled (or the worker shutting down), the tool is killed and the activity
    raises CancelledError."""
    in_activity = activity.in_activity()
    try:
        while True:
            try:
                tool.proc.wait(timeout=HEARTBEAT_INTERVAL)
                return False
            except subprocess.TimeoutExpired:
                pass
            elapsed = time.monotonic() - started
            if elapsed > timeout_seconds:
                sandbox.kill_tool(tool)
                return True
            if in_activity:
                activity.heartbeat({"phase": "tool", "elapsed_seconds": round(elapsed, 1)})
                if activity.is_cancelled() or activity.is_worker_shutdown():
                    raise CancelledError("activity cancelled")
    except BaseException:
        sandbox.kill_tool(tool)
        tool.close()
        raise


@activity.defn(name=RUN_TOOL_ACTIVITY)
def run_tool(request: ToolRequest) -> ToolResult:
    """Run one command in the run's sandboxed workspace (see the module docstring)."""
    try:
        return run_tool_sync(request)
    except ValueError as exc:
        raise ApplicationError(str(exc), type="ValueError", non_retryable=True) from exc
    except SandboxStartError as exc:
        raise ApplicationError(str(exc), type="SandboxStartError", non_retryable=True) from exc
